"""The latent hook fused into one CPU kernel (C, `fused_hook.c`): encode a token's own latents, edit, decode.

The slot path (`interventions.LatentLayerPlan._apply_slots`) places tokens by latent set into a
padded [P, T_max, d] block, encodes it with one `baddbmm` against the SAE's slot pool and decodes
sparsely: about twenty eager ops per layer, plus slot assignment whenever the batch's composition
changes. At a decode step (a token or a few per set) the arithmetic is small and those ops, on
caches the model's weights have just flushed, are most of the hook's time. The kernel does the same
math per token in one pass, reading each latent's encoder row by latent id from the SAE's
transposed encoder (no slots) and adding each non-zero term's decoder row in latent order:

    pre_i = b_i + x . W_enc[:, i];  z_i = pre_i if pre_i > max(theta_i, 0) else 0
    delta = sum_{i in S, in latent order} ((a_i - 1) z_i + b'_i) W_dec[i]

A token's result depends only on the token and its set, so the kernel is batch-invariant by
construction. Past `MAX_TOKENS` tokens of one set in a step (a long prefill) the slot path's `bmm`
is faster and keeps them. For sets of at most `SCREEN_MAX_TOKENS` tokens an exact screen first
estimates each pre-activation from an int8 copy of the row and the token taken to int16 (an integer
dot product), with the token's few massive dimensions (`HEAVY_DIMS`) computed apart in double, and
reads the float32 row only where the rigorous bound (`screen_bounds`) cannot prove the latent silent:
bit-identical, a quarter of the bytes. The screen is bound by memory, and reads a set's int8 rows from
a copy in the set's order (`SAEArrays.set_rows`) as one stream. `StepKernel` is one layer plan's call
with the grouping of tokens by set done in C and the plan's constants bound once.

Why C through ctypes: no library fuses an SAE hook, numba (the obvious JIT) leaves an object in
`llvmlite` that makes vLLM's CPU worker fail to start in any process that imported it, and a torch
C++ extension takes a minute to compile against torch's headers. The C file builds in about a second
with the system's C compiler (`cc -O3 -march=native -fopenmp`, no -ffast-math), once per machine and
source, into `~/.cache/refusal-audit/kernels` (`REFUSAL_AUDIT_KERNEL_DIR`). Where no compiler or no
OpenMP is found the kernel is unavailable and the slot path runs, as before (logged once).

Used where the tensors are float32 on the CPU and every op of a row covers its whole set
(`_GroupBatch.single`); everything else keeps the slot path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MAX_TOKENS = 40
"""Tokens of one latent set in one step past which the slot path's `bmm` is faster. With the kernel on,
a set reaches the slot pool only through a step past this limit, so the kernel's sets are new to the
pool and the slot path would first write their rows into a slot (hook_cost.py --new-sets --latents
2000, 2 threads, cold caches; fused / slot time for 8 sets of T tokens: 0.67x at T = 8, 0.75-0.82x at
20-26, 0.88-1.00x at 32, 0.89x at 40, 1.11-1.14x at 48; for 1 set: 0.74-0.87x at 26-64 tokens; against
sets already in the pool, 8 sets: 1.08x at 8 and 1.21x at 20)."""

_BLOCK = 8
SCREEN_MAX_TOKENS = 40
"""Sets with more tokens than this in one call skip the screen: their rows, read once, serve every
token from the cache, and the screen's extra work then saves less. Screen / no screen kernel time on a
model's activations (Gemma-3-270M's residual stream at 4 layers regrouped into sets of T tokens,
500-latent sets read from their copies, 2 threads, cold caches, 5 % of the pairs computed in full):
0.66x at T = 1, 0.74x at 8, 0.84x at 16, 0.83-0.86x at 24-40, 0.93x at 48. Sets past MAX_TOKENS (40)
leave the kernel anyway."""
SET_ROWS_BUDGET = 64 << 20
"""Bytes of per-set int8 row copies (`SAEArrays.set_rows`) one SAE keeps beyond those its live plans hold
(least recently used dropped first). The screen reads a set's rows from its copy as one stream: with
cold caches, 8 decode tokens of 500-latent sets, 0.69x the kernel time of reading the same rows
scattered through the SAE's table (benchmarks/RESULTS_vllm.md)."""
_SOURCE = Path(__file__).with_name("fused_hook.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", "-lm"]
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable here


