"""What the benchmarks share: the chat prompts they generate from, GemmaScope-2-shaped random SAEs,
latent sets spread over layers, and a percentile. Timing only: the SAE weights are random."""

from __future__ import annotations

import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how vaccines train the immune system.",
    "Give me three tips for learning a new language.",
    "What causes the seasons on Earth?",
    "Describe the water cycle in simple terms.",
    "How do I make a good cup of coffee?",
    "Summarise the plot of a heist movie you invent.",
    "List some benefits of regular exercise.",
]


def gemmascope_shaped_sae(d_in: int, d_sae: int, seed: int) -> JumpReLUSAE:
    """A random JumpReLU SAE with GemmaScope-2's shapes (weights random: for timing only)."""
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_sae**0.5)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(0.5)
    return sae.eval()


def spread_latents(n: int, layers: list[int], d_sae: int, seed: int = 0) -> dict[int, tuple[int, ...]]:
    """n latent ids spread evenly over the layers (distinct per layer, seeded)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[int, tuple[int, ...]] = {}
    for i, layer in enumerate(layers):
        k = n // len(layers) + (1 if i < n % len(layers) else 0)
        out[layer] = tuple(sorted(torch.randperm(d_sae, generator=g)[:k].tolist()))
    return out


def percentile(xs: list[float], q: float) -> float:
    """The nearest-rank q-quantile (q in [0, 1]) of xs; NaN for no values."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]
