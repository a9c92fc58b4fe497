"""Gradient attribution in SAE space on the HF engine: attribution patching (AtP) and integrated
gradients (IG) between the clean state and a baseline ("patched") state (docs/attribution.md).

At every attributed SAE layer L the residual h after layer L is written as decode(z) + e (z the
latents, e the error term). Along the path, at the positions of the scope,

    z(a) = z + a (z_b - z),   e(a) = e + a (e_b - e),   h'(a) = decode(z(a)) + e(a),

for a = k/n, k = 0..n-1 (left Riemann sum, as the paper's code; n = 1 is AtP at the clean state),
or a = (k + 1/2)/n (rule="midpoint": the same cost, error O(1/n^2) instead of O(1/n)).
All attributed layers are interpolated in the same forward pass; a downstream layer's z and e are
re-encoded from its current (already partly patched) input, so the gradient w.r.t. an upstream
latent carries its effect through the downstream layers. Then

    attr_i = (z_i,b - z_i,clean) * mean_k d metric / d z_i(a_k),
    attr_err = sum_d (e_b - e_clean)_d * mean_k d metric / d e_d(a_k).

With one attributed layer the attributions (latents + error) sum to metric(a=1) - metric(a=0) as
n grows (completeness); `metric_patched` is that a=1 endpoint, measured by one extra forward pass.

z(a) is a leaf of the autograd graph and the decoder is sae-lens's own `decode`, so the SAE has
to be differentiable in that form: a decode that depends on run-time state set by `encode`
(normalize_activations = constant_norm_rescale or layer_norm) is refused with a clear error.
Gradients are taken with torch.autograd.grad on these tensors only (no parameter .grad is written).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..audit.attribution import (
    AttributionRequest,
    AttributionResponse,
    AttributionResult,
    AttributionScope,
    LayerAttribution,
    LogitDiff,
    LogProb,
)
from ..audit.errors import InvalidRequest, NotFound
from ..audit.spec import Prompt, Request
from .interventions import check_interventions
from .sae_runtime import LayerSAE

if TYPE_CHECKING:
    from .hf_engine import HFEngine

DEFAULT_MAX_STEPS = 128
_DIFFERENTIABLE_NORMS = {"none", "expected_average_only_in"}
_BYTES_BUDGET = 1 << 30  # dense per-step tensors (z, grads) per chunk of rows


@dataclass
class _LayerState:
    """Per attributed layer: clean and baseline latents / error terms [B, T, *] (detached)."""

    sae: LayerSAE
    z_clean: torch.Tensor | None = None
    e_clean: torch.Tensor | None = None
    z_base: torch.Tensor | None = None
    e_base: torch.Tensor | None = None
    grad_z: torch.Tensor | None = None
    grad_e: torch.Tensor | None = None


def check_differentiable(sae: LayerSAE) -> None:
    """Raise InvalidRequest when latent gradients are not defined through sae-lens's decode."""
    if sae.normalize not in _DIFFERENTIABLE_NORMS:
        raise InvalidRequest(
            f"layers: the SAE at layer {sae.layer} ({sae.source}) uses normalize_activations={sae.normalize!r}, "
            "whose decode depends on run-time state set by encode; attribution needs decode(z) to be a "
            "function of z alone (normalize_activations 'none' or 'expected_average_only_in')"
        )
    reshape = str(getattr(sae.sae.cfg, "reshape_activations", "none"))
    if reshape != "none" or getattr(sae.sae, "hook_z_reshaping_mode", False):
        raise InvalidRequest(f"layers: the SAE at layer {sae.layer} reshapes its activations ({reshape}); not supported")
    z = torch.zeros(1, sae.d_sae, dtype=sae.sae.dtype, device=sae.sae.W_dec.device, requires_grad=True)
    with torch.enable_grad():
        out = sae.decode(z)
    if not out.requires_grad:
        raise InvalidRequest(f"layers: the SAE at layer {sae.layer} ({sae.source}) has a decode that is not differentiable")


