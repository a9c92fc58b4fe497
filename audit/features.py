"""Sparse SAE-feature datasets for the stage-3 factorization machine and the linear probe.

The seed paper (appendix "Dataset for training Factorization Machines"): harmful prompts labelled
1 and an equal number of harmless ones labelled 0, split 80/10/10; SAE activations on the *last 4
tokens* (the post-instruction / special tokens that drive refusal) at every SAE layer from layer 2
up to the steering layer. A feature is one (layer, latent, position-from-end) triple; its value
is the latent's activation there. Only triples that occur get a column: `FeatureDataset.keys`
maps the compact column index back to (layer, latent, position), position -1 being the last
prompt token.

Activations come from `engine.encode` in top-k mode (every active latent per token, up to
`top_k`; tokens that hit the cap are counted in `saturated_tokens` so a too-small `top_k` shows).
Encoding is batched and checkpointed per batch (an .npz under ``ctx.out_dir`` plus a checkpoint
row naming it), so a resumed job does not re-encode.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .context import StageContext
from .datasets import load_prompts
from .engine import Engine
from .spec import Prompt, Request
from .stage_utils import as_prompt, chunks, fingerprint, resumed, save_fingerprinted

Transform = Literal["raw", "maxabs", "log1p", "binary"]
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

_LAYER_SHIFT, _LATENT_SHIFT = 40, 8  # key = layer << 40 | latent << 8 | (-position)


@dataclass
class SparseRows:
    """A batch of sparse examples in CSR layout.

    indices: [nnz] int64 feature ids; values: [nnz] float32; offsets: [n + 1] int64 row pointers
    (row r owns entries offsets[r]:offsets[r + 1]); labels: [n] float32 (0/1) or None.
    A feature appears at most once per row (the identity would otherwise count a self-interaction).
    """

    indices: np.ndarray
    values: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64)
        self.values = np.asarray(self.values, dtype=np.float32)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.float32)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0:
            raise ValueError("offsets must be a 1-d row-pointer array starting at 0")
        if self.offsets[-1] != len(self.indices) or len(self.indices) != len(self.values):
            raise ValueError("offsets[-1], len(indices) and len(values) must agree")
        if self.labels is not None and len(self.labels) != self.n:
            raise ValueError("labels must have one entry per row")

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    @property
    def nnz(self) -> int:
        return len(self.indices)

    def rows(self, which: np.ndarray | list[int]) -> SparseRows:
        """The sub-batch of the given row numbers (in that order)."""
        which = np.asarray(which, dtype=np.int64)
        starts, ends = self.offsets[which], self.offsets[which + 1]
        lens = ends - starts
        if len(which) == 0:
            return SparseRows(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(1, np.int64),
                              None if self.labels is None else np.zeros(0, np.float32))
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        take = np.arange(offsets[-1], dtype=np.int64) + np.repeat(starts - offsets[:-1], lens)
        return SparseRows(self.indices[take], self.values[take], offsets,
                          None if self.labels is None else self.labels[which])

    def to_dense(self, n_features: int) -> np.ndarray:
        """[n, n_features] dense copy (tests and tiny data only)."""
        out = np.zeros((self.n, n_features), dtype=np.float32)
        for r in range(self.n):
            s, e = self.offsets[r], self.offsets[r + 1]
            np.add.at(out[r], self.indices[s:e], self.values[s:e])
        return out

    @classmethod
    def from_dense(cls, x: np.ndarray, labels: np.ndarray | None = None) -> SparseRows:
        """CSR rows of the non-zero entries of a dense [n, d] array."""
        x = np.asarray(x, dtype=np.float32)
        rows, cols = np.nonzero(x)
        counts = np.bincount(rows, minlength=x.shape[0])
        return cls(cols.astype(np.int64), x[rows, cols], np.concatenate([[0], np.cumsum(counts)]), labels)


def pack_keys(layer: np.ndarray, latent: np.ndarray, position: np.ndarray) -> np.ndarray:
    """One int64 per (layer, latent, position<0) triple, order-preserving by layer, then latent."""
    return (np.asarray(layer, np.int64) << _LAYER_SHIFT) | (np.asarray(latent, np.int64) << _LATENT_SHIFT) | (
        -np.asarray(position, np.int64))


def unpack_keys(keys: np.ndarray) -> np.ndarray:
    """[n, 3] (layer, latent, position) from packed keys."""
    keys = np.asarray(keys, np.int64)
    return np.stack([keys >> _LAYER_SHIFT, (keys >> _LATENT_SHIFT) & ((1 << 32) - 1), -(keys & 0xFF)], axis=1)


@dataclass
class Example:
    """One prompt's active (layer, latent, position) triples and activation values."""

    keys: np.ndarray  # [m] packed keys
    values: np.ndarray  # [m] float32
    saturated: int = 0  # tokens whose active-latent count hit top_k


