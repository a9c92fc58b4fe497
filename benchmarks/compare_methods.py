"""Seed 1 (stages 1-3) vs seed 2 (attribution, `refusal_features`) on the built demo model, in one run.

    python benchmarks/compare_methods.py [--data-dir DIR] [--small] [--prompts 8] [--threads 1] [--out DIR] [--json F]
                                         [--no-atp]

Runs `refusal-audit demo`'s own sections (coherence gate, direction -> stage 1 -> stage 2, refusal
rates) then stage 3, `refusal_features` (IG, 10 steps), `refusal_features_atp` (plain attribution
patching, n = 1, on the same prompts and candidates; skipped with --no-atp) and `method_comparison`
from `demo_analyses` (the other analyses are skipped: they do not enter the comparison), every section
recomputed (`rerun`), with the demo's `MeteredEngine` counting passes per stage. The run writes its
section cache under DIR/runs/cache and, without --out, its report under DIR/runs/<time>: point
--data-dir at a directory of links to a build you must not write into. Prints the comparison's methods table and search
cost as JSON and the load average before and after (this host is shared: report it with the times).
The model must be built first (`refusal-audit build [--small]`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--small", action="store_true", help="the demo's --small sizes (the small SAE build)")
    ap.add_argument("--prompts", type=int, default=8, help="held-out harmful prompts for stages 1-2 and attribution")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP contention on a shared box)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    ap.add_argument("--no-atp", action="store_true", help="skip the AtP (n = 1) selection")
    args = ap.parse_args()

    import torch
    from refusal_audit.server.embedded import demo_analyses
    from refusal_audit.server.embedded.demo import run_demo
    from refusal_audit.server.model_loading import default_data_dir

    torch.set_num_threads(args.threads)
    data_dir = args.data_dir or default_data_dir()
    load0, t0 = os.getloadavg(), time.time()
    analyses = [(n, fn) for n, fn in demo_analyses.ANALYSES if n in ("stage3", "refusal_features")]
    if not args.no_atp:
        analyses.append(demo_analyses.ATP_ANALYSIS)
    analyses += [(n, fn) for n, fn in demo_analyses.ANALYSES if n == "method_comparison"]
    _, js = run_demo(data_dir, small=args.small, n_prompts=args.prompts, out_dir=args.out, rerun=True,
                     analysis_list=analyses)
    report = json.loads(js.read_text())
    cmp_ = report.get("method_comparison", {})
    out = {
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t0)), "wall_s": time.time() - t0,
        "loadavg_before": load0, "loadavg_after": os.getloadavg(), "threads": args.threads,
        "report": str(js), "timings_s": report["run"]["timings_s"],
        "methods": [{k: m.get(k) for k in ("method", "prompts_run", "mean_set_size", "unique_latents", "jailbreak_rate",
                                           "jailbreak_rate_ungated", "ce_delta", "compute")}
                    for m in cmp_.get("methods", [])],
        "cost": cmp_.get("cost"), "per_layer": cmp_.get("per_layer"), "error": cmp_.get("error"),
        "per_prompt": cmp_.get("per_prompt"), "ce_samples": cmp_.get("ce_samples"),
    }
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
