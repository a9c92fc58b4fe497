"""SAE runtime: load sae-lens SAEs per layer, and cache the per-latent-set slices the sparse path needs.

An ablation or clamp of a latent set S only needs the |S| encoder columns, biases, thresholds and
decoder rows of S (docs/interventions.md). `LayerSAE.slices(S)` gathers them once per (layer, S) and caches
them; `LayerSAE.pool` keeps the sets of the batches in flight in slots for the slot path.
Architectures that are not per-latent separable (TopK and friends) use sae-lens's own full
encode/decode instead.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from sae_lens.saes.standard_sae import StandardSAE

from ..audit.engine import SAEInfo, SAERows
from ..audit.errors import InvalidRequest
from ..audit.stage_utils import rank_latents
from . import fused_hook

_SEPARABLE_NORMS = {"none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"}
ENCODER_ROWS_MAX_BYTES = 256 << 20
"""The largest encoder kept a second time, transposed, for fast set gathers (`LayerSAE._encoder_rows`)."""


@dataclass(frozen=True)
class SAESlice:
    """The columns/rows of one latent set, ready for the sparse path (all on the SAE's device)."""

    latents: torch.Tensor  # [k] long
    W_enc: torch.Tensor  # [d, k] (possibly a transposed view of [k, d] rows)
    b_enc: torch.Tensor  # [k], with the b_dec-to-input term folded in
    threshold: torch.Tensor | None  # [k] (JumpReLU) or None (ReLU)
    W_dec: torch.Tensor  # [k, d]


@dataclass(frozen=True)
class StackedSlices:
    """The slices of several latent sets, each in its own slot, padded to a common width S and
    stacked, for one batched matmul over all groups of a batch (`torch.bmm`). Padded columns/rows
    are zero (threshold 0), so a padded latent encodes to exactly 0 and decodes to exactly 0 for
    any finite input."""

    W_enc_rows: torch.Tensor  # [P, S, d]: encoder columns as rows (the bmm reads them transposed)
    b_enc: torch.Tensor  # [P, 1, S]
    threshold: torch.Tensor | None  # [P, 1, S]
    W_dec: torch.Tensor  # [P, S, d]
    edits: torch.Tensor | None = None  # [P, 3, K, S]: the slot's group's (membership, a * membership, b * membership) per op


class SlicePool:
    """Persistent slots of latent-set slices for the slot path (the multi-LoRA "slot" layout).

    A batch's groups (a latent set and what the group does to it) each get a slot holding the set's
    encoder rows, biases, thresholds, latent ids and the group's edit constants; a group keeps its
    slot while it is in use, so a new batch composition (under load, nearly every step: requests
    join and leave) writes only the groups it has not seen, instead of stacking every set again.
    Decoder rows are gathered into a slot only when a dense decode first needs them (`decoder`):
    the sparse decode reads the SAE's own decoder by latent id. A new group takes the lowest slot
    not held by the batch's others, and a call with no new group moves the highest slot into the
    lowest hole (`_compact`), so the sets of a batch sit low and the matmul runs over the leading
    slots only (`[:max(slots) + 1]`, a view), whatever the pool's size. The pool grows by half when
    a batch needs more slots and is rebuilt only when it is more than four times (and 32 slots) too
    big. Not thread-safe on its own: callers hold `LayerSAE.pool_lock` while they assign slots and
    read the stacked tensors."""

    def __init__(self, owner: LayerSAE) -> None:
        self._owner = owner
        # (latent set, what the group does to it) -> slot
        self._slot_of: dict[tuple[tuple[int, ...], Hashable], int] = {}
        self.stack: StackedSlices | None = None
        self.latent_ids: torch.Tensor | None = None  # [P, S] long: each slot's latents (0 in the padding)
        # slot -> its set's size while its decoder rows wait to be written (`decoder`), -1 once written
        self._dec_ready: dict[int, int] = {}
        self.writes = 0  # sets written into slots (for tests and benchmarks)
        self.moves = 0  # sets moved down into a hole (`_compact`)

    def forget(self) -> None:
        """Drop every set from the slots (the next `assign` writes each again, as for requests never seen):
        the new-request case of benchmarks/hook_cost.py."""
        self._slot_of.clear()

    def _allocate(self, n_slots: int, width: int, n_ops: int, keep: StackedSlices | None = None) -> None:
        """New zeroed slot tensors [n_slots, ..., width]; `keep`'s slots are copied into the first ones
        (growing), else every slot starts empty."""
        ref = self._owner.sae.W_enc
        d = self._owner.d_in
        jump = isinstance(self._owner.sae, JumpReLUSAE)
        with torch.no_grad():
            st = StackedSlices(
                W_enc_rows=ref.new_zeros((n_slots, width, d)), b_enc=ref.new_zeros((n_slots, 1, width)),
                threshold=ref.new_zeros((n_slots, 1, width)) if jump else None,
                W_dec=ref.new_zeros((n_slots, width, d)), edits=ref.new_zeros((n_slots, 3, n_ops, width)),
            )
            ids = torch.zeros((n_slots, width), dtype=torch.long, device=ref.device)
            if keep is not None:
                P, S = keep.W_enc_rows.shape[0], keep.W_enc_rows.shape[1]
                st.W_enc_rows[:P, :S] = keep.W_enc_rows
                st.b_enc[:P, :, :S] = keep.b_enc
                st.W_dec[:P, :S] = keep.W_dec
                if st.threshold is not None and keep.threshold is not None:
                    st.threshold[:P, :, :S] = keep.threshold
                if st.edits is not None and keep.edits is not None:
                    st.edits[:P, :, : keep.edits.shape[2], :S] = keep.edits
                if self.latent_ids is not None:
                    ids[:P, :S] = self.latent_ids
            else:
                self._slot_of.clear()
                self._dec_ready.clear()
        self.stack, self.latent_ids = st, ids

    def assign(self, keys: Sequence[tuple[int, ...]], edits: Sequence[tuple[Hashable, torch.Tensor]] | None = None,
               latents: Sequence[torch.Tensor] | None = None) -> list[int]:
        """A slot for each of the batch's groups, writing the groups not yet in a slot: its latent set
        `keys[g]`, and with `edits[g] = (tag, [3, K, S] constants)` what the group does to them (slots are
        per (set, tag); without edits, per set and its occurrence in `keys`)."""
        if edits is None:
            counts: dict[tuple[int, ...], int] = {}
            tags: list[Hashable] = []
            for k in keys:
                tags.append(counts.get(k, 0))
                counts[k] = counts.get(k, 0) + 1
        else:
            tags = [t for t, _ in edits]
        entries = list(zip(keys, tags, strict=True))
        n, width = len(keys), max(len(k) for k in keys)
        n_ops = max((int(c.shape[1]) for _, c in edits), default=1) if edits is not None else 1
        st = self.stack
        if st is None or (st.W_enc_rows.shape[0] > 4 * n and st.W_enc_rows.shape[0] > 32):  # start over
            self._allocate(n, width, n_ops)
        elif n > st.W_enc_rows.shape[0] or width > st.W_enc_rows.shape[1] or (
                st.edits is not None and n_ops > st.edits.shape[2]):  # grow, keeping what the slots hold
            P = st.W_enc_rows.shape[0]
            K = st.edits.shape[2] if st.edits is not None else 1
            self._allocate(max(n, P + P // 2), max(width, st.W_enc_rows.shape[1]), max(n_ops, K), keep=st)
        st = self.stack
        assert st is not None
        wanted = set(entries)
        writes_before = self.writes
        # free slots: every slot not held by one of this batch's groups, lowest first
        used_by = {slot: e for e, slot in self._slot_of.items()}
        free_iter = iter([s for s in range(st.W_enc_rows.shape[0]) if used_by.get(s) not in wanted])
        for g, e in enumerate(entries):
            if e in self._slot_of:
                continue
            slot = next(free_iter)
            old = used_by.get(slot)
            if old is not None:
                del self._slot_of[old]
            self._write(slot, e[0], None if edits is None else edits[g][1], None if latents is None else latents[g])
            self._slot_of[e] = slot
            self.writes += 1
        if self.writes == writes_before:  # no new set this call: under churn new sets fill the holes
            self._compact(entries)
        return [self._slot_of[e] for e in entries]

    def _compact(self, entries: Sequence[tuple[tuple[int, ...], Hashable]]) -> None:
        """Move the batch's highest slot into its lowest hole (a slot below it that the batch does not
        use: its set left), one move per call that wrote no new set (new sets take the lowest holes
        themselves). The matmul reads every slot up to the highest, so each hole costs a set's worth
        of encoder reads per step; a move copies one set once."""
        st = self.stack
        assert st is not None and self.latent_ids is not None
        used = {self._slot_of[e]: e for e in entries}
        top = max(used)
        hole = next((i for i in range(top) if i not in used), None)
        if hole is None:
            return
        with torch.no_grad():
            st.W_enc_rows[hole] = st.W_enc_rows[top]
            st.b_enc[hole] = st.b_enc[top]
            if st.threshold is not None:
                st.threshold[hole] = st.threshold[top]
            if st.edits is not None:
                st.edits[hole] = st.edits[top]
            self.latent_ids[hole] = self.latent_ids[top]
            if self._dec_ready[top] < 0:  # its decoder rows were gathered: they move too
                st.W_dec[hole] = st.W_dec[top]
        self._dec_ready[hole] = self._dec_ready[top]
        evicted = next((e for e, slot in self._slot_of.items() if slot == hole), None)
        if evicted is not None:
            del self._slot_of[evicted]
        self._slot_of[used[top]] = hole
        self.moves += 1

    def _write(self, slot: int, key: tuple[int, ...], edits: torch.Tensor | None,
               latents: torch.Tensor | None = None) -> None:
        """Gather a set's encoder slices straight into a slot (no intermediate copy) and zero the slot's
        tail. Its decoder rows wait until a dense decode needs them (`decoder`): the sparse decode
        reads the few rows it needs from the SAE's own decoder."""
        st = self.stack
        assert st is not None and self.latent_ids is not None
        k = len(key)
        with torch.no_grad():
            idx, _, b_enc, threshold = self._owner.gather_encoder(key, enc_rows=st.W_enc_rows[slot, :k], idx=latents)
            st.W_enc_rows[slot, k:] = 0.0
            st.b_enc[slot, 0, :k] = b_enc
            st.b_enc[slot, 0, k:] = 0.0
            self.latent_ids[slot, :k] = idx
            self.latent_ids[slot, k:] = 0
            self._dec_ready[slot] = k
            if st.threshold is not None:
                st.threshold[slot, 0, :k] = threshold if threshold is not None else 0.0
                st.threshold[slot, 0, k:] = 0.0
            if st.edits is not None:
                st.edits[slot] = 0.0
                if edits is not None:
                    st.edits[slot, :, : edits.shape[1], :k] = edits

    def decoder(self, slots: Sequence[int], lo: int, hi: int) -> torch.Tensor:
        """The decoder rows of slots lo..hi-1 [P, S, d], written now for those of `slots` that do not
        have them yet (other slots' rows are left as they are: callers drop their output)."""
        st = self.stack
        assert st is not None and self.latent_ids is not None
        W_dec = self._owner.sae.W_dec
        with torch.no_grad():
            for slot in slots:
                k = self._dec_ready.get(slot, 0)
                if k < 0:  # written already
                    continue
                torch.index_select(W_dec, 0, self.latent_ids[slot, :k], out=st.W_dec[slot, :k])
                st.W_dec[slot, k:] = 0.0
                self._dec_ready[slot] = -1
        return st.W_dec[lo:hi]


class LayerSAE:
    """One SAE on the residual stream after `layer`, with exact sparse-path helpers."""

    def __init__(self, layer: int, sae: SAE, source: str, cache_bytes: int = 256 << 20) -> None:
        self.layer = layer
        self.sae = sae.eval()
        self.source = source
        self.architecture = type(sae).__name__.removesuffix("SAE").lower() or "standard"
        self.d_in = int(sae.cfg.d_in)
        self.d_sae = int(sae.cfg.d_sae)
        self.normalize = str(getattr(sae.cfg, "normalize_activations", "none"))
        reshape = str(getattr(sae.cfg, "reshape_activations", "none"))
        self.separable = (
            type(sae) in (JumpReLUSAE, StandardSAE) and self.normalize in _SEPARABLE_NORMS and reshape == "none"
        )
        # LRUs bounded by size, not count: a 3k-latent slice is ~15 MB at d=640
        self._cache: _SizedLRU[tuple[int, ...], SAESlice] = _SizedLRU(cache_bytes)
        self._lock = threading.Lock()
        # the slot path's slots (`SlicePool`), and the lock its users hold while they use them
        self.pool = SlicePool(self)
        self.pool_lock = threading.RLock()
        self._row_absmax: np.ndarray | None = None
        self._enc_rows: torch.Tensor | None = None
        self._b_enc_in: torch.Tensor | None = None
        self._fused: fused_hook.SAEArrays | None | bool = False  # False: not made yet

    @property
    def info(self) -> SAEInfo:
        return SAEInfo(self.layer, self.source, self.architecture, self.d_in, self.d_sae, self.separable)

    def decoder_row_absmax(self) -> np.ndarray:
        """max_j |W_dec[i, j]| per latent i (float64, computed once): how much a unit of latent i
        can add to one residual entry (the interventions' overflow check)."""
        cached = self._row_absmax
        if cached is None:
            with torch.no_grad():
                cached = self.sae.W_dec.detach().abs().amax(dim=-1).double().cpu().numpy()
            self._row_absmax = cached
        return cached

    @property
    def max_decoder_entry(self) -> float:
        """max |W_dec| over every latent."""
        return float(self.decoder_row_absmax().max())

    # ------------------------------------------------------------------ sparse path

    def _encoder_rows(self) -> torch.Tensor | None:
        """W_enc transposed to [d_sae, d] (made once), so that a latent set's encoder columns are read as
        contiguous rows: gathering 500 columns of a row-major [640, 16384] W_enc reads most of it
        (1.9 ms), its rows 0.3 ms. Under load every new request's set is gathered once. None for
        SAEs whose encoder exceeds ENCODER_ROWS_MAX_BYTES (the copy doubles the encoder's memory)."""
        rows = self._enc_rows
        if rows is None and self.sae.W_enc.numel() * self.sae.W_enc.element_size() <= ENCODER_ROWS_MAX_BYTES:
            with self._lock:
                if self._enc_rows is None:
                    self._enc_rows = self.sae.W_enc.detach().T.contiguous()
                rows = self._enc_rows
        return rows

    def slices(self, latents: Sequence[int]) -> SAESlice:
        """Gathered encoder/decoder slices for a latent set, cached per (layer, set)."""
        key = latents if isinstance(latents, tuple) else tuple(int(i) for i in latents)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        sl = self.gather(key)
        with self._lock:
            self._cache.put(key, sl)
        return sl

    def _input_bias(self) -> torch.Tensor:
        """b_enc, minus b_dec @ W_enc when sae-lens subtracts b_dec from the input (made once: a set's
        slice of it is what the set's own b_dec @ W_enc[:, set] would give, without reading its columns)."""
        bias = self._b_enc_in
        if bias is None:
            sae = self.sae
            with self._lock, torch.no_grad():
                if self._b_enc_in is None:
                    b = sae.b_enc.detach()
                    self._b_enc_in = (b - sae.b_dec.detach() @ sae.W_enc.detach()) if sae.cfg.apply_b_dec_to_input else b
                bias = self._b_enc_in
        return bias

    def fused_arrays(self) -> fused_hook.SAEArrays | None:
        """The SAE as the fused hook kernel reads it (server/fused_hook.py; made once), or None where
        the kernel cannot run it (not separable, not float32 on the CPU, no C compiler here)."""
        arrays = self._fused
        if arrays is False:
            sae = self.sae
            arrays = None
            if self.separable and fused_hook.available():
                arrays = fused_hook.sae_arrays(
                    self._encoder_rows(), self._input_bias(),
                    sae.threshold if isinstance(sae, JumpReLUSAE) else None, sae.W_dec,
                )
            self._fused = arrays
        assert arrays is not True
        return arrays

    def gather_encoder(self, key: tuple[int, ...], enc_rows: torch.Tensor | None = None,
                       idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(latent ids, W_enc [d, k], b_enc [k], threshold [k] or None) of a latent set (`idx`: its ids as a
        tensor, if the caller has one); the encoder rows [k, d] are written into `enc_rows` when given (a
        slot of the pool), else into a new tensor."""
        sae = self.sae
        with torch.no_grad():
            if idx is None:
                idx = torch.tensor(key, dtype=torch.long, device=sae.W_enc.device)
            rows = self._encoder_rows()
            if rows is not None:
                enc = rows.index_select(0, idx) if enc_rows is None else torch.index_select(rows, 0, idx, out=enc_rows)
            else:
                cols = sae.W_enc.index_select(1, idx)
                enc = cols.T if enc_rows is None else enc_rows.copy_(cols.T)
            W_enc = enc.T  # [d, k], a transposed view: matmuls read it as it is
            b_enc = self._input_bias().index_select(0, idx)
            threshold = sae.threshold.index_select(0, idx) if isinstance(sae, JumpReLUSAE) else None
        return idx, W_enc, b_enc, threshold

    def gather(self, key: tuple[int, ...]) -> SAESlice:
        """A latent set's slices, uncached."""
        idx, W_enc, b_enc, threshold = self.gather_encoder(key)
        with torch.no_grad():
            W_dec = self.sae.W_dec.index_select(0, idx)
        return SAESlice(idx, W_enc, b_enc, threshold, W_dec)

    def normalise_in(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """sae-lens's input normalisation; returns (x_in, scale) with decode-space deltas times scale."""
        x = h.to(self.sae.dtype)
        if self.normalize == "constant_norm_rescale":
            coeff = (self.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            return x * coeff, 1.0 / coeff
        if self.normalize == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            xc = x - mu
            std = xc.std(dim=-1, keepdim=True)
            return xc / (std + 1e-5), std
        return x, 1.0

    def sparse_acts(self, x_in: torch.Tensor, sl: SAESlice) -> torch.Tensor:
        """z_S for normalised input x_in [..., d] -> [..., k], exactly as the full encode computes it."""
        pre = x_in @ sl.W_enc + sl.b_enc
        acts = torch.relu(pre)
        if sl.threshold is not None:
            acts = acts * (pre > sl.threshold).to(acts.dtype)
        return acts

    # ------------------------------------------------------------------ full path (sae-lens itself)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """All latents via sae-lens's own encode."""
        return self.sae.encode(h.to(self.sae.dtype))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(z)


def _nbytes(obj: SAESlice) -> int:
    """Bytes of the tensors a slice holds."""
    return sum(t.numel() * t.element_size() for t in vars(obj).values() if isinstance(t, torch.Tensor))


_K = TypeVar("_K")
_V = TypeVar("_V", bound=SAESlice)


class _SizedLRU(Generic[_K, _V]):
    """LRU cache bounded by the bytes of its values' tensors (the newest entry is always kept).
    Not thread-safe on its own: `LayerSAE` holds its lock around every call."""

    def __init__(self, max_bytes: int) -> None:
        self._items: OrderedDict[_K, _V] = OrderedDict()
        self._max_bytes = max_bytes
        self._bytes = 0

    def get(self, key: _K) -> _V | None:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key: _K, value: _V) -> None:
        if key in self._items:  # another thread built it first: keep that one
            return
        self._items[key] = value
        self._bytes += _nbytes(value)
        while self._bytes > self._max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= _nbytes(old)


def load_sae(spec: str, device: str = "cpu", dtype: str = "float32") -> tuple[int, SAE, str]:
    """Parse `LAYER=release:sae_id` (sae_lens.SAE.from_pretrained) or `LAYER=/path` (load_from_disk)."""
    if "=" not in spec:
        raise InvalidRequest(f"--sae must look like LAYER=release:sae_id or LAYER=/path, got {spec!r}")
    layer_s, source = spec.split("=", 1)
    try:
        layer = int(layer_s)
    except ValueError as exc:
        raise InvalidRequest(f"--sae layer must be an integer, got {layer_s!r}") from exc
    path = Path(source).expanduser()
    if path.exists():
        sae = SAE.load_from_disk(str(path), device=device, dtype=dtype)
    elif ":" in source:
        release, sae_id = source.split(":", 1)
        sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    else:
        raise InvalidRequest(f"--sae source {source!r} is neither an existing path nor release:sae_id")
    return layer, sae, source


def build_layer_saes(
    saes: dict[int, SAE] | Sequence[tuple[int, SAE, str]], d_model: int, n_layers: int
) -> dict[int, LayerSAE]:
    """Wrap SAEs per layer, refusing a d_in that does not match the model or a layer out of range."""
    items = [(layer, sae, f"layer{layer}") for layer, sae in saes.items()] if isinstance(saes, dict) else list(saes)
    out: dict[int, LayerSAE] = {}
    for layer, sae, source in items:
        if not 0 <= layer < n_layers:
            raise InvalidRequest(f"SAE layer {layer} out of range: the model has {n_layers} layers")
        if int(sae.cfg.d_in) != d_model:
            raise InvalidRequest(
                f"SAE at layer {layer} ({source}) has d_in={sae.cfg.d_in} but the model's d_model is {d_model}"
            )
        if layer in out:
            raise InvalidRequest(f"two SAEs for layer {layer}")
        out[layer] = LayerSAE(layer, sae, source)
    return out


def sae_rows(
    saes: Mapping[int, LayerSAE],
    layers: Sequence[int] | None = None,
    latents: Mapping[int, Sequence[int]] | None = None,
    direction: Sequence[float] | np.ndarray | None = None,
    top_k: int = 0,
    rank_by: str = "cosine",
    decoder: bool = True,
    encoder: bool = False,
    chunk: int = 8192,
) -> dict[int, SAERows]:
    """`Engine.sae_rows` for every engine that holds `LayerSAE`s (see audit/engine.py).

    Cosines are computed in float64, `chunk` decoder rows at a time on the SAE's device, and ranked
    with `audit.stage_utils.rank_latents` (ties by id), so in-process and remote rankings agree."""
    if rank_by not in ("cosine", "abs_cosine"):
        raise InvalidRequest(f"rank_by: expected 'cosine' or 'abs_cosine', got {rank_by!r}")
    if latents is None and direction is None:
        raise InvalidRequest("latents: give chosen latents or a direction to rank by")
    if top_k < 0:
        raise InvalidRequest(f"top_k: must be >= 0, got {top_k}")
    if latents is not None and top_k:
        raise InvalidRequest("top_k: ranks by a direction, so it cannot be combined with chosen latents")
    chosen = {int(ly): [int(i) for i in ids] for ly, ids in (latents or {}).items()}
    wanted = [int(ly) for ly in layers] if layers else (sorted(chosen) if chosen else sorted(saes))
    for ly in chosen:  # name the field the layer came from: `latents`, not `layers`
        if ly not in saes:
            raise InvalidRequest(f"latents[{ly}]: no SAE at layer {ly} (SAE layers: {sorted(saes)})")
        if ly not in wanted:
            raise InvalidRequest(f"latents[{ly}]: layer {ly} is not among the requested layers {sorted(wanted)}")
    for ly in wanted:
        if ly not in saes:
            raise InvalidRequest(f"layers: no SAE at layer {ly} (SAE layers: {sorted(saes)})")
    v: np.ndarray | None = None
    if direction is not None:
        v = np.asarray(direction, dtype=np.float64).reshape(-1)
        d_in = next(iter(saes.values())).d_in if saes else 0
        if v.shape[0] != d_in:
            raise InvalidRequest(f"direction: {v.shape[0]} values, expected d_model={d_in}")
        norm = float(np.linalg.norm(v))
        if not np.isfinite(norm) or norm == 0.0:
            raise InvalidRequest("direction: must be a finite, nonzero vector")
        v = v / norm
    out: dict[int, SAERows] = {}
    for ly in sorted(set(wanted)):
        s = saes[ly]
        W_dec = s.sae.W_dec
        ids: np.ndarray | None = None
        if ly in chosen or latents is not None:
            ids = np.asarray(chosen.get(ly, []), dtype=np.int64)
            bad = ids[(ids < 0) | (ids >= s.d_sae)]
            if bad.size:
                raise InvalidRequest(f"latents[{ly}]: latent {int(bad[0])} out of range [0, {s.d_sae})")
        cos: np.ndarray | None = None
        with torch.no_grad():
            if v is not None:
                vt = torch.as_tensor(v, dtype=torch.float64, device=W_dec.device)
                idx = None if ids is None else torch.as_tensor(ids, device=W_dec.device)
                n = W_dec.shape[0] if idx is None else len(idx)
                parts = []
                for a in range(0, n, chunk):
                    W = (W_dec[a:a + chunk] if idx is None else W_dec.index_select(0, idx[a:a + chunk])).double()
                    parts.append((W @ vt) / W.norm(dim=1).clamp_min(1e-12))
                cos = torch.cat(parts).cpu().numpy() if parts else np.zeros(0)
                if ids is None:
                    ids = rank_latents(cos, top_k, rank_by)
                    cos = cos[ids]
            assert ids is not None
            t_ids = torch.as_tensor(ids, dtype=torch.long, device=W_dec.device)
            dec = W_dec.index_select(0, t_ids).float().cpu().numpy() if decoder else None
            enc = s.sae.W_enc.index_select(1, t_ids).T.float().cpu().numpy() if encoder else None
        out[ly] = SAERows(ly, ids.astype(np.int64), None if cos is None else cos.astype(np.float32), dec, enc)
    return out