def encode_last_tokens(engine: Engine, prompts: Sequence[Prompt], layers: Sequence[int], n_positions: int = 4,
                       top_k: int = 256, batch_size: int = 16) -> list[Example]:
    """Active latents on the last `n_positions` tokens of each prompt at `layers` (no intervention)."""
    out: list[Example] = []
    for part in chunks(list(prompts), batch_size):
        res = engine.encode([Request(prompt=p) for p in part], layers=list(layers), top_k=top_k)
        for r in res:
            n_tok = len(r.token_ids)
            ks: list[np.ndarray] = []
            vs: list[np.ndarray] = []
            sat = 0
            for ly in layers:
                acts = r.layers[ly]
                assert acts.top_indices is not None and acts.top_values is not None
                for back in range(1, min(n_positions, n_tok) + 1):
                    t = n_tok - back
                    idx = np.asarray(acts.top_indices[t], np.int64)
                    val = np.asarray(acts.top_values[t], np.float32)
                    keep = val > 0
                    sat += int(len(idx) >= top_k)
                    ks.append(pack_keys(np.full(int(keep.sum()), ly), idx[keep], np.full(int(keep.sum()), -back)))
                    vs.append(val[keep])
            keys = np.concatenate(ks) if ks else np.zeros(0, np.int64)
            vals = np.concatenate(vs) if vs else np.zeros(0, np.float32)
            out.append(Example(keys, vals, sat))
    return out


def encode_checkpointed(engine: Engine, prompts: Sequence[Prompt], texts: Sequence[str], layers: Sequence[int],
                        n_positions: int, top_k: int, batch_size: int, ctx: Any, key: str,
                        stage: str = "features") -> list[Example]:
    """`encode_last_tokens`, batch by batch, each batch saved as .npz under ctx.out_dir and
    checkpointed (``{key}/batch/{j}``), so a resumed job re-encodes nothing already done."""
    out_dir = Path(ctx.out_dir) / "features"
    out_dir.mkdir(parents=True, exist_ok=True)
    examples: list[Example] = []
    batches = list(chunks(list(range(len(prompts))), batch_size))
    for j, idx in enumerate(batches):
        fp = fingerprint([*(texts[i] for i in idx), str(list(layers)), str(n_positions), str(top_k)])
        got = resumed(ctx, f"{key}/batch/{j}", fp)
        loaded = None
        if got is not None and os.path.isfile(got.get("path", "")):
            with np.load(got["path"]) as z:
                lens = z["lens"]
                bounds = np.concatenate([[0], np.cumsum(lens)])
                loaded = [Example(z["keys"][bounds[i]:bounds[i + 1]], z["values"][bounds[i]:bounds[i + 1]],
                                  int(z["saturated"][i])) for i in range(len(lens))]
        if loaded is None:
            ctx.check_cancelled()
            loaded = encode_last_tokens(engine, [prompts[i] for i in idx], layers, n_positions, top_k, len(idx))
            path = out_dir / f"{key.replace('/', '_')}_{j}.npz"
            np.savez(path, keys=np.concatenate([e.keys for e in loaded]),
                     values=np.concatenate([e.values for e in loaded]),
                     lens=np.array([len(e.keys) for e in loaded], np.int64),
                     saturated=np.array([e.saturated for e in loaded], np.int64))
            save_fingerprinted(ctx, f"{key}/batch/{j}", fp, path=str(path))
        examples.extend(loaded)
        ctx.progress(stage, min(len(prompts), (j + 1) * batch_size), len(prompts))
    return examples


