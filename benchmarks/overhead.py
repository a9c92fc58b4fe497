"""Intervention overhead of the HF engine, measured side by side in one run.

Embedded Gemma-3-270M on CPU (fp32) with GemmaScope-2-shaped SAEs (640 -> 16,384 JumpReLU,
random weights: timing only) at 4 layers. Generation tokens/s with no intervention, with
ablation of 10 / 100 / 2,000 latents spread over the layers (sparse path, cached slices), and with
the naive full encode/decode at the same layers (what SAELens's HookedSAETransformer does).
Configurations are interleaved round-robin and the median of the repeats is reported.

    python benchmarks/overhead.py [--batch 8] [--new-tokens 32] [--repeats 3] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import PROMPTS, gemmascope_shaped_sae, spread_latents
from refusal_audit.audit.spec import AblateLatents, Request, SamplingParams, user_prompt
from refusal_audit.server.hf_engine import HFEngine
from refusal_audit.server.model_loading import load_model
from refusal_audit.server.sae_runtime import build_layer_saes


def time_generate(engine: HFEngine, reqs: list[Request]) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = engine.generate(reqs)
    return time.perf_counter() - t0, sum(len(c.token_ids) for c in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:gemma-3-270m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", default="3,6,9,12")
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    layers = [int(x) for x in args.layers.split(",")]
    d_model = model.config.get_text_config().hidden_size
    saes = {ly: gemmascope_shaped_sae(d_model, args.d_sae, ly) for ly in layers}
    n_layers = model.config.get_text_config().num_hidden_layers
    engine = HFEngine(model, tokenizer, build_layer_saes(saes, d_model, n_layers), model_name=args.model)
    prompts = [user_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(args.batch)]
    # fixed length: no early stop, so every configuration generates the same number of tokens
    sp = SamplingParams(max_new_tokens=args.new_tokens, stop_token_ids=())
    engine.eos_ids = ()  # measure exactly new_tokens per row in every configuration

    def reqs(n_latents: int) -> list[Request]:
        if n_latents == 0:
            return [Request(prompt=p, sampling=sp) for p in prompts]
        iv = AblateLatents(latents=spread_latents(n_latents, layers, args.d_sae))
        return [Request(prompt=p, interventions=(iv,), sampling=sp) for p in prompts]

    configs: dict[str, tuple[int, bool]] = {
        "unhooked": (0, True),
        "ablate 10 (sparse)": (10, True),
        "ablate 100 (sparse)": (100, True),
        "ablate 2000 (sparse)": (2000, True),
        "ablate 2000 (full encode/decode)": (2000, False),
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    tokens: dict[str, int] = {}
    time_generate(engine, reqs(10))  # warm-up (and the slice cache for the sparse sets)
    for _ in range(args.repeats):
        for name, (n, sparse) in configs.items():
            for ls in engine.saes.values():
                ls.separable = sparse
            dt, ntok = time_generate(engine, reqs(n))
            times[name].append(dt)
            tokens[name] = ntok
    for ls in engine.saes.values():
        ls.separable = True

    base = statistics.median(times["unhooked"])
    rows: list[dict[str, Any]] = []
    for name in configs:
        med = statistics.median(times[name])
        rows.append({"config": name, "seconds": med, "tokens_per_s": tokens[name] / med, "ratio": med / base})
    full_overhead = rows[-1]["ratio"] - 1
    sparse_overhead = rows[3]["ratio"] - 1
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "model": args.model,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "layers": layers,
        "d_sae": args.d_sae,
        "rows": rows,
        "overhead_reduction_full_vs_sparse_2000": full_overhead / sparse_overhead if sparse_overhead > 0 else float("inf"),
    }
    print(f"| configuration | s (median of {args.repeats}) | tokens/s | × unhooked |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | {r['ratio']:.3f} |")
    print(f"\nfull encode/decode overhead / sparse overhead at 2,000 latents: "
          f"{summary['overhead_reduction_full_vs_sparse_2000']:.1f}×")
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
