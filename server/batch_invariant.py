"""Batch-invariant forward passes for the HF engine: a row's numbers do not depend on its batch-mates.

Two things make a row of a padded CPU batch differ from the same row run alone (docs/interventions.md,
"Batch invariance"), and each is removed here:

* **Matmul row count.** A BLAS picks its kernel by the number of rows M of a call, and the kernels
  reduce over K in different orders: MKL on AVX-512 rounds a row one way at M = 1, another at
  M = 2-3, and the 1-3 tail rows of a 5-11 row call in yet another, so a token's projection rounds
  differently with 0, 1 or 5 batch-mates. `InvariantMatmuls` pads every matmul with fewer rows than
  the BLAS's *row floor* up to it with zero rows, so every row of every call goes through the same
  large-M kernel. The floor is measured, not assumed: `row_floor` compares every row of calls of
  every size up to 128 (and a spread beyond) with the same rows computed in calls of exactly M0
  rows, once per (K, dtype, device, threads). A BLAS with no floor up to 64 raises `NoRowFloor`.
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
# row counts compared beyond 2 x _MAX_FLOOR: sizes around the blocking boundaries BLASes switch at
_PROBE_LARGE = (129, 255, 256, 257, 511, 512, 513, 1000, 1024, 1031)

_floors: dict[tuple[int, torch.dtype, str, int], int | None] = {}  # None: no floor found


class NoRowFloor(RuntimeError):
    """This BLAS rounds a row differently at every row count probed: no padding makes it invariant."""


def _pad_rows(t: torch.Tensor, dim: int, rows: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = rows - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _probe(k: int, dtype: torch.dtype, device: torch.device) -> int | None:
    """The smallest row count M0 <= 64 from which no row's matmul result depends on the call's M."""
    g = torch.Generator(device="cpu").manual_seed(1234 + k)
    big = max(_PROBE_LARGE)
    x = torch.randn(big, k, generator=g).to(dtype=dtype, device=device)
    w = torch.randn(k, 96, generator=g).to(dtype=dtype, device=device)
    calls = {m: x[:m] @ w for m in (*range(1, 2 * _MAX_FLOOR + 1), *_PROBE_LARGE)}
    for m0 in range(1, _MAX_FLOOR + 1):
        padded = _pad_rows(x, 0, -(-big // m0) * m0)
        ref = torch.cat([padded[i : i + m0] @ w for i in range(0, padded.shape[0], m0)])
        if all(torch.equal(out, ref[:m]) for m, out in calls.items() if m >= m0):
            return m0
    return None


def row_floor(k: int, dtype: torch.dtype, device: torch.device) -> int:
    """The measured row floor of matmuls reducing over `k` (cached per dtype, device and threads)."""
    key = (k, dtype, str(device), torch.get_num_threads())
    if key not in _floors:
        _floors[key] = _probe(k, dtype, device)  # inside the mode's handler the mode is off
        log.info("matmul row floor for K=%d %s on %s, %d threads: %s", k, dtype, device, key[3], _floors[key])
    floor = _floors[key]
    if floor is None:
        raise NoRowFloor(f"the BLAS rounds a row of a K={k} {dtype} matmul differently at every row count "
                         f"up to {_MAX_FLOOR}: batch-invariant matmuls are not possible on this build")
    return floor


def _floor_of(a: torch.Tensor) -> int:
    floor = _floors.get((a.shape[-1], a.dtype, str(a.device), torch.get_num_threads()))
    return floor if floor else row_floor(a.shape[-1], a.dtype, a.device)


def _pad_bias(bias: Any, m: int, m0: int) -> Any:
    """An added term with a row axis of m rows (not a broadcast one), padded to m0 rows."""
    if isinstance(bias, torch.Tensor) and bias.dim() >= 2 and bias.shape[-2] == m and m != 1:
        return _pad_rows(bias, bias.dim() - 2, m0)
    return bias


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    m = x.numel() // max(1, x.shape[-1])
    if x.dim() < 2 or m >= (m0 := _floor_of(x)):
        return F.linear(x, w, b)
    out = F.linear(_pad_rows(x.reshape(m, x.shape[-1]), 0, m0), w, b)[:m]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dim() < 2 or b.dim() < 2:
        return torch.matmul(a, b)
    m0 = _floor_of(a)
    if b.dim() == 2:  # folds into one [prod(a.shape[:-1]), K] matmul
        m = a.numel() // max(1, a.shape[-1])
        if m >= m0:
            return torch.matmul(a, b)
        out = torch.matmul(_pad_rows(a.reshape(m, a.shape[-1]), 0, m0), b)[:m]
        return out.reshape(*a.shape[:-1], b.shape[-1])
    m = a.shape[-2]  # batched: each batch entry is its own [m, K] matmul
    if m >= m0:
        return torch.matmul(a, b)
    return torch.matmul(_pad_rows(a, a.dim() - 2, m0), b)[..., :m, :]


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: Any = 1, alpha: Any = 1) -> torch.Tensor:
    m = a.shape[0]
    if m >= (m0 := _floor_of(a)):
        return torch.addmm(bias, a, b, beta=beta, alpha=alpha)
    return torch.addmm(_pad_bias(bias, m, m0), _pad_rows(a, 0, m0), b, beta=beta, alpha=alpha)[:m]


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    m = a.shape[1]
    return torch.bmm(a, b) if m >= (m0 := _floor_of(a)) else torch.bmm(_pad_rows(a, 1, m0), b)[:, :m]


def _baddbmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: Any = 1, alpha: Any = 1) -> torch.Tensor:
    m = a.shape[1]
    if m >= (m0 := _floor_of(a)):
        return torch.baddbmm(bias, a, b, beta=beta, alpha=alpha)
    return torch.baddbmm(_pad_bias(bias, m, m0), _pad_rows(a, 1, m0), b, beta=beta, alpha=alpha)[:, :m]


_HANDLERS: dict[Any, Callable[..., torch.Tensor]] = {
    F.linear: _linear,
    torch.matmul: _matmul, torch.Tensor.matmul: _matmul, torch.Tensor.__matmul__: _matmul,
    torch.mm: _matmul, torch.Tensor.mm: _matmul,
    torch.addmm: _addmm, torch.Tensor.addmm: _addmm,
    torch.bmm: _bmm, torch.Tensor.bmm: _bmm,
    torch.baddbmm: _baddbmm, torch.Tensor.baddbmm: _baddbmm,
}


class InvariantMatmuls(TorchFunctionMode):
    """Pads every matmul with fewer rows than the BLAS's row floor up to the floor (zero rows), so a
    row's result does not depend on how many rows share its call. Entered around a forward pass.

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
        if func is F.linear:
            return _linear(*args, **kwargs)
        return handler(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- attention

_key_valid: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("ra_key_valid", default=None)


@contextlib.contextmanager
def padded_batch(key_valid: torch.Tensor) -> Iterator[None]:
    """Tell the "rows" attention which keys of this forward are padding: `key_valid` [B, T] (bool or
    0/1), one column per token of the whole sequence so far (cache and this forward's tokens)."""
    token = _key_valid.set(key_valid.bool())
    try:
        yield
    finally:
        _key_valid.reset(token)


def _row_attention(inner: Callable[..., tuple[torch.Tensor, Any]]) -> Callable[..., tuple[torch.Tensor, Any]]:
    def attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        valid = _key_valid.get()
        if valid is None:  # a forward that did not say where its padding is: the model's own attention
            return inner(module, query, key, value, attention_mask, **kwargs)
        B, _, Tq, _ = query.shape
        Tk = key.shape[2]
        valid = valid[:, -Tk:]  # a sliding-window cache layer keeps only the last keys
        window = kwargs.get("sliding_window")
        out = query.new_zeros(B, Tq, query.shape[1], value.shape[-1])
        for b in range(B):
            keys = valid[b].nonzero().squeeze(1)
            queries = valid[b, Tk - Tq :].nonzero().squeeze(1)
            tk, tq = int(keys.numel()), int(queries.numel())
            if tq == 0:
                continue
            q = query[b : b + 1].index_select(2, queries).contiguous()
            k = key[b : b + 1].index_select(2, keys).contiguous()
            v = value[b : b + 1].index_select(2, keys).contiguous()
            if window is None or tk <= window:
                mask = None  # the row alone is plain causal: the same call as an unpadded batch of one
            else:
                if attention_mask is None:
                    raise RuntimeError("rows attention: a sliding window needs the model's materialised mask")
                mask = attention_mask[b : b + 1].index_select(2, queries)
                mask = mask.index_select(3, keys).contiguous()
            o, _ = inner(module, q, k, v, mask, **kwargs)
            out[b, queries] = o[0]
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
    inner = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return _row_attention(inner)(module, *args, **kwargs)


def use_row_attention(model: Any) -> str:
    """Switch `model` to the "rows" variant of its attention implementation; returns the new name."""
    register_row_attention()
    current = str(model.config._attn_implementation or "eager")
    if current.startswith(ROWS_PREFIX):
        return current
    if current not in ("sdpa", "eager"):
        raise ValueError(f"batch-invariant attention supports sdpa and eager, not {current!r}")
    model.set_attn_implementation(ROWS_PREFIX + current)
    return ROWS_PREFIX + current
