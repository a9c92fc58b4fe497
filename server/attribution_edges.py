"""Latent-to-latent ("edge") attribution on the HF engine: which upstream SAE latents drive the
downstream (refusal) latents' attribution (docs/attribution.md, "Edges").

It runs on the attribution path of `server/attribution.py` (the same patcher, metric, baselines,
path points and validation). For a downstream SAE layer L_d with latents D and the SAE layers U
within `max_back` layers before it (U and L_d patched jointly along the path):

1. ḡ_d[t] = mean over the path points of d metric / d z_d[t] (what `attribute` averages), d in D;
2. at every path point, for each d, the gradient of  T_d = sum_{t in scope} ḡ_d[t] z_d[t]  with
   respect to the upstream latents z_u (and the upstream error terms), z_d re-encoded from L_d's
   input, so it depends on the upstream state; then

       edge(u -> d)   = sum_{t in scope} (z_u,b[t] - z_u,clean[t]) * mean_k dT_d / dz_u[t] (a_k)
       edge(err -> d) = sum_{t, j} (e_b - e_clean)[t, j] * mean_k dT_d / de[t, j] (a_k).

   edge(u -> d) is the part of d's attribution that flows from u: patching u towards the baseline
   moves z_d, and ḡ_d says what that is worth to the metric. Signs follow `attribute`'s: a positive
   edge means that patching u raises the metric through d.

Stop-gradient through intermediate layers: every SAE layer in U is spliced (decode(z) + e) with z a
fresh leaf, and e = h - decode(encode(h)) keeps the gradient of h with weight 1, so the gradient from
L_d to an upstream latent passes through the model's blocks and the intermediate layers' residual,
never through an intermediate latent (no chain rule through intermediate latents). With one upstream
layer and n = 1 the edges of all its latents plus its error term sum to ḡ_d · J · (h_b - h_clean),
J the Jacobian of z_d w.r.t. that layer's residual (tested).

Cost per prompt row and downstream layer: n + 1 forward passes for ḡ (+1 for a separate clean pass
under rule="midpoint", +1 for an `interventions` baseline run), n more for the edges (partial: they
stop at L_d, counted as whole passes); n backward passes for ḡ and n x |D| (partial, to the upstream
layers) for the edges.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..audit.attribution import AttributionRequest, LogitDiff, LogProb
from ..audit.errors import InvalidRequest
from ..audit.latent_edges import EdgeLayer, EdgeResponse, EdgeResult, UpstreamEdges
from ..audit.spec import Request
from .attribution import (
    _BYTES_BUDGET,
    DEFAULT_MAX_STEPS,
    _engine_means,
    _LayerState,
    _metric,
    _Patcher,
    _set_baselines,
    chunk_inputs,
    scope_positions,
    validate_request,
)

if TYPE_CHECKING:
    from .hf_engine import HFEngine

MAX_BACK_LIMIT = 8


class _StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by the read hook once z_d is read: the edge pass needs nothing after layer L_d."""


class _ReadPatcher(_Patcher):
    """The attribution patcher that also re-encodes the downstream layer's input with gradients (and,
    in the edge pass, stops the forward pass there)."""

    def __init__(self, engine: HFEngine, states: dict[int, _LayerState], mask: torch.Tensor, read_layer: int,
                 read_ids: Sequence[int]) -> None:
        super().__init__(engine, states, mask)
        self.read_layer = read_layer
        self.read_ids = torch.tensor(list(read_ids), dtype=torch.long, device=mask.device)
        self.read = False
        self.z_read: torch.Tensor | None = None

    def _hook(self, layer: int) -> Any:
        inner = super()._hook(layer)
        if layer != self.read_layer:
            return inner
        sae = self.states[layer].sae

        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            if self.read:
                h = output[0] if isinstance(output, tuple) else output
                self.z_read = sae.encode(h.to(sae.sae.dtype)).index_select(-1, self.read_ids)
                raise _StopForward
            return inner(module, args, output)

        return hook


def upstream_layers(engine: HFEngine, downstream: int, max_back: int) -> list[int]:
    """SAE layers within `max_back` layers before `downstream`."""
    return [ly for ly in sorted(engine.saes) if downstream - max_back <= ly < downstream]


