"""What the benchmarks share: the chat prompts they generate from, GemmaScope-2-shaped random SAEs
(optionally with thresholds calibrated to a realistic L0), latent sets spread over layers, and a
percentile, and paired ratios with a confidence interval for their median. Timing only: the SAE
weights are random."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

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


def gemmascope_shaped_sae(d_in: int, d_sae: int, seed: int, threshold: float = 0.5) -> JumpReLUSAE:
    """A random JumpReLU SAE with GemmaScope-2's shapes (weights random: for timing only).

    Pre-activations are x . N(0, 1/d_in) columns, i.e. about N(0, |x|^2 / d_in); the threshold sets
    how many latents fire (`calibrate_thresholds` sets them from real activations instead)."""
    g = torch.Generator().manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_sae**0.5)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(threshold)
    return sae.eval()


def threshold_for_fire_rate(fire_rate: float) -> float:
    """The `gemmascope_shaped_sae` threshold at which each latent fires on `fire_rate` of random
    unit-variance inputs (`torch.randn(..., d_in)`: their pre-activations are about N(0, 1))."""
    return statistics.NormalDist().inv_cdf(1.0 - fire_rate)


def calibrate_thresholds(saes: dict[int, JumpReLUSAE], model: Any, tokenizer: Any, l0: float,
                         prompts: list[str] = PROMPTS) -> dict[int, float]:
    """Set each latent's threshold so that it fires on `l0 / d_sae` of real residual-stream tokens.

    A random SAE with one fixed threshold fires on a large share of its latents (the default 0.5
    with Gemma-3-270M's residual norms: about a third), far from a trained SAE's L0 of tens to a
    few hundred, and that changes what a latent edit costs (an ablation decodes only the latents
    that fire). The tokens are the chat-formatted `prompts` run through `model` (BOS excluded).
    Returns {layer: mean L0 on those tokens}, measured after the thresholds are set."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in saes}
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            for layer in saes:
                acts[layer].append(hidden[layer + 1][0, 1:].float())
    measured: dict[int, float] = {}
    for layer, sae in saes.items():
        x = torch.cat(acts[layer])
        with torch.no_grad():
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # [N, d_sae]
            n = pre.shape[0]
            k = max(1, min(n, round((1.0 - l0 / sae.cfg.d_sae) * n)))
            # halfway between two observed values, not at one: a threshold equal to some token's
            # pre-activation is a planted tie that rounding decides (a token's pre-activation is only
            # equal to the last bit between batch compositions), which a trained SAE does not have
            lo = pre.kthvalue(k, dim=0).values
            hi = pre.kthvalue(k + 1, dim=0).values if k < n else lo + lo.abs()
            sae.threshold.copy_((0.5 * (lo + hi)).clamp_min(1e-6))
            measured[layer] = float((sae.encode(x) > 0).sum(-1).float().mean())
    return measured


def random_saes(model: Any, tokenizer: Any, layers: list[int], d_sae: int, l0: float) -> dict[int, JumpReLUSAE]:
    """`gemmascope_shaped_sae`s at `layers` of `model`; with `l0` > 0 their thresholds calibrated to
    that L0 on real activations (`calibrate_thresholds`, whose measured L0 is printed)."""
    d_in = model.config.get_text_config().hidden_size
    saes = {ly: gemmascope_shaped_sae(d_in, d_sae, ly) for ly in layers}
    if l0 > 0:
        print("SAE L0 per layer on the calibration prompts:", calibrate_thresholds(saes, model, tokenizer, l0))
    return saes


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


def median_interval(values: Iterable[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median of independent samples: the k-th smallest
    and k-th largest value, with the largest k for which 2 P(Binomial(n, 1/2) < k) <= 1 - level (the
    median lies outside them only when fewer than k samples fall on one side of it). None when n is too
    small for `level` (below 6 at 95 %)."""
    v = sorted(values)
    n = len(v)
    below, k = 0.0, 0  # P(Binomial(n, 1/2) < k)
    while k < (n + 1) // 2:
        p = math.comb(n, k) / 2.0**n
        if 2.0 * (below + p) > 1.0 - level:
            break
        below += p
        k += 1
    return None if k == 0 else (v[k - 1], v[n - k])


def _with_values(ratios: Iterable[float]) -> list[float]:
    """The ratios that have a value (not NaN / inf: a configuration that streamed no decode steps)."""
    return [r for r in ratios if math.isfinite(r)]


def paired_ratio(ratios: list[float]) -> str:
    """Ratios measured in pairs (each run over its baseline run beside it) as "median [min, max]", then
    the 95 % confidence interval of the median (`median_interval`) where there are enough pairs: the
    range is the noise one pair carries, the interval what the median still carries. Pairs without a
    value (NaN: a configuration that streams no decode steps) are left out; none at all prints "n/a"."""
    v = sorted(_with_values(ratios))
    if not v:
        return "n/a"
    ci = median_interval(v)
    return f"{statistics.median(v):.3f}x [{v[0]:.3f}, {v[-1]:.3f}]" + (
        f", 95% CI {ci[0]:.3f}-{ci[1]:.3f}" if ci else "")


def against_goal(ratios: list[float], goal: float) -> str:
    """Paired ratios against a goal ratio (a throughput floor such as 0.95x): "met" or "missed" only when
    the median's 95 % confidence interval lies wholly on one side of the goal, else "within noise"
    (pairs without a value left out, as in `paired_ratio`)."""
    v = _with_values(ratios)
    ci = median_interval(v)
    if ci is None:
        return f"too few pairs ({len(v)}) to tell"
    if ci[0] >= goal:
        return f"met (the median's 95% CI {ci[0]:.3f}-{ci[1]:.3f} is at or above {goal:g}x)"
    if ci[1] < goal:
        return f"missed (the median's 95% CI {ci[0]:.3f}-{ci[1]:.3f} is below {goal:g}x)"
    return f"within noise of {goal:g}x (the median's 95% CI {ci[0]:.3f}-{ci[1]:.3f} spans it)"


def same_work(tokens_per_request: Iterable[float]) -> bool:
    """Whether configurations generated the same tokens per request (within 1 %). Masks change the text,
    so answers may stop (EOS) at other lengths, and tokens/s then compares different work."""
    v = list(tokens_per_request)
    return not v or max(v) <= 1.01 * min(v)
