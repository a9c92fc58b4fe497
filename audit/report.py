"""A self-contained HTML report (figures as embedded base64 PNG) plus the JSON it was made from.

`write_report(results, out_dir)` takes ``{name: result}`` where a result is a stage result object
(with ``to_json()``) or its JSON dict; its kind is the dict's ``"kind"`` field (else the name).
Each kind has a section renderer: ``direction`` (cosine by layer, Figures 4/5 of the seed paper;
per-layer selection scores; the candidate table), ``stage1`` (ASR vs K), ``stage2`` (Table 1,
per-tau outcome, top latents, per-prompt cost). Later analyses (stage 3, baselines, hydra, CE,
taxonomy) add theirs with `register_section`; unknown kinds get a generic section (their JSON).
matplotlib is imported lazily (the thin client does not need it); without it, sections say so.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from pathlib import Path
from typing import Any

from . import (
    report_analysis,  # noqa: F401  (registers the analysis sections)
    report_attribution,  # noqa: F401  (registers the refusal_features section)
    report_comparison,  # noqa: F401  (registers the method comparison and compute sections)
    report_refusal_analyses,  # noqa: F401  (latent_edges, jailbreak_suppression, probe_ood sections)
)
from .codec import to_jsonable
from .report_html import (
    SECTION_RENDERERS,
    SectionRenderer,
    esc,
    figure,
    fmt,
    register_section,
    table,
    titled_table,
)

__all__ = ["SECTION_RENDERERS", "SectionRenderer", "esc", "figure", "fmt", "register_section", "render_html",
           "table", "write_report"]


# ---------------------------------------------------------------------------- sections


@register_section("direction", "Refusal direction", order=10)
def render_direction(d: dict[str, Any]) -> str:
    parts = [
        "<p>" + f"Chosen layer <b>{fmt(d.get('layer'))}</b>, position <b>{fmt(d.get('position'))}</b>, "
        f"raw diff-of-means norm {fmt(d.get('raw_norm'))}"
        + (" — <b>fallback</b>: every candidate was filtered" if d.get("fallback") else "") + ".</p>"
    ]
    cos = d.get("cosine") or {}
    layers = cos.get("layers") or []
    if layers and cos.get("harmful_mean"):
        def draw_cos(ax: Any) -> None:
            for rows, color in ((cos.get("harmful") or [], "tab:red"), (cos.get("harmless") or [], "tab:blue")):
                for row in rows:
                    ax.plot(layers, row, color=color, alpha=0.12, lw=0.8)
            ax.plot(layers, cos["harmful_mean"], color="tab:red", lw=2, label="harmful (mean)")
            ax.plot(layers, cos["harmless_mean"], color="tab:blue", lw=2, label="harmless (mean)")
            ax.axvline(d.get("layer", 0), color="gray", ls="--", lw=1, label="direction layer")
            ax.set_xlabel("layer")
            ax.set_ylabel("cos(last-token residual, direction)")
            ax.legend(fontsize=8)

        parts.append(figure(draw_cos, "Cosine of the last-token residual with the refusal direction by layer "
                                      "(harmful vs harmless validation prompts; thin lines: single prompts)"))
    cands = d.get("candidates") or []
    scored = [c for c in cands if c.get("refusal_score") is not None]
    if scored:
        def draw_scores(ax: Any) -> None:
            positions = sorted({c["position"] for c in scored})
            for pos in positions:
                rows = sorted((c for c in scored if c["position"] == pos), key=lambda c: c["layer"])
                ax.plot([c["layer"] for c in rows], [c["refusal_score"] for c in rows], marker="o", ms=3,
                        label=f"ablation refusal score, pos {pos}")
                ax.plot([c["layer"] for c in rows], [c["steering_score"] for c in rows], ls=":", marker="x", ms=3,
                        label=f"steering score, pos {pos}")
            ax.axhline(0, color="gray", lw=0.8)
            ax.set_xlabel("layer")
            ax.set_ylabel("refusal score (log-odds)")
            ax.legend(fontsize=6, ncol=2)

        parts.append(figure(draw_scores, "Direction selection by layer: refusal score with the direction ablated "
                                         "on harmful val (lower = better) and steering score on harmless val"))
    if cands:
        rows = sorted(cands, key=lambda c: (c.get("filtered") is not None,
                                            c["refusal_score"] if c.get("refusal_score") is not None else math.inf))
        parts.append(table(["layer", "position", "refusal score", "steering score", "KL", "norm", "filtered"],
                           [[c["layer"], c["position"], c.get("refusal_score"), c.get("steering_score"), c.get("kl"),
                             c.get("norm"), c.get("filtered") or ""] for c in rows], "candidates"))
    return "".join(parts)


@register_section("stage1", "Stage 1: top-K latents aligned with the direction", order=20)
def render_stage1(d: dict[str, Any]) -> str:
    parts = [f"<p>{fmt(d.get('n_jailbroken'))} of {fmt(d.get('n_evaluated'))} prompts refused at baseline were "
             f"jailbroken by ablating the top-K latents per layer (layers {esc(d.get('layers'))}); "
             f"{fmt(d.get('n_prompts'))} prompts in all. {gated_note(d.get('n_jailbroken_ungated'))}</p>"]
    ks, asr = d.get("ks") or [], d.get("asr") or []
    asr_u = d.get("asr_ungated") or [None] * len(ks)
    if ks:
        def draw(ax: Any) -> None:
            ax.plot(ks, asr, marker="o", ms=3)
            ax.set_xlabel("K (latents per layer)")
            ax.set_ylabel("ASR")
            ax.set_ylim(-0.02, 1.02)

        parts.append(figure(draw, "Stage 1: attack success rate vs K"))
        parts.append(table(["K", "ASR (gated)", "ASR ungated"], [list(r) for r in zip(ks, asr, asr_u, strict=False)]))
    ranking, cosines = d.get("ranking") or {}, d.get("ranking_cosines") or {}
    rows = [[ly, ids[j], cosines.get(ly, [None] * (j + 1))[j]] for ly, ids in ranking.items() for j in range(min(5, len(ids)))]
    parts.append(titled_table("Most aligned latents per layer", ["layer", "latent", "cosine"], rows))
    return "".join(parts)


def literal_failure_text(trace: list[dict[str, Any]]) -> str:
    """One line per prompt of the literal run: the seeds' set sizes and their intersection at the
    tau where the intersection was largest, and whether that set jailbroke."""
    lines = []
    for p in trace:
        taus = p.get("taus") or []
        if not taus:
            continue
        best = max(taus, key=lambda t: (t.get("size") or 0, -float(t.get("tau") or 0)))
        sizes = "/".join(str(x) for x in best.get("per_seed_sizes") or [])
        verdict = {True: "it jailbroke", False: "it did not jailbreak", None: "nothing to verify"}[best.get("jailbroken")]
        lines.append(f"prompt {p.get('index')} (pool {p.get('pool_size')}): at tau={best.get('tau')} the seeds "
                     f"accepted {sizes} latents and shared {best.get('size')}; {verdict}")
    if not lines:
        return ""
    return ("The literal reading keeps a latent only if every seed's greedy pass accepts it; its reference "
            "state ablates the untested rest of the pool, so which blocks look necessary depends on the "
            "seed's block order, and the seeds' sets barely overlap. " + "; ".join(lines) + ".")


@register_section("stage2", "Stage 2: greedy pruning to a faithful set", order=30)
def render_stage2(d: dict[str, Any]) -> str:
    s = d.get("summary") or {}
    parts = ["<h3>Table 1</h3>", table(["prompts", "unique latents", "jailbreak successes (gated)",
                                        "jailbreak successes ungated", "mean set size", "mean forward passes / prompt"],
                                       [[s.get("n_prompts"), s.get("unique_latents"), s.get("jailbreak_successes"),
                                         s.get("jailbreak_successes_ungated"), s.get("mean_set_size"),
                                         s.get("mean_forward_passes")]], "table1")]
    fb = d.get("reading_fallback")
    if fb:
        lit = fb.get("literal_summary") or {}
        parts.insert(0, f"<p><b>Reading:</b> the paper's literal reading found {html.escape(str(lit.get('jailbreak_successes')))} "
                        f"jailbreaking sets of {html.escape(str(lit.get('n_prompts')))} prompts, so this is stage 2 rerun "
                        f"with reading={html.escape(str(fb.get('to')))} (accepted latents stay ablated; not the paper's formula).</p>")
        why = literal_failure_text(fb.get("literal_prompts") or [])
        if why:
            parts.insert(1, f"<p><b>Why the literal reading found none:</b> {html.escape(why)}</p>")
    per_tau = d.get("per_tau") or []
    if per_tau:
        def draw(ax: Any) -> None:
            taus = [t["tau"] for t in per_tau]
            ax.plot(taus, [t["asr"] for t in per_tau], marker="o", color="tab:red", label="ASR of the set")
            ax.set_xlabel("tau")
            ax.set_ylabel("ASR")
            ax.set_ylim(-0.02, 1.02)
            ax2 = ax.twinx()
            ax2.plot(taus, [t["mean_size"] for t in per_tau], marker="s", color="tab:blue", label="mean set size")
            ax2.set_ylabel("mean set size")
            ax.legend(loc="upper left", fontsize=8)
            ax2.legend(loc="upper right", fontsize=8)

        parts.append(figure(draw, "Stage 2 by threshold: jailbreaks and size of the seed-intersection set"))
        parts.append(table(["tau", "jailbroken (gated)", "ASR (gated)", "ASR ungated", "mean size"],
                           [[t["tau"], t["jailbroken"], t["asr"], t.get("asr_ungated"), t["mean_size"]]
                            for t in per_tau]))
    top = (d.get("top_latents") or [])[:50]
    parts.append(titled_table("Top latents", ["layer", "latent", "prompts"],
                              [[t["layer"], t["latent"], t["count"]] for t in top]))
    parts.append(titled_table(
        "Per prompt",
        ["#", "prompt", "pool", "final tau", "set size", "jailbroken", "forward passes", "wall s"],
        [[p["index"], p["prompt"][:80], p["pool_size"], p.get("final_tau"), p.get("final_size"), p["jailbroken"],
          p["forward_passes"], p["wall_s"]] for p in d.get("prompts") or []]))
    return "".join(parts)


def gated_note(ungated: Any) -> str:
    """'(N without the coherence gate)' for a count the gate may have lowered."""
    return "" if ungated is None else f"({fmt(ungated)} without the coherence gate.)"


@register_section("coherence_gate", "Coherence gate: degenerate text is not a jailbreak", order=5)
def render_coherence_gate(d: dict[str, Any]) -> str:
    """How every jailbreak verdict in this report was gated, and the calibration numbers."""
    return (
        "<p>Every completion the judge calls a jailbreak is re-checked: it is <b>degenerate</b> (neither refusal "
        "nor compliance, not counted as a jailbreak) when its mean token NLL under the unintervened model, or "
        "its fraction of repeated word 3-grams, exceeds what the model's own greedy answers to harmless prompts "
        "show. Thresholds: the quantile below of those answers' values plus a margin. Searches (stage 1's K, "
        "stage 2's verification, the top-K sweeps) use the gated verdict, so a degenerate completion never "
        "stops them. Every ASR is reported gated, with the ungated number (what the bare judge said) beside "
        "it.</p>"
        + table(["calibration answers", "source", "max tokens", "quantile", "NLL median", "NLL quantile",
                 "NLL threshold", "repetition median", "repetition quantile", "repetition threshold"],
                [[d.get("n_answers"), d.get("source"), d.get("max_new_tokens"), d.get("quantile"),
                  d.get("nll_median"), d.get("nll_quantile_value"), d.get("nll_threshold"),
                  d.get("repetition_median"), d.get("repetition_quantile_value"), d.get("repetition_threshold")]])
    )


@register_section("direction_ablation_rates", "Held-out refusal and jailbreak rates, direction ablated", order=35)
def render_rates(d: dict[str, Any]) -> str:
    """Refusal rate and (gated / ungated) jailbreak rate per prompt set and condition."""
    rows = []
    for key in ("harmful", "harmful_direction_ablated", "harmless", "harmless_direction_ablated"):
        r = d.get(key) or {}
        rows.append([key.replace("_", " "), r.get("n"), r.get("refusal_rate"), r.get("jailbreak_rate"),
                     r.get("jailbreak_rate_ungated"), r.get("n_degenerate")])
    parts = [table(["prompts", "n", "refusal rate", "jailbreak rate (gated)", "jailbreak rate ungated",
                    "degenerate"], rows)]
    ex = (d.get("harmful_direction_ablated") or {}).get("examples") or []
    parts.append(titled_table(
        "Examples (harmful, direction ablated)", ["prompt", "completion", "refused", "degenerate"],
        [[e["prompt"][:60], e["completion"][:120], e["refused"], e.get("degenerate")] for e in ex]))
    return "".join(parts)


def render_generic(d: Any) -> str:
    text = json.dumps(d, indent=1)
    if len(text) > 20000:
        text = text[:20000] + "\n..."
    return f"<pre>{esc(text)}</pre>"


# ---------------------------------------------------------------------------- entry point

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right}
th{background:#f3f3f3} figure{margin:1em 0} figcaption{font-size:.85em;color:#555}
img{max-width:100%} pre{background:#f7f7f7;padding:.5em;overflow:auto;font-size:.8em}
"""


