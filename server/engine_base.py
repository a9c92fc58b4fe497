"""What every serving engine shares, written once: `EngineBase` (prompt rendering, batch and
sampling validation, the stop set, ModelInfo, `generate` over `generate_iter`) with the HF and
vLLM engines as subclasses, and `ServingEngine`, the protocol the servicer, app and jobs use
(the audit `Engine` protocol plus what the server needs on top: limits, resolver, streaming).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from ..audit.engine import Completion, Engine, Limits, ModelInfo, RankBy, SAERows, StreamEvent
from ..audit.errors import InvalidRequest, LimitExceeded
from ..audit.spec import Prompt, Request, SamplingParams

if TYPE_CHECKING:  # pragma: no cover - import-light: the servicer and app import this module
    from transformers import PreTrainedTokenizerBase

    from .interventions import Resolver
    from .sae_runtime import LayerSAE

STOP_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|end_of_text|>")
SPECIAL_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<|begin_of_text|>", "<|eot_id|>", "I")


@runtime_checkable
class ServingEngine(Engine, Protocol):
    """An engine the server can serve: the audit protocol plus limits, the artifact resolver (the
    server sets it to its artifact store), the SAEs, token streaming and rendering."""

    limits: Limits
    resolver: Resolver
    saes: dict[int, LayerSAE]

    def generate_iter(self, requests: Sequence[Request]) -> Iterator[StreamEvent]: ...

    def render(self, prompt: Prompt) -> list[int]: ...


class EngineBase:
    """The parts of an engine that only need the tokenizer, the limits and the model's shape.

    A subclass sets `tokenizer`, `limits`, `saes`, `model_name`, `architecture`, `dtype`,
    `n_layers`, `d_model`, `vocab_size`, `pad_id` and `eos_ids` (from `stop_ids`), then calls
    `_build_info()`; it implements `generate_iter`.
    """

    engine_name: ClassVar[str]
    tokenizer: PreTrainedTokenizerBase
    limits: Limits
    saes: dict[int, LayerSAE]
    model_name: str
    architecture: str
    dtype: Any
    n_layers: int
    d_model: int
    vocab_size: int
    pad_id: int
    eos_ids: tuple[int, ...]
    _info: ModelInfo

    # ------------------------------------------------------------------ info

    def stop_ids(self, gen_eos: int | Sequence[int] | None) -> tuple[int, ...]:
        """The stop set: the generation config's EOS ids, the tokenizer's EOS and the chat
        end-of-turn tokens the vocabulary has."""
        tok = self.tokenizer
        ids: set[int] = set()
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif gen_eos:
            ids.update(int(i) for i in gen_eos)
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        for name in STOP_TOKENS:
            tid = tok.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != tok.unk_token_id and tid >= 0:
                ids.add(tid)
        return tuple(sorted(ids))

    def stop_set(self, sampling: SamplingParams) -> set[int]:
        """The token ids that end a request's generation: the model's stop set (unless
        `ignore_eos`) and the request's own `stop_token_ids`."""
        return (set() if sampling.ignore_eos else set(self.eos_ids)) | set(sampling.stop_token_ids)

    def _post_instruction_tokens(self) -> int:
        """How many chat-template tokens follow the user instruction (Arditi's 'eoi' tokens)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return 0
        marker = "XQZMARKERXQZ"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        suffix = str(text).split(marker, 1)[1]
        return len(self.tokenizer(suffix, add_special_tokens=False)["input_ids"])

    def _build_info(self) -> ModelInfo:
        tok = self.tokenizer
        special: dict[str, int] = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            t = getattr(tok, name, None)
            if t is not None:
                tid0 = tok.convert_tokens_to_ids(t)
                if isinstance(tid0, int):
                    special[t] = tid0
        for t in SPECIAL_TOKENS:
            tid = tok.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid >= 0 and tid != tok.unk_token_id:
                special[t] = tid
        bos = tok.bos_token_id
        return ModelInfo(
            model=self.model_name,
            architecture=self.architecture,
            n_layers=self.n_layers,
            d_model=self.d_model,
            vocab_size=self.vocab_size,
            saes=tuple(self.saes[layer].info for layer in sorted(self.saes)),
            bos_token_id=int(bos) if bos is not None else -1,
            eos_token_ids=self.eos_ids,
            pad_token_id=self.pad_id,
            n_post_instruction_tokens=self._post_instruction_tokens(),
            engine=self.engine_name,
            dtype=str(self.dtype).removeprefix("torch."),
            special_token_ids=special,
            batch_invariant=bool(getattr(self, "batch_invariant", False)),
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    # ------------------------------------------------------------------ requests

    def render(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: chat template for messages, raw text (with BOS) otherwise."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt: empty prompt")
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            bos = self.tokenizer.bos_token_id
            if bos is not None and (not ids or ids[0] != bos):
                ids = [int(bos), *ids]
        else:
            if not prompt or not any(m.content for m in prompt):
                raise InvalidRequest("prompt: empty messages")
            msgs = [{"role": m.role, "content": m.content} for m in prompt]
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(str(text), add_special_tokens=False)["input_ids"]
        if len(ids) > self.limits.max_prompt_tokens:
            raise InvalidRequest(
                f"prompt: {len(ids)} tokens exceed max_prompt_tokens={self.limits.max_prompt_tokens}"
            )
        return [int(i) for i in ids]

    def _batch_ids(self, requests: Sequence[Request]) -> list[list[int]]:
        """Every request's prompt ids, after the batch-size limit (errors name the item)."""
        if not requests:
            raise InvalidRequest("items: empty request")
        if len(requests) > self.limits.max_batch_items:
            raise LimitExceeded(f"items: {len(requests)} items exceed max_batch_items={self.limits.max_batch_items}")
        out = []
        for i, r in enumerate(requests):
            try:
                out.append(self.render(r.prompt))
            except InvalidRequest as exc:
                raise InvalidRequest(f"items[{i}].{exc}") from None
        return out

    def tokenize(self, prompts: Sequence[Prompt], raw: bool = False) -> list[list[int]]:
        """Engine protocol: `render` per prompt, or (raw) text without any special token."""
        out = []
        for i, p in enumerate(prompts):
            try:
                if not raw:
                    out.append(self.render(p))
                    continue
                if not isinstance(p, str) or not p:
                    raise InvalidRequest("prompt: raw tokenization needs a non-empty text prompt")
                ids = [int(t) for t in self.tokenizer(p, add_special_tokens=False)["input_ids"]]
                if len(ids) > self.limits.max_prompt_tokens:
                    raise InvalidRequest(
                        f"prompt: {len(ids)} tokens exceed max_prompt_tokens={self.limits.max_prompt_tokens}")
                out.append(ids)
            except InvalidRequest as exc:
                raise InvalidRequest(f"prompts[{i}].{exc}") from None
        return out

    def sae_rows(
        self,
        layers: Sequence[int] | None = None,
        latents: Mapping[int, Sequence[int]] | None = None,
        direction: Sequence[float] | np.ndarray | None = None,
        top_k: int = 0,
        rank_by: RankBy = "cosine",
        decoder: bool = True,
        encoder: bool = False,
    ) -> dict[int, SAERows]:
        """Engine protocol: SAE weights / the decoder-cosine ranking, read from this process's SAEs."""
        from .sae_runtime import sae_rows  # torch: imported when used

        return sae_rows(self.saes, layers, latents, direction, top_k, rank_by, decoder, encoder)

    def _check_sampling(self, requests: Sequence[Request]) -> None:
        """max_new_tokens within the limit and stop ids inside the vocabulary, per item."""
        for i, r in enumerate(requests):
            if r.sampling.max_new_tokens > self.limits.max_new_tokens:
                raise InvalidRequest(
                    f"items[{i}].sampling.max_new_tokens={r.sampling.max_new_tokens} exceeds the limit {self.limits.max_new_tokens}"
                )
            for t in r.sampling.stop_token_ids:
                if not 0 <= t < self.vocab_size:
                    raise InvalidRequest(f"items[{i}].sampling.stop_token_ids: unknown token id {t}")

    def _check_score_args(self, token_ids: Sequence[int], top_k: int) -> None:
        for t in token_ids:
            if not 0 <= int(t) < self.vocab_size:
                raise InvalidRequest(f"token_ids: unknown token id {t} (vocab size {self.vocab_size})")
        if top_k < 0 or top_k > self.vocab_size:
            raise InvalidRequest(f"top_k must be in [0, {self.vocab_size}]")

    # ------------------------------------------------------------------ generation

    def generate_iter(self, requests: Sequence[Request]) -> Iterator[StreamEvent]:  # pragma: no cover - interface
        raise NotImplementedError

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Every item's Completion: the final events of `generate_iter`."""
        results: list[Completion | None] = [None] * len(requests)
        for event in self.generate_iter(requests):
            if event.finished:
                results[event.index] = event.completion
        return [r for r in results if r is not None]
