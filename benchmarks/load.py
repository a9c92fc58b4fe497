"""Load test of remote ablation calls: N concurrent gRPC clients, each with its own latent mask.

Bounded in count and duration, localhost only. Either targets a running server (`--server
127.0.0.1:PORT --metrics http://127.0.0.1:MPORT/metrics`) or starts one in-process on the embedded
model with GemmaScope-2-shaped random SAEs (`--engine hf|vllm`). Every client count runs in the
same process against the same server, one after the other, so the ratios vs 1 client are measured
side by side. For each count it reports tokens/s, p50/p95 latency, ratios vs 1 client, the
server's own Prometheus view (mean batch size, queue wait, share of engine time in the hooks,
latents per request) and the 1-minute load average; and it checks that every request got exactly
one answer and that a sample of answers equals the same request sent alone (greedy decoding).

    python benchmarks/load.py --engine hf --clients 1,4,16,64 --new-tokens 16 --latents 2000
    python benchmarks/load.py --engine hf --clients 1,16 --ignore-eos                 # fixed-length answers
    python benchmarks/load.py --engine hf --clients 1,16 --ignore-eos --no-batch-invariant
    python benchmarks/load.py --engine hf --clients 16 --min-per-client 6 --join-policies 0.25:4,0:0,inf:inf
    python benchmarks/load.py --engine vllm --clients 16 --total 96 --distinct-prompts --fused-hook off,on

The in-process HF engine runs in the batch-invariant mode by default, as `serve` does; with
`--no-batch-invariant` a sampled answer can differ from its solo run (docs/interventions.md).
`--join-policies` runs every client count once per continuous-batching policy (when a Generate call
joins a running generation; `inf:inf` = never, the dynamic batching of before) on the same server.
`--fused-hook off,on` runs every client count with the vLLM workers' fused CPU hook kernel switched
off and on (server/fused_hook.py), on the same server.

    python benchmarks/load.py --engine vllm --clients 16 --total 96 --distinct-prompts --latents 0,2000 --rounds 4

`--latents 0,2000` runs every level without and with masks on the same server (requests without
interventions leave the hooks idle: the unmasked throughput), and `--rounds R` repeats all levels R
times, interleaved; the masked levels' tokens/s are then also given over the unmasked level of the
same round and client count: the median and range of those paired ratios (the range is the noise) and,
from 6 rounds, the median's 95 % confidence interval; `--goal 0.9` judges each level met, missed or
within noise of that floor from the interval.
Masks change the text, so without `--ignore-eos` masked answers may end at other lengths than unmasked
ones and tokens/s then compares different work (the script says so when tokens per request differ).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import against_goal, paired_ratio, percentile, random_saes, same_work, spread_latents  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from refusal_audit.audit.spec import AblateLatents, Request, SamplingParams, user_prompt  # noqa: E402
from refusal_audit.client import AuditClient  # noqa: E402

PROMPTS = ["Explain photosynthesis briefly.", "Write a haiku about rain.", "What is a prime number?",
           "Give two tips for sleeping better.", "Name three rivers in Europe and say where they flow.",
           "Why is the sky blue?"]


def _start_server(engine_kind: str, model: str, layers: list[int], d_sae: int, max_inflight: int,
                  vllm_compiled: bool = False, sae_l0: float = 0.0, batch_invariant: bool = False) -> Any:
    from refusal_audit.server.app import ThreadedServer
    from refusal_audit.server.config import ServerConfig
    from refusal_audit.server.hf_engine import HFEngine
    from refusal_audit.server.model_loading import load_model
    from refusal_audit.server.sae_runtime import build_layer_saes

    data_dir = Path(tempfile.mkdtemp(prefix="refusal-audit-load-"))
    cfg = ServerConfig(port=0, data_dir=data_dir, max_inflight=max_inflight, engine=engine_kind, metrics_port=0,
                       metrics_host="127.0.0.1")
    m, tok = load_model(model)
    text = m.config.get_text_config()
    saes = random_saes(m, tok, layers, d_sae, sae_l0)
    if engine_kind == "hf":
        engine: Any = HFEngine(m, tok, build_layer_saes(saes, text.hidden_size, text.num_hidden_layers),
                               batch_invariant=batch_invariant)
    else:
        from refusal_audit.server.vllm_engine import VLLMEngine

        engine = VLLMEngine.from_config(model, saes, **({"enforce_eager": False} if vllm_compiled else {}))
    server = ThreadedServer(cfg, engine=engine).start()
    # handed over: the server closes the engine when it stops (vLLM's engine core stopped in order; left to
    # the interpreter's exit, its output handler logged the core's end as an EngineDeadError)
    server.handle.owns_engine = True
    return server


def scrape(url: str | None) -> dict[str, float]:
    """Sum of every sample of the batcher/engine metrics, by sample name, and by name and kind
    (`name{kind}`: the model steps are kind "step")."""
    if not url:
        return {}
    text = urllib.request.urlopen(url, timeout=10).read().decode()  # noqa: S310 - localhost only
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.name.startswith(("refusal_audit_batch", "refusal_audit_queue_wait", "refusal_audit_hook",
                                      "refusal_audit_latents_per_request", "refusal_audit_generated_tokens",
                                      "refusal_audit_token_interval")):
                continue
            if s.name.endswith("_bucket") or s.name.endswith("_created"):
                continue
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
            if "kind" in s.labels:
                key = f"{s.name}{{{s.labels['kind']}}}"
                out[key] = out.get(key, 0.0) + float(s.value)
    return out


def _parse_policy(text: str) -> tuple[float, int]:
    ratio, wait = text.split(":")
    return float(ratio), (10**9 if wait.strip() in ("inf", "none") else int(wait))


def _policy_name(ratio: float, wait: int) -> str:
    return "off" if ratio == float("inf") and wait >= 10**9 else f"{ratio:g}:{wait}"


def _joins_note(policies: list[tuple[float, int]]) -> str:
    if len(policies) > 1:
        return ", Generate joins a running generation per row's policy (RATIO:WAIT steps; off: never)"
    return f", Generate joins at ratio {policies[0][0]:g} / after {policies[0][1]} steps"


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


@dataclass
class Level:
    """One client count's results."""

    clients: int
    issued: int = 0
    answers: dict[tuple[int, int], list[list[int]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    load_before: float = 0.0
    load_after: float = 0.0
    server: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Shape:
    """What every request of a run looks like (`make_request`)."""

    new_tokens: int
    n_latents: int
    layers: tuple[int, ...]
    d_sae: int
    distinct: bool = False  # every prompt tagged with its request: no shared prefix-cache blocks
    ignore_eos: bool = False  # every answer runs to new_tokens: latencies compare like with like


@functools.lru_cache(maxsize=1024)
def client_mask(i: int, shape: Shape) -> tuple[AblateLatents, ...]:
    """Client i's latent mask (made once per client: the load generator shares the host with the server,
    and drawing 2,000 latents per request would charge the server's measurement for the client's work)."""
    return ((AblateLatents(latents=spread_latents(shape.n_latents, list(shape.layers), shape.d_sae, seed=i)),)
            if shape.n_latents else ())


def make_request(i: int, j: int, shape: Shape) -> Request:
    """The j-th request of client i: its client's latent mask, one of six prompts, greedy. `distinct`:
    the prompt starts with the request's own tag, so that no request can reuse another's cached KV
    blocks (masked requests never can: their cache salt is their mask)."""
    iv = client_mask(i, shape)
    text = PROMPTS[(i + j) % len(PROMPTS)]
    return Request(prompt=user_prompt(f"(Request {i}.{j}) {text}" if shape.distinct else text), interventions=iv,
                   sampling=SamplingParams(max_new_tokens=shape.new_tokens, ignore_eos=shape.ignore_eos))


def run_level(address: str, n_clients: int, per_client: int, shape: Shape, duration_s: float) -> Level:
    """n_clients threads, each sending per_client single-item Generate calls one after the other."""
    lv = Level(n_clients)
    lock = threading.Lock()
    deadline = time.perf_counter() + duration_s
    start = threading.Barrier(n_clients)

    def worker(i: int) -> None:
        client = AuditClient(address, timeout=600)
        try:
            reqs = [make_request(i, j, shape) for j in range(per_client)]
            start.wait()
            for j, req in enumerate(reqs):
                if time.perf_counter() > deadline:
                    break
                with lock:
                    lv.issued += 1
                t0 = time.perf_counter()
                try:
                    out = client.generate([req])
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    with lock:
                        lv.errors.append(f"client {i} request {j}: {exc}")
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    lv.latencies.append(dt)
                    lv.tokens += sum(len(c.token_ids) for c in out)
                    lv.answers.setdefault((i, j), []).extend(list(c.token_ids) for c in out)
        finally:
            client.close()

    lv.load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lv.wall_s = time.perf_counter() - t0
    lv.load_after = os.getloadavg()[0]
    return lv


def check_level(lv: Level, address: str, sample: int, shape: Shape, rng: random.Random) -> tuple[bool, int, int]:
    """(exactly one answer per issued request, sampled answers equal to alone, sample size)."""
    once = (not lv.errors and len(lv.answers) == lv.issued and all(len(v) == 1 for v in lv.answers.values()))
    keys = rng.sample(sorted(lv.answers), min(sample, len(lv.answers)))
    client = AuditClient(address, timeout=600)
    same = 0
    try:
        for i, j in keys:
            alone = client.generate([make_request(i, j, shape)])[0].token_ids
            same += int(list(alone) == lv.answers[(i, j)][0])
    finally:
        client.close()
    return once, same, len(keys)


def _print_paired(rows: list[dict[str, Any]], goal: float | None = None) -> None:
    """Masked tokens/s over unmasked in the same round, client count and join policy: median [min, max] and the
    median's 95 % CI; with `goal`, whether the interval clears that floor."""
    base = {(r["round"], r["policy"], r["clients"]): r["tokens_per_s"] for r in rows if r["latents"] == 0}
    paired: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        b = base.get((r["round"], r["policy"], r["clients"]))
        if r["latents"] and b:
            paired.setdefault((r["engine"], r["clients"]), []).append(r["tokens_per_s"] / b)
    print("\n| level | clients | rounds | tokens/s over unmasked, paired by round: median [min, max], 95% CI of the median |"
          + (f" against {goal:g}x |" if goal is not None else ""))
    print("|---|---:|---:|---:|" + ("---|" if goal is not None else ""))
    for (engine, n), v in paired.items():
        print(f"| {engine} | {n} | {len(v)} | {paired_ratio(v)} |" + (f" {against_goal(v, goal)} |" if goal is not None else ""))
    # masks change the text, so answers may end (EOS) at other lengths: then tokens/s compares different work
    # (fewer tokens per prefill, a shrinking batch as short answers leave); --ignore-eos compares like with like
    per_req = {lat: statistics.mean(r["tokens_per_request"] for r in rows if r["latents"] == lat)
               for lat in sorted({r["latents"] for r in rows})}
    if not same_work(per_req.values()):
        print("\nNot like with like: generated tokens per request differ between levels ("
              + ", ".join(f"{lat} latents: {t:.1f}" for lat, t in per_req.items())
              + "); --ignore-eos runs every answer to its last token.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default=None, help="address of a running server (default: start one)")
    ap.add_argument("--metrics", default=None, help="its /metrics URL (default: the started server's)")
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--vllm-compiled", action="store_true", help="--engine vllm without enforce_eager (torch.compile)")
    ap.add_argument("--model", default="embedded:gemma-3-270m")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--total", type=int, default=16, help="requests per client count (at least --min-per-client each)")
    ap.add_argument("--min-per-client", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--latents", default="2000", help="latents per request, or a comma list (every level runs with each)")
    ap.add_argument("--rounds", type=int, default=1, help="run all levels this many times, interleaved")
    ap.add_argument("--goal", type=float, default=None,
                    help="a throughput floor for masked over unmasked (e.g. 0.9): judged met, missed or within noise "
                         "from the 95%% confidence interval of the paired ratios' median (6 rounds or more)")
    ap.add_argument("--layers", default="3,6,9,12")
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--sae-l0", type=float, default=100.0,
                    help="calibrate the random SAEs' thresholds so that this many latents fire per token on real "
                         "activations (0: one fixed threshold 0.5, about a third of the latents fire)")
    ap.add_argument("--sample", type=int, default=4, help="answers per client count re-run alone and compared")
    ap.add_argument("--distinct-prompts", action="store_true",
                    help="tag every prompt with its request, so no request reuses another's prefix-cache blocks "
                         "(isolates the hooks' cost: masked requests cannot share blocks across masks)")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="every answer runs to --new-tokens (the requests' ignore_eos): latencies then compare "
                         "requests of one length, where otherwise prompts that stop early make p50 a prompt-mix effect")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the in-process server (0 = default)")
    ap.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                    help="--engine hf: the engine's batch-invariant mode (on by default, as in `serve`)")
    ap.add_argument("--interleave", type=float, default=4.0,
                    help="the in-process HF server's --batch-interleave (inf: no cap on work between two steps)")
    ap.add_argument("--join-policies", default="0.25:4",
                    help="in-process HF server: when a Generate call joins a running generation, as RATIO:WAIT (once "
                         "the waiting calls number RATIO x its rows, or the oldest has waited WAIT decode steps: "
                         "serve --batch-join-ratio / --batch-join-wait-steps); several, comma-separated, run every "
                         "client count under each in turn on the same server (e.g. 0.25:4,1:16,inf:inf; inf:inf = "
                         "no joins, the dynamic batching of before)")
    ap.add_argument("--fused-hook", default="on",
                    help="vLLM: comma list of on/off; every client count runs once per setting of the workers' fused "
                         "CPU hook kernel, on the same server")
    ap.add_argument("--duration", type=float, default=900.0, help="per client count: stop issuing after this many s")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    policies = [_parse_policy(p) for p in args.join_policies.split(",")]
    latents = [int(x) for x in args.latents.split(",")]
    shapes = {n: Shape(args.new_tokens, n, tuple(layers), args.d_sae, args.distinct_prompts, args.ignore_eos)
              for n in latents}
    server = None
    address, metrics_url = args.server, args.metrics
    if address is None:
        server = _start_server(args.engine, args.model, layers, args.d_sae, max_inflight=256,
                               vllm_compiled=args.vllm_compiled, sae_l0=args.sae_l0,
                               batch_invariant=args.batch_invariant)
        address = server.address
        if server.handle.metrics_port:
            metrics_url = f"http://127.0.0.1:{server.handle.metrics_port}/metrics"
    host = address.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]", "::1"):
        raise SystemExit("load tests target localhost only")
    rng = random.Random(0)
    rows: list[dict[str, Any]] = []
    try:
        # warm-up (first-call allocations, lazy init), not counted
        AuditClient(address, timeout=600).generate(
            [make_request(0, 0, shapes[max(latents)])])
        fused_settings = [x.strip() == "on" for x in args.fused_hook.split(",")]
        levels = [(rnd, p, f, lat, int(x)) for rnd in range(args.rounds) for p in policies for f in fused_settings
                  for lat in latents for x in args.clients.split(",")
                  if lat or f == fused_settings[-1]]  # without masks the kernel has nothing to do: once
        for rnd, (ratio, wait), fused, lat, n in levels:
            shape = shapes[lat]
            if server is not None and hasattr(server.handle.engine, "set_fused_hook"):
                fused = server.handle.engine.set_fused_hook(fused)
            if server is not None and hasattr(server.handle.engine, "join_ratio"):
                server.handle.engine.join_ratio, server.handle.engine.max_join_wait = ratio, wait
                server.handle.engine.interleave = args.interleave
            per = max(args.min_per_client, -(-args.total // n))
            before = scrape(metrics_url)
            lv = run_level(address, n, per, shape, args.duration)
            time.sleep(1.0)  # the vLLM engine reports its last model steps in the background (~1 step)
            after = scrape(metrics_url)
            once, same, k = check_level(lv, address, args.sample, shape, rng)
            # mean batch: rows per model step where the engine reports steps (vLLM; HF generation),
            # else rows per batch of any kind
            kind = "{step}" if _delta(after, before, "refusal_audit_batch_size_count{step}") else ""
            bs_n = _delta(after, before, "refusal_audit_batch_size_count" + kind)
            qw_n = _delta(after, before, "refusal_audit_queue_wait_seconds_count")
            lat_n = _delta(after, before, "refusal_audit_latents_per_request_count")
            batch_s = _delta(after, before, "refusal_audit_batch_seconds_total")
            ti_n = _delta(after, before, "refusal_audit_token_interval_seconds_count")
            rows.append({
                "engine": args.engine + (" (batch-invariant)" if args.batch_invariant and args.engine == "hf" else "")
                + (f", joins {_policy_name(ratio, wait)}" if len(policies) > 1 else "")
                + (f", fused kernel {'on' if fused else 'off'}" if len(fused_settings) > 1 and lat else "")
                + (f", {lat} latents" if len(latents) > 1 else ""),
                "round": rnd, "latents": lat, "policy": (ratio, wait), "clients": n, "issued": lv.issued, "answered": len(lv.answers),
                "errors": len(lv.errors), "exactly_once": once, "same_as_alone": f"{same}/{k}",
                "wall_s": lv.wall_s, "tokens": lv.tokens, "tokens_per_s": lv.tokens / lv.wall_s,
                "tokens_per_request": lv.tokens / max(len(lv.latencies), 1),
                "p50_s": statistics.median(lv.latencies) if lv.latencies else float("nan"),
                "p95_s": percentile(lv.latencies, 0.95),
                "mean_batch": _delta(after, before, "refusal_audit_batch_size_sum" + kind) / bs_n if bs_n else float("nan"),
                "mean_queue_wait_s": (_delta(after, before, "refusal_audit_queue_wait_seconds_sum") / qw_n
                                      if qw_n else float("nan")),
                # HF generation: a stream's mean wait between two tokens (steps + work run between them)
                "token_interval_s": (_delta(after, before, "refusal_audit_token_interval_seconds_sum") / ti_n
                                     if ti_n else float("nan")),
                "hook_share": _delta(after, before, "refusal_audit_hook_seconds_total") / batch_s if batch_s else float("nan"),
                # HF generation: engine time in admissions (newcomers' prefills) vs decode steps
                "prefill_share": (_delta(after, before, "refusal_audit_batch_seconds_total{generate}") / batch_s
                                  if batch_s and args.engine == "hf" else float("nan")),
                "latents_per_request": (_delta(after, before, "refusal_audit_latents_per_request_sum") / lat_n
                                        if lat_n else float("nan")),
                "load_before": lv.load_before, "load_after": lv.load_after,
                "first_errors": lv.errors[:3],
            })
            r = rows[-1]
            print(f"[{n} clients] {r['tokens_per_s']:.1f} tok/s p50 {r['p50_s']:.2f}s once={once} "
                  f"alone={same}/{k} load {lv.load_before:.1f}->{lv.load_after:.1f}", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
    thresholds = ("the running server's SAEs" if args.server else
                  f"calibrated to L0 {args.sae_l0:g} on real activations" if args.sae_l0 > 0 else "one fixed 0.5")
    print(f"\nmodel {args.model}, {args.new_tokens} new tokens, {args.latents} latents/request over SAEs "
          f"640->{args.d_sae} at layers {layers} (thresholds: {thresholds}), greedy, "
          f"{'every prompt distinct (no prefix-cache sharing)' if args.distinct_prompts else 'six prompts'}"
          f"{', every answer runs to its last token (ignore_eos)' if args.ignore_eos else ''}"
          f"{_joins_note(policies) if not args.server and args.engine == 'hf' else ''}; "
          "load average (1 min) before -> after each row\n")
    print("| engine | clients | requests | exactly one answer | same as alone | tokens/request | tokens/s | vs 1 client | "
          "p50 s | p95 s | p50 vs 1 client | mean batch | mean queue wait s | mean token interval s | time in hooks | "
          "time in prefills | latents/request | load avg |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        base = next(b for b in rows if b["engine"] == r["engine"])  # the policy's first client count
        print(f"| {r['engine']} | {r['clients']} | {r['issued']} | {'yes' if r['exactly_once'] else 'NO'} | "
              f"{r['same_as_alone']} | {r['tokens_per_request']:.1f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
              f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['p50_s'] / base['p50_s']:.2f}x | {r['mean_batch']:.1f} | "
              f"{r['mean_queue_wait_s']:.3f} | {r['token_interval_s']:.3f} | {100 * r['hook_share']:.1f}% | "
              f"{_pct(r['prefill_share'])} | "
              f"{r['latents_per_request']:.0f} | "
              f"{r['load_before']:.1f} -> {r['load_after']:.1f} |")
        for e in r["first_errors"]:
            print(f"  error: {e}")
    if 0 in latents and len(latents) > 1:
        _print_paired(rows, args.goal)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if any(not r["exactly_once"] for r in rows):
        raise SystemExit("FAILED: a request was lost, duplicated or failed")
    if any(r["same_as_alone"].split("/")[0] != r["same_as_alone"].split("/")[1] for r in rows):
        raise SystemExit("FAILED: an answer differs from its solo run (without the HF engine's batch-invariant mode "
                         "this can be float32 rounding that flips a JumpReLU latent at its threshold: see "
                         "docs/interventions.md, 'Batch invariance', and benchmarks/batch_vs_alone.py)")


if __name__ == "__main__":
    main()
