"""`refusal-audit build` and `refusal-audit demo`: build the embedded demo once (cached), then run it.

    refusal-audit build [--data-dir DIR] [--force STEP]... [--small]
    refusal-audit demo  [--data-dir DIR] [--force STEP]... [--small] [--rerun]

`demo` reuses the run sections (gate calibration, chain, rates, each analysis) finished by an
earlier run with the same fingerprint (model + SAE manifests, data split, code, options) and
re-renders the report; `--rerun` recomputes them.

Steps: base (GGUF -> fp32 safetensors), finetune (LoRA refusal tune, merged), saes (JumpReLU SAEs).
Each step is skipped when its artifact and manifest are present and intact; `--force STEP` rebuilds
it. The data directory defaults to $XDG_CACHE_HOME/refusal-audit (~/.cache/refusal-audit).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="where builds are cached (default: $XDG_CACHE_HOME/refusal-audit)"),
]
ForceOpt = Annotated[
    list[str] | None, typer.Option("--force", help="rebuild this step even if cached: base | finetune | saes")
]
SmallOpt = Annotated[bool, typer.Option("--small", help="reduced SAE sizes (2 layers x 1024 latents x 32k tokens)")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's choice)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the step records as JSON")]


def _summary_rows(records: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for step, rec in records.items():
        m = rec.manifest.metrics
        if step == "finetune":
            held = m.get("heldout", {})
            detail = (
                f"held-out refusal: harmful {held.get('harmful', {}).get('refusal_rate', float('nan')):.0%}, "
                f"harmless {held.get('harmless', {}).get('refusal_rate', float('nan')):.0%}; "
                f"P(I) mean {held.get('harmful', {}).get('p_refusal_start', {}).get('mean', float('nan')):.2f} vs "
                f"{held.get('harmless', {}).get('p_refusal_start', {}).get('mean', float('nan')):.2f}"
            )
            unseen = {k: v for k, v in m.get("unseen", {}).items() if isinstance(v, dict) and "refusal_rate" in v}
            if unseen:
                detail += "; unseen refusal: " + ", ".join(
                    f"{name} {v['refusal_rate']:.0%} (n={v['n']})" for name, v in unseen.items())
                verdict = m["unseen"].get("acceptance", {})
                detail += f" [{'meets' if verdict.get('passed') else 'misses'} >= " \
                          f"{verdict.get('harmful_refusal_min', float('nan')):.0%} / <= " \
                          f"{verdict.get('benign_refusal_max', float('nan')):.0%}]"
        elif step == "saes":
            detail = "; ".join(
                f"L{layer}: FVE {v['fve']:.2f} L0 {v['mean_l0']:.0f} dead {v['dead_fraction']:.0%}"
                for layer, v in m.get("layers", {}).items()
            )
        else:
            detail = f"reload {m.get('reload_seconds', float('nan')):.1f} s"
        status = "built" if rec.built else "cached"
        rows.append((step, status, f"{rec.manifest.seconds:.1f}" if rec.built else f"{rec.seconds:.1f}",
                     str(rec.path), detail))
    return rows


def _print_summary(records: dict[str, Any], console: Console) -> None:
    table = Table(title="refusal-audit demo build")
    for col in ("step", "status", "seconds", "artifact", "metrics"):
        table.add_column(col, overflow="fold")
    for row in _summary_rows(records):
        table.add_row(*row)
    console.print(table)


def _records_json(records: dict[str, Any]) -> str:
    return json.dumps(
        {s: {"built": r.built, "reason": r.reason, "path": str(r.path), "seconds": r.seconds,
             "manifest": json.loads(r.manifest.model_dump_json())} for s, r in records.items()},
        indent=2,
    )


def _run_build(data_dir: Path | None, force: list[str] | None, small: bool, threads: int | None) -> dict[str, Any]:
    from ..server.embedded.build import build_all

    try:
        return build_all(data_dir, force=force or (), sizes="small" if small else "full", threads=threads)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def register(app: typer.Typer) -> None:
    """Attach `build` and `demo` to the main app."""

    @app.command("build")
    def build(data_dir: DataDirOpt = None, force: ForceOpt = None, small: SmallOpt = False,
              threads: ThreadsOpt = None, json_out: JsonOpt = False) -> None:
        """Build the embedded demo (base model, refusal fine-tune, SAEs); cached steps are skipped."""
        records = _run_build(data_dir, force, small, threads)
        if json_out:
            typer.echo(_records_json(records))
        else:
            _print_summary(records, Console())

    @app.command("demo")
    def demo(data_dir: DataDirOpt = None, force: ForceOpt = None, small: SmallOpt = False,
             threads: ThreadsOpt = None,
             analyses: Annotated[bool, typer.Option(
                 "--analyses/--no-analyses",
                 help="after stage 2, run stage 3, the baselines, hydra, causality, CE and taxonomy")] = True,
             rerun: Annotated[bool, typer.Option(
                 "--rerun", help="recompute every section instead of reusing finished ones by fingerprint")] = False,
             bf16: Annotated[bool | None, typer.Option(
                 "--bf16/--fp32", help="run step: matmuls in bf16 precision (fp32 tensors, bf16 inputs, fp32 "
                 "accumulation) or plain fp32; default: bf16 only on a CPU with native bf16")] = None,
             ) -> None:
        """Build (once, cached) and run the embedded refusal-dissection demo."""
        from ..server.embedded.demo import run_demo
        from ..server.model_loading import default_data_dir

        console = Console()
        records = _run_build(data_dir, force, small, threads)
        _print_summary(records, console)
        resolved = data_dir if data_dir is not None else default_data_dir()
        t0 = time.perf_counter()
        run_demo(resolved, small=small, analyses=analyses, rerun=rerun, bf16=bf16)
        console.print(f"run: {time.perf_counter() - t0:.1f} s")