def _cache_dir() -> Path:
    """$REFUSAL_AUDIT_KERNEL_DIR, else $XDG_CACHE_HOME/refusal-audit/kernels, else ~/.cache/refusal-audit/kernels."""
    env = os.environ.get("REFUSAL_AUDIT_KERNEL_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "refusal-audit" / "kernels"


def _cpu_key() -> str:
    """What -march=native compiles for: the CPU's model and flags (a shared home across hosts must not
    hand one host's binary to another)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "\n".join(lines) or platform.processor() or platform.machine()


def _build() -> ctypes.CDLL | None:
    """Compile the kernel (or find it compiled) and load it; None where that is not possible here."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("fused hook kernel unavailable: no C compiler (cc / gcc) on PATH; the latent hook keeps the slot path")
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(_FLAGS).encode(), _cpu_key().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"fused_hook-{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                out = Path(tmp) / target.name
                subprocess.run([cc, *_FLAGS, "-o", str(out), str(_SOURCE)], check=True, capture_output=True, timeout=120)
                os.replace(out, target)  # atomic: concurrent builders (tensor-parallel workers) each write whole files
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning("fused hook kernel unavailable (%s%s); the latent hook keeps the slot path",
                    e, f": {detail.decode(errors='replace')[:500]}" if detail else "")
        return None
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    screen: list[Any] = [i64, c_int, ptr, ptr, ptr, i64, i64, ptr]  # block, threads, enc_q, meta, heavy, n_heavy, screen max, counts
    lib.ra_fused_delta.restype = c_int
    lib.ra_fused_delta.argtypes = [ptr, i64, i64, *[ptr] * 12, c_int, *screen]
    lib.ra_fused_step.restype = i64
    lib.ra_fused_step.argtypes = [ptr, i64, i64, ptr, ptr, ptr, c_int, ptr]
    return lib


def _library() -> ctypes.CDLL | None:
    global _LIB
    if _LIB is False:
        with _LOCK:
            if _LIB is False:
                _LIB = _build()
    assert _LIB is not True
    return _LIB


_COUNTS = np.zeros(3, dtype=np.int64)  # this process's kernel work: pairs screened, of them exact, tokens (the C adds)


def counts(reset: bool = False) -> dict[str, int]:
    """Tokens through the kernel, (token, latent) pairs that went through the screen, and of those the
    pairs whose pre-activation was computed in full, since the last reset (as the kernel counts them)."""
    screened, exact, tokens = (int(v) for v in _COUNTS)
    if reset:
        _COUNTS[:] = 0
    return {"tokens": tokens, "screened": screened, "exact": exact}


def available() -> bool:
    """Whether the fused kernel runs here (builds it on the first call: about a second, once per machine)."""
    return _library() is not None


HEAVY_DIMS = 6
"""Dimensions of the token the screen takes apart and computes in double (a residual stream's few massive
ones: with them out, the bound shrinks from ||x|| to ||x_r||; fused_hook.c, "The screen")."""
_META = 8  # float64 per latent in `SAEArrays.screen_meta`: one 64-byte cache line


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose first byte sits on an `align`-byte boundary."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) * dt.itemsize
    raw = np.empty(n + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n].view(dt).reshape(shape)


@dataclass(frozen=True)
class SAEArrays:
    """One SAE's weights as the kernel reads them (made once per SAE)."""

    enc_rows: np.ndarray  # [d_sae, d] float32: W_enc transposed, one latent per row
    b_enc: np.ndarray  # [d_sae] float32, with sae-lens's b_dec-to-input term folded in
    floor: np.ndarray  # [d_sae] float32: max(threshold, 0) (0 for ReLU SAEs): z > 0 only above it
    dec: np.ndarray  # [d_sae, d] float32
    enc_q: np.ndarray  # [d_sae, d] int8: the encoder rows quantised, one scale per row (the screen's copy)
    q_scale: np.ndarray  # [d_sae] float32: row i is about q_scale[i] * enc_q[i]
    q_err: np.ndarray  # [d_sae] float64: ||e_i - q~_i||, the row's quantisation error (`screen_bounds`)
    rounding: np.ndarray  # [d_sae] float64: the exact dot product's float32 rounding per unit ||x||
    q_norm: np.ndarray  # [d_sae] float64: ||q~_i||, what the token's own quantisation error is multiplied by
    # [d_sae, 8] float64, 64-byte aligned: (floor_i - b_i, q_err_i, rounding_i, q_norm_i, q_scale_i, then
    # HEAVY_DIMS float32: row i at the heavy dimensions), what the screen reads, one cache line per latent;
    # derived from the fields above (so `dataclasses.replace` keeps it in step, heavy dimensions unset)
    screen_meta: np.ndarray = field(init=False, repr=False)
    # the heavy dimensions (int64, -1: unused), chosen from the first tokens the screen sees (`set_heavy_dims`)
    heavy: np.ndarray = field(init=False, repr=False)
    heavy_n: np.ndarray = field(init=False, repr=False)  # [1] int64: how many are used; -1 until chosen (once)
    ptrs: tuple[int, ...] = field(init=False, repr=False)  # enc_rows, b_enc, floor, dec, as the kernel takes them
    screen_ptrs: tuple[int, ...] = field(init=False, repr=False)  # enc_q, screen_meta, heavy
    # per-set int8 row copies (`set_rows`): id(set) -> (set, copy), least recently used first; bytes held
    _set_rows: OrderedDict[int, tuple[KernelSet, np.ndarray]] = field(init=False, repr=False)
    _set_rows_bytes: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        meta = _aligned_empty((self.floor.shape[0], _META), np.float64)
        meta[:, 0] = self.floor.astype(np.float64) - self.b_enc.astype(np.float64)
        meta[:, 1] = self.q_err
        meta[:, 2] = self.rounding
        meta[:, 3] = self.q_norm
        meta[:, 4] = self.q_scale
        meta[:, 5:] = 0.0
        object.__setattr__(self, "screen_meta", meta)
        object.__setattr__(self, "heavy", np.full(HEAVY_DIMS, -1, dtype=np.int64))
        object.__setattr__(self, "heavy_n", np.full(1, -1, dtype=np.int64))
        arrays = (self.enc_rows, self.b_enc, self.floor, self.dec, self.enc_q)
        if any(not a.flags.c_contiguous for a in arrays):
            raise ValueError("the kernel's arrays must be C-contiguous")
        object.__setattr__(self, "ptrs", tuple(_ptr(a) for a in arrays[:4]))
        object.__setattr__(self, "screen_ptrs", (_ptr(self.enc_q), _ptr(meta), _ptr(self.heavy)))
        object.__setattr__(self, "_set_rows", OrderedDict())
        object.__setattr__(self, "_set_rows_bytes", [0])

    def set_rows(self, kset: KernelSet) -> np.ndarray | None:
        """The set's int8 encoder rows copied in its order ([S, d], row j latent kset.ids[j]'s), made once
        per (set, SAE): the screen then reads them as one stream. None for a set of more than half the
        SAE's latents (read in order anyway) or of more than a quarter of SET_ROWS_BUDGET. Copies past the
        budget are dropped least recently used first; a caller keeps the ones it uses alive."""
        n, d = len(kset.ids), self.enc_q.shape[1]
        if n == 0 or 2 * n > self.enc_q.shape[0] or 4 * n * d > SET_ROWS_BUDGET:
            return None
        key = id(kset)
        with _LOCK:
            hit = self._set_rows.get(key)
            if hit is not None:
                self._set_rows.move_to_end(key)
                return hit[1]
        rows = _aligned_empty((n, d), np.int8)
        np.take(self.enc_q, kset.ids, axis=0, out=rows)
        with _LOCK:
            hit = self._set_rows.get(key)  # another thread made it meanwhile: keep one
            if hit is not None:
                return hit[1]
            self._set_rows[key] = (kset, rows)  # the set is held, so its id is not reused while cached
            self._set_rows_bytes[0] += rows.nbytes
            while self._set_rows_bytes[0] > SET_ROWS_BUDGET:
                _, (_, old) = self._set_rows.popitem(last=False)
                self._set_rows_bytes[0] -= old.nbytes
        return rows

    def set_heavy_dims(self, dims: np.ndarray) -> bool:
        """Take these dimensions (at most HEAVY_DIMS, distinct) apart in the screen from now on, once per
        arrays (False, and nothing changes, when they are already set: a kernel may be reading them; an
        empty `dims` sets none).
        Changes which pairs the screen computes in full, never a result. The rows' values there go into
        the meta rows before the dimensions are published, so a kernel starting meanwhile reads none."""
        dims = np.asarray(dims, dtype=np.int64).reshape(-1)[:HEAVY_DIMS]
        if len(np.unique(dims)) != len(dims) or ((dims < 0) | (dims >= self.enc_rows.shape[1])).any():
            raise ValueError(f"heavy dimensions must be distinct and in [0, {self.enc_rows.shape[1]}): {dims}")
        with _LOCK:
            if self.heavy_n[0] >= 0:
                return False
            values = self.screen_meta[:, 5:].view(np.float32)  # [d_sae, 6] float32
            values[:, :len(dims)] = self.enc_rows[:, dims]
            self.heavy[:len(dims)] = dims
            self.heavy_n[0] = len(dims)
            return True

    @property
    def n_heavy(self) -> int:
        return max(int(self.heavy_n[0]), 0)


def pick_heavy_dims(x: np.ndarray, k: int = HEAVY_DIMS) -> np.ndarray:
    """The k dimensions with the largest share of the tokens' norms, |x| / ||x|| summed over the finite
    tokens of x [n, d] (a residual stream's massive dimensions are the same at every token)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x).all(axis=1)]
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    share = (np.abs(x) / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)).sum(axis=0)
    return np.argsort(-share, kind="stable")[:k].astype(np.int64)


_U = 2.0**-24  # float32 unit roundoff


def quantise_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, float32 scale per row): row i ~ scale[i] * q[i], |q| <= 127 (round to nearest)."""
    scale = (rows.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


def screen_bounds(enc_rows: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The screen's three per-latent bounds, (q_err, rounding, q_norm), each with 1 % added for the
    float64 arithmetic here and in the kernel. With e the float32 row, q~ = scale * q8 its quantised value
    (as a real vector), x = x_h + x_r the token split into its heavy dimensions and the rest, x~_r = sx xq
    the rest quantised, s~ = x~_r . q~ the kernel's exact integer estimate and gamma_n = n u / (1 - n u)
    (n = d + 8, u = 2^-24):

        |fl(x . e) - x_h . e_h - s~| <= |x_r . (e - q~)| + |(x_r - x~_r) . q~| + gamma_n |x| . |e|
                                     <= ||x_r|| ||e - q~|| + ||x_r - x~_r|| ||q~|| + ||x|| gamma_n (||e|| + ||q~||)

    (Cauchy-Schwarz; x_r is zero at the heavy dimensions, so x_r . (e - q~) only sums the rest; the
    gamma_n ||q~|| term, for a float32 estimate, is kept: it only widens the bound), so q_err = ||e - q~||,
    rounding = gamma_n (||e|| + ||q~||) and q_norm = ||q~||."""
    n = enc_rows.shape[1] + 8
    gamma = n * _U / (1 - n * _U)
    q_err = np.empty(enc_rows.shape[0], dtype=np.float64)
    rounding = np.empty(enc_rows.shape[0], dtype=np.float64)
    q_norm = np.empty(enc_rows.shape[0], dtype=np.float64)
    for lo in range(0, enc_rows.shape[0], 4096):  # in float64, a block of rows at a time
        e = enc_rows[lo:lo + 4096].detach().to(torch.float64)
        qe = q[lo:lo + 4096].detach().to(torch.float64) * scale[lo:lo + 4096].detach().to(torch.float64)[:, None]
        qn = qe.norm(dim=1)
        q_err[lo:lo + 4096] = ((e - qe).norm(dim=1) * 1.01).cpu().numpy()
        rounding[lo:lo + 4096] = (gamma * (e.norm(dim=1) + qn) * 1.01).cpu().numpy()
        q_norm[lo:lo + 4096] = (qn * 1.01).cpu().numpy()
    return q_err, rounding, q_norm


def sae_arrays(enc_rows: torch.Tensor | None, b_enc: torch.Tensor, threshold: torch.Tensor | None,
               W_dec: torch.Tensor) -> SAEArrays | None:
    """The kernel's view of an SAE, or None where it cannot run (not float32 on the CPU, no encoder rows)."""
    tensors = [t for t in (enc_rows, b_enc, threshold, W_dec) if t is not None]
    if enc_rows is None or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    with torch.no_grad():
        rows = enc_rows.detach().contiguous()
        q, scale = quantise_rows(rows)
        floor = torch.zeros_like(b_enc) if threshold is None else threshold.detach().clamp(min=0.0)
        q_err, rounding, q_norm = screen_bounds(rows, q, scale)
        return SAEArrays(
            rows.numpy(), b_enc.detach().contiguous().numpy(), floor.contiguous().numpy(),
            W_dec.detach().contiguous().numpy(), q.numpy(), scale.numpy(), q_err, rounding, q_norm,
        )


@dataclass(frozen=True)
class KernelSet:
    """One latent set as the kernel reads it, each latent edited to z' = (mul + 1) z + add. Made once per
    set (the group constants' cache keeps it), so that a plan's tables are only its sets' addresses."""

    ids: np.ndarray  # [S] int64, sorted
    mul: np.ndarray  # [S] float32: a - 1 (computed in float32, as the slot path does)
    add: np.ndarray  # [S] float32: b
    addr: tuple[int, int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        arrays = (np.ascontiguousarray(self.ids, dtype=np.int64), np.ascontiguousarray(self.mul, dtype=np.float32),
                  np.ascontiguousarray(self.add, dtype=np.float32))
        if not arrays[0].shape == arrays[1].shape == arrays[2].shape or arrays[0].ndim != 1:
            raise ValueError(f"a set's ids, mul and add must be [S] alike (got {[a.shape for a in arrays]})")
        for name, a in zip(("ids", "mul", "add"), arrays, strict=True):
            object.__setattr__(self, name, a)
        object.__setattr__(self, "addr", (_ptr(arrays[0]), _ptr(arrays[1]), _ptr(arrays[2])))


def kernel_set(ids: np.ndarray | torch.Tensor, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> KernelSet:
    """A set's latent ids [S] and edits z' = a z + b ([S] each; mul = a - 1 in float32)."""
    def host(v: np.ndarray | torch.Tensor) -> np.ndarray:
        return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    return KernelSet(host(ids).astype(np.int64), host(a).astype(np.float32) - np.float32(1.0), host(b).astype(np.float32))


@dataclass(frozen=True)
class SetTables:
    """The latent sets of one layer plan, as the kernel takes them: per set its length and the addresses
    of its three arrays (the sets themselves are kept, so that the addresses stay valid)."""

    sets: tuple[KernelSet, ...]
    lens: np.ndarray = field(init=False, repr=False)  # [G] int64
    addrs: np.ndarray = field(init=False, repr=False)  # [3, G] uint64: ids, mul, add of each set
    ptrs: tuple[int, ...] = field(init=False, repr=False)  # lens, then the three address rows

    def __post_init__(self) -> None:
        lens = np.fromiter((len(s.ids) for s in self.sets), dtype=np.int64, count=len(self.sets))
        addrs = np.zeros((3, len(self.sets)), dtype=np.uint64)
        if self.sets:
            addrs[:] = np.array([s.addr for s in self.sets], dtype=np.uint64).T
        object.__setattr__(self, "lens", lens)
        object.__setattr__(self, "addrs", addrs)
        object.__setattr__(self, "ptrs", (_ptr(lens), _ptr(addrs[0]), _ptr(addrs[1]), _ptr(addrs[2])))

    @property
    def n_sets(self) -> int:
        return len(self.sets)


def set_tables(sets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> SetTables:
    """From each set's (latent ids [S], a [S], b [S])."""
    return SetTables(tuple(kernel_set(ids, a, b) for ids, a, b in sets))


def _ptr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def _lib() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the fused hook kernel is not available here (fused_hook.available())")
    return lib


def _screen_args(sae: SAEArrays, screen: bool) -> tuple[Any, ...]:
    """ra_fused_delta's trailing arguments: block, threads, the screen's arrays (None: no screen), counts."""
    enc_q, meta, heavy = sae.screen_ptrs
    return (_BLOCK, max(1, torch.get_num_threads()), enc_q if screen else None, meta if screen else None, heavy,
            sae.n_heavy if screen else 0, SCREEN_MAX_TOKENS, _ptr(_COUNTS))


def _check_width(d: int, sae: SAEArrays) -> None:
    if sae.enc_rows.shape[1] != d:
        raise ValueError(f"inputs of width {d} for an SAE of width {sae.enc_rows.shape[1]}")


def _choose_heavy(sae: SAEArrays, x: np.ndarray) -> None:
    """The first tokens screened with an SAE choose its heavy dimensions (once)."""
    if sae.heavy_n[0] < 0 and x.shape[0]:
        sae.set_heavy_dims(pick_heavy_dims(x))


def _set_rows_table(tables: SetTables, sae: SAEArrays) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """The kernel's `set_q`: [G] uint64, each set's int8 row copy's address (0: none, its rows are read from
    the SAE's table), and the copies, which the caller keeps while the kernel may read them."""
    copies = [sae.set_rows(s) for s in tables.sets]
    return np.array([0 if c is None else _ptr(c) for c in copies], dtype=np.uint64), copies


def _run(x: np.ndarray, rows: np.ndarray | None, n: int, tok_set: np.ndarray, tables: SetTables, sae: SAEArrays,
         out: np.ndarray, add_input: bool, screen: bool, set_rows: bool = True) -> None:
    lib = _lib()
    d = x.shape[1]
    _check_width(d, sae)
    sets = np.ascontiguousarray(tok_set, dtype=np.int64)
    if screen:
        _choose_heavy(sae, x if rows is None else x[rows[:n]])
    set_q, copies = _set_rows_table(tables, sae) if screen and set_rows else (None, [])
    rc = lib.ra_fused_delta(
        _ptr(x), n, d, None if rows is None else _ptr(rows), _ptr(sets), *tables.ptrs,
        None if set_q is None else _ptr(set_q), *sae.ptrs, _ptr(out), int(add_input), *_screen_args(sae, screen),
    )
    del copies  # held through the call
    if rc != 0:
        raise MemoryError("fused hook kernel: out of memory")


class _StepArgs(ctypes.Structure):
    """fused_hook.c's `ra_step_args`: every field 8 bytes, in its order."""

    _fields_ = [(name, ctypes.c_void_p if kind == "p" else ctypes.c_int64) for name, kind in (
        ("row_set", "p"), ("n_rows", "i"), ("n_sets", "i"), ("max_tokens", "i"), ("set_len", "p"), ("set_ids", "p"),
        ("set_mul", "p"), ("set_add", "p"), ("set_q", "p"), ("enc_rows", "p"), ("b_enc", "p"), ("floor", "p"), ("dec", "p"), ("enc_q", "p"),
        ("meta", "p"), ("heavy", "p"), ("heavy_n", "p"), ("screen_max_tokens", "i"), ("block", "i"), ("counts", "p"),
    )]


class StepKernel:
    """One layer plan's kernel, grouping included, its constant arguments prepared once: a call costs
    one C call and a few Python operations. At a decode step the interpreter's own data is as cold as
    the SAE rows (the model's weights have just passed through the caches), so each Python operation
    saved is worth several microseconds there.

    `row_set[r]`: row r's set in `tables` (-1: none). Sets with more than `max_tokens` (MAX_TOKENS)
    tokens in a call are left unedited for the caller (the slot path)."""

    def __init__(self, row_set: np.ndarray, tables: SetTables, sae: SAEArrays, max_tokens: int | None = None,
                 screen: bool = True) -> None:
        self.lib = _lib()
        self.row_set = np.ascontiguousarray(row_set, dtype=np.int64)
        self.tables, self.sae, self.screen = tables, sae, screen
        self.max_tokens = MAX_TOKENS if max_tokens is None else int(max_tokens)
        self.width = sae.enc_rows.shape[1]
        enc_q, meta, heavy = sae.screen_ptrs
        # the sets' int8 row copies, held as long as this kernel (the SAE's cache may drop them sooner)
        self.set_q, self.set_rows = _set_rows_table(tables, sae) if screen else (np.zeros(tables.n_sets, np.uint64), [])
        self.args = _StepArgs(
            _ptr(self.row_set), self.row_set.shape[0], tables.n_sets, self.max_tokens, *tables.ptrs, _ptr(self.set_q),
            *sae.ptrs, enc_q if screen else None, meta, heavy, _ptr(sae.heavy_n), SCREEN_MAX_TOKENS, _BLOCK,
            _ptr(_COUNTS),
        )
        self.args_ref = ctypes.byref(self.args)

    def __call__(self, h: torch.Tensor, tok_row: np.ndarray) -> tuple[torch.Tensor, np.ndarray | None]:
        """h [..., N, d] (float32, contiguous, CPU; leading dims of size 1), token t of row tok_row[t]
        (int64 [N], -1: none) -> (a new stream, h's shape, with every taken set's tokens edited and the
        others copied; None, or a [G] bool mask of the sets left unedited)."""
        tok_row = self._check(h, tok_row)
        out = torch.empty_like(h)
        return out, self._call(h, tok_row, out, None)

    def in_place(self, stream: torch.Tensor, residual: torch.Tensor | None, tok_row: np.ndarray) -> np.ndarray | None:
        """The same edit written into `stream` itself, after adding `residual` (vLLM's hidden / residual pair;
        same shape, zeroed here) into it: their sum, the stream the next layer reads, is then `stream`.
        Returns None, or the [G] bool mask of the sets left unedited."""
        tok_row = self._check(stream, tok_row)
        if residual is not None and (residual.shape != stream.shape or residual.dtype != torch.float32
                                     or not residual.is_contiguous() or residual.device.type != "cpu"):
            raise ValueError(f"residual {residual.dtype} {tuple(residual.shape)} does not match the stream")
        return self._call(stream, tok_row, stream, residual)

    def _check(self, h: torch.Tensor, tok_row: np.ndarray) -> np.ndarray:
        n, d = h.shape[-2], h.shape[-1]
        if tok_row.dtype != np.int64 or not tok_row.flags.c_contiguous:
            tok_row = np.ascontiguousarray(tok_row, dtype=np.int64)
        if (h.dtype != torch.float32 or not h.is_contiguous() or h.device.type != "cpu" or d != self.width
                or h.numel() != n * d or tok_row.shape != (n,)):
            raise ValueError(f"StepKernel needs a contiguous float32 stream [N, {self.width}] on the CPU and tok_row "
                             f"[N] (got {h.dtype} {tuple(h.shape)} on {h.device}, tok_row {tok_row.shape})")
        if self.screen and self.sae.heavy_n[0] < 0:
            _choose_heavy(self.sae, h.detach().reshape(n, d).numpy()[tok_row >= 0])
        return tok_row

    def _call(self, h: torch.Tensor, tok_row: np.ndarray, out: torch.Tensor, residual: torch.Tensor | None) -> np.ndarray | None:
        n_left = self.lib.ra_fused_step(h.data_ptr(), tok_row.shape[0], self.width, tok_row.ctypes.data, out.data_ptr(),
                                        None if residual is None else residual.data_ptr(),
                                        max(1, torch.get_num_threads()), self.args_ref)
        if n_left < 0:
            raise MemoryError("fused hook kernel: out of memory")
        if n_left == 0:
            return None
        r = tok_row[(tok_row >= 0) & (tok_row < self.row_set.shape[0])]
        g = self.row_set[r]
        per_set = np.bincount(g[g >= 0], minlength=self.tables.n_sets)
        left: np.ndarray = per_set > self.max_tokens
        return left


def fused_step(h: torch.Tensor, tok_row: np.ndarray, row_set: np.ndarray, tables: SetTables, sae: SAEArrays,
               max_tokens: int | None = None, screen: bool = True) -> tuple[torch.Tensor, np.ndarray | None]:
    """`StepKernel(row_set, tables, sae, max_tokens, screen)(h, tok_row)`, for one call."""
    return StepKernel(row_set, tables, sae, max_tokens, screen)(h, tok_row)


def fused_delta(x_in: torch.Tensor, tok_set: np.ndarray, tables: SetTables, sae: SAEArrays,
                screen: bool = True, set_rows: bool = True) -> torch.Tensor:
    """The sum of each token's edited terms, [n, d] float32, for normalised inputs x_in [n, d] whose set
    (an index into `tables`) is tok_set [n], tokens sorted by set. `screen` skips the float32 encoder
    row of latents the int8 screen proves silent (the result is bit-identical either way; `counts`
    says how often); `set_rows`: the screen reads the sets' int8 row copies (`SAEArrays.set_rows`),
    else the SAE's table (bit-identical too)."""
    x = np.ascontiguousarray(x_in.detach().to(torch.float32).numpy())
    out = np.empty_like(x)
    _run(x, None, x.shape[0], tok_set, tables, sae, out, False, screen, set_rows)
    return torch.from_numpy(out)


def fused_edit(h: torch.Tensor, tokens: np.ndarray, tok_set: np.ndarray, tables: SetTables, sae: SAEArrays,
               screen: bool = True) -> torch.Tensor:
    """h [N, d] (float32, contiguous, on the CPU) with rows `tokens` edited in one pass: row + its
    summed terms (fused_delta's, computed from the row itself: an SAE without input normalisation).
    A new tensor; rows not in `tokens` are copies."""
    x = h.detach().numpy()
    if not x.flags.c_contiguous or x.dtype != np.float32:
        raise ValueError("fused_edit needs a contiguous float32 stream")
    out = h.detach().clone()
    rows = np.ascontiguousarray(tokens, dtype=np.int64)
    _run(x, rows, rows.shape[0], tok_set, tables, sae, out.numpy(), True, screen)
    return out