def stratified_split(labels: Sequence[int], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> np.ndarray:
    """[n] split codes (0 train, 1 val, 2 test): each class permuted (seeded) and cut by `fractions`."""
    y = np.asarray(labels)
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError("fractions must be three non-negative numbers summing to 1")
    out = np.zeros(len(y), np.int8)
    rng = np.random.default_rng(seed)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        out[idx[n_train : n_train + n_val]] = 1
        out[idx[n_train + n_val :]] = 2
    return out


@dataclass
class FeatureDataset:
    """All examples as CSR rows over a compact feature index, with labels and the split."""

    rows: SparseRows  # raw activation values
    keys: np.ndarray  # [n_features, 3] (layer, latent, position-from-end, -1 = last token)
    split: np.ndarray  # [n] 0 train / 1 val / 2 test
    layers: list[int]
    n_positions: int
    saturated_tokens: int = 0
    scale: np.ndarray | None = None  # per-feature divisor applied by `transformed` ("maxabs")
    transform: Transform = "raw"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return len(self.keys)

    @classmethod
    def build(cls, examples: Sequence[Example], labels: Sequence[int], split: np.ndarray, layers: Sequence[int],
              n_positions: int) -> FeatureDataset:
        """Compact column index over every (layer, latent, position) that occurs in `examples`."""
        all_keys = np.concatenate([e.keys for e in examples]) if examples else np.zeros(0, np.int64)
        uniq, inverse = np.unique(all_keys, return_inverse=True)
        lens = np.array([len(e.keys) for e in examples], np.int64)
        values = np.concatenate([e.values for e in examples]) if examples else np.zeros(0, np.float32)
        rows = SparseRows(inverse.astype(np.int64).reshape(-1), values, np.concatenate([[0], np.cumsum(lens)]),
                          np.asarray(labels, np.float32))
        return cls(rows, unpack_keys(uniq), np.asarray(split, np.int8), [int(x) for x in layers], int(n_positions),
                   int(sum(e.saturated for e in examples)))

    def part(self, name: str) -> SparseRows:
        """The train / val / test rows."""
        return self.rows.rows(np.flatnonzero(self.split == SPLIT_CODES[name]))

    def train_counts(self) -> np.ndarray:
        """[n_features] number of training examples in which each feature is non-zero."""
        tr = self.part("train")
        return np.bincount(tr.indices, minlength=self.n_features)

    def transformed(self, kind: Transform) -> FeatureDataset:
        """A copy with values rescaled: raw; maxabs (divide by the feature's max on the training
        split, so values lie in [0, 1] and sparsity is kept); log1p; binary (1 where active)."""
        v = self.rows.values
        scale = None
        if kind == "raw":
            nv = v.copy()
        elif kind == "log1p":
            nv = np.log1p(np.maximum(v, 0.0)).astype(np.float32)
        elif kind == "binary":
            nv = (v != 0).astype(np.float32)
        elif kind == "maxabs":
            tr = self.part("train")
            scale = np.zeros(self.n_features, np.float32)
            np.maximum.at(scale, tr.indices, np.abs(tr.values))
            allmax = np.zeros(self.n_features, np.float32)
            np.maximum.at(allmax, self.rows.indices, np.abs(v))
            scale = np.where(scale > 0, scale, np.where(allmax > 0, allmax, 1.0)).astype(np.float32)
            nv = (v / scale[self.rows.indices]).astype(np.float32)
        else:
            raise ValueError(f"unknown transform {kind!r}")
        rows = SparseRows(self.rows.indices, nv, self.rows.offsets, self.rows.labels)
        return FeatureDataset(rows, self.keys, self.split, self.layers, self.n_positions, self.saturated_tokens,
                              scale, kind, dict(self.meta))

    def summary(self) -> dict[str, Any]:
        nnz = np.diff(self.rows.offsets)
        return {"n_examples": self.rows.n, "n_features": self.n_features, "nnz": int(self.rows.nnz),
                "nnz_per_example_mean": float(nnz.mean()) if len(nnz) else 0.0,
                "n_train": int((self.split == 0).sum()), "n_val": int((self.split == 1).sum()),
                "n_test": int((self.split == 2).sum()), "layers": self.layers, "n_positions": self.n_positions,
                "saturated_tokens": self.saturated_tokens, "transform": self.transform,
                "n_positive": int((self.rows.labels == 1).sum()) if self.rows.labels is not None else 0}

    def arrays(self, prefix: str = "features_") -> dict[str, np.ndarray]:
        """Raw rows + index as numpy arrays (stored as safetensors beside a job's JSON)."""
        labels = self.rows.labels if self.rows.labels is not None else np.zeros(self.rows.n, np.float32)
        return {f"{prefix}indices": self.rows.indices.astype(np.int64), f"{prefix}values": self.rows.values,
                f"{prefix}offsets": self.rows.offsets, f"{prefix}labels": labels,
                f"{prefix}keys": self.keys.astype(np.int64), f"{prefix}split": self.split.astype(np.int8)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], layers: Sequence[int], n_positions: int,
                    prefix: str = "features_") -> FeatureDataset:
        a = {k: np.asarray(v) for k, v in arrays.items()}
        rows = SparseRows(a[f"{prefix}indices"], a[f"{prefix}values"], a[f"{prefix}offsets"], a[f"{prefix}labels"])
        return cls(rows, a[f"{prefix}keys"].reshape(-1, 3), a[f"{prefix}split"], list(layers), int(n_positions))