def latent_edges(engine: HFEngine, request: AttributionRequest, max_back: int = 3,
                 max_steps: int = DEFAULT_MAX_STEPS) -> EdgeResponse:
    """Edges from the upstream latents to the downstream latents `request.latents` ({layer: ids}).

    The request's metric(s), method, n_steps, rule, baseline and scope mean what they mean for
    `attribute`; `layers` must be empty (derived) and `top_k` is not read (every upstream latent whose
    state differs between clean and baseline somewhere in the scope is returned)."""
    t0 = time.perf_counter()
    if request.layers:
        raise InvalidRequest("layers: derived from the downstream latents for edges; leave it empty")
    if not request.latents or not any(request.latents.values()):
        raise InvalidRequest("latents: no downstream latents")
    if not 1 <= max_back <= MAX_BACK_LIMIT:
        raise InvalidRequest(f"max_back: {max_back} out of range [1, {MAX_BACK_LIMIT}]")
    for ly in request.latents:
        if ly not in engine.saes:
            raise InvalidRequest(f"latents: no SAE at layer {ly} (SAE layers: {sorted(engine.saes)})")
    plan = {ly: upstream_layers(engine, ly, max_back) for ly in sorted(request.latents) if request.latents[ly]}
    if not any(plan.values()):
        raise InvalidRequest(f"latents: no SAE layer within max_back={max_back} layers before the downstream "
                             f"layers {sorted(plan)} (SAE layers: {sorted(engine.saes)})")
    all_layers = sorted(set(plan) | {u for us in plan.values() for u in us})
    metrics = validate_request(engine, request.model_copy(update={"top_k": 0}), all_layers, max_steps)

    requests = [Request(prompt=it.prompt) for it in request.items]
    all_ids = engine._batch_ids(requests)
    bos = engine.tokenizer.bos_token_id
    positions = [scope_positions(request.scope, ids, bos, f"items[{i}]") for i, ids in enumerate(all_ids)]
    means: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    fwd = bwd = 0
    if request.baseline.kind == "mean":
        means, fwd = _engine_means(engine).get(engine, request.baseline.reference_set_id, all_layers)

    T_max = max(len(x) for x in all_ids)
    per_row = T_max * sum(engine.saes[ly].d_sae * 4 + engine.d_model * 4 for ly in all_layers) * 4
    chunk = max(1, min(len(requests), _BYTES_BUDGET // max(1, per_row)))
    results = [EdgeResult(positions=list(p), token_ids=list(ids)) for p, ids in zip(positions, all_ids, strict=True)]
    for start in range(0, len(requests), chunk):
        sl = slice(start, start + chunk)
        for ld, ups in plan.items():
            if not ups:
                continue
            down = [int(i) for i in dict.fromkeys(request.latents[ld])]
            out, f, b = _edges_chunk(engine, request, requests[sl], all_ids[sl], positions[sl], metrics[sl], ld,
                                     down, ups, means)
            fwd += f
            bwd += b
            for res, (layer_edges, m_clean, m_base) in zip(results[sl], out, strict=True):
                res.layers[ld] = layer_edges
                res.metric_clean, res.metric_baseline = m_clean, m_base
    return EdgeResponse(results, fwd, bwd, time.perf_counter() - t0)


def _edges_chunk(
    engine: HFEngine, request: AttributionRequest, requests: list[Request], ids: list[list[int]],
    positions: list[list[int]], metrics: list[LogitDiff | LogProb], ld: int, down: list[int], ups: list[int],
    means: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[list[tuple[EdgeLayer, float, float | None]], int, int]:
    dev = engine.device
    B = len(requests)
    input_ids, attn, pos_ids, mask, pos_t, neg_t, is_diff, ctx = chunk_inputs(engine, ids, positions, metrics)
    T = input_ids.shape[1]
    layers = [*ups, ld]
    states = {ly: _LayerState(engine.saes[ly]) for ly in layers}
    patcher = _ReadPatcher(engine, states, mask, ld, down)
    n = request.steps
    down_t = patcher.read_ids
    g_sum = torch.zeros(B, T, len(down), device=dev)
    edge_acc: dict[int, torch.Tensor] = {}  # per upstream layer: [|D|, B, d_sae] (mean-gradient x delta)
    err_acc: dict[int, torch.Tensor] = {}  # [|D|, B]

    def forward(alpha: float, grad: bool, read: bool = False, record_clean: bool = False) -> torch.Tensor:
        patcher.alpha, patcher.want_grad, patcher.record_clean, patcher.read = alpha, grad, record_clean, read
        patcher.leaves, patcher.z_read = {}, None
        engine._ctx = ctx
        logits = engine._forward(input_ids, attn, pos_ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        return _metric(logits, pos_t, neg_t, is_diff)

    def metric_step(alpha: float, record_clean: bool = False) -> torch.Tensor:
        nonlocal g_sum
        with engine._active(None), patcher.installed(), torch.enable_grad():
            metric = forward(alpha, True, record_clean=record_clean)
            (gz,) = torch.autograd.grad(metric.sum(), [patcher.leaves[ld][0]])
            g_sum = g_sum + gz.detach().index_select(-1, down_t).float()
        patcher.leaves = {}
        return metric.detach()

    def edge_step(alpha: float, g_bar: torch.Tensor) -> None:
        with engine._active(None), patcher.installed(), torch.enable_grad():
            with contextlib.suppress(_StopForward):  # the read hook ends the pass at L_d
                forward(alpha, True, read=True)
            assert patcher.z_read is not None
            inputs = [t for u in ups for t in patcher.leaves[u]]
            weight = (g_bar * mask).to(patcher.z_read.dtype)
            for j in range(len(down)):
                target = (weight[..., j] * patcher.z_read[..., j]).sum()
                grads = torch.autograd.grad(target, inputs, retain_graph=j < len(down) - 1, allow_unused=True)
                for k, u in enumerate(ups):
                    st = states[u]
                    assert st.z_base is not None and st.z_clean is not None
                    assert st.e_base is not None and st.e_clean is not None
                    gz, ge = grads[2 * k], grads[2 * k + 1]
                    if gz is not None:
                        dz = ((st.z_base - st.z_clean) * mask).float()
                        edge_acc[u][j] += (dz * gz.float()).sum(1)
                    if ge is not None:
                        de = ((st.e_base - st.e_clean) * mask).float()
                        err_acc[u][j] += (de * ge.float()).sum((1, 2))
        patcher.leaves, patcher.z_read = {}, None

    fwd = bwd = 0
    alphas = request.alphas()
    if alphas[0] == 0.0:
        metric_clean = metric_step(0.0, record_clean=True)
        bwd += B
        rest = alphas[1:]
    else:
        with engine._active(None), patcher.installed(), torch.no_grad():
            metric_clean = forward(0.0, False, record_clean=True).detach()
        rest = alphas
    fwd += B
    # only an interventions baseline has a run (and a metric) of its own
    metric_baseline = _set_baselines(engine, request, requests, ids, layers, states, means, pos_t, neg_t, is_diff)
    if metric_baseline is not None:
        fwd += B
    for a in rest:
        metric_step(a)
        fwd += B
        bwd += B
    g_bar = g_sum / n
    for u in ups:
        d_sae = engine.saes[u].d_sae
        edge_acc[u] = torch.zeros(len(down), B, d_sae, device=dev)
        err_acc[u] = torch.zeros(len(down), B, device=dev)
    for a in alphas:
        edge_step(a, g_bar)
        fwd += B
        bwd += B * len(down)

    st_d = states[ld]
    assert st_d.z_base is not None and st_d.z_clean is not None
    dz_d = ((st_d.z_base - st_d.z_clean).index_select(-1, down_t) * mask).float()
    down_attr = (dz_d * g_bar).sum(1)  # [B, |D|]
    out = []
    for b in range(B):
        upstream: dict[int, UpstreamEdges] = {}
        for u in ups:
            st = states[u]
            assert st.z_base is not None and st.z_clean is not None
            moved = (((st.z_base[b] - st.z_clean[b]) * mask[b]).abs().sum(0) > 0).nonzero().flatten()
            upstream[u] = UpstreamEdges(
                layer=u, latents=moved.cpu().numpy().astype(np.int64),
                edges=(edge_acc[u][:, b].index_select(-1, moved) / n).cpu().numpy(),
                error=(err_acc[u][:, b] / n).cpu().numpy(),
            )
        layer_edges = EdgeLayer(layer=ld, latents=np.asarray(down, dtype=np.int64),
                                attribution=down_attr[b].cpu().numpy(), upstream=upstream)
        out.append((layer_edges, float(metric_clean[b]),
                    None if metric_baseline is None else float(metric_baseline[b])))
    return out, fwd, bwd
