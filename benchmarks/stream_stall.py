"""How long running streams stall while a large prompt-only call runs beside them (HF engine).

A job's Score sweep (one call of `--score-rows` prompts) arrives while `--streams` GenerateStream
clients are generating. Between two decode steps the batcher runs one prompt-only batch, sized by
`--batch-interleave` (about that x a decode step; `inf` = the whole token budget at once, the
behaviour before the interleave budget). For each interleave value, on the same in-process server
one after the other, this prints: the streams' longest and p95 gap between two tokens while the Score
call ran and their median gap outside it, the Score call's latency, the streams' total time, and the
1-minute load average. Every stream's tokens and every Score result must be the same under every
value (batch-invariant mode: bit for bit).

    python benchmarks/stream_stall.py --interleaves inf,4,1 --streams 4 --score-rows 128
    python benchmarks/stream_stall.py --interleaves 4 --sweep generate --score-rows 64   # a job's Generate joins
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import percentile, spread_latents  # noqa: E402
from load import _start_server  # noqa: E402
from refusal_audit.audit.spec import AblateLatents, Request, SamplingParams, user_prompt  # noqa: E402
from refusal_audit.client import AuditClient  # noqa: E402

STREAM_PROMPTS = ["Tell me a long story about a lighthouse.", "Explain how rain forms, step by step.",
                  "Describe a walk through an old city.", "Write a letter to a friend about the sea."]


def _score_prompts(n: int) -> list[Request]:
    return [Request(prompt=user_prompt(f"Question {i}: is it safe to mix product {i} with water?")) for i in range(n)]


def run_once(address: str, args: argparse.Namespace, layers: list[int]) -> dict[str, Any]:
    """The streams start together; once each has `--after` tokens the Score call is sent. Returns
    per-stream token times and tokens, the Score call's window and its results."""
    times: list[list[float]] = [[] for _ in range(args.streams)]
    tokens: list[list[int]] = [[] for _ in range(args.streams)]
    ready = threading.Barrier(args.streams + 1)
    started = threading.Event()
    errors: list[str] = []

    def stream(i: int) -> None:
        iv = ((AblateLatents(latents=spread_latents(args.latents, layers, args.d_sae, seed=i)),) if args.latents else ())
        req = Request(prompt=user_prompt(STREAM_PROMPTS[i % len(STREAM_PROMPTS)]), interventions=iv,
                      sampling=SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True))
        client = AuditClient(address, timeout=900)
        try:
            ready.wait()
            for ev in client.generate_stream([req]):
                times[i].append(time.perf_counter())
                tokens[i].extend(ev.token_ids)
                if len(times[i]) == args.after:
                    started.set()
        except Exception as exc:  # noqa: BLE001 - reported
            errors.append(f"stream {i}: {exc}")
        finally:
            client.close()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(args.streams)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    ready.wait()
    started.wait(timeout=600)
    client = AuditClient(address, timeout=900)
    s0 = time.perf_counter()
    if args.sweep == "score":
        scores: list[Any] = client.score(_score_prompts(args.score_rows), [5, 6, 7], top_k=4)
    else:  # a job's generation: its rows join the running streams' decode batch
        scores = client.generate(_score_prompts(args.score_rows), max_new_tokens=args.sweep_tokens)
    s1 = time.perf_counter()
    client.close()
    for t in threads:
        t.join()
    return {"times": times, "tokens": tokens, "score": scores, "window": (s0, s1), "wall": time.perf_counter() - t0,
            "errors": errors}


def gaps(run: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Gaps between two tokens of a stream: those overlapping the Score call's window, and the rest."""
    s0, s1 = run["window"]
    inside: list[float] = []
    outside: list[float] = []
    for ts in run["times"]:
        for a, b in zip(ts, ts[1:], strict=False):
            (inside if a < s1 and b > s0 else outside).append(b - a)
    return inside, outside


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:gemma-3-270m")
    ap.add_argument("--interleaves", default="inf,1", help="comma-separated --batch-interleave values")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--after", type=int, default=4, help="stream tokens before the Score call is sent")
    ap.add_argument("--score-rows", type=int, default=128, help="prompts in the sweep's one call")
    ap.add_argument("--sweep", choices=["score", "generate"], default="score",
                    help="the sweep's call: Score (prompt-only, interleaved) or Generate (its rows join the streams)")
    ap.add_argument("--sweep-tokens", type=int, default=4, help="--sweep generate: new tokens per sweep prompt")
    ap.add_argument("--latents", type=int, default=2000, help="per stream, its own mask")
    ap.add_argument("--layers", default="3,6,9,12")
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--sae-l0", type=float, default=100.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    server = _start_server("hf", args.model, layers, args.d_sae, max_inflight=64, sae_l0=args.sae_l0,
                           batch_invariant=args.batch_invariant)
    batcher = server.handle.engine
    try:
        AuditClient(server.address, timeout=600).generate([user_prompt("Hi")], max_new_tokens=2)  # warm-up
        rows, first = [], None
        for text in args.interleaves.split(","):
            batcher.interleave = float(text)
            load0 = os.getloadavg()[0]
            run = run_once(server.address, args, layers)
            inside, outside = gaps(run)
            same = "-"
            if first is None:
                first = run
            else:
                same_tokens = run["tokens"] == first["tokens"]
                same_scores = all(
                    (a.token_ids == b.token_ids) if args.sweep == "generate" else
                    (np.array_equal(a.logprobs, b.logprobs) and np.array_equal(a.top_token_ids, b.top_token_ids))
                    for a, b in zip(run["score"], first["score"], strict=True))
                same = "yes" if same_tokens and same_scores else f"NO (tokens {same_tokens}, scores {same_scores})"
            rows.append((text, max(inside, default=float("nan")), percentile(inside, 0.95),
                         statistics.median(outside) if outside else float("nan"), run["window"][1] - run["window"][0],
                         run["wall"], len(run["errors"]), same, load0, os.getloadavg()[0]))
    finally:
        server.stop()
    sweep = "Score" if args.sweep == "score" else f"Generate ({args.sweep_tokens} new tokens each)"
    print(f"\n{args.streams} streams x {args.new_tokens} tokens ({args.latents} latents each), one {sweep} call of "
          f"{args.score_rows} prompts after {args.after} stream tokens; batch-invariant={args.batch_invariant}; "
          f"torch threads {torch.get_num_threads()}\n")
    print("| interleave | longest gap during the sweep s | p95 gap during it s | median gap otherwise s | sweep call s "
          "| streams' wall s | errors | same as first | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]} | {r[7]} "
              f"| {r[8]:.1f} -> {r[9]:.1f} |")


if __name__ == "__main__":
    main()