def scope_positions(scope: AttributionScope, ids: Sequence[int], bos_id: int | None, where: str) -> list[int]:
    """0-based positions of a prompt covered by the scope (InvalidRequest when empty or out of range)."""
    n = len(ids)
    if scope.kind == "after_bos":
        start = 1 if bos_id is not None and ids and ids[0] == bos_id else 0
        pos = list(range(start, n))
    elif scope.kind == "all":
        pos = list(range(n))
    elif scope.kind == "last_n":
        if scope.n <= 0:
            raise InvalidRequest(f"scope.n: must be > 0 for kind 'last_n', got {scope.n}")
        pos = list(range(max(0, n - scope.n), n))
    else:
        if not scope.positions:
            raise InvalidRequest("scope.positions: empty")
        pos = []
        for p in scope.positions:
            rel = p if p >= 0 else n + p
            if not 0 <= rel < n:
                raise InvalidRequest(f"scope.positions: position {p} outside the {n}-token prompt of {where}")
            pos.append(rel)
        pos = sorted(set(pos))
    if not pos:
        raise InvalidRequest(f"scope: empty for {where} (its prompt has {n} token(s))")
    return pos


class ReferenceMeans:
    """Mean latents and error terms per layer over a registered prompt set, cached by (set id, layer)."""

    def __init__(self, size: int = 16) -> None:
        self._cache: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._size = size

    def get(self, engine: HFEngine, set_id: str, layers: Sequence[int]) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], int]:
        """{layer: (mean z [d_sae], mean e [d])} and the number of forward rows this call ran."""
        missing = [ly for ly in layers if (set_id, ly) not in self._cache]
        rows = 0
        if missing:
            prompts = _prompt_set(engine, set_id)
            sums_z: dict[int, torch.Tensor] = {}
            sums_e: dict[int, torch.Tensor] = {}
            count = 0
            step = max(1, engine.limits.max_batch_items)
            for start in range(0, len(prompts), step):
                part = prompts[start : start + step]
                resid, ids, mask = _capture_resid(engine, [Request(prompt=p) for p in part], missing)
                rows += len(part)
                T = mask.shape[1]
                keep = torch.zeros_like(mask, dtype=torch.bool)
                for b, seq in enumerate(ids):
                    first = T - len(seq) + (1 if seq and seq[0] == engine.tokenizer.bos_token_id else 0)
                    keep[b, first:] = True
                count += int(keep.sum())
                for ly in missing:
                    sae = engine.saes[ly]
                    with torch.no_grad():
                        h = resid[ly][keep].to(sae.sae.dtype)
                        z = sae.encode(h)
                        e = h - sae.decode(z)
                    sums_z[ly] = sums_z[ly] + z.sum(0) if ly in sums_z else z.sum(0)
                    sums_e[ly] = sums_e[ly] + e.sum(0) if ly in sums_e else e.sum(0)
            if count == 0:
                raise InvalidRequest(f"baseline.reference_set_id: prompt set {set_id!r} has no tokens after BOS")
            for ly in missing:
                self._cache[(set_id, ly)] = (sums_z[ly] / count, sums_e[ly] / count)
                while len(self._cache) > self._size:
                    self._cache.popitem(last=False)
        return {ly: self._cache[(set_id, ly)] for ly in layers}, rows


def _engine_means(engine: HFEngine) -> ReferenceMeans:
    """The engine's reference-mean cache (created on first use)."""
    ref = getattr(engine, "_reference_means", None)
    if ref is None:
        ref = ReferenceMeans()
        engine._reference_means = ref  # type: ignore[attr-defined]
    return ref


def _prompt_set(engine: HFEngine, set_id: str) -> list[Prompt]:
    fn = getattr(engine.resolver, "prompt_set", None)
    if fn is None:
        raise NotFound(f"baseline.reference_set_id: {set_id!r} is not registered (this server has no prompt sets)")
    try:
        prompts = list(fn(set_id))
    except NotFound as exc:
        raise NotFound(f"baseline.reference_set_id: {exc}") from None
    if not prompts:
        raise InvalidRequest(f"baseline.reference_set_id: prompt set {set_id!r} is empty")
    return prompts


