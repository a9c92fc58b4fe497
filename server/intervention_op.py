"""The intervention as a torch custom op: the seam that lets a compiled model keep its SAE hooks.

torch.compile (and vLLM's compiled, CUDA-graph path) traces the model once and replays the trace,
so a Python hook that looks at "the current request's plan" would be baked in as whatever it saw at
trace time. Instead every hook point calls one opaque op, `refusal_audit::edit_stream`, which the
compiler keeps as a node of the graph (its fake implementation says: no outputs, two tensors
mutated in place). At run time the op reads the per-step plan handle set by the engine around the
forward call (`active`) and applies the one shared intervention module (`interventions.py`); with
no active plan it touches nothing. vLLM lists the op in `CompilationConfig.splitting_ops`, so with
piecewise CUDA graphs it runs eagerly between graph pieces; it edits its inputs in place (the
persistent buffers the graph pieces hand over), never allocating a tensor the next piece reads.

Sites: PRE (the stream entering a layer: direction ablation), CONTRIB (an attention/MLP output:
direction ablation), POST (the stream leaving a layer, the SAE's input: latent edits, then
direction additions) — the hook points of both engines (docs/interventions.md).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn

from .interventions import BatchPlan, TokenContext

SITE_PRE, SITE_CONTRIB, SITE_POST = 0, 1, 2
OP_NAME = "refusal_audit::edit_stream"
"""The op's qualified name, as vLLM's `CompilationConfig.splitting_ops` lists it."""


class StepSource(Protocol):
    """What the op asks at run time: is there work at this hook point, and the edited stream (None: leave it)."""

    def acts_at(self, layer: int, site: int) -> bool: ...

    def edit(self, x: torch.Tensor, layer: int, site: int) -> torch.Tensor | None: ...


_ACTIVE = threading.local()
_CALLS = [0]  # op calls in this process, with or without a plan (the worker checks the compiled model makes them)


def op_calls() -> int:
    """How often the op ran in this process (a compiled model without the op in its graph never calls it)."""
    return _CALLS[0]


@contextmanager
def active(source: StepSource | None) -> Iterator[None]:
    """Make `source` the plan handle of the forward calls this thread runs inside the block."""
    prev = getattr(_ACTIVE, "source", None)
    _ACTIVE.source = source
    try:
        yield
    finally:
        _ACTIVE.source = prev


def plan_acts_at(plan: BatchPlan, layer: int, site: int) -> bool:
    """Has `plan` any op at this hook point? (Cheap: lets the op skip materialising hidden + residual.)"""
    if site == SITE_POST:
        return layer in plan.latent_layers or layer in plan.additions
    abl = plan.ablations
    return abl is not None and any(ls is None or layer in ls for ls in abl.layers)


def edit_at_site(plan: BatchPlan, ctx: TokenContext, x: torch.Tensor, layer: int, site: int) -> torch.Tensor | None:
    """The shared module's edit of stream/contribution `x` ([B, T, d], or packed [1, N, d]) at a hook point."""
    if site == SITE_POST:
        lp, ap = plan.latent_layers.get(layer), plan.additions.get(layer)
        if lp is None and ap is None:
            return None
        new = x if lp is None else lp.apply(x, ctx)
        return new if ap is None else ap.add(new, ctx)
    abl = plan.ablations
    if abl is None or abl.rows_at(layer) is None:
        return None
    return abl.ablate(x, ctx, layer)


class PlanSource:
    """A fixed plan and token context as the op's plan handle (one forward call of the HF layout)."""

    def __init__(self, plan: BatchPlan, ctx: TokenContext) -> None:
        self.plan, self.ctx = plan, ctx
        self.calls = 0  # op calls that found this source active (each compiled/eager hook point once)

    def acts_at(self, layer: int, site: int) -> bool:
        self.calls += 1
        return plan_acts_at(self.plan, layer, site)

    def edit(self, x: torch.Tensor, layer: int, site: int) -> torch.Tensor | None:
        return edit_at_site(self.plan, self.ctx, x, layer, site)


def _edit_stream(stream: torch.Tensor, residual: torch.Tensor | None, layer: int, site: int) -> None:
    """Edit the residual stream (`stream + residual` when vLLM hands the two apart) in place.

    With an edit, `stream` becomes the edited stream and `residual` zeros (their sum is what the
    next layer reads); without an active plan, or with nothing to do here, both stay untouched."""
    _CALLS[0] += 1
    source: StepSource | None = getattr(_ACTIVE, "source", None)
    if source is None or not source.acts_at(layer, site):
        return
    in_place = getattr(source, "edit_in_place", None)  # a source that can write the edit straight into the pair
    if in_place is not None and in_place(stream, residual, layer, site):
        return
    x = stream if residual is None else stream + residual
    new = source.edit(x, layer, site)
    if new is None:
        return
    stream.copy_(new)
    if residual is not None:
        residual.zero_()


@torch.library.custom_op(OP_NAME, mutates_args=("stream", "residual"))
def edit_stream(stream: torch.Tensor, residual: torch.Tensor | None, layer: int, site: int) -> None:
    """The op: `_edit_stream` behind torch's dispatcher, so a compiler keeps it as one opaque node."""
    _edit_stream(stream, residual, layer, site)


@edit_stream.register_fake
def _edit_stream_fake(stream: torch.Tensor, residual: torch.Tensor | None, layer: int, site: int) -> None:
    """Shape propagation for the compiler: no outputs; the inputs keep their shapes (edited in place)."""
    return None


def edit(stream: torch.Tensor, residual: torch.Tensor | None, layer: int, site: int) -> None:
    """What a hook calls: the op while torch.compile traces (a graph node), the same function directly
    when running eagerly (the dispatcher costs ~100 microseconds per call on this CPU, a plain call ~10)."""
    if torch.compiler.is_compiling():
        edit_stream(stream, residual, layer, site)
    else:
        _edit_stream(stream, residual, layer, site)


# ------------------------------------------------------------------ HF-layout hooks (transformers layers)


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _hf_pre(idx: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    edit(args[0] if args else kwargs["hidden_states"], None, idx, SITE_PRE)


def _hf_contrib(idx: int, module: nn.Module, args: tuple, output: Any) -> None:
    edit(_first(output), None, idx, SITE_CONTRIB)


def _hf_post(idx: int, module: nn.Module, args: tuple, output: Any) -> None:
    edit(_first(output), None, idx, SITE_POST)


def hook_hf_layers(model: nn.Module) -> list[Any]:
    """Put the op at every hook point of a transformers causal LM (the HF engine's hook points).

    The hooks carry only constants (layer index, site), so torch.compile traces them into the graph
    as op calls; the plan comes from `active` at run time. Returns the hook handles (`.remove()`)."""
    from .hf_engine import contribution_modules, decoder_layers

    handles = []
    for idx, layer in enumerate(decoder_layers(model)):
        handles.append(layer.register_forward_pre_hook(partial(_hf_pre, idx), with_kwargs=True))
        for mod in contribution_modules(layer):
            handles.append(mod.register_forward_hook(partial(_hf_contrib, idx)))
        handles.append(layer.register_forward_hook(partial(_hf_post, idx)))
    return handles
