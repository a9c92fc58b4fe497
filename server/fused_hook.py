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
dot product) and reads the float32 row only where the rigorous bound (`screen_bounds`) cannot
prove the latent silent: bit-identical, a quarter of the bytes.

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
from dataclasses import dataclass, field
from pathlib import Path

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
SCREEN_MAX_TOKENS = 16
"""Sets with more tokens than this in one call skip the screen: their rows, read once, serve every
token from the cache, and the screen's extra work then saves less (direct calls, 2 threads, cold
caches, 500-latent sets, 1.9 % of the pairs computed in full; screen / no screen time: 8 sets of 1,
2, 4, 8, 16 tokens 0.45x, 0.41x, 0.49x, 0.57x, 0.68x; 2 sets of 16 tokens 0.72x, of 32 tokens 0.85x;
on a model's activations about 8 % of the pairs are computed in full, hence the margin)."""
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
    fn = lib.ra_fused_delta
    fn.restype = ctypes.c_int
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ptr, i64, i64, *[ptr] * 11, ctypes.c_int, i64, ctypes.c_int, ptr, ptr, i64, ptr]
    return lib


def _library() -> ctypes.CDLL | None:
    global _LIB
    if _LIB is False:
        with _LOCK:
            if _LIB is False:
                _LIB = _build()
    assert _LIB is not True
    return _LIB


_COUNTS = {"tokens": 0, "screened": 0, "exact": 0}  # this process's kernel work (the vLLM worker's stats)


def counts(reset: bool = False) -> dict[str, int]:
    """Tokens through the kernel, (token, latent) pairs that went through the screen, and of those the
    pairs whose pre-activation was computed in full, since the last reset (as the kernel counts them)."""
    out = dict(_COUNTS)
    if reset:
        for k in _COUNTS:
            _COUNTS[k] = 0
    return out


def available() -> bool:
    """Whether the fused kernel runs here (builds it on the first call: about a second, once per machine)."""
    return _library() is not None


@dataclass(frozen=True)
class SAEArrays:
    """One SAE's weights as the kernel reads them (made once per SAE)."""

    enc_rows: np.ndarray  # [d_sae, d] float32: W_enc transposed, one latent per row
    b_enc: np.ndarray  # [d_sae] float32, with sae-lens's b_dec-to-input term folded in
    floor: np.ndarray  # [d_sae] float32: max(threshold, 0) (0 for ReLU SAEs): z > 0 only above it
    dec: np.ndarray  # [d_sae, d] float32
    enc_q: np.ndarray  # [d_sae, d] int8: the encoder rows quantised, one scale per row (the screen's copy)
    q_scale: np.ndarray  # [d_sae] float32: row i is about q_scale[i] * enc_q[i]
    slack: np.ndarray  # [d_sae] float64: the row's quantisation and float32 rounding per unit ||x|| (`screen_bounds`)
    q_norm: np.ndarray  # [d_sae] float64: ||scale_i q_i||, what the token's own quantisation error is multiplied by
    # [d_sae, 4] float64: (floor_i - b_i, slack_i, q_norm_i, q_scale_i), what the screen reads, one cache line per
    # two latents; derived from the fields above (so `dataclasses.replace` keeps it in step)
    screen_meta: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        room = self.floor.astype(np.float64) - self.b_enc.astype(np.float64)
        meta = np.stack([room, self.slack, self.q_norm, self.q_scale.astype(np.float64)], axis=1)
        object.__setattr__(self, "screen_meta", np.ascontiguousarray(meta))


_U = 2.0**-24  # float32 unit roundoff


