"""What the HF engine's batch-invariant mode costs: ms per generation step, plain vs batch-invariant.

Two engines over two copies of the embedded Gemma-3-270M with the same random GemmaScope-shaped
SAEs (thresholds calibrated to the data), each request ablating its own latents; batches of B rows
of different prompt lengths, `--new-tokens` steps, every row forced to run them all (no stop
tokens in reach: the prompts ask for long stories; the time is per step of the longest row). The engines alternate, `--reps` times per
B; the table gives medians, the ratio, and the rounds' spread (a ratio inside it is "within noise").

    python benchmarks/invariant_cost.py --batches 1,2,4,8,16 --latents 2000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import random_saes, spread_latents  # noqa: E402
from load import PROMPTS  # noqa: E402
from refusal_audit.audit.spec import AblateLatents, Request, SamplingParams, user_prompt  # noqa: E402


def build(invariant: bool, layers: list[int], d_sae: int, sae_l0: float) -> Any:
    from refusal_audit.server.hf_engine import HFEngine
    from refusal_audit.server.model_loading import load_model
    from refusal_audit.server.sae_runtime import build_layer_saes

    model, tok = load_model("embedded:gemma-3-270m")
    text = model.config.get_text_config()
    saes = random_saes(model, tok, layers, d_sae, sae_l0)
    return HFEngine(model, tok, build_layer_saes(saes, text.hidden_size, text.num_hidden_layers),
                    batch_invariant=invariant)


def requests(n: int, new_tokens: int, latents: int, layers: list[int], d_sae: int) -> list[Request]:
    out = []
    for i in range(n):
        prompt = user_prompt(f"Write a very long story, number {i}, that begins: {PROMPTS[i % len(PROMPTS)]}")
        ivs = (AblateLatents(latents=spread_latents(latents, layers, d_sae, seed=i)),) if latents else ()
        out.append(Request(prompt=prompt, interventions=ivs, sampling=SamplingParams(max_new_tokens=new_tokens)))
    return out


def ms_per_step(engine: Any, reqs: list[Request]) -> float:
    t = time.perf_counter()
    done = engine.generate(reqs)
    steps = max(len(c.token_ids) for c in done)
    return 1000 * (time.perf_counter() - t) / max(1, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--latents", type=int, default=2000, help="latents per request over the SAE layers (0: none)")
    ap.add_argument("--layers", default="3,6,9,12")
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--sae-l0", type=float, default=100.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.reps < 2:
        ap.error("--reps must be at least 2: the rounds' spread is what tells a ratio from noise")
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    engines = {"plain": build(False, layers, args.d_sae, args.sae_l0),
               "batch-invariant": build(True, layers, args.d_sae, args.sae_l0)}
    warm = requests(2, 4, args.latents, layers, args.d_sae)
    for e in engines.values():
        e.generate(warm)
    print(f"embedded Gemma-3-270M, {args.latents} latents/request over SAEs 640->{args.d_sae} at {layers}, "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, {args.reps} alternating rounds\n")
    print("| rows | plain ms/step | batch-invariant ms/step | ratio | rounds' spread | load avg |")
    print("|---:|---:|---:|---:|---:|---|")
    for b in [int(x) for x in args.batches.split(",")]:
        reqs = requests(b, args.new_tokens, args.latents, layers, args.d_sae)
        times: dict[str, list[float]] = {k: [] for k in engines}
        load0 = os.getloadavg()[0]
        for _ in range(args.reps):
            for name, e in engines.items():
                times[name].append(ms_per_step(e, reqs))
        med = {k: statistics.median(v) for k, v in times.items()}
        spread = max((max(v) - min(v)) / statistics.median(v) for v in times.values())
        ratio = med["batch-invariant"] / med["plain"]
        shown = f"{ratio:.2f}x" if abs(ratio - 1) > spread else f"within noise ({ratio:.2f}x)"
        print(f"| {b} | {med['plain']:.0f} | {med['batch-invariant']:.0f} | {shown} | {100 * spread:.0f} % | "
              f"{load0:.1f} -> {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
