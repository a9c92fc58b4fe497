"""A generation batch that rows join and leave at step boundaries: continuous batching for the HF engine.

The rows share one left-padded KV cache (transformers' `DynamicCache`). A newcomer is prefilled in a
forward of its own; its cache and the running batch's are then left-padded to a common length and
concatenated along the batch axis. A finished or cancelled row is removed from the cache at once, and
the columns of padding every remaining row has are trimmed. A row's keys and values are the same
numbers whatever shares the cache, and its position ids come from its own length, so in the
batch-invariant mode (server/batch_invariant.py) every row stays bit-identical to the row run alone;
`tests/test_continuous_batching.py` checks that for rows that join and finish at different steps.

The same object runs a lone `HFEngine.generate_iter` call (all rows admitted at once), so there is one
decoding loop. Cache layers other than full and sliding-window dynamic layers cannot be spliced:
`joinable` is False there and new rows wait until the batch is empty.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..audit.engine import Completion, StreamEvent
from ..audit.errors import non_finite
from ..audit.spec import Request
from .interventions import BatchPlan, RowCache, TokenContext

if TYPE_CHECKING:
    from .hf_engine import HFEngine

_row_ids = itertools.count()


@dataclass(eq=False)
class DecodeRow:
    """One request being generated: its prompt, sampling state and output so far.

    `index` is the item's index in its caller's call (events and errors carry it); `owner` is the
    caller's handle for the row (the batcher's call), opaque here.
    """

    request: Request
    prompt_ids: list[int]
    index: int
    owner: Any = None
    cost: int = 0  # padded tokens the row can occupy: prompt + max_new_tokens
    stops: set[int] = field(default_factory=set)
    gen: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    key: int = field(default_factory=lambda: next(_row_ids))  # names the row in the plan's RowCache

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def seq_len(self) -> int:
        """Positions the model reads for the row: the prompt and every generated token but the last."""
        return self.prompt_len + self.request.sampling.max_new_tokens - 1


def _window(layer: Any) -> int | None:
    """The number of past keys a sliding-window layer keeps (None for a full layer)."""
    return int(layer.sliding_window) - 1 if isinstance(layer, DynamicSlidingWindowLayer) else None


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers (typed loosely: transformers' layer classes differ in their attributes)."""
    return list(cache.layers)


def spliceable(cache: DynamicCache) -> bool:
    """Whether `_pad_cache` / `_trim_cache` know every layer of `cache` (full or sliding-window dynamic
    layers, initialised, not recording their past)."""
    for layer in _layers(cache):
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) or not layer.is_initialized:
            return False
        w = _window(layer)
        if getattr(layer, "record_past", False) or (w is not None and w < 1):
            return False
    return True


def _resize(cache: DynamicCache, old: int, new: int) -> None:
    """Make `cache`, holding `old` positions per row, hold `new`: left-pad with zeros (new > old) or
    drop the first old - new positions (new < old). A sliding layer keeps its last `window` of them."""
    for layer in _layers(cache):
        w = _window(layer)
        have, want = layer.keys.shape[-2], (new if w is None else min(new, w))
        if want > have:
            pad = list(layer.keys.shape)
            pad[-2] = want - have
            layer.keys = torch.cat([layer.keys.new_zeros(pad), layer.keys], dim=-2)
            layer.values = torch.cat([layer.values.new_zeros(pad[:-1] + [layer.values.shape[-1]]), layer.values], dim=-2)
        elif want < have:
            layer.keys = layer.keys[..., have - want :, :].contiguous()
            layer.values = layer.values[..., have - want :, :].contiguous()
        if w is not None:
            layer.cumulative_length = new


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """`mask` [B, T] with zero columns prepended up to `length`."""
    return torch.cat([mask.new_zeros(mask.shape[0], length - mask.shape[1]), mask], dim=1)


