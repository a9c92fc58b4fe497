"""The one intervention module shared by every engine: compile per-row specs into a batch plan and
apply it to residual-stream tensors at hook points.

Rows are the requests of a batch; each has its own interventions. Per SAE layer, rows whose ops
edit the same latents the same way form a group, and a token goes through the SAE on its own
group's latents only (it never pays for another request's latents). Several groups run in one
padded batched matmul (tokens [P, T_max, d] against the slices in the SAE's slot pool [P, S, d]), so
the op count per layer does not grow with the number of distinct latent sets. Token scopes are evaluated from a `TokenContext` the
engine sets before each forward call; the padded [B, T] layout is flattened to the packed one, so
both engines run the same arithmetic.

Math (docs/interventions.md): ablate  h' = h - sum_{i in S} z_i W_dec[i]  (error term kept);
clamp  h' = h + sum_i (c_i - z_i) W_dec[i];  scale  h' = h + sum_i (alpha - 1) z_i W_dec[i];  direction ablation  h' = h - (h.r) r;
addition  h' = h + a r.  Non-separable SAEs (TopK) go through sae-lens's full encode/decode.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..audit.errors import InvalidRequest, NotFound
from ..audit.spec import (
    AblateDirection,
    AblateLatents,
    AddDirection,
    ClampLatents,
    Intervention,
    ScaleLatents,
    TokenScope,
)
from . import fused_hook
from .sae_runtime import LayerSAE

SCOPE_ALL, SCOPE_PROMPT, SCOPE_GENERATED, SCOPE_LAST_N, SCOPE_POSITIONS = range(5)
_SCOPE_CODES = {"all": 0, "prompt": 1, "generated": 2, "last_n_prompt": 3, "positions": 4}
_NO_POS = -(10**9)
OVERFLOW_LIMIT = math.sqrt(float(torch.finfo(torch.float32).max))  # ~1.8e19
"""A residual-stream entry larger than this overflows float32 when the next RMSNorm/LayerNorm squares
it, so the forward pass turns to inf/NaN: clamp values and coefficients that add more are rejected."""


@dataclass
class TokenContext:
    """Where the tokens of the current forward call sit. Shapes [B, T]; B rows of the batch.

    position: 0-based position in the unpadded sequence (-1 for padding);
    is_prompt: the token belongs to the prompt (False for generated tokens and padding).

    Packed form (`TokenContext.packed`, for engines that flatten the batch, like vLLM): the
    tensors are [1, N] over the N tokens of the step, `row` [N] names each token's plan row
    (-1 for padding) and `prompt_len` is per plan row. Ops then act on h [1, N, d], each on
    the tokens of its own row only, without padding the rows to a common length.
    """

    position: torch.Tensor
    is_prompt: torch.Tensor
    prompt_len: torch.Tensor  # [B] (packed: [R], one per plan row)
    row: torch.Tensor | None = None  # packed form only: [N] plan row of each token
    row_on_host: np.ndarray | None = None  # `row` as a host array, when the engine has it there

    _flat: TokenContext | None = field(default=None, init=False, repr=False)

    def flattened(self) -> TokenContext:
        """This padded [B, T] context as a packed one over its B * T tokens (made once, for every layer)."""
        if self._flat is None:
            B, T = self.position.shape
            rows = torch.arange(B, device=self.position.device).repeat_interleave(T)
            pos = self.position.reshape(-1)
            self._flat = TokenContext.packed(pos, self.is_prompt.reshape(-1), self.prompt_len,
                                             torch.where(pos >= 0, rows, -1))
        return self._flat

    def host_row(self) -> np.ndarray:
        """The packed `row` as a host array (a copy from the device only if the engine gave none)."""
        if self.row_on_host is None:
            assert self.row is not None
            self.row_on_host = self.row.cpu().numpy()
        return self.row_on_host

    @classmethod
    def packed(
        cls, position: torch.Tensor, is_prompt: torch.Tensor, prompt_len: torch.Tensor, row: torch.Tensor,
        row_on_host: np.ndarray | None = None,
    ) -> TokenContext:
        """A context over N flattened tokens ([N] tensors) of several rows (requests); `row_on_host`:
        `row` as a host array if the engine has one (spares a device-to-host copy)."""
        return cls(position.reshape(1, -1), is_prompt.reshape(1, -1), prompt_len, row.reshape(-1),
                   None if row_on_host is None else row_on_host.reshape(-1))

    @property
    def valid(self) -> torch.Tensor:
        return self.position >= 0


class Resolver:
    """Looks up registered latent sets and directions by id (the server's artifact store)."""

    def latent_set(self, set_id: str) -> dict[int, list[int]]:  # pragma: no cover - interface
        raise NotFound(f"latent_set_id {set_id!r} is not registered")

    def direction(self, direction_id: str) -> np.ndarray:  # pragma: no cover - interface
        raise NotFound(f"direction_id {direction_id!r} is not registered")


@dataclass
class _ScopeTable:
    """Per-op scope parameters, evaluated to [O, T] masks against a TokenContext."""

    rows: torch.Tensor  # [O] long
    kind: torch.Tensor  # [O] long
    n: torch.Tensor  # [O] long
    positions: torch.Tensor  # [O, P] long (resolved, _NO_POS padded)
    all_tokens: bool = False  # every op has scope "all": the mask is each op's own valid tokens

    def masks(self, ctx: TokenContext) -> torch.Tensor:
        if self.all_tokens and ctx.row is not None:  # the common case, in 3 ops instead of ~20
            return (ctx.row.unsqueeze(0) == self.rows.unsqueeze(1)) & (ctx.position >= 0)
        if ctx.row is None:
            pos = ctx.position.index_select(0, self.rows)  # [O, T]
            is_prompt = ctx.is_prompt.index_select(0, self.rows)
            valid = pos >= 0
        else:  # packed: every op sees all N tokens, restricted to those of its own row
            own = ctx.row.unsqueeze(0) == self.rows.unsqueeze(1)  # [O, N]
            pos = ctx.position.expand(len(self.rows), -1)
            valid = (pos >= 0) & own
            is_prompt = ctx.is_prompt.expand(len(self.rows), -1) & own
        plen = ctx.prompt_len.index_select(0, self.rows).unsqueeze(1)
        kind = self.kind.unsqueeze(1)
        m_all = valid
        m_prompt = is_prompt
        m_gen = valid & ~is_prompt
        m_last = is_prompt & (pos >= plen - self.n.unsqueeze(1))
        m_pos = (pos.unsqueeze(-1) == self.positions.unsqueeze(1)).any(-1) & valid
        out = torch.where(kind == SCOPE_ALL, m_all, m_prompt)
        out = torch.where(kind == SCOPE_GENERATED, m_gen, out)
        out = torch.where(kind == SCOPE_LAST_N, m_last, out)
        out = torch.where(kind == SCOPE_POSITIONS, m_pos, out)
        return out


def _scope_table(entries: list[tuple[int, TokenScope]], prompt_lens: Sequence[int], device: torch.device) -> _ScopeTable:
    rows, kinds, ns, pos_lists = [], [], [], []
    for row, scope in entries:
        rows.append(row)
        kinds.append(_SCOPE_CODES[scope.kind])
        ns.append(scope.n)
        resolved = [p if p >= 0 else prompt_lens[row] + p for p in scope.positions]
        pos_lists.append(resolved)
    width = max([1] + [len(p) for p in pos_lists])
    pos = torch.full((len(entries), width), _NO_POS, dtype=torch.long)
    for i, p in enumerate(pos_lists):
        if p:
            pos[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    return _ScopeTable(
        torch.tensor(rows, dtype=torch.long, device=device),
        torch.tensor(kinds, dtype=torch.long, device=device),
        torch.tensor(ns, dtype=torch.long, device=device),
        pos.to(device),
        all_tokens=all(k == SCOPE_ALL for k in kinds),
    )


@dataclass
class _LatentGroup:
    """The rows of a batch whose ops at one layer edit the same latents the same way.

    Their tokens go through one gather over the group's own latents (not the batch's union), so a
    token only pays for its own request's latents. Op k of row r of the group is `ops[r, k]`.
    """

    key: tuple[int, ...]  # sorted latent ids: the slice-cache key
    latents: torch.Tensor  # [S] long
    ops: torch.Tensor  # [R, K] long: indices into the layer's scope table
    membership: torch.Tensor  # [K, S] (1 where op k touches the latent)
    scales: torch.Tensor  # [K, S] a * membership
    targets: torch.Tensor  # [K, S] b * membership
    edit_key: Hashable  # what the group's rows edit (the ops' latents, a and b as bytes)
    constants: torch.Tensor  # [3, K, S]: membership, scales, targets stacked (what the slot pool copies)
    rows: tuple[int, ...]  # the plan rows in the group
    kernel: fused_hook.KernelSet | None  # one-op groups of a fused plan: the set as the fused kernel reads it

    @property
    def single(self) -> bool:
        """One op touching every latent of the group: its tokens need no per-latent weights."""
        return self.ops.shape[1] == 1


_PAD_LIMIT, _PAD_SLACK = 2.0, 16
"""The slot path pads every group to the largest group's token count; when that more than doubles
the tokens the SAE sees and adds more than `_PAD_SLACK` padded tokens per group (a long prefill
batched with decodes), each group longer than twice the median runs on its own slot (there the
arithmetic dominates, not the ~20 small ops of a run) and the rest stay together."""


_SPARSE_DECODE_FRACTION = 1 / 8
"""Decode through the non-zero coefficients alone when there are at most this fraction as many as
decoder rows of the gathered sets. An ablation's coefficient is -z, non-zero only where a latent
fires (about L0 / d_sae of a trained SAE's latents): at a decode step (a token or a few per set)
reading those rows beats reading every row of every set, since the step is bound by reading weights.
A long prefill has many non-zero terms per row, and there the `bmm` over rows already gathered is
faster (hook_cost.py, 160-token prefill at 1 % firing: sparse 1.24x the bmm's time)."""

_SPARSE_DECODE_FRACTION_UNGATHERED = 2.0
"""The same bound when the set's decoder rows are not gathered yet (the slot pool gathers them only
for a dense decode): the `bmm` must then first read every row of the set from the SAE's decoder, and
the sparse path stays faster up to a few non-zero terms per row (measured with the caches cold, as
between two layers of a forward pass: 160 tokens, 783 terms over 500 latents, 0.86 ms sparse against
1.32 ms gather + `bmm`)."""


def decode_coefficients(
    coeff: torch.Tensor, W_dec: torch.Tensor | Callable[[], torch.Tensor],
    rows: tuple[torch.Tensor, torch.Tensor] | None = None, sparse_only: bool = False,
) -> torch.Tensor:
    """sum_s coeff[g, t, s] W_dec[g, s] for coeff [G, T, S] and W_dec [G, S, d] -> [G * T, d].

    Sparse coefficients skip the zero terms: each token sums its own non-zero terms in latent order
    (`embedding_bag`, one bag per token, so its result does not depend on the other tokens of the
    batch), otherwise one `torch.bmm`. W_dec may be a function that makes it, called only for the
    `bmm`; with `rows` = (latent ids [G, S], the SAE's decoder [d_sae, d]) the sparse terms read
    their rows from the SAE's decoder instead, and W_dec is made only past
    `_SPARSE_DECODE_FRACTION_UNGATHERED`. `sparse_only` never takes the `bmm`: whether it would is
    decided by the whole batch's count of terms, and its sum over a set padded to the batch's widest
    rounds differently from the set alone (the batch-invariant mode needs neither)."""
    G, T, S = coeff.shape
    flat = coeff.reshape(-1)
    nz = flat.nonzero().squeeze(1)  # flat indices (g * T + t) * S + s, in (g, t, s) order
    fraction = _SPARSE_DECODE_FRACTION if rows is None or not callable(W_dec) else _SPARSE_DECODE_FRACTION_UNGATHERED
    if not sparse_only and nz.shape[0] > fraction * G * S:
        dense = W_dec() if callable(W_dec) else W_dec
        return torch.bmm(coeff, dense).view(G * T, -1)
    gt = torch.div(nz, S, rounding_mode="floor")  # the output row g * T + t (sorted: one bag per token)
    dec_row = nz if T == 1 else torch.div(gt, T, rounding_mode="floor") * S + (nz - gt * S)  # g * S + s
    if rows is not None:
        latent_ids, table = rows
        picked = latent_ids.reshape(-1).index_select(0, dec_row)
    else:
        table = (W_dec() if callable(W_dec) else W_dec).reshape(G * S, -1)
        picked = dec_row
    weights = flat.index_select(0, nz)
    if table.dtype != weights.dtype:  # e.g. a bf16 SAE: terms in the coefficients' precision
        terms = table.index_select(0, picked) * weights.unsqueeze(-1)
        return terms.new_zeros((G * T, table.shape[-1])).index_add_(0, gt, terms)
    starts = torch.searchsorted(gt, torch.arange(G * T, device=gt.device))
    return torch.nn.functional.embedding_bag(picked, table, starts, mode="sum", per_sample_weights=weights)


@dataclass
class _GroupBatch:
    """Constant parts of the batched (one `torch.bmm` for all groups) path of one layer plan.

    The groups' encoder/decoder slices and their edit constants live in the SAE's slot pool
    (`LayerSAE.pool`, [P, S, d] and [P, 3, K, S]), written once when a group first takes a slot: a
    new batch composition only looks its groups' slots up."""

    keys: tuple[tuple[int, ...], ...]  # the groups' latent sets
    edits: tuple[tuple[Hashable, torch.Tensor], ...]  # (what the group edits, its [3, K, S] constants)
    op_group: torch.Tensor  # [O, 1] long: the group of each op of the layer's scope table
    op_k: torch.Tensor  # [O, K_max] float: one-hot position of each op within its row's ops
    row_group: np.ndarray  # [max row + 1] on the host: the group of each plan row, -1 without ops here
    single: bool  # every row has one op covering its group's latents: per-token weights are not needed


@dataclass
class LatentLayerPlan:
    """All latent ablations/clamps/scalings of a batch at one SAE layer, grouped by latent set.

    Each op sets its latents to z' = a z + b: ablation (a, b) = (0, 0), clamp (0, c), scale (alpha, 0).
    Where several ops of a row cover the same latent at the same token, their a and b add up.
    With several groups on a separable SAE they run together (`_apply_slots`): tokens placed by their group's slot
    into [P, T_max, d], one `torch.bmm` to encode against the SAE's slot pool and one sparse (or `bmm`)
    decode, so the op count per layer does not grow with the number of distinct latent sets.
    """

    sae: LayerSAE
    scopes: _ScopeTable  # one entry per op
    groups: list[_LatentGroup]
    batched: bool = True  # the slot path (False: always the per-group loop, for comparisons)
    invariant: bool = False  # batch-invariant: one path and a sparse decode whatever the batch holds
    fused: bool = False  # sets with few tokens this step through the fused CPU kernel (server/fused_hook.py)
    _batch: _GroupBatch | None = field(default=None, init=False, repr=False)

    def apply(self, h: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        """h [B, T, d] -> h' with every row's ops at this layer applied (exact, error term kept)."""
        if ctx.row is not None:
            return self._apply_packed(h, ctx)
        B, T, d = h.shape  # padded: the same computation over the flattened tokens
        return self._apply_packed(h.reshape(1, B * T, d), ctx.flattened()).reshape(B, T, d)

    def _apply_packed(self, h: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        """h [1, N, d]: only the tokens the ops touch go through the SAE, each on its own group's latents."""
        step = self._step_kernel
        if step is not None and ctx.row is not None and h.dtype == torch.float32 and h.is_contiguous():
            # the common case (every token of a row edited, a float32 stream): grouping and kernel in one C call
            out, left = step(h, ctx.host_row())
            return out if left is None else self._apply_slots(out, ctx, left)
        if self.sae.separable and (self.invariant or self._fused_arrays is not None
                                   or (self.batched and len(self.groups) > 1)):
            return self._apply_slots(h, ctx)
        return self._apply_looped(h, self.scopes.masks(ctx))  # one group: the loop's few ops, its slices cached

    def edit_in_place(self, stream: torch.Tensor, residual: torch.Tensor | None, ctx: TokenContext) -> bool:
        """This layer's ops written into a packed stream [N, d] itself, `residual` (vLLM's hidden / residual
        pair, zeroed) added in first, where the kernel edits the stream directly (`_step_kernel`): no
        tensor is made for the sum or the result. False, with nothing touched, where it cannot."""
        step = self._step_kernel
        if (step is None or ctx.row is None or stream.dtype != torch.float32 or not stream.is_contiguous()
                or (residual is not None and (residual.dtype != torch.float32 or not residual.is_contiguous()
                                              or residual.shape != stream.shape))):
            return False
        left = step.in_place(stream, residual, ctx.host_row())
        if left is not None:  # long prefills: the slot path on the summed stream, written back
            stream.copy_(self._apply_slots(stream.view(1, *stream.shape[-2:]), ctx, left).view_as(stream))
        return True

    def _apply_looped(self, h: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One gather per group over its own latents for its own tokens (~20 small ops per group): a
        single group (fewer ops than the slot path), SAEs that are not separable, and the reference
        the slot path is tested against."""
        x_all = h[0]
        toks: list[torch.Tensor] = []
        news: list[torch.Tensor] = []
        for g in self.groups:
            R, K = g.ops.shape
            m = masks.index_select(0, g.ops.reshape(-1)).view(R, K, -1).any(0)  # [K, N]: rows are disjoint
            tok = m.any(0).nonzero().squeeze(-1)
            if tok.numel() == 0:
                continue
            x = x_all.index_select(0, tok)
            if g.single:
                toks.append(tok)
                news.append(x + self._delta(x, g, None, g.scales[0], g.targets[0]).to(h.dtype))
                continue
            w = m.index_select(1, tok).T.to(g.membership.dtype)  # [A, K]
            weight = (w @ g.membership).clamp_(max=1.0)
            toks.append(tok)
            news.append(x + self._delta(x, g, weight, w @ g.scales, w @ g.targets).to(h.dtype))
        if not toks:
            return h
        return x_all.index_copy(0, torch.cat(toks), torch.cat(news)).unsqueeze(0)

    @functools.cached_property
    def _fused_arrays(self) -> fused_hook.SAEArrays | None:
        """The SAE's arrays for the fused kernel when this plan may use it (decided once): every row's
        op covers its whole set (else per-token op weights are needed, which only the slot path has)."""
        ok = self.fused and all(g.single for g in self.groups) and self.scopes.rows.device.type == "cpu"
        return self.sae.fused_arrays() if ok else None

    @functools.cached_property
    def _step_kernel(self) -> fused_hook.StepKernel | None:
        """The kernel with this plan's constants bound, where it edits the stream in place: every token of a
        row takes the row's op, and the SAE reads the stream as it is (made once)."""
        arrays = self._fused_arrays
        if arrays is None or not self.scopes.all_tokens or self.sae.normalize != "none":
            return None
        return fused_hook.StepKernel(_row_groups(self.groups), self._set_tables, arrays)

    @functools.cached_property
    def _set_tables(self) -> fused_hook.SetTables:
        """The groups' latent sets and edits as the kernel reads them (their addresses: the sets are made
        once per group constants, not per plan)."""
        return fused_hook.SetTables(tuple(
            g.kernel if g.kernel is not None else fused_hook.kernel_set(g.latents, g.scales[0], g.targets[0])
            for g in self.groups))

    def _batch_consts(self) -> _GroupBatch:
        gb = self._batch
        if gb is None:
            gb = self._batch = _group_batch(self.groups, self.scopes.rows)
        return gb

    def _token_groups(self, ctx: TokenContext, gb: _GroupBatch) -> tuple[np.ndarray, torch.Tensor | None]:
        """Each token's group at this layer, -1 if no op touches it ([N], on the host), and the op masks
        [O, N] if they had to be evaluated (scopes other than "all")."""
        if self.scopes.all_tokens and ctx.row is not None:
            row = ctx.host_row()
            rg = gb.row_group
            inside = (row >= 0) & (row < len(rg))
            return np.where(inside, rg[np.where(inside, row, 0)], -1), None
        masks = self.scopes.masks(ctx)
        return torch.where(masks, gb.op_group, -1).amax(0).cpu().numpy(), masks

    def _apply_slots(self, h: torch.Tensor, ctx: TokenContext, left: np.ndarray | None = None) -> torch.Tensor:
        """All groups through the SAE's slot pool: a constant number of ops whatever the number of groups.

        Each touched token belongs to one row, hence one group, hence one slot of the pool: tokens are
        placed by slot, padded to [P, T_max, d], encoded with one `bmm` against the pool's encoder rows
        [P, S, d] (read transposed) and decoded (`decode_coefficients`). Padded latents and slots of
        other batches have zero weights, biases, scales and targets here (their coefficient is exactly
        0); padded token slots are computed and dropped. Where tokens are grouped is worked out on the
        host (a few small numpy arrays; no device sync per layer). A long group beside short ones (a
        prefill among decodes, see _PAD_LIMIT) runs on its own slot, so that the short ones are not
        padded to its length."""
        gb = self._batch_consts()
        G = len(self.groups)
        arrays = self._fused_arrays
        x_all = h[0]
        base = x_all  # what the slot path's results are written into
        tok_group, masks = self._token_groups(ctx, gb)
        if left is not None:  # `_step_kernel` edited h's other sets: only these (long prefills) remain
            tok_group = np.where(left[np.maximum(tok_group, 0)] & (tok_group >= 0), tok_group, -1)
        tok = np.flatnonzero(tok_group >= 0)
        if tok.size == 0:
            return base.unsqueeze(0)
        order = np.argsort(tok_group[tok], kind="stable")
        tok = tok[order]
        gid = tok_group[tok]
        counts = np.bincount(gid, minlength=G)
        sae = self.sae
        toks: list[torch.Tensor] = []
        news: list[torch.Tensor] = []
        if arrays is not None and left is None:  # sets with few tokens this step (decodes): the fused kernel, no slots
            few = (counts <= fused_hook.MAX_TOKENS)[gid]
            if few.any():
                base, edited = self._apply_fused(x_all, tok[few], gid[few], arrays)
                if edited is not None:
                    toks.append(edited[0])
                    news.append(edited[1])
                tok, gid = tok[~few], gid[~few]
                counts = np.bincount(gid, minlength=G)
                if tok.size == 0:
                    if toks:
                        base = base.index_copy(0, torch.cat(toks), torch.cat(news).to(h.dtype))
                    return base.unsqueeze(0)
        slot_in_group = np.arange(tok.size) - (np.cumsum(counts) - counts)[gid]
        present = np.flatnonzero(counts)
        runs = [present]
        t_max = int(counts.max())
        if G * t_max > _PAD_LIMIT * tok.size and G * t_max - tok.size > _PAD_SLACK * G:
            cap = 2 * int(np.sort(counts[present])[(present.size - 1) // 2])  # twice the (lower) median
            runs = [present[counts[present] <= cap]] + [np.array([g]) for g in present[counts[present] > cap]]
        with sae.pool_lock:
            if arrays is None:
                slots = np.asarray(sae.pool.assign(gb.keys, gb.edits, [g.latents for g in self.groups]))
            else:  # only the sets the kernel left (long prefills) take slots
                slots = np.full(G, -1, dtype=np.int64)
                slots[present] = sae.pool.assign([gb.keys[g] for g in present], [gb.edits[g] for g in present],
                                                 [self.groups[g].latents for g in present])
            for run in runs:
                if run.size == 0:
                    continue
                sel = np.flatnonzero(np.isin(gid, run)) if len(runs) > 1 else slice(None)
                t, new = self._encode_decode(x_all, tok[sel], gid[sel], slot_in_group[sel], slots, run, gb, masks, ctx)
                toks.append(t)
                news.append(new)
        return base.index_copy(0, torch.cat(toks), torch.cat(news).to(h.dtype)).unsqueeze(0)

    def _stream_editable(self, x_all: torch.Tensor) -> bool:
        """Can the kernel edit the stream's rows directly (the SAE reads the stream as it is, float32)?"""
        return self.sae.normalize == "none" and x_all.dtype == torch.float32 and x_all.is_contiguous()

    def _apply_fused(
        self, x_all: torch.Tensor, tok: np.ndarray, gid: np.ndarray, arrays: fused_hook.SAEArrays,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The fused kernel's part of `_apply_slots`, tokens `tok` of sets `gid`: (the stream with their rows
        edited in one pass, None), or, for an SAE that normalises its input or a stream in another precision,
        (x_all, (the tokens, their edited rows)) for the caller to write in."""
        if self._stream_editable(x_all):
            return fused_hook.fused_edit(x_all, tok, gid, self._set_tables, arrays), None
        tok_t = torch.from_numpy(tok).to(x_all.device)
        x = x_all.index_select(0, tok_t)
        x_in, scale = self.sae.normalise_in(x)
        delta = fused_hook.fused_delta(x_in, gid, self._set_tables, arrays)
        if not isinstance(scale, float) or scale != 1.0:
            delta = delta * scale
        return x_all, (tok_t, x + delta)

    def _encode_decode(
        self, x_all: torch.Tensor, tok: np.ndarray, gid: np.ndarray, slot_in_group: np.ndarray, slots: np.ndarray,
        run: np.ndarray, gb: _GroupBatch, masks: torch.Tensor | None, ctx: TokenContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, their edited values) for the groups of one run, over the pool slots they occupy."""
        sae, pool_of = self.sae, self.sae.pool
        pool, ids = pool_of.stack, pool_of.latent_ids
        assert pool is not None and pool.edits is not None and ids is not None
        lo, hi = (int(slots[run[0]]), int(slots[run[0]]) + 1) if run.size == 1 else (0, int(slots[run].max()) + 1)
        P = hi - lo
        w = max(len(gb.keys[g]) for g in run.tolist())  # the run's widest set: the pool may be wider
        t_max = int(np.bincount(gid).max())
        flat_np = (slots[gid] - lo) * t_max + slot_in_group  # each token's row in [P * T_max]
        device = x_all.device
        tok_t = torch.from_numpy(tok).to(device)
        flat = torch.from_numpy(flat_np).to(device)
        x = x_all.index_select(0, tok_t)
        x_in, scale = sae.normalise_in(x)
        d = x_in.shape[-1]
        W_enc_rows, b_enc = pool.W_enc_rows[lo:hi, :w], pool.b_enc[lo:hi, :, :w]
        edits = pool.edits[lo:hi, :, : gb.op_k.shape[1], :w]  # [P, 3, K_max, S]
        membership, scales, targets = edits[:, 0], edits[:, 1], edits[:, 2]
        X = x_in.new_zeros((P * t_max, d)).index_copy_(0, flat, x_in).view(P, t_max, d)
        pre = torch.baddbmm(b_enc, X, W_enc_rows.transpose(1, 2))  # [P, T_max, S]
        z = torch.relu(pre)
        if pool.threshold is not None:
            z = torch.where(pre > pool.threshold[lo:hi, :, :w], z, 0.0)
        if gb.single:  # weight 1 on the group's latents, 0 on padding: membership itself
            coeff = torch.addcmul(targets, scales - membership, z)
        else:
            if masks is None:
                masks = self.scopes.masks(ctx)
            w_tok = masks.index_select(1, tok_t).T.to(gb.op_k.dtype) @ gb.op_k  # [A, K_max]: each row's op k
            W = w_tok.new_zeros((P * t_max, w_tok.shape[1])).index_copy_(0, flat, w_tok).view(P, t_max, -1)
            weight = torch.bmm(W, membership).clamp_(max=1.0)
            coeff = torch.addcmul(torch.bmm(W, targets), torch.bmm(W, scales) - weight, z)
        run_slots = slots[run].tolist()
        delta = decode_coefficients(coeff, lambda: pool_of.decoder(run_slots, lo, hi)[:, :w],
                                    (ids[lo:hi, :w], sae.sae.W_dec), sparse_only=self.invariant).index_select(0, flat)
        if not isinstance(scale, float) or scale != 1.0:
            delta = delta * scale
        return tok_t, x + delta

    def _delta(
        self, x: torch.Tensor, g: _LatentGroup, weight: torch.Tensor | None, mul: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """The change to x [A, d] that sets the weighted latents of `g` to mul * z + target.

        weight None: every latent of the group, at every token (mul, target [S]); else [A, S] each."""
        sae = self.sae
        if sae.separable:
            sl = sae.slices(g.key)
            x_in, scale = sae.normalise_in(x)
            z = sae.sparse_acts(x_in, sl)  # [A, S]
            coeff = (mul - (1.0 if weight is None else weight)) * z + target  # z' - z (0 where not weighted)
            return decode_coefficients(coeff.unsqueeze(0), sl.W_dec.unsqueeze(0)) * scale
        z_full = sae.encode(x)
        z_sel = z_full[..., g.latents]
        z_new = z_full.clone()
        edited = mul * z_sel + target
        z_new[..., g.latents] = edited if weight is None else torch.where(weight > 0, edited, z_sel)
        recon_new = sae.decode(z_new)
        sae.encode(x)  # sae-lens run-time normalisation is stateful: each decode needs its encode
        return recon_new - sae.decode(z_full)


@dataclass
class DirectionPlan:
    """Direction ablations (at given layers) or additions (at one layer) of a batch."""

    scopes: _ScopeTable
    directions: torch.Tensor  # [O, d] unit vectors (times the coefficient for additions)
    layers: list[frozenset[int] | None]  # ablation: layers it applies at (None = all)

    def rows_at(self, layer: int) -> torch.Tensor | None:
        keep = [i for i, ls in enumerate(self.layers) if ls is None or layer in ls]
        if not keep:
            return None
        return torch.tensor(keep, dtype=torch.long, device=self.directions.device)

    def ablate(self, h: torch.Tensor, ctx: TokenContext, layer: int) -> torch.Tensor:
        ops = self.rows_at(layer)
        if ops is None:
            return h
        dirs = self.directions.index_select(0, ops).to(h.dtype)  # [O, d]
        mask = self.scopes.masks(ctx).index_select(0, ops).to(h.dtype)  # [O, T]
        if ctx.row is not None:  # packed: two matmuls over the N tokens, no [O, N, d] copies
            proj_t = (h[0] @ dirs.T) * mask.T  # [N, O]
            return h - (proj_t @ dirs).unsqueeze(0)
        rows = self.scopes.rows.index_select(0, ops)
        proj = (h.index_select(0, rows) @ dirs.unsqueeze(-1)).squeeze(-1) * mask  # [O, T] (a matmul, not einsum: batch_invariant)
        delta = proj.unsqueeze(-1) * dirs.unsqueeze(1)  # [O, T, d]
        return h.index_add(0, rows, -delta)

    def add(self, h: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        mask = self.scopes.masks(ctx).to(h.dtype)  # [O, T]
        if ctx.row is not None:  # packed
            return h + (mask.T @ self.directions.to(h.dtype)).unsqueeze(0)
        delta = mask.unsqueeze(-1) * self.directions.to(h.dtype).unsqueeze(1)
        return h.index_add(0, self.scopes.rows, delta)


@dataclass
class BatchPlan:
    """Every intervention of every row of one batch, compiled for the hook points."""

    latent_layers: dict[int, LatentLayerPlan] = field(default_factory=dict)
    ablations: DirectionPlan | None = None
    additions: dict[int, DirectionPlan] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.latent_layers and self.ablations is None and not self.additions


def _unit(vec: Sequence[float] | np.ndarray, d_model: int, field_name: str) -> torch.Tensor:
    """The unit vector of a direction, normalised in float64 (float32 entries near 3e38 overflow a
    float32 norm to inf, which would silently turn the direction into a zero vector)."""
    a = np.asarray(vec, dtype=np.float64)
    if a.ndim != 1 or a.shape[0] != d_model:
        raise InvalidRequest(f"{field_name}: direction has dimension {tuple(a.shape)}, expected ({d_model},)")
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise InvalidRequest(f"{field_name}: direction contains NaN or Inf (entry {bad[0]} is {a[bad[0]]})")
    peak = float(np.abs(a).max())
    if peak == 0.0:
        raise InvalidRequest(f"{field_name}: direction has zero norm")
    scaled = a / peak  # entries in [-1, 1]: the norm cannot overflow or underflow
    return torch.from_numpy(scaled / np.linalg.norm(scaled)).to(torch.float32)


def _check_overflow(amount: float, field_name: str, what: str) -> None:
    """Reject an edit that adds `amount` (float64) to some residual entry beyond OVERFLOW_LIMIT."""
    if not amount <= OVERFLOW_LIMIT:
        raise InvalidRequest(
            f"{field_name}: {what} adds up to {amount:.3g} to a residual-stream entry, beyond "
            f"{OVERFLOW_LIMIT:.3g} where the model's normalisation overflows float32 (the result would be NaN)"
        )


def _check_positions(scope: TokenScope, field_name: str, row: int, prompt_len: int, seq_len: int | None) -> None:
    """Explicit positions must be ones the model reads: -prompt_len <= p < seq_len (negative = from the prompt end)."""
    if scope.kind != "positions" or seq_len is None:
        return
    for j, p in enumerate(scope.positions):
        at = p if p >= 0 else prompt_len + p
        if not 0 <= at < seq_len:
            extra = f" + {seq_len - prompt_len} generated/completion tokens" if seq_len > prompt_len else ""
            raise InvalidRequest(
                f"{field_name}.scope.positions[{j}]: position {p} of items[{row}] is outside the {seq_len} positions "
                f"the model reads ({prompt_len}-token prompt{extra}); valid: {-prompt_len} to {seq_len - 1}"
            )


_GROUP_CACHE_SIZE = 1024
_GroupConstants = tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        fused_hook.KernelSet | None]
_GROUP_CACHE: OrderedDict[tuple, _GroupConstants] = OrderedDict()
_GROUP_CACHE_LOCK = threading.Lock()
"""A group's constants by (what its rows edit, device, dtype, with the kernel's copy or not): under load
every step has a new batch composition, but its latent sets are those of requests already seen, so a new
plan reuses them."""


def _op_edits(ids: np.ndarray, muls: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted unique latent ids, a, b per id) of one op; a latent listed twice keeps its last (a, b)."""
    uniq, first_from_end = np.unique(ids[::-1], return_index=True)
    last = len(ids) - 1 - first_from_end
    return uniq, muls[last], vals[last]


def _group_constants(
    edits: list[tuple[np.ndarray, np.ndarray, np.ndarray]], device: torch.device, dtype: torch.dtype,
    kernel_set: bool = False,
) -> _GroupConstants:
    """(key, latents, membership, scales, targets, the last three stacked, the fused kernel's copy of the set
    or None) of a group whose rows' ops edit `edits` in order; the copy is made for one-op groups when
    `kernel_set` (a fused plan's)."""
    if len(edits) == 1:  # one op (the common case): its ids are sorted and unique already
        ids, a, b = edits[0]
        stacked = torch.from_numpy(np.stack([np.ones_like(a), a, b])[:, None, :]).to(device=device, dtype=dtype)
        # for a fused plan, the kernel's copy (float32, as the kernel computes; mul = a - 1 as the slot path's scales - 1)
        kernel = fused_hook.kernel_set(ids, stacked[1, 0].float(), stacked[2, 0].float()) if kernel_set else None
        return tuple(ids.tolist()), torch.from_numpy(ids).to(device), stacked[0], stacked[1], stacked[2], stacked, kernel
    latents = np.unique(np.concatenate([ids for ids, _, _ in edits]))
    membership = np.zeros((len(edits), len(latents)), dtype=np.float64)
    scales = np.zeros_like(membership)
    targets = np.zeros_like(membership)
    for k, (ids, a, b) in enumerate(edits):
        cols = np.searchsorted(latents, ids)
        membership[k, cols] = 1.0
        scales[k, cols] = a
        targets[k, cols] = b
    stacked = torch.from_numpy(np.stack([membership, scales, targets])).to(device=device, dtype=dtype)
    return tuple(latents.tolist()), torch.from_numpy(latents).to(device), stacked[0], stacked[1], stacked[2], stacked, None


def _latent_groups(ops: list[tuple[int, _LatentOp]], device: torch.device, dtype: torch.dtype,
                   kernel_sets: bool = False) -> list[_LatentGroup]:
    """Group the rows of one layer's ops by what their ops edit (latents and (a, b) per op, in order);
    `kernel_sets`: also keep each one-op group's set as the fused kernel reads it (a fused plan)."""
    by_row: dict[int, list[int]] = {}
    for o, (row, _) in enumerate(ops):
        by_row.setdefault(row, []).append(o)
    grouped: dict[tuple, list[list[int]]] = {}
    group_rows: dict[tuple, list[int]] = {}
    for row, row_ops in by_row.items():
        edit = tuple(ops[o][1].key for o in row_ops)
        grouped.setdefault(edit, []).append(row_ops)
        group_rows.setdefault(edit, []).append(row)
    out = []
    for key_edits, members in grouped.items():
        cache_key = (key_edits, str(device), dtype, kernel_sets)
        with _GROUP_CACHE_LOCK:
            consts = _GROUP_CACHE.get(cache_key)
            if consts is not None:
                _GROUP_CACHE.move_to_end(cache_key)
        if consts is None:
            consts = _group_constants([ops[o][1].edits for o in members[0]], device, dtype, kernel_sets)
            with _GROUP_CACHE_LOCK:
                _GROUP_CACHE[cache_key] = consts
                while len(_GROUP_CACHE) > _GROUP_CACHE_SIZE:
                    _GROUP_CACHE.popitem(last=False)
        key, latents, membership, scales, targets, stacked, kernel = consts
        out.append(_LatentGroup(
            key=key, latents=latents, ops=torch.from_numpy(np.asarray(members, dtype=np.int64)).to(device),
            membership=membership, scales=scales, targets=targets, edit_key=key_edits, constants=stacked,
            kernel=kernel, rows=tuple(group_rows[key_edits]),
        ))
    return out


def _row_groups(groups: list[_LatentGroup]) -> np.ndarray:
    """[max row + 1] int64 on the host: the group of each plan row at this layer, -1 without ops here
    (known from the grouping, `_latent_groups`: no device reads)."""
    row_group = np.full(max(max(g.rows) for g in groups) + 1, -1, dtype=np.int64)
    for gi, g in enumerate(groups):
        row_group[list(g.rows)] = gi
    return row_group


def _group_batch(groups: list[_LatentGroup], scope_rows: torch.Tensor) -> _GroupBatch:
    """The per-op tables of the slot path (built once per plan, on first use)."""
    k_max = max(g.ops.shape[1] for g in groups)
    n_ops = len(scope_rows)
    op_group = np.zeros((n_ops, 1), dtype=np.int64)
    op_k = np.zeros((n_ops, k_max), dtype=np.float64)
    for gi, g in enumerate(groups):
        ops = g.ops.cpu().numpy()  # [R, K]
        op_group[ops.reshape(-1), 0] = gi
        op_k[ops, np.arange(ops.shape[1])[None, :]] = 1.0
    row_group = _row_groups(groups)
    ref = groups[0].membership
    return _GroupBatch(
        tuple(g.key for g in groups), tuple((g.edit_key, g.constants) for g in groups),
        torch.from_numpy(op_group).to(ref.device), torch.from_numpy(op_k).to(device=ref.device, dtype=ref.dtype),
        row_group, single=all(g.single for g in groups),
    )


def _check_layer(layer: int, n_layers: int, field_name: str) -> None:
    if not 0 <= layer < n_layers:
        raise InvalidRequest(f"{field_name}: layer {layer} out of range [0, {n_layers})")


def _check_clamp(vals: Sequence[float], ids: Sequence[int], own: int, sae: LayerSAE, layer: int, where: str) -> None:
    """Clamp values must be finite and must not push a residual entry past OVERFLOW_LIMIT (|c| * max|W_dec[i]|)."""
    row_max: np.ndarray | None = None
    for j, (c, i) in enumerate(zip(vals, ids, strict=True)):
        name = f"{where}.values[{layer}][{j}]" if j < own else f"{where}.value"
        if not math.isfinite(c):
            raise InvalidRequest(f"{name}: clamp value must be finite, got {c}")
        if abs(c) * sae.max_decoder_entry > OVERFLOW_LIMIT:  # cheap bound first; exact per-row check below
            row_max = sae.decoder_row_absmax() if row_max is None else row_max
            _check_overflow(abs(c) * float(row_max[i]), name, f"clamping latent {i} at layer {layer} to {c:g}")


@dataclass(frozen=True)
class _LatentOp:
    """One op's latent edits at one layer: z' = a z + b on each of its (sorted, unique) latents."""

    layer: int
    scope: TokenScope
    edits: tuple[np.ndarray, np.ndarray, np.ndarray]  # (latent ids, a, b)
    key: tuple[bytes, bytes, bytes]  # the edits as bytes: what groups rows and keys the group cache


@dataclass(frozen=True)
class _RowOps:
    """One row's interventions, validated and parsed; what `RowCache` keeps between compositions."""

    latent: tuple[_LatentOp, ...]
    ablations: tuple[tuple[TokenScope, torch.Tensor, frozenset[int] | None], ...]
    additions: tuple[tuple[int, TokenScope, torch.Tensor], ...]


class RowCache:
    """Rows `compile_plan` has validated and parsed, by the caller's key for the row's interventions
    (the vLLM worker: the spec hash). Under load every step has a new batch composition, but its
    rows are requests already seen: a new plan then only merges them. Bound to one set of SAEs and
    model shape: clear it when they change."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._rows: OrderedDict[tuple, _RowOps] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> _RowOps | None:
        with self._lock:
            hit = self._rows.get(key)
            if hit is not None:
                self._rows.move_to_end(key)
            return hit

    def put(self, key: tuple, ops: _RowOps) -> None:
        with self._lock:
            self._rows[key] = ops
            while len(self._rows) > self._size:
                self._rows.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)


def _parse_row(
    row: int, ivs: Sequence[Intervention], prompt_len: int, seq_len: int | None, saes: dict[int, LayerSAE],
    n_layers: int, d_model: int, resolver: Resolver, max_latents_per_request: int | None,
) -> _RowOps:
    """Validate one row's interventions (errors name items[row]) and parse them into per-layer edits."""
    latent: list[_LatentOp] = []
    abl: list[tuple[TokenScope, torch.Tensor, frozenset[int] | None]] = []
    add: list[tuple[int, TokenScope, torch.Tensor]] = []
    n_latents = 0
    for k, iv in enumerate(ivs):
        where = f"items[{row}].interventions[{k}]"
        _check_positions(iv.scope, where, row, prompt_len, seq_len)
        if isinstance(iv, (AblateLatents, ClampLatents, ScaleLatents)):
            by_layer = {int(ly): list(ids) for ly, ids in iv.latents.items()}
            if iv.latent_set_id:
                for ly, ids in resolver.latent_set(iv.latent_set_id).items():
                    by_layer.setdefault(int(ly), []).extend(int(i) for i in ids)
            for layer, ids in by_layer.items():
                if layer not in saes:
                    raise InvalidRequest(f"{where}.latents: no SAE at layer {layer} (SAE layers: {sorted(saes)})")
                d_sae = saes[layer].d_sae
                try:
                    id_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
                except OverflowError:  # beyond int64: out of range whatever the SAE
                    id_arr = np.asarray([i if abs(i) < 2**62 else -1 for i in ids], dtype=np.int64)
                bad = np.flatnonzero((id_arr < 0) | (id_arr >= d_sae))
                if bad.size:
                    raise InvalidRequest(
                        f"{where}.latents[{layer}]: latent id {ids[int(bad[0])]} out of range [0, {d_sae})")
                muls = np.zeros(len(ids), dtype=np.float64)
                if isinstance(iv, ClampLatents):
                    own = len(iv.latents.get(layer, ())) if iv.values.get(layer) else 0
                    vals_list = [iv.value_of(layer, j) if j < own else iv.value for j in range(len(ids))]
                    _check_clamp(vals_list, ids, own, saes[layer], layer, where)
                    vals = np.asarray(vals_list, dtype=np.float64)
                else:
                    vals = np.zeros(len(ids), dtype=np.float64)
                if isinstance(iv, ScaleLatents):
                    if not np.isfinite(iv.factor):
                        raise InvalidRequest(f"{where}.factor: the scale factor must be finite")
                    muls = np.full(len(ids), float(iv.factor), dtype=np.float64)
                n_latents += len(ids)
                edits = _op_edits(id_arr, muls, vals)
                latent.append(_LatentOp(layer, iv.scope, edits, (edits[0].tobytes(), edits[1].tobytes(), edits[2].tobytes())))
        elif isinstance(iv, AblateDirection):
            vec = iv.direction if iv.direction else resolver.direction(iv.direction_id or "")
            unit = _unit(vec, d_model, f"{where}.direction")
            for ly in iv.layers:
                _check_layer(ly, n_layers, f"{where}.layers")
            abl.append((iv.scope, unit, frozenset(iv.layers) if iv.layers else None))
        elif isinstance(iv, AddDirection):
            vec = iv.direction if iv.direction else resolver.direction(iv.direction_id or "")
            unit = _unit(vec, d_model, f"{where}.direction")
            _check_layer(iv.layer, n_layers, f"{where}.layer")
            if not np.isfinite(iv.coefficient):
                raise InvalidRequest(f"{where}.coefficient: must be finite, got {iv.coefficient}")
            _check_overflow(abs(float(iv.coefficient)) * float(unit.abs().max()), f"{where}.coefficient",
                            f"coefficient {iv.coefficient:g}")
            add.append((iv.layer, iv.scope, unit * float(iv.coefficient)))
        else:  # pragma: no cover - the discriminated union forbids this
            raise InvalidRequest(f"{where}: unknown intervention type")
    if max_latents_per_request is not None and n_latents > max_latents_per_request:
        raise InvalidRequest(
            f"items[{row}].interventions: {n_latents} latents exceed the limit of {max_latents_per_request} per request"
        )
    return _RowOps(tuple(latent), tuple(abl), tuple(add))


def compile_plan(
    rows: Sequence[Sequence[Intervention]],
    prompt_lens: Sequence[int],
    saes: dict[int, LayerSAE],
    n_layers: int,
    d_model: int,
    device: torch.device,
    resolver: Resolver | None = None,
    max_latents_per_request: int | None = None,
    dtype: torch.dtype = torch.float32,
    seq_lens: Sequence[int] | None = None,
    row_keys: Sequence[Hashable | None] | None = None,
    row_cache: RowCache | None = None,
    batch_invariant: bool = False,
    fused: bool = False,
) -> BatchPlan:
    """Validate and compile per-row interventions (raises InvalidRequest / NotFound, naming the field).

    `seq_lens[row]` is how many positions the model reads for that row (the prompt, plus the
    generated tokens fed back, or a Loss completion); given, explicit scope positions outside it
    are rejected. Negative positions count from the prompt end. With `row_cache`, a row whose
    `row_keys` entry is not None is parsed once per (key, prompt length, sequence length): the key
    must name the row's interventions exactly (a hash of their canonical form). `batch_invariant`
    makes every latent layer take one path whatever the batch holds (server/batch_invariant.py).
    `fused` runs the latent hook's decode-step tokens through the fused CPU kernel where it can
    (server/fused_hook.py).
    """
    resolver = resolver or Resolver()
    latent_ops: dict[int, list[tuple[int, _LatentOp]]] = {}
    abl: list[tuple[int, TokenScope, torch.Tensor, frozenset[int] | None]] = []
    add: dict[int, list[tuple[int, TokenScope, torch.Tensor]]] = {}
    for row, ivs in enumerate(rows):
        seq_len = seq_lens[row] if seq_lens is not None else None
        key = row_keys[row] if row_cache is not None and row_keys is not None else None
        parsed = row_cache.get((key, prompt_lens[row], seq_len)) if key is not None and row_cache is not None else None
        if parsed is None:
            parsed = _parse_row(row, ivs, prompt_lens[row], seq_len, saes, n_layers, d_model, resolver,
                                max_latents_per_request)
            if key is not None and row_cache is not None:
                row_cache.put((key, prompt_lens[row], seq_len), parsed)
        for op in parsed.latent:
            latent_ops.setdefault(op.layer, []).append((row, op))
        abl.extend((row, scope, unit, layers) for scope, unit, layers in parsed.ablations)
        for layer, scope, vec in parsed.additions:
            add.setdefault(layer, []).append((row, scope, vec))

    plan = BatchPlan()
    for layer, ops in sorted(latent_ops.items()):
        plan.latent_layers[layer] = LatentLayerPlan(
            sae=saes[layer],
            scopes=_scope_table([(r, op.scope) for r, op in ops], prompt_lens, device),
            groups=_latent_groups(ops, device, dtype,
                                  kernel_sets=fused and not batch_invariant and device.type == "cpu"),
            invariant=batch_invariant,
            fused=fused and not batch_invariant,
        )
    if abl:
        plan.ablations = DirectionPlan(
            scopes=_scope_table([(r, s) for r, s, _, _ in abl], prompt_lens, device),
            directions=torch.stack([u for _, _, u, _ in abl]).to(device),
            layers=[ls for _, _, _, ls in abl],
        )
    for layer, ops_add in sorted(add.items()):
        plan.additions[layer] = DirectionPlan(
            scopes=_scope_table([(r, s) for r, s, _ in ops_add], prompt_lens, device),
            directions=torch.stack([u for _, _, u in ops_add]).to(device),
            layers=[None] * len(ops_add),
        )
    return plan


def validate_rows(
    rows: Sequence[Sequence[Intervention]],
    prompt_lens: Sequence[int],
    saes: dict[int, LayerSAE],
    n_layers: int,
    d_model: int,
    resolver: Resolver | None = None,
    max_latents_per_request: int | None = None,
    seq_lens: Sequence[int] | None = None,
) -> None:
    """Validate per-row interventions exactly as `compile_plan` does (raises InvalidRequest / NotFound,
    naming the field) without building a plan: where only the check is wanted (an engine that compiles
    its plans elsewhere, a job config), the plan's group constants and scope tables are most of the cost."""
    resolver = resolver or Resolver()
    for row, ivs in enumerate(rows):
        _parse_row(row, ivs, prompt_lens[row], seq_lens[row] if seq_lens is not None else None, saes, n_layers,
                   d_model, resolver, max_latents_per_request)


def check_interventions(
    engine: Any, interventions: Sequence[Intervention], field_name: str, resolver: Resolver | None = None,
    prompt_len: int | None = None, seq_len: int | None = None,
) -> None:
    """Validate one list of interventions against `engine`'s model and SAEs without running anything
    (a job config at StartJob, an attribution baseline). Errors name `field_name` instead of
    ``items[0].interventions``. Prompt unknown (`prompt_len` None): explicit positions are checked
    against the longest prompt and generation the limits allow, so only positions that can never
    exist are rejected."""
    limits = engine.limits
    if prompt_len is None:
        prompt_len = int(limits.max_prompt_tokens)
        seq_len = prompt_len + int(limits.max_new_tokens)
    try:
        validate_rows([list(interventions)], [prompt_len], engine.saes, engine.n_layers, engine.d_model,
                      resolver if resolver is not None else engine.resolver, limits.max_latents_per_request,
                      seq_lens=None if seq_len is None else [seq_len])
    except InvalidRequest as exc:
        msg = str(exc).replace("items[0].interventions", field_name)
        raise InvalidRequest(msg.replace(" of items[0] ", " ") if seq_len is not None else msg) from None
    except NotFound as exc:
        raise NotFound(f"{field_name}: {exc}") from None
