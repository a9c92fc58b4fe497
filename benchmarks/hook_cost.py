"""Time of the latent hook alone (`LatentLayerPlan.apply`), per layer call, on one thread.

GemmaScope-2-shaped JumpReLU SAE (640 -> 16,384, random weights: timing only), a packed step of
8 requests (decode: 1 token each; prefill: `--prefill` tokens each). Configurations:

  * batched    every request ablates its own random `--latents`-latent set; all groups through the
               SAE's slot pool: one padded `torch.bmm` to encode, a sparse decode (the default path)
  * looped     the same plan through the per-group loop (one gather per distinct set: ~20 small
               ops per group), `LatentLayerPlan(batched=False)`
  * shared     all requests ablate the same set (one group: the floor for this set size)
  * union      every request ablates the union of the 8 distinct sets: the matmul work of the old
               union gather (~3,600 latents per token for 8 x 500), without its masks
  * fused      the same plan with the fused CPU kernel (server/fused_hook.py): each token encodes
               its own set's latents and adds its decoder terms in one C pass, no slots; sets with
               more than fused_hook.MAX_TOKENS tokens in the step stay on the slot path
  * fused-table  `fused` with the screen reading each latent's int8 row from the SAE's table, scattered,
               instead of each set's own copy of its rows (`fused_hook.SET_ROWS_BUDGET` 0 for its plan)
  * dense-dec  `batched` with the decode forced through the `bmm` over every latent of the sets
               (what `decode_coefficients` does past its sparse bound: dense clamps, long prefills)

`--fire-rate 0.01` gives the SAE a trained SAE's sparsity (L0 ~ 160 of 16,384); the default fixed
threshold fires on ~31% of the latents for these random inputs, where the sparse decode never runs.

Median over `--repeats` interleaved timings. Load-light compared with an end-to-end run, but it
still shares the CPU with whatever else runs: print the load average next to it.

    python benchmarks/hook_cost.py [--latents 500] [--prefill 20] [--repeats 30] [--threads 1] [--cold]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

import torch
from _common import gemmascope_shaped_sae, threshold_for_fire_rate
from refusal_audit.audit.spec import AblateLatents
from refusal_audit.server import fused_hook, interventions
from refusal_audit.server.interventions import TokenContext, compile_plan
from refusal_audit.server.sae_runtime import build_layer_saes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=500, help="latents per request at this layer")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prefill", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and the fused kernel's)")
    ap.add_argument("--cold", action="store_true",
                    help="write a 64 MB buffer before every timed call, so each starts with the caches cold, as "
                         "between two layers of a forward pass")
    ap.add_argument("--new-sets", action="store_true",
                    help="the slot pools forget their sets before every timed call, so the slot path writes each "
                         "set into its slot again, as for a new request's prefill (the fused kernel has no slots)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="fused_hook.MAX_TOKENS for this run: sets with more tokens in the step keep the slot path")
    ap.add_argument("--fire-rate", type=float, default=None,
                    help="fraction of latents active per token (threshold from the N(0, 1) pre-activations of "
                         "the random inputs); default: threshold 0.5, i.e. ~31%% active, far denser than a real SAE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.max_tokens is not None:
        fused_hook.MAX_TOKENS = args.max_tokens
    d_sae, d = 16384, 640
    threshold = 0.5 if args.fire_rate is None else threshold_for_fire_rate(args.fire_rate)
    sae = gemmascope_shaped_sae(d, d_sae, seed=1, threshold=threshold)
    g = torch.Generator().manual_seed(0)
    sets = [tuple(sorted(torch.randperm(d_sae, generator=g)[: args.latents].tolist())) for _ in range(args.rows)]
    union = tuple(sorted(set().union(*sets)))
    specs = {
        "distinct": [(AblateLatents(latents={1: s}),) for s in sets],
        "shared": [(AblateLatents(latents={1: sets[0]}),)] * args.rows,
        "union": [(AblateLatents(latents={1: union}),)] * args.rows,
    }
    # one runtime SAE (same weights) per configuration: each keeps its own slot pool, as a server running
    # one of them would, instead of the interleaved configurations evicting each other's sets
    plans = {k: compile_plan(v, [args.prefill] * args.rows, build_layer_saes({1: sae}, d, 4), 4, d,
                             torch.device("cpu"), fused=k.startswith("fused")).latent_layers[1]
             for k, v in {**specs, "fused": specs["distinct"], "fused-table": specs["distinct"]}.items()}
    plans = {"batched": plans["distinct"], "looped": replace(plans["distinct"], batched=False),
             "shared": plans["shared"], "union": plans["union"], "dense-dec": plans["distinct"], "fused": plans["fused"],
             "fused-table": plans["fused-table"]}
    budget, fused_hook.SET_ROWS_BUDGET = fused_hook.SET_ROWS_BUDGET, 0
    try:  # this plan's kernel is made now, without row copies
        kernel = plans["fused-table"]._step_kernel
        assert kernel is None or not any(c is not None for c in kernel.set_rows)
    finally:
        fused_hook.SET_ROWS_BUDGET = budget

    def run(name: str, h: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        if name != "dense-dec":
            return plans[name].apply(h, ctx)
        saved = interventions._SPARSE_DECODE_FRACTION, interventions._SPARSE_DECODE_FRACTION_UNGATHERED
        interventions._SPARSE_DECODE_FRACTION = interventions._SPARSE_DECODE_FRACTION_UNGATHERED = -1.0
        try:
            return plans[name].apply(h, ctx)
        finally:
            interventions._SPARSE_DECODE_FRACTION, interventions._SPARSE_DECODE_FRACTION_UNGATHERED = saved

    load0 = os.getloadavg()[0]
    junk = torch.empty(16 << 20)
    print(f"{args.rows} rows x {args.latents} latents; union {len(union)} latents; threshold {threshold:.2f}; "
          f"torch threads {args.threads}; caches {'cold' if args.cold else 'warm'}; "
          f"slot pools {'forget their sets before each call' if args.new_sets else 'keep their sets'}; "
          f"fused kernel's MAX_TOKENS {fused_hook.MAX_TOKENS}; "
          f"fused kernel {'on' if plans['fused']._fused_arrays is not None else 'unavailable'}")
    for step, per_row in (("decode", 1), ("prefill", args.prefill)):
        n = args.rows * per_row
        row = torch.arange(args.rows).repeat_interleave(per_row)
        pos = torch.arange(per_row).repeat(args.rows) + (args.prefill if per_row == 1 else 0)
        plen = torch.full((args.rows,), args.prefill)
        ctx = TokenContext.packed(pos, pos < plen[row], plen, row)
        h = torch.randn(1, n, d, generator=g)
        times: dict[str, list[float]] = {k: [] for k in plans}
        with torch.inference_mode():
            for _ in range(3):  # warm-up: slice caches, slot pools
                outs = {k: run(k, h, ctx) for k in plans}
            gap = float((outs["batched"] - outs["looped"]).abs().max())
            gap_dense = float((outs["batched"] - outs["dense-dec"]).abs().max())
            gap_fused = float((outs["batched"] - outs["fused"]).abs().max())
            same_bits = bool(torch.equal(outs["fused"], outs["fused-table"]))
            fired = float((plans["batched"].sae.encode(h[0]) > 0).float().mean())
            for _ in range(args.repeats):
                for k in plans:
                    if args.cold:
                        junk.add_(1.0)
                    if args.new_sets:
                        plans[k].sae.pool.forget()
                    t0 = time.perf_counter()
                    run(k, h, ctx)
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{step:8s} ({n:4d} tokens, {100 * fired:.1f}% of latents fire): "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items())
              + f"; batched/looped {med['batched'] / med['looped']:.2f}, looped/union {med['looped'] / med['union']:.2f}, "
              f"batched/dense-dec {med['batched'] / med['dense-dec']:.2f}, fused/batched {med['fused'] / med['batched']:.2f}, "
              f"fused/fused-table {med['fused'] / med['fused-table']:.2f}"
              + f"; max |batched - looped| {gap:.1e}, |batched - dense-dec| {gap_dense:.1e}, |batched - fused| {gap_fused:.1e}"
              + f"; fused and fused-table bit-identical: {'yes' if same_bits else 'NO'}")
    print(f"load average (1 min) before / after: {load0:.1f} / {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