class DecodeBatch:
    """Rows generating together on one HFEngine: `admit` prefills newcomers and splices them in, `pick`
    chooses every row's next token (finished rows leave), `advance` runs the next decode forward."""

    def __init__(self, engine: HFEngine) -> None:
        self.engine = engine
        self.rows: list[DecodeRow] = []
        self.joinable = True  # False once a cache turned out not to be spliceable
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, T]: 1 where a row has a real token; T = the cache's length
        self._logits: torch.Tensor | None = None  # [B, vocab]: each row's next-token logits (float32)
        self._plan: BatchPlan | None = None
        self._plan_rows: list[int] | None = None  # row keys the plan was compiled for
        self._parsed = RowCache()

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def padded_tokens(self) -> int:
        """Rows x cache length: the padded size of the next forward."""
        return 0 if self._mask is None else int(self._mask.numel())

    # ------------------------------------------------------------------ joining

    def admit(self, requests: Sequence[Request], indices: Sequence[int] | None = None,
              owners: Sequence[Any] | None = None, prompt_ids: Sequence[list[int]] | None = None) -> list[DecodeRow]:
        """Validate and prefill `requests` in a forward of their own, then add them to the batch.

        `indices` (default 0..n-1) become the rows' `index`, which events and row errors carry;
        `prompt_ids`, the prompts as the caller already rendered them (`_batch_ids`; else rendered here).
        Validation errors (InvalidRequest, NotFound, LimitExceeded) are raised before the batch
        changes and name items by their position in `requests` (the batcher maps them back).
        Raises RuntimeError when the batch holds rows and its cache cannot be spliced (`joinable`)."""
        eng = self.engine
        ids = [list(p) for p in prompt_ids] if prompt_ids is not None else eng._batch_ids(requests)
        eng._check_sampling(requests)
        idx = list(indices) if indices is not None else list(range(len(requests)))
        rows = [
            DecodeRow(r, p, i, owners[k] if owners is not None else None, len(p) + r.sampling.max_new_tokens,
                      eng.stop_set(r.sampling), eng._generator(r))
            for k, (r, p, i) in enumerate(zip(requests, ids, idx, strict=True))
        ]
        plan = self._compile(rows)
        if self.rows and not self.joinable:
            raise RuntimeError("this model's KV cache cannot be spliced: wait until the batch is empty")
        input_ids, mask, pos = eng._left_pad(ids)
        plen = torch.tensor([len(x) for x in ids], dtype=torch.long, device=eng.device)
        cache = DynamicCache(config=eng.model.config)
        with eng._active(plan), torch.no_grad():
            eng._ctx = eng._prompt_ctx(mask, pos, plen)
            out = eng._forward(input_ids, mask, pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        self._join(rows, cache, mask, logits)
        return rows

    def _join(self, rows: list[DecodeRow], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor) -> None:
        if self._cache is None or self._mask is None or self._logits is None:
            self.rows, self._cache, self._mask, self._logits = rows, cache, mask, logits
            self.joinable = spliceable(cache)
            return
        if not spliceable(cache):
            raise RuntimeError("this model's KV cache cannot be spliced")
        ta, tb = self._mask.shape[1], mask.shape[1]
        T = max(ta, tb)
        _resize(self._cache, ta, T)
        _resize(cache, tb, T)
        for mine, theirs in zip(_layers(self._cache), _layers(cache), strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self._mask = torch.cat([_left_pad_mask(self._mask, T), _left_pad_mask(mask, T)], dim=0)
        self._logits = torch.cat([self._logits, logits], dim=0)
        self.rows = self.rows + rows

    # ------------------------------------------------------------------ leaving

    def remove(self, gone: Sequence[DecodeRow]) -> None:
        """Take `gone` rows out of the batch (their cache rows and logits) and trim shared padding."""
        if not gone:
            return
        drop = {id(r) for r in gone}
        keep = [b for b, r in enumerate(self.rows) if id(r) not in drop]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[b] for b in keep]
        if not keep:
            self._cache = self._mask = self._logits = None
            return
        assert self._cache is not None and self._mask is not None and self._logits is not None
        sel = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        self._cache.batch_select_indices(sel)
        self._mask = self._mask.index_select(0, sel)
        self._logits = self._logits.index_select(0, sel)
        first = int(self._mask.any(0).long().argmax())  # columns before it are padding in every row
        if first and self.joinable:
            _resize(self._cache, self._mask.shape[1], self._mask.shape[1] - first)
            self._mask = self._mask[:, first:]

    # ------------------------------------------------------------------ stepping

    def pick(self) -> list[tuple[DecodeRow, StreamEvent | Exception]]:
        """Every row's next token from its logits, as a StreamEvent (index: the row's `index`), or the
        error that ends the row (non-finite logits). Finished and failed rows leave the batch."""
        if not self.rows or self._logits is None:
            return []
        eng = self.engine
        logits = self._logits
        finite = torch.isfinite(logits).all(-1).tolist()
        out: list[tuple[DecodeRow, StreamEvent | Exception]] = []
        done: list[DecodeRow] = []
        for b, row in enumerate(self.rows):
            if not finite[b]:
                out.append((row, non_finite(row.index, f"logits at generated token {len(row.tokens)}",
                                            bool(row.request.interventions))))
                done.append(row)
                continue
            tok = eng._pick(logits[b], row.request, row.gen)
            finish = None
            if tok in row.stops:
                finish = "stop"
            else:
                row.tokens.append(tok)
                if len(row.tokens) >= row.request.sampling.max_new_tokens:
                    finish = "length"
            new_text = str(eng.tokenizer.decode(row.tokens, skip_special_tokens=True))
            if finish is None and new_text.endswith("\ufffd"):
                delta = ""  # an incomplete UTF-8 sequence: wait for its next byte (stream == final text)
            else:
                delta, row.text = new_text[len(row.text):], new_text
            comp = None
            if finish:
                done.append(row)
                comp = Completion(new_text, list(row.tokens), finish, row.prompt_len)
            out.append((row, StreamEvent(row.index, delta, [] if finish == "stop" else [tok], finish is not None,
                                         finish or "", comp)))
        self.remove(done)
        return out

    def advance(self) -> None:
        """One decode forward: feed every row its last token, at its own position."""
        if not self.rows:
            return
        assert self._cache is not None and self._mask is not None
        eng = self.engine
        dev = eng.device
        plan = self._compile(self.rows)
        nxt = torch.tensor([r.tokens[-1] for r in self.rows], dtype=torch.long, device=dev).unsqueeze(1)
        step_pos = torch.tensor([r.prompt_len + len(r.tokens) - 1 for r in self.rows], dtype=torch.long,
                                device=dev).unsqueeze(1)
        plen = torch.tensor([r.prompt_len for r in self.rows], dtype=torch.long, device=dev)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.rows), 1)], dim=1)
        with eng._active(plan), torch.no_grad():
            eng._ctx = TokenContext(step_pos, torch.zeros_like(step_pos, dtype=torch.bool), plen)
            out = eng._forward(nxt, self._mask, step_pos, past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        self._logits = out.logits[:, -1, :].float()

    def _compile(self, rows: list[DecodeRow]) -> BatchPlan | None:
        """The plan for `rows` (each row's interventions parsed once, when it is admitted)."""
        keys = [r.key for r in rows]
        if rows is self.rows and keys == self._plan_rows:
            return self._plan
        plan = self.engine._plan_for([r.request for r in rows], [r.prompt_len for r in rows],
                                     [r.seq_len for r in rows], row_keys=keys, row_cache=self._parsed)
        if rows is self.rows:
            self._plan, self._plan_rows = plan, keys
        return plan
