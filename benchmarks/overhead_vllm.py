"""What per-request SAE interventions cost in the vLLM engine, side by side with plain vLLM and HF.

Embedded Gemma-3-270M on CPU (fp32) with GemmaScope-2-shaped SAEs (640 -> 16,384 JumpReLU, random
weights: timing only; thresholds calibrated so that `--sae-l0` latents fire per token, as in a
trained SAE) at 4 layers. Each run submits `--batch` requests at once and streams them
to completion (greedy, `--new-tokens` each); every request carries its *own* random latent set
(per-request masks: the batch's union is up to batch x n latents per layer). Configurations:

  * vllm-plain     vLLM without the worker extension (same driver, same engine args)
  * vllm-hooked/0  the SAE engine, no intervention (hooks installed, no-ops)
  * vllm-hooked/N  N latents ablated per request, spread over the 4 layers (sparse path)
  * hf/0, hf/N     the HF engine on the same weights and SAEs (one padded batch)
  * vllm-slots/N   with `--unfused`: the same SAE engine with its fused CPU kernel switched off
                   (`set_fused_hook(False)`: every latent hook on the slot path) for these runs, the
                   comparison for server/fused_hook.py

Reported: generated tokens/s (all tokens of the run / wall time), the decode step (the median time
between two streamed tokens of a request, over all requests and repeats: steady decoding, less moved
by a disturbed repeat) and the p50 / p99 of request latency (submit -> final token), over `--repeats`
interleaved repeats (rounds over the configurations, each round in a random order; the prefix cache is
reset before every vLLM run so masked and unmasked runs pay the same prefill). Each configuration's
throughput is also given paired by repeat (its tokens/s, and its decode step, over the first row's in
the same round): the median, the range, and the median's 95 % confidence interval; with `--goal 0.95`
each masked row is judged met, missed or within noise of that floor from the interval.

    python benchmarks/overhead_vllm.py [--batch 8] [--new-tokens 32] [--repeats 3] [--out benchmarks/RESULTS_vllm.md]

`--compiled` runs both vLLM engines without enforce_eager (torch.compile; piecewise CUDA graphs on a
GPU, the hooks as a custom op: docs/engines.md "Compiled mode"); `--model` takes any model the
engine loads (the SAEs get its hidden size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    PROMPTS,
    against_goal,
    calibrate_thresholds,
    gemmascope_shaped_sae,
    paired_ratio,
    percentile,
    same_work,
    spread_latents,
)
from refusal_audit.audit.spec import AblateLatents, Request, SamplingParams, user_prompt
from refusal_audit.server.hf_engine import HFEngine
from refusal_audit.server.model_loading import load_model
from refusal_audit.server.sae_runtime import build_layer_saes

MODEL = "embedded:gemma-3-270m"


def requests_for(n_latents: int, batch: int, new_tokens: int, layers: list[int], d_sae: int) -> list[Request]:
    sp = SamplingParams(max_new_tokens=new_tokens)
    out = []
    for i in range(batch):
        ivs = (AblateLatents(latents=spread_latents(n_latents, layers, d_sae, seed=1000 * n_latents + i)),) if n_latents else ()
        out.append(Request(prompt=user_prompt(PROMPTS[i % len(PROMPTS)]), interventions=ivs, sampling=sp))
    return out


def run_once(engine: Any, reqs: list[Request]) -> tuple[float, int, list[float], list[float]]:
    """(wall seconds, generated tokens, per-request latency, decode intervals) for one streamed batch; a
    decode interval is the time between two of a request's streamed tokens after its first (one decode
    step; a chunk of k tokens counts k intervals of a k-th of its time each)."""
    if hasattr(engine, "reset_prefix_cache"):
        engine.reset_prefix_cache()
    t0 = time.perf_counter()
    latencies: list[float] = [0.0] * len(reqs)
    last: list[float | None] = [None] * len(reqs)
    intervals: list[float] = []
    n_tok = 0
    for ev in engine.generate_iter(reqs):
        now = time.perf_counter()
        k = len(ev.token_ids)
        n_tok += k
        if k:
            prev = last[ev.index]
            if prev is not None:
                intervals += [(now - prev) / k] * k
            last[ev.index] = now
        if ev.finished:
            latencies[ev.index] = now - t0
    return time.perf_counter() - t0, n_tok, latencies, intervals


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latents", default="0,10,100,2000", help="latents per request (comma-separated)")
    ap.add_argument("--layers", default="3,6,9,12")
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--model", default=MODEL, help="hub id, local dir, .gguf or embedded:NAME")
    ap.add_argument("--compiled", action="store_true", help="vLLM without enforce_eager (torch.compile, CUDA graphs)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-vLLM baseline")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF engine")
    ap.add_argument("--hf-latents", default="0,2000", help="HF configurations (latents per request)")
    ap.add_argument("--hf-threads", type=int, default=1,
                    help="torch threads for the HF engine (vLLM's CPU worker runs 1 bound OMP thread on a 2-core host)")
    ap.add_argument("--sae-l0", type=float, default=100.0,
                    help="calibrate each random SAE's thresholds so that this many latents fire per token on real "
                         "activations, as in a trained SAE (0: one fixed threshold, 0.5, which fires on ~1/3 of them)")
    ap.add_argument("--unfused", action="store_true",
                    help="also run the hooked engine with its fused hook kernel off (configurations vllm-slots/N)")
    ap.add_argument("--fixed-order", dest="shuffle", action="store_false",
                    help="run the configurations in the same order in every round (default: a random order per round)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the rounds' random orders")
    ap.add_argument("--goal", type=float, default=None,
                    help="a throughput floor for the masked rows (e.g. 0.95): each is judged met, missed or within "
                         "noise of it from the 95%% confidence interval of its paired ratios' median")
    ap.add_argument("--out", default=None, help="append a markdown section to this file")
    ap.add_argument("--json", default=None, help="write raw results as JSON")
    args = ap.parse_args()

    from refusal_audit.server.vllm_engine import VLLMEngine

    layers = [int(x) for x in args.layers.split(",")]
    ns = [int(x) for x in args.latents.split(",")]
    from refusal_audit.server.vllm_engine.engine import resolve_model_dir
    from transformers import AutoConfig

    model_name = args.model
    cfg = AutoConfig.from_pretrained(resolve_model_dir(model_name))
    d_model = int((cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg).hidden_size)
    saes = {ly: gemmascope_shaped_sae(d_model, args.d_sae, seed=ly) for ly in layers}
    model, tok = load_model(model_name)
    sae_l0 = calibrate_thresholds(saes, model, tok, args.sae_l0) if args.sae_l0 > 0 else None
    print("SAE L0 per layer on the calibration prompts:", sae_l0 or "not calibrated (threshold 0.5)")
    vkw: dict[str, Any] = dict(kv_cache_memory_bytes=1024**3, max_model_len=1024)
    if args.compiled:
        vkw["enforce_eager"] = False
    t0 = time.perf_counter()
    hooked = VLLMEngine.from_config(model_name, saes, **vkw)
    startup = {"vllm-hooked": time.perf_counter() - t0}
    engines: dict[str, Any] = {"vllm-hooked": hooked}
    if not args.no_plain:
        t0 = time.perf_counter()
        engines["vllm-plain"] = VLLMEngine.from_config(model_name, {}, hooks=False, **vkw)
        startup["vllm-plain"] = time.perf_counter() - t0
    if args.unfused:
        engines["vllm-slots"] = hooked  # the same engine, its kernel switched off around these runs
    if not args.no_hf:
        torch.set_num_threads(args.hf_threads)
        engines["hf"] = HFEngine(model, tok, build_layer_saes(saes, d_model, len(model.model.layers)), model_name=model_name)
    configs: list[tuple[str, str, int]] = []
    if "vllm-plain" in engines:
        configs.append(("vllm-plain", "vllm-plain", 0))
    configs += [(f"vllm-hooked/{n}", "vllm-hooked", n) for n in ns]
    if "vllm-slots" in engines:
        configs += [(f"vllm-slots/{n}", "vllm-slots", n) for n in ns if n]
    if "hf" in engines:
        configs += [(f"hf/{n}", "hf", n) for n in (int(x) for x in args.hf_latents.split(","))]
    reqs = {name: requests_for(n, args.batch, args.new_tokens, layers, args.d_sae) for name, _, n in configs}
    def run(name: str, eng: str, reqs_: list[Request]) -> tuple[float, int, list[float], list[float]]:
        if eng == "vllm-slots":
            hooked.set_fused_hook(False)
        try:
            return run_once(engines[eng], reqs_)
        finally:
            if eng == "vllm-slots":
                hooked.set_fused_hook(True)

    for name, eng, _ in configs:  # warm-up (first-call allocations, slice caches)
        run(name, eng, reqs[name][:2])
    raw: dict[str, dict[str, list[float]]] = {name: {"tps": [], "lat": [], "hook_s": [], "interval": [], "step": []}
                                              for name, _, _ in configs}
    load_before = os.getloadavg()
    order = random.Random(args.seed)
    for rep in range(args.repeats):
        # each round runs every configuration once, in a fresh random order (seeded): a fixed order would
        # put each configuration at the same place in every round, where a drift within rounds biases it
        for name, eng, _ in order.sample(configs, len(configs)) if args.shuffle else configs:
            hooks = eng in ("vllm-hooked", "vllm-slots")
            if hooks:
                engines[eng].hook_stats(reset=True)
            wall, n_tok, lat, intervals = run(name, eng, reqs[name])
            raw[name]["tps"].append(n_tok / wall)
            raw[name]["interval"].extend(intervals)
            raw[name]["step"].append(statistics.median(intervals) if intervals else float("nan"))
            raw[name].setdefault("tokens", []).append(n_tok / len(reqs[name]))
            raw[name]["lat"].extend(lat)
            if hooks:
                st = engines[eng].hook_stats()
                raw[name]["hook_s"].append(float(st.get("hook_s", 0.0)) / wall)
                if st.get("fused_screened"):
                    raw[name].setdefault("exact", []).append(st["fused_exact"] / st["fused_screened"])
            print(f"repeat {rep} {name:18s} {n_tok / wall:7.1f} tok/s  p50 {statistics.median(lat):.2f}s")
    load_after = os.getloadavg()
    facts = hooked.worker_facts
    for eng in {id(e): e for e in engines.values()}.values():
        if hasattr(eng, "close"):
            eng.close()
    base = statistics.median(raw[configs[0][0]]["tps"])

    def speedups(name: str, over: str) -> tuple[list[float], list[float]]:
        """Per repeat, `name`'s throughput over `over`'s in the same round: by tokens/s, and by decode step."""
        return ([t / b for t, b in zip(raw[name]["tps"], raw[over]["tps"], strict=True)],
                [b / t for t, b in zip(raw[name]["step"], raw[over]["step"], strict=True)])

    rows = []
    verdicts: list[str] = []
    for name, _, n in configs:
        tps = statistics.median(raw[name]["tps"])
        hook = statistics.median(raw[name]["hook_s"]) if raw[name]["hook_s"] else None
        # each repeat's tokens/s (and decode step) against the first row's in the same repeat (interleaved:
        # seconds apart, so a drift of the shared host hits both); their spread is the noise the median carries
        paired, paired_step = speedups(name, configs[0][0])
        # the decode step's period, median over every interval of every repeat: a short disturbance of the
        # host moves a few of its thousands of samples, the median little (a slow spell longer than a
        # repeat still moves it)
        interval = statistics.median(raw[name]["interval"]) if raw[name]["interval"] else float("nan")
        rows.append((name, n, tps, base / tps, percentile(raw[name]["lat"], 0.5), percentile(raw[name]["lat"], 0.99), hook,
                     paired_ratio(paired), interval, paired_ratio(paired_step)))
        if args.goal is not None and n:
            verdicts.append(f"{name} vs {configs[0][0]}: throughput {against_goal(paired, args.goal)}; decode step "
                            f"{against_goal(paired_step, args.goal)}")
            unmasked = f"{name.split('/')[0]}/0"  # the same engine without masks, where it ran and is not the first row
            if unmasked in raw and unmasked != configs[0][0]:
                own, own_step = speedups(name, unmasked)
                verdicts.append(f"{name} vs {unmasked}: throughput {paired_ratio(own)}, {against_goal(own, args.goal)}; "
                                f"decode step {paired_ratio(own_step)}, {against_goal(own_step, args.goal)}")
    machine = (f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, vllm {facts.get('vllm_version')} "
               f"(worker torch threads: {facts.get('torch_threads')}, fused hook kernel: {facts.get('fused_hook')}), HF engine torch threads: {torch.get_num_threads()}, "
               f"Python {platform.python_version()}")
    md = [
        f"### {model_name}{' (vLLM compiled)' if args.compiled else ''}, batch {args.batch} x {args.new_tokens} new tokens, "
        f"SAEs {d_model}->{args.d_sae} at layers {layers}",
        "",
        f"Machine: {machine}. Repeats: {args.repeats}, configurations in "
        + (f"a random order per round (seed {args.seed})" if args.shuffle else "the same order in every round")
        + " (median tokens/s; latency percentiles over all requests).",
        f"Start-up: {', '.join(f'{k} {v:.0f} s' for k, v in startup.items())}. Load average (1 min) before / after: "
        f"{load_before[0]:.1f} / {load_after[0]:.1f} (shared host).",
        "SAE thresholds: " + (f"calibrated to L0 {args.sae_l0:g} on real activations (measured per layer: "
                              + ", ".join(f"{ly}: {v:.0f}" for ly, v in sae_l0.items()) + ")" if sae_l0
                              else "one fixed threshold 0.5 (about a third of the latents fire)") + ".",
        "",
        "| configuration | latents / request | tokens/s | slowdown vs first row | throughput vs first row, paired by "
        "repeat: median [min, max], 95% CI of the median | decode step, median (ms) | decode throughput vs first "
        "row | the same, paired by repeat | p50 latency (s) | p99 latency (s) | time in hooks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_interval = rows[0][8]
    for name, n, tps, slow, p50, p99, hook, paired_text, interval, paired_step_text in rows:
        md.append(f"| {name} | {n} | {tps:.1f} | {slow:.2f}x | {paired_text} | {1e3 * interval:.2f} | "
                  f"{base_interval / interval:.3f}x | {paired_step_text} | {p50:.2f} | {p99:.2f} | "
                  f"{'' if hook is None else f'{100 * hook:.1f}%'} |")
    md += ["", "Decode step: the median time between two streamed tokens of a request after its first, over every "
           "request and repeat (one step of the whole batch); its ratio is the steady decoding throughput's, and "
           "a short disturbance of the host moves it little (a slow spell longer than a repeat still does). "
           "Paired by repeat: each repeat's median step over the first row's in the same round. The 95% CI of a "
           "median of paired ratios is distribution-free (order statistics), from the repeats alone."]
    if verdicts:
        md += ["", f"Against the goal of {args.goal:g}x:", ""] + [f"- {v}" for v in verdicts]
    per_req = {name: statistics.mean(r["tokens"]) for name, r in raw.items()}
    md += ["", "Generated tokens per request: " + ", ".join(f"{k} {v:.1f}" for k, v in per_req.items())
           + (" (they differ: masks changed where answers stop, so tokens/s compares different work)"
              if not same_work(per_req.values()) else " (like with like)") + "."]
    exact = {name: statistics.median(r["exact"]) for name, r in raw.items() if r.get("exact")}
    if exact:
        md += ["", "Fused kernel's screen: pre-activations computed in full (float32 row read), of those screened: "
               + ", ".join(f"{k} {100 * v:.1f}%" for k, v in exact.items()) + "."]
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "raw": raw, "startup": startup, "machine": machine}, indent=1))


if __name__ == "__main__":
    main()
