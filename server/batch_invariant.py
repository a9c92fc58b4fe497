"""Batch-invariant forward passes for the HF engine: a row's numbers do not depend on its batch-mates.

Three things make a row of a padded CPU batch differ from the same row run alone (docs/interventions.md,
"Batch invariance"); the first two are removed here, the third by the intervention plan
(`compile_plan(batch_invariant=True)`: every latent layer takes the slot path with a sparse decode,
whatever the batch holds, instead of a path chosen by the batch's size and count of terms):

* **Matmul sizes.** A BLAS picks its kernel by the sizes M and N of a call, and the kernels reduce
  over K in different orders: MKL on AVX-512 rounds a row one way at M = 1, another at M = 2-3, the
  1-3 tail rows of a 5-11 row call in yet another, and an entry differently again when N < 12. So a
  token's projection rounds differently with 0, 1 or 5 batch-mates, and a latent's pre-activation
  with the width of the set it is encoded with. `InvariantMatmuls` pads every matmul with fewer
  rows or columns than the BLAS's *floor* up to it with zeros, so every entry of every call goes
  through the same large-size kernel. The floor is measured, not assumed: `row_floor` compares
  calls of many sizes with the same entries computed in calls of exactly f rows, once per (K, dtype,
  device, threads). A BLAS with no floor up to 64 raises `NoRowFloor`.
  On CPU, float32 `F.linear` (every projection of the model and its LM head) goes to oneDNN's
  inner product instead (`torch.ops.mkldnn._linear_pointwise`, the op Inductor lowers CPU linears
  to), where its floor is measured too: it is 2 on the x86 hosts measured (MKL: 12), and oneDNN is
  2-3x faster than MKL there for the 262k-row LM head (docs/engines.md, "Batch-invariant mode").
* **Padding inside attention.** A left-padded row attends over a longer, masked key axis through
  another kernel (an explicit mask instead of `is_causal`), so its softmax sums in another order.
  The "rows" attention implementations (`rows-sdpa`, `rows-eager`) run each row on its own unpadded
  queries and keys through the model's own attention function: exactly the call the row alone makes.

The rest of a decoder forward is per token or reduces along one token's hidden axis (norms, rotary,
activations, the SAE decode's `embedding_bag` in latent order), which no batch-mate changes.
`tests/test_batch_invariant.py` checks bit-equality end to end; docs/engines.md has the costs.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

log = logging.getLogger("refusal_audit.server.batch_invariant")

ROWS_PREFIX = "rows-"
_MAX_FLOOR = 64
# sizes probed beyond [floor, 2 x floor + 3]: around the blocking boundaries BLASes switch at
_PROBE_SIZES = (31, 32, 33, 47, 64, 65, 96, 100, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1000, 1031)
_PROBE_WIDE = 96  # the other dimension while one is varied
_PROBE_ROWS = 1031
_PROBE_LONG = (2047, 2048, 4096, 4099)  # the floor found is checked on calls this long too

_floors: dict[tuple[int, torch.dtype, str, int, str], int | None] = {}  # None: no floor found
_onednn_floors: dict[tuple[int, int, str], int | None] = {}  # (K, threads, precision); None: not usable


class NoRowFloor(RuntimeError):
    """This BLAS rounds an entry differently at every matmul size probed: no padding makes it invariant."""


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`t` with zeros appended along `dim` up to `size` (`t` itself when it is that long already)."""
    if t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, k] @ weight [n, k].T (+ bias) through oneDNN's inner product (float32 on CPU)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _probe(k: int, dtype: torch.dtype, device: torch.device, onednn: bool = False) -> int | None:
    """The smallest f <= 64 such that an [M, k] @ [k, N] matmul's entry does not depend on M or N
    once both are at least f.

    For each candidate f the reference is every entry computed in calls of exactly f rows; calls of
    every M in [f, 2f + 3] (and a spread of larger M) at a wide N, of every N in the same range at
    M = 40, and of M = N, must give each entry bit-identically; the f found is then checked on calls
    of up to 4,099 rows (a long prefill). (MKL on AVX-512: a call with fewer than 12 rows or columns
    takes other kernels, and the 1-3 tail rows of a 5-11 row call yet others.)"""
    g = torch.Generator(device="cpu").manual_seed(1234 + k)
    x = torch.randn(_PROBE_LONG[-1], k, generator=g).to(dtype=dtype, device=device)
    w = torch.randn(k, max(_PROBE_SIZES), generator=g).to(dtype=dtype, device=device)
    w_rows = w.T.contiguous()  # oneDNN's linear takes the weight as rows, as nn.Linear stores it

    def mm(a: torch.Tensor, cols: int) -> torch.Tensor:
        return _onednn_linear(a, w_rows[:cols]) if onednn else a @ w[:, :cols]

    def chunked(rows: int, f: int, cols: int) -> torch.Tensor:
        padded = _pad(x[:rows], 0, -(-rows // f) * f)
        return torch.cat([mm(padded[i : i + f], cols) for i in range(0, padded.shape[0], f)])

    for f in range(1, _MAX_FLOOR + 1):
        ref = chunked(_PROBE_ROWS, f, w.shape[1])
        sizes = [*range(f, 2 * f + 4), *(n for n in _PROBE_SIZES if n >= f)]
        wide = max(_PROBE_WIDE, f)
        ok = all(torch.equal(mm(x[:m], wide), ref[:m, :wide]) for m in sizes)
        ok = ok and all(torch.equal(mm(x[:40], n), ref[:40, :n]) for n in sizes)
        ok = ok and all(torch.equal(mm(x[:n], n), ref[:n, :n]) for n in sizes)
        if ok:
            long_ref = chunked(_PROBE_LONG[-1], f, _PROBE_WIDE)
            if all(torch.equal(mm(x[:m], _PROBE_WIDE), long_ref[:m]) for m in _PROBE_LONG):
                return f
            return None
    return None


def _precision() -> str:
    """oneDNN's float32 matmul precision ("bf16" inside the demo's `bf16_matmuls`): it changes the kernels."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    return str(getattr(matmul, "fp32_precision", ""))


def row_floor(k: int, dtype: torch.dtype, device: torch.device) -> int:
    """The measured floor (rows and columns) of matmuls reducing over `k`, cached per dtype, device
    and thread count."""
    key = (k, dtype, str(device), torch.get_num_threads(), _precision())
    if key not in _floors:
        _floors[key] = _probe(k, dtype, device)  # inside the mode's handler the mode is off
        log.info("matmul floor for K=%d %s on %s, %d threads: %s", k, dtype, device, key[3], _floors[key])
    floor = _floors[key]
    if floor is None:
        raise NoRowFloor(f"the BLAS rounds an entry of a K={k} {dtype} matmul differently at every size up to "
                         f"{_MAX_FLOOR}: batch-invariant matmuls are not possible on this build")
    return floor


def onednn_floor(k: int, dtype: torch.dtype, device: torch.device) -> int | None:
    """The measured floor of oneDNN's linear for K=k (float32 on CPU), cached per thread count and
    precision; None where oneDNN is not built in, the op fails, or no floor up to 64 exists."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    key = (k, torch.get_num_threads(), _precision())
    if key not in _onednn_floors:
        try:
            _onednn_floors[key] = _probe(k, dtype, device, onednn=True)
        except Exception as exc:  # noqa: BLE001 - an op missing from this build, or failing on this CPU
            log.info("oneDNN linear unavailable (%s): matmuls go to the BLAS", exc)
            _onednn_floors[key] = None
        log.info("oneDNN linear floor for K=%d, %d threads: %s", k, key[1], _onednn_floors[key])
    return _onednn_floors[key]


def _floor_of(a: torch.Tensor) -> int:
    """The floor for a matmul whose left operand is `a` (it reduces over a's last axis)."""
    return row_floor(a.shape[-1], a.dtype, a.device)


def _pad_term(t: Any, m: int, n: int, f: int) -> Any:
    """An added term ([..., m or 1, n or 1]) padded like the product it is added to ([..., f, f])."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    if t.shape[-1] == n and n != 1:
        t = _pad(t, t.dim() - 1, f)
    if t.dim() >= 2 and t.shape[-2] == m and m != 1:
        t = _pad(t, t.dim() - 2, f)
    return t


# The handlers take torch's own parameter names, so keyword calls (`F.linear(x, w, bias=b)`) reach
# them. Each pads the rows (M) and the columns (N) of a small matmul up to the floor with zeros and
# slices the product back; an added term is padded to match.


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    x = input
    if x.dim() < 2:
        return F.linear(x, weight, bias)
    m, n = x.numel() // max(1, x.shape[-1]), weight.shape[0]
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)  # the op has no backward
    g = None if grad or weight.dim() != 2 or not weight.is_contiguous() else onednn_floor(x.shape[-1], x.dtype, x.device)
    if g is not None and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
        b = None if bias is None else _pad(bias, 0, g)
        out = _onednn_linear(_pad(x.reshape(m, x.shape[-1]), 0, g).contiguous(), _pad(weight, 0, g), b)[:m, :n]
        return out.reshape(*x.shape[:-1], n)
    f = _floor_of(x)
    if m >= f and n >= f:
        return F.linear(x, weight, bias)
    bias = None if bias is None else _pad_term(bias, -1, n, f)
    out = F.linear(_pad(x.reshape(m, x.shape[-1]), 0, f), _pad(weight, 0, f), bias)[:m, :n]
    return out.reshape(*x.shape[:-1], n)


def _matmul(input: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    a, b = input, other
    if a.dim() < 2 or b.dim() < 2:
        return torch.matmul(a, b)
    f = _floor_of(a)
    n = b.shape[-1]
    folded = b.dim() == 2  # [..., K] @ [K, N] is one [prod(a.shape[:-1]), K] matmul
    m = a.numel() // max(1, a.shape[-1]) if folded else a.shape[-2]
    if m >= f and n >= f:
        return torch.matmul(a, b)
    b = _pad(b, b.dim() - 1, f)
    if folded:
        out = torch.matmul(_pad(a.reshape(m, a.shape[-1]), 0, f), b)[:m, :n]
        return out.reshape(*a.shape[:-1], n)
    return torch.matmul(_pad(a, a.dim() - 2, f), b)[..., :m, :n]


def _addmm(input: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta: Any = 1, alpha: Any = 1) -> torch.Tensor:
    m, n, f = mat1.shape[0], mat2.shape[1], _floor_of(mat1)
    if m >= f and n >= f:
        return torch.addmm(input, mat1, mat2, beta=beta, alpha=alpha)
    return torch.addmm(_pad_term(input, m, n, f), _pad(mat1, 0, f), _pad(mat2, 1, f), beta=beta, alpha=alpha)[:m, :n]


def _bmm(input: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    m, n, f = input.shape[1], mat2.shape[2], _floor_of(input)
    if m >= f and n >= f:
        return torch.bmm(input, mat2)
    return torch.bmm(_pad(input, 1, f), _pad(mat2, 2, f))[:, :m, :n]


def _baddbmm(input: torch.Tensor, batch1: torch.Tensor, batch2: torch.Tensor, *, beta: Any = 1,
             alpha: Any = 1) -> torch.Tensor:
    m, n, f = batch1.shape[1], batch2.shape[2], _floor_of(batch1)
    if m >= f and n >= f:
        return torch.baddbmm(input, batch1, batch2, beta=beta, alpha=alpha)
    return torch.baddbmm(_pad_term(input, m, n, f), _pad(batch1, 1, f), _pad(batch2, 2, f), beta=beta,
                         alpha=alpha)[:, :m, :n]


_HANDLERS: dict[Any, Callable[..., torch.Tensor]] = {
    F.linear: _linear,
    torch.matmul: _matmul, torch.Tensor.matmul: _matmul, torch.Tensor.__matmul__: _matmul,
    torch.mm: _matmul, torch.Tensor.mm: _matmul,
    torch.addmm: _addmm, torch.Tensor.addmm: _addmm,
    torch.bmm: _bmm, torch.Tensor.bmm: _bmm,
    torch.baddbmm: _baddbmm, torch.Tensor.baddbmm: _baddbmm,
}


class InvariantMatmuls(TorchFunctionMode):
    """Pads every matmul with fewer rows or columns than the BLAS's floor up to the floor (zeros), so
    an entry of the product does not depend on how many rows or columns share its call. Entered
    around a forward pass.

    A `TorchFunctionMode` (~1.5 us per torch call; a `TorchDispatchMode` costs ~6 us) that sees the
    Python-level matmul entry points. `torch.einsum` is not among them: code on the per-token path
    writes its contractions as matmuls."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None or "out" in kwargs:
            if func is torch.Tensor.__rmatmul__:
                return _matmul(args[1], args[0])
            return func(*args, **kwargs)
        return handler(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- attention

_starts: contextvars.ContextVar[tuple[int, list[int]] | None] = contextvars.ContextVar("ra_padding", default=None)


@contextlib.contextmanager
def padded_batch(key_valid: torch.Tensor) -> Iterator[None]:
    """Tell the "rows" attention where this forward's padding is: `key_valid` [B, T] (bool or 0/1),
    one column per token of the whole sequence so far (cache and this forward's tokens). Rows must
    be left-padded (each row's real tokens a suffix), as the HF engine pads them."""
    valid = key_valid.bool()
    T = valid.shape[1]
    starts = T - valid.sum(1)
    if not torch.equal(valid, torch.arange(T, device=valid.device) >= starts.unsqueeze(1)):
        raise ValueError("padded_batch: every row's real tokens must be a suffix (left padding)")
    token = _starts.set((T, starts.tolist()))
    try:
        yield
    finally:
        _starts.reset(token)


def _row_attention(inner: Callable[..., tuple[torch.Tensor, Any]]) -> Callable[..., tuple[torch.Tensor, Any]]:
    def attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        padding = _starts.get()
        if padding is None:  # a forward that did not say where its padding is: the model's own attention
            return inner(module, query, key, value, attention_mask, **kwargs)
        T, starts = padding
        B, _, Tq, _ = query.shape
        Tk = key.shape[2]
        cut = T - Tk  # a sliding-window cache layer keeps only the last Tk keys
        window = kwargs.get("sliding_window")
        out = query.new_zeros(B, Tq, query.shape[1], value.shape[-1])
        for b in range(B):
            ks = max(0, starts[b] - cut)  # the row's first real key, and its first real query:
            qs = max(0, ks - (Tk - Tq))  # query j is key column Tk - Tq + j
            if qs >= Tq:
                continue
            q = query[b : b + 1, :, qs:].contiguous()
            k = key[b : b + 1, :, ks:].contiguous()
            v = value[b : b + 1, :, ks:].contiguous()
            if window is None or k.shape[2] <= window:
                mask = None  # the row alone is plain causal: the same call as an unpadded batch of one
            elif attention_mask is None:
                raise RuntimeError("rows attention: a sliding window needs the model's materialised mask")
            else:
                mask = attention_mask[b : b + 1, :, qs:, ks:].contiguous()
            o, _ = inner(module, q, k, v, mask, **kwargs)
            out[b, qs:] = o[0]
        return out, None

    return attend


def _materialised(mask_fn: Callable[..., Any]) -> Callable[..., Any]:
    """The mask function, never skipping the mask for `is_causal`: a long row's window slices it."""
    def make(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_is_causal_skip"] = False  # eager_mask drops it
        return mask_fn(*args, **kwargs)

    return make


def register_row_attention() -> None:
    """Register `rows-sdpa` and `rows-eager` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name in ("sdpa", "eager"):
        inner = ALL_ATTENTION_FUNCTIONS.get(name) if name != "eager" else None
        AttentionInterface.register(ROWS_PREFIX + name, _row_attention(inner) if inner else _eager_rows)
        AttentionMaskInterface.register(ROWS_PREFIX + name, _materialised(ALL_MASK_ATTENTION_FUNCTIONS[name]))


def _eager_rows(module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The model's own eager attention (its modelling module defines it), one row at a time."""
    inner = sys.modules[type(module).__module__].eager_attention_forward
    return _row_attention(inner)(module, *args, **kwargs)


def use_row_attention(model: Any) -> str:
    """Switch `model` to the "rows" variant of its attention implementation; returns the new name."""
    register_row_attention()
    current = str(model.config._attn_implementation or "eager")
    if current.startswith(ROWS_PREFIX):
        return current
    if current not in ("sdpa", "eager"):
        raise ValueError(f"batch-invariant attention supports sdpa and eager, not {current!r}")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("attention_chunk_size", "use_bidirectional_attention"):
        if getattr(cfg, attr, None):  # masks that are not causal + sliding window: rows attention assumes those
            raise ValueError(f"batch-invariant attention assumes causal (and sliding-window) masks; this model sets {attr}")
    model.set_attn_implementation(ROWS_PREFIX + current)
    return ROWS_PREFIX + current