def quantise_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, float32 scale per row): row i ~ scale[i] * q[i], |q| <= 127 (round to nearest)."""
    scale = (rows.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


def screen_bounds(enc_rows: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The screen's two per-latent bounds, (slack, q_norm), each with 1 % added for the float64
    arithmetic here and in the kernel. With e the float32 row, q~ = scale * q8 its quantised value (as a
    real vector), x~ = sx xq the token's, s~ = x~ . q~ the kernel's exact integer estimate and
    gamma_n = n u / (1 - n u) (n = d + 8, u = 2^-24):

        |fl(x . e) - s~| <= |x . (e - q~)| + |(x - x~) . q~| + gamma_n |x| . |e|
                         <= ||x|| (||e - q~|| + gamma_n (||e|| + ||q~||)) + ||x - x~|| ||q~||   (Cauchy-Schwarz),

    so slack = ||e - q~|| + gamma_n (||e|| + ||q~||) (the gamma_n ||q~|| term, for a float32 estimate,
    is kept: it only widens the bound) and q_norm = ||q~||."""
    n = enc_rows.shape[1] + 8
    gamma = n * _U / (1 - n * _U)
    slack = np.empty(enc_rows.shape[0], dtype=np.float64)
    q_norm = np.empty(enc_rows.shape[0], dtype=np.float64)
    for lo in range(0, enc_rows.shape[0], 4096):  # in float64, a block of rows at a time
        e = enc_rows[lo:lo + 4096].detach().to(torch.float64)
        qe = q[lo:lo + 4096].detach().to(torch.float64) * scale[lo:lo + 4096].detach().to(torch.float64)[:, None]
        qn = qe.norm(dim=1)
        slack[lo:lo + 4096] = ((e - qe).norm(dim=1) + gamma * (e.norm(dim=1) + qn)).mul(1.01).cpu().numpy()
        q_norm[lo:lo + 4096] = (qn * 1.01).cpu().numpy()
    return slack, q_norm


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
        slack, q_norm = screen_bounds(rows, q, scale)
        return SAEArrays(
            rows.numpy(), b_enc.detach().contiguous().numpy(), floor.contiguous().numpy(),
            W_dec.detach().contiguous().numpy(), q.numpy(), scale.numpy(), slack, q_norm,
        )


@dataclass(frozen=True)
class SetTables:
    """The latent sets of one layer plan, concatenated: set g is ids[offsets[g]:offsets[g + 1]], each
    latent edited to z' = (mul + 1) z + add."""

    offsets: np.ndarray  # [G + 1] int64
    ids: np.ndarray  # [sum S] int64, sorted within each set
    mul: np.ndarray  # [sum S] float32: a - 1
    add: np.ndarray  # [sum S] float32: b


def set_tables(sets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> SetTables:
    """From each set's (latent ids [S], a [S], b [S]). Three concatenations and three conversions in all,
    whatever the number of sets: under load a plan (and so its tables) is new at nearly every step."""
    offsets = np.zeros(len(sets) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(ids) for ids, _, _ in sets])
    if not sets:
        return SetTables(offsets, np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32))
    with torch.no_grad():
        ids = torch.cat([i for i, _, _ in sets]).to("cpu", torch.int64)
        mul = (torch.cat([a for _, a, _ in sets]) - 1.0).to("cpu", torch.float32)
        add = torch.cat([b for _, _, b in sets]).to("cpu", torch.float32)
    return SetTables(offsets, ids.numpy(), mul.numpy(), add.numpy())


def _ptr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def _run(x: np.ndarray, rows: np.ndarray | None, n: int, tok_set: np.ndarray, tables: SetTables, sae: SAEArrays,
         out: np.ndarray, add_input: bool, screen: bool) -> None:
    lib = _library()
    if lib is None:
        raise RuntimeError("the fused hook kernel is not available here (fused_hook.available())")
    d = x.shape[1]
    if sae.enc_rows.shape[1] != d:
        raise ValueError(f"inputs of width {d} for an SAE of width {sae.enc_rows.shape[1]}")
    sets = np.ascontiguousarray(tok_set, dtype=np.int64)
    screened_exact = np.zeros(2, dtype=np.int64)
    rc = lib.ra_fused_delta(
        _ptr(x), n, d, None if rows is None else _ptr(rows), _ptr(sets), _ptr(tables.offsets), _ptr(tables.ids),
        _ptr(tables.mul), _ptr(tables.add), _ptr(sae.enc_rows), _ptr(sae.b_enc), _ptr(sae.floor), _ptr(sae.dec),
        _ptr(out), int(add_input), _BLOCK, max(1, torch.get_num_threads()),
        _ptr(sae.enc_q) if screen else None, _ptr(sae.screen_meta) if screen else None,
        SCREEN_MAX_TOKENS, _ptr(screened_exact),
    )
    if rc != 0:
        raise MemoryError("fused hook kernel: out of memory")
    _COUNTS["tokens"] += n
    _COUNTS["screened"] += int(screened_exact[0])
    _COUNTS["exact"] += int(screened_exact[1])


def fused_delta(x_in: torch.Tensor, tok_set: np.ndarray, tables: SetTables, sae: SAEArrays,
                screen: bool = True) -> torch.Tensor:
    """The sum of each token's edited terms, [n, d] float32, for normalised inputs x_in [n, d] whose set
    (an index into `tables`) is tok_set [n], tokens sorted by set. `screen` skips the float32 encoder
    row of latents the int8 screen proves silent (the result is bit-identical either way; `counts`
    says how often)."""
    x = np.ascontiguousarray(x_in.detach().to(torch.float32).numpy())
    out = np.empty_like(x)
    _run(x, None, x.shape[0], tok_set, tables, sae, out, False, screen)
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