# Rendered sections by (kind, JSON) hash: a report rewritten after every finished section (the demo)
# renders each section's figures once, not once per rewrite.
_RENDERED: dict[str, str] = {}


def load_render_cache(path: str | Path) -> int:
    """Add the rendered sections saved by `save_render_cache` (a later run re-renders nothing it has
    rendered before); returns how many were loaded. A missing or unreadable file loads none."""
    try:
        got = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    if not isinstance(got, dict):
        return 0
    _RENDERED.update({str(k): str(v) for k, v in got.items()})
    return len(got)


def save_render_cache(path: str | Path, keys: set[str] | None = None) -> None:
    """Save the rendered sections (only `keys`, when given) as JSON."""
    keep = {k: v for k, v in _RENDERED.items() if keys is None or k in keys}
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(keep), encoding="utf-8")
    tmp.replace(path)


def section_key(kind: str, res: Any) -> str:
    """The rendered-section cache key: the kind and the section's JSON."""
    return hashlib.sha256(f"{kind}|{json.dumps(res, sort_keys=True, default=str)}".encode()).hexdigest()


def render_html(results: dict[str, Any], title: str = "refusal-audit report") -> str:
    """The HTML of a report over JSON-able results (see the module docstring)."""
    items = []
    for name, res in results.items():
        kind = res.get("kind", name) if isinstance(res, dict) else name
        r = SECTION_RENDERERS.get(kind)
        items.append((r.order if r else 1000, name, kind, res, r))
    items.sort(key=lambda t: t[0])
    body = []
    for _, name, kind, res, r in items:
        heading = r.title if r else kind
        if name != kind:
            heading += f" ({name})"
        key = section_key(kind, res)
        content = _RENDERED.get(key, "")
        if not content:
            try:
                content = r.render(res) if r else render_generic(res)
                _RENDERED[key] = content
                while len(_RENDERED) > 256:
                    _RENDERED.pop(next(iter(_RENDERED)))
            except Exception as exc:  # noqa: BLE001 - one broken section must not lose the report
                content = f"<p><b>could not render this section:</b> {esc(repr(exc))}</p>" + render_generic(res)
        body.append(f'<section id="{esc(name)}"><h2>{esc(heading)}</h2>{content}</section>')
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>{''.join(body)}</body></html>")


def write_report(results: dict[str, Any], out_dir: str | Path, title: str = "refusal-audit report",
                 stem: str = "report") -> tuple[Path, Path]:
    """Write ``{stem}.html`` (self-contained) and ``{stem}.json``; returns (html_path, json_path)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = to_jsonable(results)
    html_path, json_path = out / f"{stem}.html", out / f"{stem}.json"
    json_path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    html_path.write_text(render_html(data, title), encoding="utf-8")
    return html_path, json_path