def latent_groups(keys: np.ndarray, usable: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Group feature columns by (layer, latent): (latent_keys [m, 2], group id per column [n_features]
    with -1 for columns not `usable`)."""
    keys = np.asarray(keys, np.int64).reshape(-1, 3)
    mask = np.ones(len(keys), bool) if usable is None else np.asarray(usable, bool)
    packed = (keys[:, 0] << 32) | keys[:, 1]
    uniq, inv = np.unique(packed[mask], return_inverse=True)
    group = np.full(len(keys), -1, np.int64)
    group[np.flatnonzero(mask)] = inv.reshape(-1)
    latent_keys = np.stack([uniq >> 32, uniq & ((1 << 32) - 1)], axis=1) if len(uniq) else np.zeros((0, 2), np.int64)
    return latent_keys, group


# ---------------------------------------------------------------------------- the stage-3 / probe dataset


class FeatureConfig(BaseModel):
    """How the FM / probe dataset is built (shared by stage 3 and the linear-probe baseline)."""

    model_config = ConfigDict(extra="forbid")

    harmful_dataset: str = "temaq-abliterated:harmful"
    harmless_dataset: str = "temaq-abliterated:harmless"
    split: str = "all"  # which split of each named set to draw from (then 80/10/10 here)
    n_per_class: int | None = Field(None, ge=2)  # None: min(#harmful, #harmless) ("an equal number")
    seed: int = 0
    chat: bool = True
    layers: list[int] | None = None  # explicit SAE layers; None: SAE layers in [min_layer, steering_layer]
    min_layer: int = 2
    steering_layer: int | None = None  # None: the direction job's layer, else every SAE layer >= min_layer
    n_positions: int = Field(4, ge=1, le=255)
    encode_top_k: int = Field(256, ge=1, le=4096)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    transform: Transform = "maxabs"
    batch_size: int = Field(16, ge=1)


def resolve_layers(engine: Engine, fc: FeatureConfig, steering_layer: int | None) -> tuple[list[int], str]:
    """Feature layers and a note of how they were chosen."""
    sae_layers = sorted(engine.info.sae_layers)
    if fc.layers:
        bad = [ly for ly in fc.layers if ly not in sae_layers]
        if bad:
            raise ValueError(f"features.layers: no SAE at layer(s) {bad} (SAE layers: {sae_layers})")
        return sorted(set(fc.layers)), "explicit"
    top = fc.steering_layer if fc.steering_layer is not None else steering_layer
    layers = [ly for ly in sae_layers if ly >= fc.min_layer and (top is None or ly <= top)]
    if not layers:
        raise ValueError(f"no SAE layer in [{fc.min_layer}, {top}] (SAE layers: {sae_layers})")
    how = f"SAE layers in [{fc.min_layer}, {top}] (steering layer)" if top is not None else \
        f"SAE layers >= {fc.min_layer} (no steering layer given)"
    return layers, how


def load_fm_prompts(fc: FeatureConfig) -> tuple[list[str], list[str]]:
    """Harmful and harmless prompts, equal numbers (seeded sample of the larger set)."""
    harmful = load_prompts(fc.harmful_dataset, fc.split, None, fc.seed)
    harmless = load_prompts(fc.harmless_dataset, fc.split, None, fc.seed)
    n = min(len(harmful), len(harmless))
    if fc.n_per_class is not None:
        n = min(n, fc.n_per_class)
    rng = np.random.default_rng(fc.seed)
    pick = lambda xs: [xs[i] for i in np.sort(rng.permutation(len(xs))[:n])]  # noqa: E731
    return pick(harmful), pick(harmless)


def build_feature_dataset(engine: Engine, fc: FeatureConfig, layers: Sequence[int], ctx: StageContext,
                          harmful: Sequence[str] | None = None, harmless: Sequence[str] | None = None,
                          key: str = "stage3/features", stage: str = "stage3/features") -> FeatureDataset:
    """Encode harmful (1) + harmless (0) prompts into a `FeatureDataset` with a stratified split."""
    if harmful is None or harmless is None:
        harmful, harmless = load_fm_prompts(fc)
    texts = [*harmful, *harmless]
    labels = [1] * len(harmful) + [0] * len(harmless)
    if len(harmful) < 2 or len(harmless) < 2:
        raise ValueError("the FM dataset needs at least 2 harmful and 2 harmless prompts")
    prompts = [as_prompt(t, fc.chat) for t in texts]
    examples = encode_checkpointed(engine, prompts, texts, layers, fc.n_positions, fc.encode_top_k, fc.batch_size,
                                   ctx, key, stage)
    split = stratified_split(labels, fc.split_fractions, fc.seed)
    ds = FeatureDataset.build(examples, labels, split, layers, fc.n_positions)
    ds.meta["texts"] = texts
    return ds
