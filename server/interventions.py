"""The one intervention module shared by every engine: compile per-row specs into a batch plan and
apply it to residual-stream tensors at hook points.

Rows are the requests of a batch; each has its own interventions. Everything is vectorised over
rows: per layer, one gather over the union of latents any row touches, and a per-(row, token,
latent) membership weight — no Python loop over requests in the hot path. Token scopes are
evaluated from a `TokenContext` the engine sets before each forward call.

Math (docs/interventions.md): ablate  h' = h - sum_{i in S} z_i W_dec[i]  (error term kept);
clamp  h' = h + sum_i (c_i - z_i) W_dec[i];  scale  h' = h + sum_i (alpha - 1) z_i W_dec[i];  direction ablation  h' = h - (h.r) r;
addition  h' = h + a r.  Non-separable SAEs (TopK) go through sae-lens's full encode/decode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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

    @classmethod
    def packed(
        cls, position: torch.Tensor, is_prompt: torch.Tensor, prompt_len: torch.Tensor, row: torch.Tensor
    ) -> TokenContext:
        """A context over N flattened tokens ([N] tensors) of several rows (requests)."""
        return cls(position.reshape(1, -1), is_prompt.reshape(1, -1), prompt_len, row.reshape(-1))

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

    def masks(self, ctx: TokenContext) -> torch.Tensor:
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

    def view_rows(self, ctx: TokenContext) -> torch.Tensor:
        """Index of each op's row in dim 0 of the hidden states (0 for every op in the packed form)."""
        return self.rows if ctx.row is None else torch.zeros_like(self.rows)


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
    )


