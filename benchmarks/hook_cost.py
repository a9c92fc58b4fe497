"""Time of the latent hook alone (`LatentLayerPlan.apply`), per layer call, on one thread.

GemmaScope-2-shaped JumpReLU SAE (640 -> 16,384, random weights: timing only), a packed step of
8 requests (decode: 1 token each; prefill: `--prefill` tokens each). Configurations:

  * batched    every request ablates its own random `--latents`-latent set; all groups in one padded
               `torch.bmm` each for encode and decode (the default path for several groups)
  * looped     the same plan through the per-group loop (one gather per distinct set: ~20 small
               ops per group), `LatentLayerPlan(batched=False)`
  * shared     all requests ablate the same set (one group: the floor for this set size)
  * union      every request ablates the union of the 8 distinct sets: the matmul work of the old
               union gather (~3,600 latents per token for 8 x 500), without its masks

Median over `--repeats` interleaved timings. Load-light compared with an end-to-end run, but it
still shares the CPU with whatever else runs: print the load average next to it.

    python benchmarks/hook_cost.py [--latents 500] [--prefill 20] [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

import torch
from _common import gemmascope_shaped_sae
from refusal_audit.audit.spec import AblateLatents
from refusal_audit.server.interventions import TokenContext, compile_plan
from refusal_audit.server.sae_runtime import build_layer_saes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=500, help="latents per request at this layer")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prefill", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d_sae, d = 16384, 640
    saes = build_layer_saes({1: gemmascope_shaped_sae(d, d_sae, seed=1)}, d, 4)
    g = torch.Generator().manual_seed(0)
    sets = [tuple(sorted(torch.randperm(d_sae, generator=g)[: args.latents].tolist())) for _ in range(args.rows)]
    union = tuple(sorted(set().union(*sets)))
    specs = {
        "distinct": [(AblateLatents(latents={1: s}),) for s in sets],
        "shared": [(AblateLatents(latents={1: sets[0]}),)] * args.rows,
        "union": [(AblateLatents(latents={1: union}),)] * args.rows,
    }
    plans = {k: compile_plan(v, [args.prefill] * args.rows, saes, 4, d, torch.device("cpu")).latent_layers[1]
             for k, v in specs.items()}
    plans = {"batched": plans["distinct"], "looped": replace(plans["distinct"], batched=False),
             "shared": plans["shared"], "union": plans["union"]}
    load0 = os.getloadavg()[0]
    print(f"{args.rows} rows x {args.latents} latents; union {len(union)} latents; torch threads 1")
    for step, per_row in (("decode", 1), ("prefill", args.prefill)):
        n = args.rows * per_row
        row = torch.arange(args.rows).repeat_interleave(per_row)
        pos = torch.arange(per_row).repeat(args.rows) + (args.prefill if per_row == 1 else 0)
        plen = torch.full((args.rows,), args.prefill)
        ctx = TokenContext.packed(pos, pos < plen[row], plen, row)
        h = torch.randn(1, n, d, generator=g)
        times: dict[str, list[float]] = {k: [] for k in plans}
        with torch.inference_mode():
            for _ in range(3):  # warm-up: slice caches; a plan's first calls take the loop (interventions._BATCH_AFTER)
                outs = [p.apply(h, ctx) for p in plans.values()]
            gap = float((outs[0] - outs[1]).abs().max())
            for _ in range(args.repeats):
                for k, p in plans.items():
                    t0 = time.perf_counter()
                    p.apply(h, ctx)
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{step:8s} ({n:4d} tokens): " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items())
              + f"; batched/looped {med['batched'] / med['looped']:.2f}, looped/union {med['looped'] / med['union']:.2f}"
              + f"; max |batched - looped| {gap:.1e}")
    print(f"load average (1 min) before / after: {load0:.1f} / {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
