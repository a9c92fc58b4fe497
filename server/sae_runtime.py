"""SAE runtime: load sae-lens SAEs per layer, and cache the per-latent-set slices the sparse path needs.

An ablation or clamp of a latent set S only needs the |S| encoder columns, biases, thresholds and
decoder rows of S (docs/interventions.md). `LayerSAE.slices(S)` gathers them once per (layer, S) and caches
them. Architectures that are not per-latent separable (TopK and friends) use sae-lens's own full
encode/decode instead.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from sae_lens.saes.standard_sae import StandardSAE

from ..audit.engine import SAEInfo
from ..audit.errors import InvalidRequest

_SEPARABLE_NORMS = {"none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"}


@dataclass(frozen=True)
class SAESlice:
    """The columns/rows of one latent set, ready for the sparse path (all on the SAE's device)."""

    latents: torch.Tensor  # [k] long
    W_enc: torch.Tensor  # [d, k]
    b_enc: torch.Tensor  # [k], with the b_dec-to-input term folded in
    threshold: torch.Tensor | None  # [k] (JumpReLU) or None (ReLU)
    W_dec: torch.Tensor  # [k, d]


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
        self._cache: OrderedDict[tuple[int, ...], SAESlice] = OrderedDict()
        self._cache_bytes = cache_bytes  # LRU bounded by size, not count: a 3k-latent slice is ~15 MB at d=640
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._row_absmax: np.ndarray | None = None

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

    def slices(self, latents: Sequence[int]) -> SAESlice:
        """Gathered encoder/decoder slices for a latent set, cached per (layer, set)."""
        key = tuple(int(i) for i in latents)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        sae = self.sae
        with torch.no_grad():
            idx = torch.tensor(key, dtype=torch.long, device=sae.W_enc.device)
            W_enc = sae.W_enc.index_select(1, idx).contiguous()
            b_enc = sae.b_enc.index_select(0, idx)
            if sae.cfg.apply_b_dec_to_input:
                b_enc = b_enc - sae.b_dec @ W_enc
            threshold = sae.threshold.index_select(0, idx) if isinstance(sae, JumpReLUSAE) else None
            W_dec = sae.W_dec.index_select(0, idx).contiguous()
        sl = SAESlice(idx, W_enc, b_enc.contiguous(), threshold, W_dec)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = sl
                self._cached_bytes += _nbytes(sl)
            while self._cached_bytes > self._cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= _nbytes(old)
        return sl

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


def _nbytes(sl: SAESlice) -> int:
    parts = [sl.W_enc, sl.b_enc, sl.W_dec, sl.latents] + ([sl.threshold] if sl.threshold is not None else [])
    return sum(t.numel() * t.element_size() for t in parts)


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