@dataclass
class LatentLayerPlan:
    """All latent ablations/clamps/scalings of a batch at one SAE layer.

    Each op sets its latents to z' = a z + b: ablation (a, b) = (0, 0), clamp (0, c), scale (alpha, 0).
    """

    sae: LayerSAE
    union: torch.Tensor  # [U] long, sorted latent ids
    scopes: _ScopeTable  # one entry per op
    membership: torch.Tensor  # [O, U] float (1 where op touches the latent)
    targets: torch.Tensor  # [O, U] float: b (0 for ablation and scaling, c for clamp)
    scales: torch.Tensor  # [O, U] float: a (0 for ablation and clamp, alpha for scaling)

    def apply(self, h: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        """h [B, T, d] -> h' with every row's ops at this layer applied (exact, error term kept)."""
        B = h.shape[0]
        scope = self.scopes.masks(ctx).to(self.membership.dtype)  # [O, T]
        row_onehot = torch.zeros(len(self.scopes.rows), B, dtype=scope.dtype, device=h.device)
        row_onehot[torch.arange(len(self.scopes.rows), device=h.device), self.scopes.view_rows(ctx)] = 1.0
        # weight[b, t, u] = 1 where some op of row b touches latent u at token t
        weight = torch.einsum("ob,ot,ou->btu", row_onehot, scope, self.membership).clamp_(max=1.0)
        target = torch.einsum("ob,ot,ou->btu", row_onehot, scope, self.targets * self.membership)
        mul = torch.einsum("ob,ot,ou->btu", row_onehot, scope, self.scales * self.membership)
        if not torch.any(weight):
            return h
        if ctx.row is not None:
            # Packed: only the tokens some op touches go through the SAE (the others are unchanged).
            active = weight[0].any(-1).nonzero().squeeze(-1)  # [A]
            x = h[0].index_select(0, active)
            delta = self._delta(x, weight[0].index_select(0, active), target[0].index_select(0, active),
                                mul[0].index_select(0, active))
            return h[0].index_copy(0, active, x + delta.to(h.dtype)).unsqueeze(0)
        delta = self._delta(h, weight, target, mul)
        valid = ctx.valid.unsqueeze(-1)
        return torch.where(valid, h + delta.to(h.dtype), h)

    def _delta(self, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, mul: torch.Tensor) -> torch.Tensor:
        """The change to h [..., d] that sets the weighted latents to mul * z + target (all [..., U])."""
        sae = self.sae
        if sae.separable:
            sl = sae.slices(self.union.tolist())
            x_in, scale = sae.normalise_in(h)
            z = sae.sparse_acts(x_in, sl)  # [..., U]
            coeff = (mul - weight) * z + target  # z' - z where weighted, 0 elsewhere
            return (coeff @ sl.W_dec) * scale
        z_full = sae.encode(h)
        z_sel = z_full[..., self.union]
        z_new = z_full.clone()
        z_new[..., self.union] = torch.where(weight > 0, mul * z_sel + target, z_sel)
        recon_new = sae.decode(z_new)
        sae.encode(h)  # sae-lens run-time normalisation is stateful: each decode needs its encode
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
        proj = torch.einsum("otd,od->ot", h.index_select(0, rows), dirs) * mask
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

    def ablation_layers(self) -> set[int] | None:
        """Layers with any direction ablation (None = every layer)."""
        if self.ablations is None:
            return set()
        out: set[int] = set()
        for ls in self.ablations.layers:
            if ls is None:
                return None
            out |= ls
        return out


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
) -> BatchPlan:
    """Validate and compile per-row interventions (raises InvalidRequest / NotFound, naming the field).

    `seq_lens[row]` is how many positions the model reads for that row (the prompt, plus the
    generated tokens fed back, or a Loss completion); given, explicit scope positions outside it
    are rejected. Negative positions count from the prompt end.
    """
    resolver = resolver or Resolver()
    # per layer: (row, scope, latent ids, a, b) with z' = a z + b for each listed latent
    latent_ops: dict[int, list[tuple[int, TokenScope, list[int], list[float], list[float]]]] = {}
    abl: list[tuple[int, TokenScope, torch.Tensor, frozenset[int] | None]] = []
    add: dict[int, list[tuple[int, TokenScope, torch.Tensor]]] = {}
    for row, ivs in enumerate(rows):
        n_latents = 0
        for k, iv in enumerate(ivs):
            where = f"items[{row}].interventions[{k}]"
            _check_positions(iv.scope, where, row, prompt_lens[row], seq_lens[row] if seq_lens is not None else None)
            if isinstance(iv, (AblateLatents, ClampLatents, ScaleLatents)):
                by_layer = {int(ly): list(ids) for ly, ids in iv.latents.items()}
                if iv.latent_set_id:
                    for ly, ids in resolver.latent_set(iv.latent_set_id).items():
                        by_layer.setdefault(int(ly), []).extend(int(i) for i in ids)
                for layer, ids in by_layer.items():
                    if layer not in saes:
                        raise InvalidRequest(
                            f"{where}.latents: no SAE at layer {layer} (SAE layers: {sorted(saes)})"
                        )
                    d_sae = saes[layer].d_sae
                    bad = [i for i in ids if not 0 <= i < d_sae]
                    if bad:
                        raise InvalidRequest(f"{where}.latents[{layer}]: latent id {bad[0]} out of range [0, {d_sae})")
                    muls = [0.0] * len(ids)
                    if isinstance(iv, ClampLatents):
                        own = len(iv.latents.get(layer, ())) if iv.values.get(layer) else 0
                        vals = [iv.value_of(layer, j) if j < own else iv.value for j in range(len(ids))]
                        _check_clamp(vals, ids, own, saes[layer], layer, where)
                    else:
                        vals = [0.0] * len(ids)
                    if isinstance(iv, ScaleLatents):
                        if not np.isfinite(iv.factor):
                            raise InvalidRequest(f"{where}.factor: the scale factor must be finite")
                        muls = [float(iv.factor)] * len(ids)
                    n_latents += len(ids)
                    latent_ops.setdefault(layer, []).append((row, iv.scope, ids, muls, vals))
            elif isinstance(iv, AblateDirection):
                vec = iv.direction if iv.direction else resolver.direction(iv.direction_id or "")
                unit = _unit(vec, d_model, f"{where}.direction")
                for ly in iv.layers:
                    _check_layer(ly, n_layers, f"{where}.layers")
                abl.append((row, iv.scope, unit, frozenset(iv.layers) if iv.layers else None))
            elif isinstance(iv, AddDirection):
                vec = iv.direction if iv.direction else resolver.direction(iv.direction_id or "")
                unit = _unit(vec, d_model, f"{where}.direction")
                _check_layer(iv.layer, n_layers, f"{where}.layer")
                if not np.isfinite(iv.coefficient):
                    raise InvalidRequest(f"{where}.coefficient: must be finite, got {iv.coefficient}")
                _check_overflow(abs(float(iv.coefficient)) * float(unit.abs().max()), f"{where}.coefficient",
                                f"coefficient {iv.coefficient:g}")
                add.setdefault(iv.layer, []).append((row, iv.scope, unit * float(iv.coefficient)))
            else:  # pragma: no cover - the discriminated union forbids this
                raise InvalidRequest(f"{where}: unknown intervention type")
        if max_latents_per_request is not None and n_latents > max_latents_per_request:
            raise InvalidRequest(
                f"items[{row}].interventions: {n_latents} latents exceed the limit of {max_latents_per_request} per request"
            )

    plan = BatchPlan()
    for layer, ops in sorted(latent_ops.items()):
        union = np.unique(np.fromiter((i for _, _, ids, _, _ in ops for i in ids), dtype=np.int64))
        membership = np.zeros((len(ops), len(union)), dtype=np.float64)
        targets = np.zeros((len(ops), len(union)), dtype=np.float64)
        scales = np.zeros((len(ops), len(union)), dtype=np.float64)
        for o, (_, _, ids, muls, vals) in enumerate(ops):
            last = {i: (a, b) for i, a, b in zip(ids, muls, vals, strict=True)}  # a latent listed twice keeps its last
            cols = np.searchsorted(union, np.fromiter(last.keys(), dtype=np.int64, count=len(last)))
            membership[o, cols] = 1.0
            scales[o, cols] = np.fromiter((a for a, _ in last.values()), dtype=np.float64, count=len(last))
            targets[o, cols] = np.fromiter((b for _, b in last.values()), dtype=np.float64, count=len(last))
        plan.latent_layers[layer] = LatentLayerPlan(
            sae=saes[layer],
            union=torch.from_numpy(union).to(device),
            scopes=_scope_table([(r, s) for r, s, _, _, _ in ops], prompt_lens, device),
            membership=torch.from_numpy(membership).to(device=device, dtype=dtype),
            targets=torch.from_numpy(targets).to(device=device, dtype=dtype),
            scales=torch.from_numpy(scales).to(device=device, dtype=dtype),
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


HookFn = Callable[[torch.Tensor, TokenContext], torch.Tensor]
