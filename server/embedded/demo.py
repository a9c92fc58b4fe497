"""`refusal-audit demo`, the run step: serve the built refusal-tuned Gemma-3-270M with its demo SAEs
in-process, run the audit chain on held-out prompts, and write the HTML+JSON report.

The chain: refusal direction (Arditi et al.) -> generation on held-out harmful/harmless prompts with
and without direction ablation (the refusal-rate change) -> stage 1 (top-K latents by decoder
cosine) -> stage 2 (greedy block pruning), then the stage-3 / baseline / hydra / causality / CE /
taxonomy analyses, the second seed's attribution pipeline (`refusal_features`) and the comparison of
the two seeds' methods on the same prompts (`demo_analyses`). Every stage goes through the same engine
protocol a remote client would use, wrapped in a `compute.MeteredEngine`: the report's compute section
and the comparison's pass counts come from that one meter.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from sae_lens import SAE

from ...audit.codec import to_jsonable
from ...audit.compute import ComputeMeter, MeteredEngine, stages_json
from ...audit.context import LocalContext
from ...audit.judges import (
    CoherenceGate,
    GateCalibration,
    Judge,
    JudgeItem,
    SubstringJudge,
    calibrate,
    gate_summary,
)
from ...audit.pipeline import ChainConfig, PromptSplits, run_chain
from ...audit.refusal_direction import RefusalDirectionConfig
from ...audit.report import load_render_cache, save_render_cache, section_key, write_report
from ...audit.spec import AblateDirection, Request, SamplingParams, user_prompt
from ...audit.stage1 import Stage1Config, Stage1Result
from ...audit.stage2 import Stage2Config, run_stage2
from ..hf_engine import HFEngine
from ..model_loading import load_model
from ..sae_runtime import build_layer_saes
from . import artifact_dir
from .cpu_bf16 import bf16_matmuls, resolve_autocast
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
    # batch-invariant where the BLAS allows it: a prompt's verdict does not depend on which prompts
    # share its batch (nor on the batch size), only on the prompt, the model and the precision
    return HFEngine(model, tokenizer, build_layer_saes(saes, cfg.hidden_size, cfg.num_hidden_layers),
                    model_name="embedded:gemma-3-270m-refusal", batch_invariant=None)


def refusal_rates(engine: Any, prompts: list[str], interventions: tuple = (), max_new_tokens: int = 24,
                  batch_size: int = 16, judge: Judge | None = None) -> dict[str, Any]:
    """Greedy generations judged by `judge` (the demo's gated substring judge; bare substring if None)."""
    judge = judge if judge is not None else SubstringJudge()
    sp = SamplingParams(max_new_tokens=max_new_tokens)
    comps = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        comps += engine.generate([Request(prompt=user_prompt(p), interventions=interventions, sampling=sp)
                                  for p in chunk])
    verdicts = judge.judge([JudgeItem(p, c.text, prompt=user_prompt(p)) for p, c in zip(prompts, comps, strict=True)])
    gs = gate_summary([(v.jailbroken, v.degenerate) for v in verdicts])
    return {
        "n": len(prompts),
        "refusal_rate": float(np.mean([v.refused for v in verdicts])) if verdicts else float("nan"),
        "jailbreak_rate": gs["asr"], "jailbreak_rate_ungated": gs["asr_ungated"], "n_degenerate": gs["degenerate"],
        "examples": [{"prompt": p, "completion": c.text, "refused": v.refused, "degenerate": v.degenerate}
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


def literal_trace(stage2_json: dict[str, Any]) -> list[dict[str, Any]]:
    """Per prompt and tau, the seeds' accepted-set sizes and their intersection: why a reading found no set."""
    return [{"index": p["index"], "pool_size": p["pool_size"],
             "taus": [{"tau": t["tau"], "per_seed_sizes": t["per_seed_sizes"], "size": t["size"],
                       "jailbroken": t.get("jailbroken")} for t in p.get("taus", [])]}
            for p in stage2_json.get("prompts", [])]


def rerun_stage2_pool(engine: Any, stage1: Stage1Result, cfg: Stage2Config, ctx: LocalContext,
                      literal_summary: dict[str, Any], literal_prompts: list[dict[str, Any]] | None = None,
                      ) -> dict[str, Any]:
    """Stage 2 again with reading="pool"; its JSON records the literal run's summary (and, when
    given, its per-prompt trace, `literal_trace`) that it replaces, so the report can say why."""
    pool = run_stage2(engine, stage1, cfg.model_copy(update={"reading": "pool"}), ctx)
    out = pool.to_json()
    out["reading_fallback"] = {"from": cfg.reading, "to": "pool", "literal_summary": literal_summary,
                               "literal_prompts": literal_prompts or []}
    return out


def calibration_prompts(split: Any, small: bool) -> list[str]:
    """Harmless prompts the fine-tune never trained on (its held-out split) for the gate's calibration."""
    return list(split.harmless_heldout)[: 16 if small else 40]


def code_fingerprint() -> str:
    """sha256 over the audit and server packages' Python sources: any code change reruns the demo."""
    import refusal_audit.audit as audit_pkg
    import refusal_audit.server as server_pkg

    h = hashlib.sha256()
    for pkg in (audit_pkg, server_pkg):
        for root in pkg.__path__:
            for f in sorted(Path(root).rglob("*.py")):
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def model_fingerprint(data_dir: Path) -> str:
    """The built model and SAEs' identity: their manifests' file-hash digests."""
    from .manifest import Manifest

    parts = []
    for step in ("finetune", "saes"):
        d = artifact_dir(data_dir, step)
        try:
            parts.append(Manifest.load(d).digest())
        except (OSError, ValueError):  # no manifest (a hand-made data dir): hash the files' sizes and times
            parts.append(str(sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in d.rglob("*") if f.is_file())))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


class RunCache:
    """Finished demo sections, stored by fingerprint under ``data_dir/runs/cache``.

    A section's fingerprint chains the run's base fingerprint (model + SAE manifests, the data
    split, the code, the run options) with every earlier section's, so a change anywhere reruns
    that section and all after it. An entry holds the section's JSON, the result objects later
    analyses read, and the directions / latent sets registered so far (the ids in the JSON)."""

    def __init__(self, root: Path, rerun: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.rerun = rerun

    def path(self, name: str, fp: str) -> Path:
        return self.root / f"{name}-{fp[:24]}.pkl"

    def get(self, name: str, fp: str) -> dict[str, Any] | None:
        p = self.path(name, fp)
        if self.rerun or not p.exists():
            return None
        try:
            with p.open("rb") as f:
                entry = pickle.load(f)
        except Exception:  # noqa: BLE001 - a corrupt / incompatible entry: recompute
            return None
        return entry if isinstance(entry, dict) and entry.get("fingerprint") == fp else None

    def put(self, name: str, fp: str, entry: dict[str, Any]) -> bool:
        entry = {**entry, "fingerprint": fp}
        tmp = self.path(name, fp).with_suffix(".tmp")
        try:
            with tmp.open("wb") as f:
                pickle.dump(entry, f, protocol=pickle.HIGHEST_PROTOCOL)
            tmp.replace(self.path(name, fp))
            return True
        except Exception:  # noqa: BLE001 - unpicklable objects: the section is just not reused
            tmp.unlink(missing_ok=True)
            return False


class _LazyEngine:
    """Loads the demo engine on first use, so a fully cached run never loads the model."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._engine: Any = None

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def get(self) -> Any:
        if self._engine is None:
            self._engine = self._loader()
        return self._engine

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.get(), name)


Section = Callable[[], dict[str, Any]]


def run_demo(data_dir: Path | str, small: bool = False, n_prompts: int | None = None,
             out_dir: Path | str | None = None, analyses: bool = True, rerun: bool = False,
             engine_loader: Callable[[], Any] | None = None, split: Any = None,
             analysis_list: list[tuple[str, Any]] | None = None,
             configs: ChainConfig | None = None, bf16: bool | None = None) -> tuple[Path, Path]:
    """Run the audit chain (and, with `analyses`, the issue-7 analyses) on the built demo and write
    the report; returns (html, json) paths.

    Sections whose fingerprint matches a finished one (`RunCache`) are reused unless `rerun`; the
    report is rewritten after every computed section, so its first sections can be read while the
    later ones run. `engine_loader` / `split` / `analysis_list` replace the built model, the
    fine-tune split, `ANALYSES` and `demo_configs` (tests). `bf16`: run every section's matmuls in
    bf16 precision (`cpu_bf16.bf16_matmuls`); None = only on a native-bf16 CPU."""
    console = Console()
    data_dir = Path(data_dir)
    torch.manual_seed(0)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    run_dir = Path(out_dir) if out_dir else data_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = RunCache(data_dir / "runs" / "cache", rerun=rerun)
    ctx = LocalContext(judge=SubstringJudge(), out_dir=run_dir)
    title = "refusal-audit demo: Gemma-3-270M (refusal-tuned)"

    def load() -> Any:
        t0 = time.perf_counter()
        eng = engine_loader() if engine_loader is not None else load_demo_engine(data_dir)
        eng.resolver = _LocalResolver(ctx)
        timings["load"] = time.perf_counter() - t0
        info = eng.info
        results["compute"]["batch_invariant"] = bool(getattr(info, "batch_invariant", False))
        console.print(f"engine: {info.model} ({info.architecture}, {info.n_layers} layers, d={info.d_model}); "
                      f"SAEs at layers {list(info.sae_layers)}")
        return eng

    meter = ComputeMeter()  # every engine call charged to the stage the run last reported (audit/compute.py)
    raw = _LazyEngine(load)
    engine = MeteredEngine(raw, meter)
    split = split if split is not None else make_split(FinetuneConfig())
    n_test = n_prompts or (4 if small else 8)
    cfgs = configs if configs is not None else demo_configs(small)
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
        meter.set_stage(stage)
        if total and (done == total or done % max(1, total // 4) == 0):
            console.print(f"  {stage}: {done}/{total}")

    ctx.on_progress = on_progress
    compute: dict[str, Any] = {}  # {section: compute.stages_json}, cached with the section
    results: dict[str, Any] = {"compute": {"kind": "compute", "sections": compute}}
    objects: dict[str, Any] = {}  # result objects handed between sections (stage 3's rankings, the calibration)

    def gate() -> CoherenceGate:
        # the gate's NLL checks are charged to "<stage>: judge", apart from the stage's own passes
        return CoherenceGate(SubstringJudge(), MeteredEngine(raw, meter, tag="judge"),
                             GateCalibration.from_json(results["coherence_gate"]))

    def sec_gate() -> dict[str, Any]:
        prompts = calibration_prompts(split, small)
        cal = calibrate(engine, prompts, max_new_tokens=cfgs.stage1.max_new_tokens,
                        source=f"the fine-tune's held-out harmless prompts (n={len(prompts)})")
        return {"coherence_gate": cal.to_json()}

    def sec_chain() -> dict[str, Any]:
        console.print("[bold]refusal direction -> stage 1 -> stage 2[/bold]")
        chain = run_chain(engine, harmful, harmless, cfgs, ctx)
        out: dict[str, Any] = chain.to_json()
        if not chain.stage2.summary()["jailbreak_successes"] and cfgs.stage2.reading == "literal":
            # Measured on the full build: each seed accepts 20-110 latents, but the three seeds' sets
            # barely overlap and their intersection keeps 0-9; whether one of those jailbreaks flips
            # with rounding alone (fp32 vs bf16 matmuls on the same weights: none vs one prompt,
            # benchmarks/RESULTS.md). Without a set every analysis after stage 2 has nothing to work
            # on, so the pool reading (audit/stage2.py docstring; not the paper's formula) runs instead.
            console.print("stage 2 found no jailbreaking set with the paper's literal reading; "
                          "rerunning it with reading='pool' (recorded in the report)")
            out["stage2"] = rerun_stage2_pool(engine, chain.stage1, cfgs.stage2, ctx, out["stage2"]["summary"],
                                              literal_trace(out["stage2"]))
        return out

    def sec_rates() -> dict[str, Any]:
        heldout_harmful = split.harmful_heldout[half:][: 8 if small else 16]
        heldout_harmless = split.harmless_heldout[len(split.harmless_heldout) // 2 :][: 8 if small else 16]
        ablate = (AblateDirection(direction_id=results["direction"]["direction_id"]),)
        j = ctx.judge
        rates: dict[str, Any] = {
            "kind": "direction_ablation_rates",
            "harmful": refusal_rates(engine, heldout_harmful, judge=j),
            "harmful_direction_ablated": refusal_rates(engine, heldout_harmful, ablate, judge=j),
            "harmless": refusal_rates(engine, heldout_harmless, judge=j),
            "harmless_direction_ablated": refusal_rates(engine, heldout_harmless, ablate, judge=j),
        }
        console.print(
            f"held-out refusal rate: harmful {rates['harmful']['refusal_rate']:.0%} -> "
            f"{rates['harmful_direction_ablated']['refusal_rate']:.0%} with the direction ablated; "
            f"harmless {rates['harmless']['refusal_rate']:.0%} -> "
            f"{rates['harmless_direction_ablated']['refusal_rate']:.0%}")
        return {"direction_ablation_rates": rates}

    def analysis(name: str, fn: Any) -> Section:
        def run() -> dict[str, Any]:
            console.print(f"[bold]{name}[/bold]")
            try:
                return {name: fn(engine, results, ctx, split=split, small=small, objects=objects)}
            except Exception as exc:  # noqa: BLE001 - one failing analysis must not lose the report
                console.print(f"  [red]{name} failed: {exc!r}[/red]")
                return {name: {"kind": "error", "analysis": name, "error": repr(exc)}}
        return run

    sections: list[tuple[str, Section]] = [("coherence_gate", sec_gate), ("chain", sec_chain),
                                           ("direction_ablation_rates", sec_rates)]
    if analyses:
        sections += [(name, analysis(name, fn)) for name, fn in (analysis_list if analysis_list is not None else ANALYSES)]

    use_bf16 = resolve_autocast(bf16)
    results["compute"]["matmul_precision"] = "bf16" if use_bf16 else "fp32"
    fp = hashlib.sha256(json.dumps({
        "model": model_fingerprint(data_dir) if engine_loader is None else "custom", "bf16_matmuls": use_bf16,
        "code": code_fingerprint(), "small": small, "n_test": n_test, "configs": cfgs.model_dump(mode="json"),
        "split": hashlib.sha256(json.dumps([split.harmful_train, split.harmful_heldout, split.harmless_train,
                                            split.harmless_heldout]).encode()).hexdigest(),
    }, sort_keys=True).encode()).hexdigest()
    reused: list[str] = []
    html = run_dir / "report.html"
    console.print(f"report (rewritten as sections finish): {html}")
    render_cache = cache.root / "rendered.json"
    if not rerun:
        load_render_cache(render_cache)
    with bf16_matmuls(use_bf16):  # the whole run step: every engine call of every section
        for name, fn in sections:
            fp = hashlib.sha256(f"{fp}|{name}".encode()).hexdigest()
            entry = cache.get(name, fp)
            if entry is not None:
                results.update(entry["results"])
                objects.update(entry["objects"])
                ctx.directions.update(entry["directions"])
                ctx.latent_sets.update(entry["latent_sets"])
                compute[name] = entry.get("compute")
                if entry.get("batch_invariant") is not None:  # the engine that computed it (not loaded now)
                    results["compute"]["batch_invariant"] = entry["batch_invariant"]
                timings[name] = 0.0
                reused.append(name)
            else:
                t0 = time.perf_counter()
                meter.set_stage(name)  # what ran between sections (the gate's set-up) goes to the previous one
                meter.take()
                out = fn()
                compute[name] = stages_json(meter.take())
                results.update(out)
                timings[name] = time.perf_counter() - t0
                ok = not any(isinstance(v, dict) and v.get("kind") == "error" for v in out.values())
                if ok:
                    cache.put(name, fp, {"results": out, "objects": dict(objects), "directions": dict(ctx.directions),
                                         "latent_sets": dict(ctx.latent_sets), "seconds": timings[name],
                                         "compute": compute[name],
                                         "batch_invariant": results["compute"].get("batch_invariant")})
                write_report(results, run_dir, title=title)  # the sections so far, readable now
            if name == "coherence_gate":
                ctx.judge = gate()  # every later verdict passes the gate

    timings["total"] = time.perf_counter() - t_all
    results["run"] = {"kind": "run", "timings_s": timings, "model": "embedded:gemma-3-270m-refusal",
                      "sae_layers": list(engine.info.sae_layers) if engine.loaded else None,
                      "n_test_prompts": len(harmful.test), "small": small, "reused_sections": reused,
                      "rerun": rerun, "fingerprint": fp, "bf16_matmuls": use_bf16}
    html, js = write_report(results, run_dir, title=title)
    save_render_cache(render_cache, {section_key(v.get("kind", k), v) for k, v in to_jsonable(results).items()
                                     if isinstance(v, dict) and k != "run"})
    (run_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    s2 = results.get("stage2", {}).get("summary", {})
    if reused:
        console.print(f"reused {len(reused)} finished section(s) by fingerprint: {', '.join(reused)} "
                      "(--rerun recomputes)")
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
