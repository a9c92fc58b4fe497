"""`refusal-audit demo`, the run step: serve the built refusal-tuned Gemma-3-270M with its demo SAEs
in-process, run the audit chain on held-out prompts, and write the HTML+JSON report.

The chain: refusal direction (Arditi et al.) -> generation on held-out harmful/harmless prompts with
and without direction ablation (the refusal-rate change) -> stage 1 (top-K latents by decoder
cosine) -> stage 2 (greedy block pruning), then the stage-3 / baseline / hydra / causality / CE /
taxonomy analyses (`demo_analyses`). Every stage goes through the same engine protocol a remote client would use.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from sae_lens import SAE

from ...audit.context import LocalContext
from ...audit.judges import JudgeItem, SubstringJudge
from ...audit.pipeline import ChainConfig, PromptSplits, run_chain
from ...audit.refusal_direction import RefusalDirectionConfig
from ...audit.report import write_report
from ...audit.spec import AblateDirection, Request, SamplingParams, user_prompt
from ...audit.stage1 import Stage1Config, Stage1Result
from ...audit.stage2 import Stage2Config, run_stage2
from ..hf_engine import HFEngine
from ..model_loading import load_model
from ..sae_runtime import build_layer_saes
from . import artifact_dir
from .demo_analyses import ANALYSES
from .finetune import FinetuneConfig, make_split


def load_demo_engine(data_dir: Path) -> HFEngine:
    """The refusal-tuned model with every demo SAE found under data_dir/saes."""
    model, tokenizer = load_model(str(artifact_dir(data_dir, "finetune")))
    saes_root = artifact_dir(data_dir, "saes")
    saes = []
    for sub in sorted(saes_root.glob("layer_*")):
        saes.append((int(sub.name.split("_")[1]), SAE.load_from_disk(str(sub), device="cpu"), str(sub)))
    cfg = model.config.get_text_config()
    return HFEngine(model, tokenizer, build_layer_saes(saes, cfg.hidden_size, cfg.num_hidden_layers),
                    model_name="embedded:gemma-3-270m-refusal")


def refusal_rates(engine: HFEngine, prompts: list[str], interventions: tuple = (), max_new_tokens: int = 24,
                  batch_size: int = 16) -> dict[str, Any]:
    """Greedy generations judged by the refusal-substring judge."""
    judge = SubstringJudge()
    sp = SamplingParams(max_new_tokens=max_new_tokens)
    comps = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        comps += engine.generate([Request(prompt=user_prompt(p), interventions=interventions, sampling=sp)
                                  for p in chunk])
    verdicts = judge.judge([JudgeItem(p, c.text) for p, c in zip(prompts, comps, strict=True)])
    return {
        "n": len(prompts),
        "refusal_rate": float(np.mean([v.refused for v in verdicts])) if verdicts else float("nan"),
        "examples": [{"prompt": p, "completion": c.text, "refused": v.refused}
                     for p, c, v in list(zip(prompts, comps, verdicts, strict=True))[:6]],
    }


def demo_configs(small: bool) -> ChainConfig:
    """Sizes that keep a later demo run within a few minutes on a 2-core CPU.

    The direction's candidates are the last prompt token only (14 candidates instead of Arditi's
    70 post-instruction ones): measured on the demo model, the full set picks the same
    layer-10 / position -1 direction in 161 s instead of ~40 s."""
    return ChainConfig(
        direction=RefusalDirectionConfig(n_train=32 if small else 64, n_val=8 if small else 16, positions=[-1],
                                         batch_size=16),
        stage1=Stage1Config(k_start=10, k_step=10, k_max=60 if small else 100, exclude_layers=[1, 2],
                            max_new_tokens=24, batch_size=16),
        stage2=Stage2Config(max_new_tokens=24, batch_size=64, prompts_per_group=8),
    )


def rerun_stage2_pool(engine: Any, stage1: Stage1Result, cfg: Stage2Config, ctx: LocalContext,
                      literal_summary: dict[str, Any]) -> dict[str, Any]:
    """Stage 2 again with reading="pool"; its JSON records the literal run's summary it replaces."""
    pool = run_stage2(engine, stage1, cfg.model_copy(update={"reading": "pool"}), ctx)
    out = pool.to_json()
    out["reading_fallback"] = {"from": cfg.reading, "to": "pool", "literal_summary": literal_summary}
    return out


