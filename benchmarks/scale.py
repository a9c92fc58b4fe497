"""1 vs 2 engine replicas on a local Ray cluster, in one run: a fixed stage-2 job and concurrent Score calls.

    python benchmarks/scale.py [--prompts 32] [--score-calls 192] [--concurrency 4] [--json out.json]

Needs the `[ray]` extra. The model is the planted tiny Llama of the tests (saved to a temporary
directory and loaded by each replica with the server's loader, one torch thread per replica), so
the numbers measure the scale-out machinery (Ray dispatch, fan-out, head-side judging and
checkpointing) and how well two replicas use two cores, not a real model's forward pass. The job is
stage 2 over `--prompts` prompts (3 seeds x 8 taus, blocks of 5, 20-latent pools), fanned out as
(prompt, seed) units; the Score load is `--score-calls` calls of 8 requests from `--concurrency`
threads. Prints wall times, the 2-vs-1 ratios and the load average before and after each phase
(this host is shared: report the load with the ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _save_planted(root: Path) -> tuple[str, list[str]]:
    import planted

    model, tok, saes = planted.make_model(), planted.make_tokenizer(), planted.make_saes()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for layer, sae in saes.items():
        sae.save_model(str(root / f"sae{layer}"))
    return str(root / "model"), [f"{layer}={root / f'sae{layer}'}" for layer in sorted(saes)]


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(n_replicas: int, model: str, saes: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from _fanout_common import stage1_result
    from planted import HARMFUL
    from refusal_audit.audit.context import LocalContext
    from refusal_audit.audit.spec import Request, user_prompt
    from refusal_audit.audit.stage2 import Stage2Config
    from refusal_audit.server.config import RayConfig, ServerConfig
    from refusal_audit.server.jobs import fanout
    from refusal_audit.server.ray_replicas import ReplicaSet

    cfg = ServerConfig(model=model, saes=saes, data_dir=Path(tempfile.mkdtemp()),
                       ray=RayConfig(replicas=n_replicas, num_cpus=1, torch_threads=1))
    t0 = time.perf_counter()
    rs = ReplicaSet(cfg)
    start_s = time.perf_counter() - t0
    tok = rs.info.special_token_ids["I"]
    reqs = [Request(prompt=user_prompt(p)) for p in HARMFUL[:8]]
    for _ in range(2 * n_replicas):  # warm every replica
        rs.score(reqs, [tok])
    out: dict[str, Any] = {"replicas": n_replicas, "start_s": round(start_s, 1)}

    load0 = _load()
    t0 = time.perf_counter()
    res = fanout.run_stage2(rs, stage1_result(args.prompts), Stage2Config(max_new_tokens=6), LocalContext())
    job_s = time.perf_counter() - t0
    passes = [p.forward_passes for p in res.prompts]
    out["job"] = {"wall_s": round(job_s, 2), "prompts": len(res.prompts), "forward_passes": sum(passes),
                  "passes_per_prompt": sum(passes) / len(passes), "passes_per_s": round(sum(passes) / job_s, 1),
                  "load_before": load0, "load_after": _load()}

    load0 = _load()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(lambda _: rs.score(reqs, [tok]), range(args.score_calls)))
    score_s = time.perf_counter() - t0
    out["score"] = {"wall_s": round(score_s, 2), "calls": args.score_calls, "items_per_call": len(reqs),
                    "calls_per_s": round(args.score_calls / score_s, 2), "load_before": load0, "load_after": _load()}
    out["replica_stats"] = [{"name": s.name, "calls": s.calls, "busy_s": round(s.busy_s, 2)} for s in rs.stats()]
    rs.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--score-calls", type=int, default=192)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import ray
    import torch

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="scale-"))
    model, saes = _save_planted(root)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=150 * 1024**2)
    try:
        runs = [run(n, model, saes, args) for n in (1, 2)]
    finally:
        ray.shutdown()
    one, two = runs
    summary = {
        "cpus": os.cpu_count(),
        "runs": runs,
        "job_speedup": round(one["job"]["wall_s"] / two["job"]["wall_s"], 2),
        "score_speedup": round(two["score"]["calls_per_s"] / one["score"]["calls_per_s"], 2),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
