"""What a changing batch composition costs the hooks: plan compile + latent edits per model step.

Under load (many clients, short requests) requests join and leave the running batch almost every
step, and each new request brings its own latent sets. This replays that on one thread, without a
model: `--rows` decode rows, GemmaScope-2-shaped random JumpReLU SAEs (640 -> 16,384, thresholds for
~1% firing, as a trained SAE) at 4 layers, each request ablating its own random `--latents` per
layer; every `--churn` steps one row is replaced by a new request (0: the same batch throughout).
Per step it times `compile_plan` for the composition (cached per composition, as the vLLM worker
does) and the edits at the 4 layers. Print the load average beside it: the host is shared.

    python benchmarks/churn_cost.py [--churn 1] [--rows 12] [--latents 500] [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _common import gemmascope_shaped_sae, threshold_for_fire_rate
from refusal_audit.audit.spec import AblateLatents, Intervention
from refusal_audit.server.interventions import BatchPlan, RowCache, TokenContext, compile_plan
from refusal_audit.server.sae_runtime import build_layer_saes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--churn", type=int, default=1, help="replace one row every N steps (0: never)")
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--latents", type=int, default=500, help="latents per request per layer")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d, d_sae, layers, n_layers, plen = 640, 16384, (3, 6, 9, 12), 18, 20
    threshold = threshold_for_fire_rate(0.01)
    saes = build_layer_saes({ly: gemmascope_shaped_sae(d, d_sae, ly, threshold=threshold) for ly in layers},
                            d, n_layers)
    g = torch.Generator().manual_seed(0)

    def new_request() -> tuple[Intervention, ...]:
        return (AblateLatents(latents={ly: tuple(sorted(torch.randperm(d_sae, generator=g)[: args.latents].tolist()))
                                       for ly in layers}),)

    rows = [new_request() for _ in range(args.rows)]
    ids = list(range(args.rows))  # a request's id, as the worker's spec hash (object ids get reused)
    plans: dict[tuple[int, ...], BatchPlan] = {}
    row_cache = RowCache()  # as the vLLM worker keeps it: each request parsed once
    t_compile: list[float] = []
    t_apply: list[float] = []
    load0 = os.getloadavg()[0]
    with torch.inference_mode():
        for step in range(args.steps):
            if args.churn and step % args.churn == 0:
                rows[step % args.rows] = new_request()
                ids[step % args.rows] = args.rows + step
            key = tuple(ids)
            t0 = time.perf_counter()
            plan = plans.get(key)
            if plan is None:
                if len(plans) >= 64:  # the worker's plan cache holds 64 compositions
                    del plans[next(iter(plans))]
                plan = plans[key] = compile_plan(rows, [plen] * args.rows, saes, n_layers, d, torch.device("cpu"),
                                                 row_keys=key, row_cache=row_cache)
            t1 = time.perf_counter()
            pos = torch.full((args.rows,), plen + step)
            ctx = TokenContext.packed(pos, pos < plen, torch.full((args.rows,), plen), torch.arange(args.rows))
            h = torch.randn(1, args.rows, d, generator=g)
            for ly in layers:
                plan.latent_layers[ly].apply(h, ctx)
            t2 = time.perf_counter()
            if step >= 10:  # after the first compositions have filled caches and pools
                t_compile.append(t1 - t0)
                t_apply.append(t2 - t1)
    print(f"{args.rows} decode rows x {args.latents} latents per layer at 4 layers, one new request every "
          f"{args.churn or 'never'} step(s): compile {1e3 * statistics.mean(t_compile):.2f} ms/step, "
          f"edits {1e3 * statistics.mean(t_apply):.2f} ms/step (mean over {len(t_apply)} steps); "
          f"load average (1 min) {load0:.1f} / {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