def _capture_resid(
    engine: HFEngine, requests: Sequence[Request], layers: Sequence[int]
) -> tuple[dict[int, torch.Tensor], list[list[int]], torch.Tensor]:
    """Residuals after `layers` (after their interventions) under each request's interventions."""
    from .hf_engine import _Capture

    cap = _Capture(residual_layers=set(layers))
    _, ids, mask = engine._prefill(requests, capture=cap, logits_to_keep=1)
    return cap.resid, ids, mask


def _metric(logits: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, is_diff: torch.Tensor) -> torch.Tensor:
    """Per-row metric from last-token logits [B, V]: logit diff where is_diff, else log-prob of pos."""
    logits = logits.float()
    rows = torch.arange(logits.shape[0], device=logits.device)
    lp = logits[rows, pos]
    diff = lp - logits[rows, neg]
    logprob = lp - torch.logsumexp(logits, dim=-1)
    return torch.where(is_diff, diff, logprob)


class _Patcher:
    """Forward hooks on the attributed decoder layers that write h'(a) (see the module docstring)."""

    def __init__(self, engine: HFEngine, states: dict[int, _LayerState], mask: torch.Tensor) -> None:
        self.engine = engine
        self.states = states
        self.mask = mask  # [B, T, 1] float: positions in scope
        self.alpha = 0.0
        self.record_clean = False
        self.want_grad = False
        self.leaves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @contextmanager
    def installed(self) -> Iterator[None]:
        handles = [self.engine.layers[ly].register_forward_hook(self._hook(ly)) for ly in self.states]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, layer: int) -> Any:
        st = self.states[layer]
        sae = st.sae

        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            x = h.to(sae.sae.dtype)
            with torch.no_grad():
                z = sae.encode(x)
                x_hat = sae.decode(z)
            e = x - x_hat  # keeps the gradient path from upstream (weight 1 - a inside the scope)
            if self.record_clean:
                st.z_clean, st.e_clean = z.detach(), e.detach()
            a = self.alpha
            if a != 0.0:
                assert st.z_base is not None and st.e_base is not None
                m = self.mask.to(z.dtype)
                z = z + (a * m) * (st.z_base - z)
                e = e + (a * m) * (st.e_base - e)
            if self.want_grad:
                z = z.detach().requires_grad_(True)
                if not e.requires_grad:  # the first attributed layer: nothing upstream carries a gradient
                    e = e.detach().requires_grad_(True)
                self.leaves[layer] = (z, e)
            new = (sae.decode(z) + e).to(h.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook


def validate_request(engine: HFEngine, request: AttributionRequest, layers: list[int],
                     max_steps: int = DEFAULT_MAX_STEPS) -> list[LogitDiff | LogProb]:
    """Check a request against the engine (steps, layers, latents, top_k, metrics, baseline) before any
    forward pass; the metric of every item. Raises InvalidRequest / NotFound naming the field."""
    n_steps = request.steps
    if request.method == "ig" and not 1 <= n_steps <= max_steps:
        raise InvalidRequest(f"n_steps: {n_steps} out of range [1, {max_steps}]")
    if request.method == "atp" and request.n_steps not in (0, 1):
        raise InvalidRequest(f"n_steps: method 'atp' is one step, got n_steps={request.n_steps}")
    if not layers:
        raise InvalidRequest("layers: this server has no SAEs")
    for ly in layers:
        if ly not in engine.saes:
            raise InvalidRequest(f"layers: no SAE at layer {ly} (SAE layers: {sorted(engine.saes)})")
        check_differentiable(engine.saes[ly])
    n_chosen = 0
    for ly, ids in request.latents.items():
        if ly not in layers:
            raise InvalidRequest(f"latents: layer {ly} is not attributed (layers: {layers})")
        d_sae = engine.saes[ly].d_sae
        bad = [i for i in ids if not 0 <= int(i) < d_sae]
        if bad:
            raise InvalidRequest(f"latents[{ly}]: latent id {bad[0]} out of range [0, {d_sae})")
        n_chosen += len(ids)
    if n_chosen > engine.limits.max_latents_per_request:
        raise InvalidRequest(f"latents: {n_chosen} latents exceed the limit of {engine.limits.max_latents_per_request} per request")
    if request.top_k < 0 or request.top_k > max(engine.saes[ly].d_sae for ly in layers):
        raise InvalidRequest(f"top_k: {request.top_k} out of range [0, d_sae]")
    if request.top_k == 0 and not request.latents:
        raise InvalidRequest("top_k: 0 and no latents chosen (nothing to return)")
    metrics = []
    for i, item in enumerate(request.items):
        m = item.metric or request.metric
        where = f"items[{i}].metric" if item.metric is not None else "metric"
        if m is None:
            raise InvalidRequest(f"metric: none given for items[{i}] (set the request's metric or the item's)")
        toks = [m.positive, m.negative] if isinstance(m, LogitDiff) else [m.token]
        names = ["positive", "negative"] if isinstance(m, LogitDiff) else ["token"]
        for name, t in zip(names, toks, strict=True):
            if not 0 <= int(t) < engine.vocab_size:
                raise InvalidRequest(f"{where}.{name}: unknown token id {t} (vocab size {engine.vocab_size})")
        metrics.append(m)
    if request.baseline.kind == "interventions":
        _check_baseline_interventions(engine, request)
    return metrics


def attribute(engine: HFEngine, request: AttributionRequest, max_steps: int = DEFAULT_MAX_STEPS,
              reference_means: ReferenceMeans | None = None) -> AttributionResponse:
    """Run an attribution request on the HF engine (validates; raises InvalidRequest / NotFound)."""
    t0 = time.perf_counter()
    n_steps = request.steps
    layers = sorted(set(request.layers)) if request.layers else sorted(engine.saes)
    metrics = validate_request(engine, request, layers, max_steps)

    requests = [Request(prompt=it.prompt) for it in request.items]
    all_ids = engine._batch_ids(requests)
    bos = engine.tokenizer.bos_token_id
    positions = [scope_positions(request.scope, ids, bos, f"items[{i}]") for i, ids in enumerate(all_ids)]

    ref = reference_means or _engine_means(engine)
    means: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    fwd_rows = 0
    if request.baseline.kind == "mean":
        means, fwd_rows = ref.get(engine, request.baseline.reference_set_id, layers)

    # chunk rows so the dense per-layer tensors stay within a budget
    T_max = max(len(x) for x in all_ids)
    per_row = T_max * sum(engine.saes[ly].d_sae * 4 + engine.d_model * 4 for ly in layers) * 4
    chunk = max(1, min(len(requests), _BYTES_BUDGET // max(1, per_row)))
    results: list[AttributionResult] = []
    bwd_rows = 0
    for start in range(0, len(requests), chunk):
        sl = slice(start, start + chunk)
        res, f, b = _attribute_chunk(
            engine, request, requests[sl], all_ids[sl], positions[sl], metrics[sl], layers, means, n_steps
        )
        results.extend(res)
        fwd_rows += f
        bwd_rows += b
    return AttributionResponse(results, fwd_rows, bwd_rows, time.perf_counter() - t0)


def _check_baseline_interventions(engine: HFEngine, request: AttributionRequest) -> None:
    check_interventions(engine, request.baseline.interventions, "baseline.interventions", prompt_len=1)


def chunk_inputs(
    engine: HFEngine, ids: list[list[int]], positions: list[list[int]], metrics: list[LogitDiff | LogProb],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """What one attribution chunk runs on: the left-padded (input_ids, attention mask, position ids),
    the [B, T, 1] mask of the scoped positions, the metric's (positive, negative, is-a-logit-diff)
    tensors, and the engine's prompt context for hooks."""
    dev = engine.device
    input_ids, attn, pos_ids = engine._left_pad(ids)
    T = input_ids.shape[1]
    mask = torch.zeros(len(ids), T, 1, device=dev)
    for b, (seq, ps) in enumerate(zip(ids, positions, strict=True)):
        mask[b, [T - len(seq) + p for p in ps], 0] = 1.0
    pos_t = torch.tensor([m.positive if isinstance(m, LogitDiff) else m.token for m in metrics], device=dev)
    neg_t = torch.tensor([m.negative if isinstance(m, LogitDiff) else m.token for m in metrics], device=dev)
    is_diff = torch.tensor([isinstance(m, LogitDiff) for m in metrics], device=dev)
    plen = torch.tensor([len(x) for x in ids], dtype=torch.long, device=dev)
    return input_ids, attn, pos_ids, mask, pos_t, neg_t, is_diff, engine._prompt_ctx(attn, pos_ids, plen)


def _attribute_chunk(
    engine: HFEngine,
    request: AttributionRequest,
    requests: list[Request],
    ids: list[list[int]],
    positions: list[list[int]],
    metrics: list[LogitDiff | LogProb],
    layers: list[int],
    means: dict[int, tuple[torch.Tensor, torch.Tensor]],
    n_steps: int,
) -> tuple[list[AttributionResult], int, int]:
    B = len(requests)
    input_ids, attn, pos_ids, mask, pos_t, neg_t, is_diff, ctx = chunk_inputs(engine, ids, positions, metrics)
    T = input_ids.shape[1]
    states = {ly: _LayerState(engine.saes[ly]) for ly in layers}
    patcher = _Patcher(engine, states, mask)

    def run(alpha: float, grad: bool, record_clean: bool = False) -> torch.Tensor:
        patcher.alpha, patcher.want_grad, patcher.record_clean = alpha, grad, record_clean
        patcher.leaves = {}
        with engine._active(None), patcher.installed(), torch.set_grad_enabled(grad):
            engine._ctx = ctx
            logits = engine._forward(input_ids, attn, pos_ids, use_cache=False, logits_to_keep=1).logits[:, -1]
            metric = _metric(logits, pos_t, neg_t, is_diff)
            if grad:
                inputs = [t for ly in layers for t in patcher.leaves[ly]]
                grads = torch.autograd.grad(metric.sum(), inputs, allow_unused=True)
                for k, ly in enumerate(layers):
                    gz, ge = grads[2 * k], grads[2 * k + 1]
                    st = states[ly]
                    gz = torch.zeros_like(patcher.leaves[ly][0]) if gz is None else gz
                    ge = torch.zeros_like(patcher.leaves[ly][1]) if ge is None else ge
                    st.grad_z = gz.detach() if st.grad_z is None else st.grad_z + gz.detach()
                    st.grad_e = ge.detach() if st.grad_e is None else st.grad_e + ge.detach()
                patcher.leaves = {}
        return metric.detach()

    fwd = bwd = 0
    alphas = request.alphas()
    if alphas[0] == 0.0:  # the first step is the clean run: it records z_clean / e_clean and the clean metric
        metric_clean = run(0.0, grad=True, record_clean=True)
        bwd += B
        alphas = alphas[1:]
    else:
        metric_clean = run(0.0, grad=False, record_clean=True)
    fwd += B
    metric_baseline = _set_baselines(engine, request, requests, ids, layers, states, means, pos_t, neg_t, is_diff)
    if metric_baseline is not None:
        fwd += B
    for a in alphas:
        run(a, grad=True)
        fwd += B
        bwd += B
    metric_patched = run(1.0, grad=False)
    fwd += B
    if metric_baseline is None:
        metric_baseline = metric_patched

    results = []
    for b in range(B):
        off = T - len(ids[b])
        cols = torch.tensor([off + p for p in positions[b]], dtype=torch.long, device=engine.device)
        per_layer: dict[int, LayerAttribution] = {}
        for ly in layers:
            st = states[ly]
            assert st.z_base is not None and st.e_base is not None and st.grad_z is not None
            assert st.z_clean is not None and st.e_clean is not None and st.grad_e is not None
            dz = (st.z_base[b, cols] - st.z_clean[b, cols]).detach().float()
            attr = dz * (st.grad_z[b, cols].float() / n_steps)  # [P, d_sae]
            de = (st.e_base[b, cols] - st.e_clean[b, cols]).float()
            attr_e = (de * (st.grad_e[b, cols].float() / n_steps)).sum(-1)  # [P]
            summed = attr.sum(0)
            chosen = [int(i) for i in request.latents.get(ly, ())]
            top: list[int] = []
            if request.top_k > 0:
                k_eff = min(request.top_k, summed.shape[0])
                top = [int(i) for i in torch.topk(summed, k_eff).indices.tolist()]
            sel = top + [i for i in dict.fromkeys(chosen) if i not in set(top)]
            sel_t = torch.tensor(sel, dtype=torch.long, device=summed.device)
            per_layer[ly] = LayerAttribution(
                layer=ly,
                latents=np.asarray(sel, dtype=np.int64),
                scores=summed.index_select(0, sel_t).cpu().numpy(),
                error=float(attr_e.sum()),
                total=float(summed.sum()),
                per_position=attr.index_select(1, sel_t).cpu().numpy() if request.per_position else None,
                error_per_position=attr_e.cpu().numpy() if request.per_position else None,
            )
        results.append(AttributionResult(
            metric_clean=float(metric_clean[b]), metric_baseline=float(metric_baseline[b]),
            metric_patched=float(metric_patched[b]), positions=list(positions[b]), token_ids=list(ids[b]),
            layers=per_layer,
        ))
    return results, fwd, bwd


def _set_baselines(
    engine: HFEngine, request: AttributionRequest, requests: list[Request], ids: list[list[int]],
    layers: list[int], states: dict[int, _LayerState], means: Any, pos_t: torch.Tensor, neg_t: torch.Tensor,
    is_diff: torch.Tensor,
) -> torch.Tensor | None:
    """Set each layer's baseline (z_b, e_b) from its clean run: zeros, reference means, or a forward
    pass under the baseline interventions, whose metric is returned (None for the other kinds)."""
    kind = request.baseline.kind
    for ly, st in states.items():
        assert st.z_clean is not None and st.e_clean is not None
        if kind == "zero":
            st.z_base, st.e_base = torch.zeros_like(st.z_clean), st.e_clean
        elif kind == "mean":
            mz, me = means[ly]
            st.z_base, st.e_base = mz.expand_as(st.z_clean), me.expand_as(st.e_clean)
    if kind != "interventions":
        return None
    return _baseline_run(engine, request, requests, ids, layers, states, pos_t, neg_t, is_diff)


def _baseline_run(
    engine: HFEngine, request: AttributionRequest, requests: list[Request], ids: list[list[int]],
    layers: list[int], states: dict[int, _LayerState], pos_t: torch.Tensor, neg_t: torch.Tensor,
    is_diff: torch.Tensor,
) -> torch.Tensor:
    """The baseline forward pass under the baseline interventions: its metric and z_b / e_b per layer."""
    from .hf_engine import _Capture

    base_reqs = [Request(prompt=r.prompt, interventions=request.baseline.interventions) for r in requests]
    cap = _Capture(residual_layers=set(layers))
    try:
        out, _, _ = engine._prefill(base_reqs, capture=cap, logits_to_keep=1)
    except InvalidRequest as exc:
        raise InvalidRequest(str(exc).replace("items[0].interventions", "baseline.interventions")) from None
    with torch.no_grad():
        for ly in layers:
            sae = states[ly].sae
            h = cap.resid[ly].to(sae.sae.dtype)
            z = sae.encode(h)
            states[ly].z_base, states[ly].e_base = z, h - sae.decode(z)
        return _metric(out.logits[:, -1], pos_t, neg_t, is_diff)