def run_demo(data_dir: Path | str, small: bool = False, n_prompts: int | None = None,
             out_dir: Path | str | None = None, analyses: bool = True) -> tuple[Path, Path]:
    """Run the audit chain (and, with `analyses`, the issue-7 analyses) on the built demo and write
    the report; returns (html, json) paths."""
    console = Console()
    data_dir = Path(data_dir)
    torch.manual_seed(0)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    engine = load_demo_engine(data_dir)
    timings["load"] = time.perf_counter() - t0
    info = engine.info
    console.print(f"engine: {info.model} ({info.architecture}, {info.n_layers} layers, d={info.d_model}); "
                  f"SAEs at layers {list(info.sae_layers)}")

    split = make_split(FinetuneConfig())
    n_test = n_prompts or (4 if small else 8)
    cfgs = demo_configs(small)
    half = len(split.harmful_heldout) // 2
    harmful = PromptSplits(train=split.harmful_train, val=split.harmful_heldout[:half],
                           test=split.harmful_heldout[half : half + n_test])
    harmless = PromptSplits(train=split.harmless_train, val=split.harmless_heldout[: len(split.harmless_heldout) // 2])
    # the direction config samples n_train / n_val from these lists itself
    harmful.train = harmful.train[: cfgs.direction.n_train]
    harmless.train = harmless.train[: cfgs.direction.n_train]
    harmful.val = harmful.val[: cfgs.direction.n_val]
    harmless.val = harmless.val[: cfgs.direction.n_val]

    def on_progress(stage: str, done: int, total: int, partial: dict[str, Any] | None) -> None:
        if total and (done == total or done % max(1, total // 4) == 0):
            console.print(f"  {stage}: {done}/{total}")

    run_dir = Path(out_dir) if out_dir else data_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = LocalContext(judge=SubstringJudge(), out_dir=run_dir, on_progress=on_progress)
    decoder = {ly: ls.sae.W_dec.detach().cpu().numpy() for ly, ls in engine.saes.items()}
    engine.resolver = _LocalResolver(ctx)  # type: ignore[assignment]

    t0 = time.perf_counter()
    console.print("[bold]refusal direction -> stage 1 -> stage 2[/bold]")
    chain = run_chain(engine, harmful, harmless, cfgs, ctx, decoder)
    results: dict[str, Any] = chain.to_json()
    if not chain.stage2.summary()["jailbreak_successes"] and cfgs.stage2.reading == "literal":
        # Measured: with SAEs trained on fp32 instead of bf16 activations, the three seeds' sets
        # (40-75 latents each) stopped intersecting, and every analysis after stage 2 had nothing
        # to work on. The pool reading (audit/stage2.py docstring; not the paper's formula) found one.
        console.print("stage 2 found no jailbreaking set with the paper's literal reading; "
                      "rerunning it with reading='pool' (recorded in the report)")
        results["stage2"] = rerun_stage2_pool(engine, chain.stage1, cfgs.stage2, ctx, results["stage2"]["summary"])
    timings["chain"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    heldout_harmful = split.harmful_heldout[half:][: 8 if small else 16]
    heldout_harmless = split.harmless_heldout[len(split.harmless_heldout) // 2 :][: 8 if small else 16]
    ablate = (AblateDirection(direction_id=results["direction"]["direction_id"]),)
    rates: dict[str, Any] = {
        "kind": "direction_ablation_rates",
        "harmful": refusal_rates(engine, heldout_harmful),
        "harmful_direction_ablated": refusal_rates(engine, heldout_harmful, ablate),
        "harmless": refusal_rates(engine, heldout_harmless),
        "harmless_direction_ablated": refusal_rates(engine, heldout_harmless, ablate),
    }
    results["direction_ablation_rates"] = rates
    timings["refusal_rates"] = time.perf_counter() - t0
    console.print(
        f"held-out refusal rate: harmful {rates['harmful']['refusal_rate']:.0%} -> "
        f"{rates['harmful_direction_ablated']['refusal_rate']:.0%} with the direction ablated; "
        f"harmless {rates['harmless']['refusal_rate']:.0%} -> {rates['harmless_direction_ablated']['refusal_rate']:.0%}"
    )

    objects: dict[str, Any] = {}  # result objects handed between analyses (stage 3's rankings)
    for name, fn in ANALYSES if analyses else []:
        t0 = time.perf_counter()
        console.print(f"[bold]{name}[/bold]")
        try:
            results[name] = fn(engine, results, ctx, split=split, small=small, objects=objects)
        except Exception as exc:  # noqa: BLE001 - one failing analysis must not lose the report
            results[name] = {"kind": "error", "analysis": name, "error": repr(exc)}
            console.print(f"  [red]{name} failed: {exc!r}[/red]")
        timings[name] = time.perf_counter() - t0

    timings["total"] = time.perf_counter() - t_all
    results["run"] = {"kind": "run", "timings_s": timings, "model": info.model, "sae_layers": list(info.sae_layers),
                      "n_test_prompts": len(harmful.test), "small": small}
    html, js = write_report(results, run_dir, title="refusal-audit demo: Gemma-3-270M (refusal-tuned)")
    (run_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    s2 = results.get("stage2", {}).get("summary", {})
    console.print(f"stage 2: {s2}")
    console.print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    console.print(f"[bold green]report:[/bold green] {html}\n        {js}")
    return html, js


class _LocalResolver:
    """Resolves the direction / latent-set ids a LocalContext registered."""

    def __init__(self, ctx: LocalContext) -> None:
        self.ctx = ctx

    def latent_set(self, set_id: str) -> dict[int, list[int]]:
        from ...audit.errors import NotFound

        if set_id not in self.ctx.latent_sets:
            raise NotFound(f"latent_set_id {set_id!r} is not registered")
        return self.ctx.latent_sets[set_id][0]

    def direction(self, direction_id: str) -> np.ndarray:
        from ...audit.errors import NotFound

        if direction_id not in self.ctx.directions:
            raise NotFound(f"direction_id {direction_id!r} is not registered")
        return self.ctx.directions[direction_id][0]
