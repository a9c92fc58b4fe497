"""The HF engine: transformers + torch forward hooks. The reference engine (exact, CPU or GPU).

Hook points per decoder layer L, in forward order:
  1. input of layers[L] (resid_pre):            direction ablation
  2. attention and MLP contributions to the residual: direction ablation (Arditi et al.)
  3. output of layers[L] (resid_post, the SAE's input): latent ablation/clamp, then addition;
     Encode reads z here *before* this layer's own latent ops (after every upstream edit).
Batches are left-padded with position ids from the attention mask, so a row's output does not
depend on the other rows of its batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..audit.attribution import AttributionRequest, AttributionResponse
from ..audit.engine import (
    EncodeResult,
    LayerActivations,
    Limits,
    LossResult,
    ScoreResult,
    StreamEvent,
)
from ..audit.errors import InvalidRequest
from ..audit.latent_edges import EdgeResponse
from ..audit.spec import Request
from .batch_invariant import (
    InvariantMatmuls,
    NoRowFloor,
    onednn_floor,
    padded_batch,
    row_floor,
    use_row_attention,
)
from .engine_base import EngineBase
from .interventions import BatchPlan, Resolver, RowCache, TokenContext, compile_plan
from .sae_runtime import LayerSAE

log = logging.getLogger("refusal_audit.server.hf_engine")

EngineLimits = Limits  # the one Limits (audit/engine.py); the old name stays importable


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a Llama / Gemma-2 / Gemma-3 (text or multimodal) causal LM."""
    for path in ("model.layers", "model.language_model.layers", "language_model.model.layers"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise InvalidRequest(f"unsupported architecture {type(model).__name__}: no decoder layer list found")


def contribution_modules(layer: nn.Module) -> list[nn.Module]:
    """Modules whose outputs are added to the residual stream (after Gemma's post-norms)."""
    if hasattr(layer, "post_attention_layernorm") and hasattr(layer, "post_feedforward_layernorm"):
        mods = [layer.post_attention_layernorm, layer.post_feedforward_layernorm]  # Gemma-2/3
    else:
        mods = [layer.self_attn, layer.mlp]  # Llama: o_proj / down_proj outputs
    return [m for m in mods if isinstance(m, nn.Module)]


@dataclass
class _Capture:
    """What the current forward call should record."""

    encode_layers: set[int] = field(default_factory=set)
    residual_layers: set[int] = field(default_factory=set)
    z: dict[int, torch.Tensor] = field(default_factory=dict)
    resid: dict[int, torch.Tensor] = field(default_factory=dict)


class HFEngine(EngineBase):
    """Engine protocol over a transformers causal LM with SAEs on the residual stream."""

    engine_name = "hf"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        saes: dict[int, LayerSAE],
        model_name: str = "model",
        limits: Limits | None = None,
        resolver: Resolver | None = None,
        batch_invariant: bool | None = False,
    ) -> None:
        """`batch_invariant`: every row's numbers equal the row run alone, bit for bit, whatever shares
        its batch (server/batch_invariant.py; costs single-request decode speed, docs/engines.md).
        None: on where this BLAS and attention implementation allow it, else off with a warning."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.saes = saes
        self.model_name = model_name
        self.architecture = type(model).__name__
        self.limits = limits or Limits()
        self.resolver = resolver or Resolver()
        self.layers = decoder_layers(model)
        self.n_layers = len(self.layers)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.d_model = int(cfg.hidden_size)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.batch_invariant = self._batch_invariance(batch_invariant)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_ids = self.stop_ids(getattr(model.generation_config, "eos_token_id", None))
        self._lock = threading.RLock()
        self._plan: BatchPlan | None = None
        self._ctx: TokenContext | None = None
        self._capture: _Capture | None = None
        self.hook_seconds = 0.0  # wall time inside the intervention/capture hooks (read by the batcher's metrics)
        self._register_hooks()
        self._info = self._build_info()

    def _batch_invariance(self, wanted: bool | None) -> bool:
        """Switch the batch-invariant mode on (measuring the BLAS's matmul floors now, not inside the
        first request); where it cannot be kept, raise if it was asked for, else warn and stay off."""
        if wanted is False:
            return False
        try:
            for k in sorted({m.in_features for m in self.model.modules() if isinstance(m, nn.Linear)}):
                row_floor(k, self.dtype, self.device)
                onednn_floor(k, self.dtype, self.device)  # where measured, F.linear goes to oneDNN instead
            use_row_attention(self.model)
        except (NoRowFloor, ValueError) as exc:
            if wanted:
                raise
            log.warning("batch-invariant mode off (rows of a batch equal the row alone only up to float32 "
                        "rounding): %s", exc)
            return False
        return True

    # ------------------------------------------------------------------ hooks

    def _register_hooks(self) -> None:
        for idx, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._timed(self._make_pre_hook(idx)), with_kwargs=True)
            for mod in contribution_modules(layer):
                mod.register_forward_hook(self._timed(self._make_contrib_hook(idx)))
            layer.register_forward_hook(self._timed(self._make_post_hook(idx)))

    def _timed(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        """Add the hook's wall time to `hook_seconds` when it has work (a plan or a capture).

        Host time: on a GPU it counts kernel launches, not kernel time (no synchronisation added).
        """

        def timed(*args: Any) -> Any:
            if self._ctx is None or (self._plan is None and self._capture is None):
                return hook(*args)
            t0 = time.perf_counter()
            try:
                return hook(*args)
            finally:
                self.hook_seconds += time.perf_counter() - t0

        return timed

    def _make_pre_hook(self, idx: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            plan, ctx, cap = self._plan, self._ctx, self._capture
            if ctx is None:
                return None
            h = args[0] if args else kwargs["hidden_states"]
            new = h
            if plan is not None and plan.ablations is not None:
                new = plan.ablations.ablate(h, ctx, idx)
            if cap is not None and idx == 0 and -1 in cap.residual_layers:
                cap.resid[-1] = new.detach()
            if new is h:
                return None
            if args:
                return (new, *args[1:]), kwargs
            kwargs["hidden_states"] = new
            return args, kwargs

        return hook

    def _make_contrib_hook(self, idx: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            plan, ctx = self._plan, self._ctx
            if plan is None or ctx is None or plan.ablations is None:
                return None
            if isinstance(output, tuple):
                return (plan.ablations.ablate(output[0], ctx, idx), *output[1:])
            return plan.ablations.ablate(output, ctx, idx)

        return hook

    def _make_post_hook(self, idx: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            plan, ctx, cap = self._plan, self._ctx, self._capture
            if ctx is None:
                return None
            h = output[0] if isinstance(output, tuple) else output
            new = h
            if cap is not None and idx in cap.encode_layers:
                cap.z[idx] = self.saes[idx].encode(h).detach()
            if plan is not None:
                lp = plan.latent_layers.get(idx)
                if lp is not None:
                    new = lp.apply(new, ctx)
                ap = plan.additions.get(idx)
                if ap is not None:
                    new = ap.add(new, ctx)
            if cap is not None and idx in cap.residual_layers:
                cap.resid[idx] = new.detach()
            if new is h:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    @contextmanager
    def _active(self, plan: BatchPlan | None, capture: _Capture | None = None) -> Iterator[None]:
        with self._lock:
            self._plan, self._capture = plan, capture
            try:
                yield
            finally:
                self._plan, self._ctx, self._capture = None, None, None

    # ------------------------------------------------------------------ tokenization

    def _plan_for(
        self, requests: Sequence[Request], prompt_lens: Sequence[int], seq_lens: Sequence[int] | None = None,
        row_keys: Sequence[int] | None = None, row_cache: RowCache | None = None,
    ) -> BatchPlan | None:
        """The batch's compiled interventions; `seq_lens` (default: the prompts) bounds explicit positions.
        With `row_cache`, each row is parsed once under its `row_keys` entry (compile_plan)."""
        plan = compile_plan(
            [r.interventions for r in requests],
            prompt_lens,
            self.saes,
            self.n_layers,
            self.d_model,
            self.device,
            self.resolver,
            self.limits.max_latents_per_request,
            seq_lens=prompt_lens if seq_lens is None else seq_lens,
            row_keys=row_keys,
            row_cache=row_cache,
            batch_invariant=self.batch_invariant,
        )
        return None if plan.empty else plan

    def _left_pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask, position_ids for a left-padded batch."""
        T = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        for b, x in enumerate(ids):
            input_ids[b, T - len(x) :] = torch.tensor(x, dtype=torch.long)
            mask[b, T - len(x) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return input_ids.to(self.device), mask.to(self.device), pos.to(self.device)

    def _prompt_ctx(self, mask: torch.Tensor, pos: torch.Tensor, prompt_lens: torch.Tensor) -> TokenContext:
        valid = mask.bool()
        return TokenContext(torch.where(valid, pos, torch.full_like(pos, -1)), valid, prompt_lens)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, **kw: Any) -> Any:
        if not self.batch_invariant:
            return self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, **kw)
        with InvariantMatmuls(), padded_batch(mask):
            return self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, **kw)

    # ------------------------------------------------------------------ generate

    def generate_iter(
        self, requests: Sequence[Request], cancelled: Callable[[int], bool] | None = None
    ) -> Iterator[StreamEvent]:
        """Yields one event per new token per row, and a final event per row with its Completion.

        `cancelled(row)` (checked before each step) drops a row from the batch: it gets no more
        events and the other rows are unaffected; when every row is done or dropped, generation stops.
        """
        from .decode_batch import DecodeBatch

        batch = DecodeBatch(self)
        batch.admit(requests)
        while batch.rows:
            for _row, event in batch.pick():
                if isinstance(event, Exception):
                    raise event
                yield event
            if cancelled is not None:
                batch.remove([r for r in batch.rows if cancelled(r.index)])
            batch.advance()

    def _generator(self, r: Request) -> torch.Generator | None:
        if r.sampling.greedy:
            return None
        g = torch.Generator(device="cpu")
        g.manual_seed(int(r.sampling.seed) if r.sampling.seed is not None else int(torch.seed() % (2**63)))
        return g

    def _pick(self, logits: torch.Tensor, r: Request, gen: torch.Generator | None) -> int:
        sp = r.sampling
        if sp.greedy or gen is None:
            return int(torch.argmax(logits))
        # float64: logits / T cannot overflow for any float32 logit and T >= GREEDY_TEMPERATURE
        probs = torch.softmax(logits.cpu().double() / sp.temperature, dim=-1)
        if sp.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = (sorted_p.cumsum(-1) - sorted_p) < sp.top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=gen))

    # ------------------------------------------------------------------ score / encode / residuals / loss

    def _prefill(self, requests: Sequence[Request], capture: _Capture | None = None, **kw: Any) -> tuple[Any, list[list[int]], torch.Tensor]:
        ids = self._batch_ids(requests)
        plan = self._plan_for(requests, [len(x) for x in ids])
        input_ids, mask, pos = self._left_pad(ids)
        plen = torch.tensor([len(x) for x in ids], dtype=torch.long, device=self.device)
        with self._active(plan, capture), torch.no_grad():
            self._ctx = self._prompt_ctx(mask, pos, plen)
            out = self._forward(input_ids, mask, pos, use_cache=False, **kw)
        return out, ids, mask

    def score(
        self,
        requests: Sequence[Request],
        token_ids: Sequence[int],
        top_k: int = 0,
        return_full_logprobs: bool = False,
    ) -> list[ScoreResult]:
        self._check_score_args(token_ids, top_k)
        out, _, _ = self._prefill(requests, logits_to_keep=1)
        logprobs = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
        idx = torch.tensor([int(t) for t in token_ids], dtype=torch.long, device=logprobs.device)
        chosen = logprobs.index_select(1, idx).cpu().numpy()
        results = []
        top = torch.topk(logprobs, top_k, dim=-1) if top_k > 0 else None
        for b in range(len(requests)):
            res = ScoreResult(logprobs=chosen[b])
            if top is not None:
                res.top_token_ids = top.indices[b].cpu().numpy()
                res.top_logprobs = top.values[b].cpu().numpy()
            if return_full_logprobs:
                res.full_logprobs = logprobs[b].cpu().numpy()
            results.append(res)
        return results

    def _check_layers(
        self, layers: Sequence[int], allow_embed: bool = False, need_sae: bool = False, where: str = "layers"
    ) -> None:
        for ly in layers:
            if allow_embed and ly == -1:
                continue
            if not 0 <= ly < self.n_layers:
                raise InvalidRequest(f"{where}: layer {ly} out of range [0, {self.n_layers})")
            if need_sae and ly not in self.saes:
                raise InvalidRequest(f"{where}: no SAE at layer {ly} (SAE layers: {sorted(self.saes)})")

    def encode(
        self,
        requests: Sequence[Request],
        layers: Sequence[int] | None = None,
        top_k: int = 16,
        latents: dict[int, Sequence[int]] | None = None,
    ) -> list[EncodeResult]:
        layers = sorted(set(layers if layers else (latents.keys() if latents else self.saes)))
        if latents:
            self._check_layers(list(latents), need_sae=True, where="latents")
        self._check_layers(layers, need_sae=True)
        if latents:
            for ly, ids in latents.items():
                bad = [i for i in ids if not 0 <= int(i) < self.saes[ly].d_sae]
                if bad:
                    raise InvalidRequest(f"latents[{ly}]: latent id {bad[0]} out of range [0, {self.saes[ly].d_sae})")
        elif not 0 < top_k <= 4096:
            raise InvalidRequest("top_k must be in (0, 4096]")
        cap = _Capture(encode_layers=set(layers))
        _, batch_ids, mask = self._prefill(requests, capture=cap, logits_to_keep=1)
        results = []
        T = mask.shape[1]
        for b, seq in enumerate(batch_ids):
            start = T - len(seq)
            per_layer: dict[int, LayerActivations] = {}
            for ly in layers:
                z = cap.z[ly][b, start:].float()  # [n_tokens, d_sae]
                if latents:
                    sel = torch.tensor([int(i) for i in latents.get(ly, [])], dtype=torch.long, device=z.device)
                    per_layer[ly] = LayerActivations(
                        ly, latents=sel.cpu().numpy(), values=z.index_select(1, sel).cpu().numpy()
                    )
                else:
                    k = min(top_k, z.shape[-1])
                    top = torch.topk(z, k, dim=-1)
                    top_i, top_v = top.indices.cpu().numpy(), top.values.cpu().numpy()
                    n_active = (top_v > 0).sum(-1)  # topk is sorted: the active ones come first
                    inds = [top_i[t, : n_active[t]] for t in range(len(top_i))]
                    vals = [top_v[t, : n_active[t]] for t in range(len(top_v))]
                    per_layer[ly] = LayerActivations(ly, top_indices=inds, top_values=vals)
            toks = self.tokenizer.convert_ids_to_tokens(seq)
            results.append(EncodeResult(token_ids=list(seq), tokens=[str(t) for t in toks], layers=per_layer))
        return results

    def residuals(
        self,
        requests: Sequence[Request],
        layers: Sequence[int] | None = None,
        positions: Sequence[int] = (-1,),
    ) -> np.ndarray:
        layers = list(layers) if layers else list(range(self.n_layers))
        self._check_layers(layers, allow_embed=True)
        if not positions:
            raise InvalidRequest("positions: empty")
        cap = _Capture(residual_layers=set(layers))
        _, ids, mask = self._prefill(requests, capture=cap, logits_to_keep=1)
        T = mask.shape[1]
        out = np.zeros((len(ids), len(layers), len(positions), self.d_model), dtype=np.float32)
        for b, seq in enumerate(ids):
            n = len(seq)
            cols = []
            for p in positions:
                rel = p if p >= 0 else n + p
                if not 0 <= rel < n:
                    raise InvalidRequest(f"positions: position {p} outside the {n}-token prompt of items[{b}]")
                cols.append(T - n + rel)
            for j, ly in enumerate(layers):
                out[b, j] = cap.resid[ly][b, cols].float().cpu().numpy()
        return out

    def loss(self, requests: Sequence[Request], completions: Sequence[str | None]) -> list[LossResult]:
        """Mean CE of each completion's tokens given its prompt (or LM loss of the prompt itself)."""
        if len(completions) != len(requests):
            raise InvalidRequest("completions must align with items")
        results: list[LossResult] = []
        chunk = max(1, int(2e8 // max(1, self.vocab_size * 256)))
        for start in range(0, len(requests), chunk):
            part = list(range(start, min(len(requests), start + chunk)))
            results.extend(self._loss_chunk([requests[i] for i in part], [completions[i] for i in part], start))
        return results

    def _loss_chunk(self, requests: Sequence[Request], completions: Sequence[str | None], offset: int = 0) -> list[LossResult]:
        prompt_ids = self._batch_ids(requests)
        full, label_from = [], []
        for p, c in zip(prompt_ids, completions, strict=True):
            if c:
                comp = self.tokenizer(c, add_special_tokens=False)["input_ids"]
                full.append(p + [int(i) for i in comp])
                label_from.append(len(p))
            else:
                full.append(p)
                label_from.append(1)
        longest = self.limits.max_prompt_tokens + self.limits.max_new_tokens  # Generate's longest sequence
        for b, (seq, lo) in enumerate(zip(full, label_from, strict=True)):
            if len(seq) > longest:
                raise InvalidRequest(
                    f"items[{offset + b}].completion: {len(seq)} prompt+completion tokens exceed "
                    f"max_prompt_tokens + max_new_tokens = {longest}"
                )
            if len(seq) <= lo:  # nothing to predict: the mean CE would be NaN
                raise InvalidRequest(
                    f"items[{offset + b}].completion: no token to score (the completion tokenizes to nothing)"
                    if completions[b] else f"items[{offset + b}].prompt: a 1-token prompt has no token to score"
                )
        # scopes ("prompt") refer to the prompt part only; explicit positions may point into the completion
        plan = self._plan_for(requests, [len(p) for p in prompt_ids], [len(f) for f in full])
        input_ids, mask, pos = self._left_pad(full)
        plen = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long, device=self.device)
        T = input_ids.shape[1]
        # the 262k-vocab head dominates the cost: compute logits only from the first position that
        # predicts a scored token (left padding: every row's scored tokens lie in the last `keep`)
        first = [T - len(seq) + lo - 1 for seq, lo in zip(full, label_from, strict=True)]
        keep = T - min(first)
        with self._active(plan), torch.no_grad():
            valid = mask.bool()
            is_prompt = valid & (pos < plen.unsqueeze(1))
            self._ctx = TokenContext(torch.where(valid, pos, torch.full_like(pos, -1)), is_prompt, plen)
            logits = self._forward(input_ids, mask, pos, use_cache=False, logits_to_keep=keep).logits.float()
        # NLL = logsumexp(logits) - logit[target], positions T-keep .. T-2: one read of the [B, keep, 262k]
        # logits instead of log_softmax's full-size output (measured ~1/4 of a CE pass's time)
        scored = logits[:, :-1]
        targets = input_ids[:, T - keep + 1 :]
        if self.batch_invariant:  # log_softmax reduces each row in one thread; a reduction over a lone
            # long row (logsumexp's sum) is split across threads, so a row alone would round differently
            nll = -torch.log_softmax(scored, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        else:
            nll = torch.logsumexp(scored, dim=-1) - scored.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, keep-1]
        out = []
        for b in range(len(full)):
            vals = nll[b, first[b] - (T - keep) :]
            out.append(LossResult(float(vals.mean()) if vals.numel() else float("nan"), int(vals.numel())))
        return out

    # ------------------------------------------------------------------ attribution

    def attribute(self, request: AttributionRequest) -> AttributionResponse:
        """Gradient attribution of a metric to SAE latents (server/attribution.py, docs/attribution.md)."""
        from .attribution import attribute

        with self._lock:
            return attribute(self, request, max_steps=self.limits.max_attribution_steps)

    def latent_edges(self, request: AttributionRequest, max_back: int = 3) -> EdgeResponse:
        """Upstream -> downstream latent edges on the attribution path (server/attribution_edges.py)."""
        from .attribution_edges import latent_edges

        with self._lock:
            return latent_edges(self, request, max_back=max_back, max_steps=self.limits.max_attribution_steps)
