"""Report sections for the method comparison (`audit.comparison`) and the per-stage compute
(`audit.compute`); registered on import by `audit.report`."""

from __future__ import annotations

from typing import Any

from .report_html import esc, fmt, register_section, table


def _ce(d: dict[str, Any] | None) -> str:
    d = d or {}
    return " / ".join(fmt(d.get(s)) for s in ("instructions", "general_text")) if d else "–"


@register_section("method_comparison", "Seed 1 vs seed 2: stage 2 / stage 3 vs attribution on the same prompts",
                  order=38)
def render_comparison(d: dict[str, Any]) -> str:
    """Methods table, the search cost, per-layer and per-prompt overlaps."""
    c = d.get("cost") or {}
    parts = [f"<p>{d.get('n_prompts')} prompts. {esc(d.get('note', ''))}. CE change = mean token NLL under the "
             "method's ablation/steering minus the unintervened model's (instructions / general text); per-prompt "
             "methods average the same prompts' sets.</p>"]
    rows = []
    for m in d.get("methods") or []:
        comp = m.get("compute") or {}
        rows.append([m["method"], m.get("prompts_run"), m.get("mean_set_size"), m.get("unique_latents"),
                     m.get("jailbreak_rate"), m.get("jailbreak_rate_ungated"), _ce(m.get("ce_delta")),
                     comp.get("forward_passes"), comp.get("backward_passes"), comp.get("forward_equivalents"),
                     comp.get("generations"), comp.get("engine_s"), comp.get("wall_s")])
    parts.append(table(["method", "prompts run", "mean set size", "unique latents", "jailbreak rate",
                        "jailbreak rate (ungated)", "CE change (instr / general)", "forward", "backward",
                        "forward-equiv.", "generations", "engine s", "wall s"], rows))
    verdict = "yes" if c.get("meets_10x") else "no"
    parts.append("<h3>Search cost per prompt (forward-equivalents, verification generations excluded)</h3>" + table(
        ["stage 2 / prompt", "attribution / prompt", "ratio", ">= 10x fewer for attribution",
         "stage 2 mean pool", "pool for 10x (block N, seeds)"],
        [[c.get("stage2_per_prompt"), c.get("attribution_per_prompt"), c.get("ratio_stage2_over_attribution"), verdict,
          c.get("stage2_mean_pool"),
          f"{fmt(c.get('break_even_pool_10x'))} (N={c.get('stage2_block_size')}, {c.get('stage2_seeds')} seeds)"]]))
    if "atp_per_prompt" in c:
        parts.append("<p>Plain attribution patching (AtP, one gradient at the clean state, the IG left rule with "
                     "n = 1) on the same prompts and candidates:</p>" + table(
            ["stage 2 / prompt", "AtP / prompt", "ratio", ">= 10x fewer for AtP", "IG / AtP",
             "mean Jaccard AtP/IG per prompt", "pool for 10x"],
            [[c.get("stage2_per_prompt"), c.get("atp_per_prompt"), c.get("ratio_stage2_over_atp"),
              "yes" if c.get("meets_10x_atp") else "no", c.get("ratio_attribution_over_atp"),
              c.get("mean_jaccard_atp_attribution"), c.get("break_even_pool_10x_atp")]]))
    parts.append("<p>Attribution costs a fixed number of passes per prompt whatever the candidate count (one score "
                 "for the jailbreak token, then per IG step a forward and a backward, plus the clean, baseline and "
                 "patched forwards); stage 2 costs about 2 + seeds x pool / block score passes per prompt, so the "
                 "ratio grows with the stage-1 pool.</p>")
    pl = d.get("per_layer") or []
    if pl:
        parts.append("<h3>Per layer: union sets and overlap</h3>" + table(
            ["layer", "stage 2", "stage 3", "attribution (per-prompt union)", "attribution global",
             "attribution candidates", "stage-2 latents among candidates", "Jaccard s2/attr", "Jaccard s3/attr"],
            [[r["layer"], r["stage2_union"], r["stage3_union"], r["attribution_union"], r["attribution_global"],
              r["attribution_candidates"], r["stage2_in_candidates"], r["jaccard_stage2_attribution"],
              r["jaccard_stage3_attribution"]] for r in pl]))
        if any("atp_union" in r for r in pl):
            parts.append(table(["layer", "AtP (per-prompt union)", "Jaccard AtP/IG", "Jaccard s2/AtP"],
                               [[r["layer"], r.get("atp_union"), r.get("jaccard_atp_attribution"),
                                 r.get("jaccard_stage2_atp")] for r in pl]))
    pp = d.get("per_prompt") or []
    if pp:
        alphas = sorted({k for r in pp for k in r if k.startswith("attribution_jailbroken@")})
        parts.append("<h3>Per prompt</h3>" + table(
            ["#", "prompt", "stage 1", "pool", "stage 2 size", "stage 2 jb", "stage 3 size", "stage 3 jb",
             "attr. size", *[f"attr. jb {a.split('@')[1]}" for a in alphas], "Jaccard s2/attr", "Jaccard s3/attr"],
            [[i, r["prompt"][:60], r.get("stage1_status"), r.get("stage1_pool"), r.get("stage2_size"),
              r.get("stage2_jailbroken"), r.get("stage3_size"), r.get("stage3_jailbroken"), r.get("attribution_size"),
              *[r.get(a) for a in alphas], r.get("jaccard_stage2_attribution"), r.get("jaccard_stage3_attribution")]
             for i, r in enumerate(pp)]))
        atp_cols = sorted({k for r in pp for k in r if k.startswith("atp_jailbroken@")})
        if atp_cols:
            parts.append("<p>AtP per prompt:</p>" + table(
                ["#", "AtP size", *[f"AtP jb {a.split('@')[1]}" for a in atp_cols], "Jaccard AtP/IG", "Jaccard s2/AtP"],
                [[i, r.get("atp_size"), *[r.get(a) for a in atp_cols], r.get("jaccard_atp_attribution"),
                  r.get("jaccard_stage2_atp")] for i, r in enumerate(pp)]))
    return "".join(parts)


@register_section("compute", "Compute per section and stage (passes, generations, seconds)", order=990)
def render_compute(d: dict[str, Any]) -> str:
    """One row per (section, stage) the run's MeteredEngine charged."""
    rows = []
    sections = d.get("sections") or ({"job": d} if "stages" in d else {})  # a demo run's, or one job's
    for sec, comp in sections.items():
        for stage, c in ((comp or {}).get("stages") or {}).items():
            rows.append([sec, stage, c.get("forward_passes"), c.get("backward_passes"), c.get("forward_equivalents"),
                         c.get("generations"), c.get("generated_tokens"), c.get("engine_calls"), c.get("engine_s"),
                         c.get("wall_s")])
    precision = d.get("matmul_precision")  # a demo run's; jobs do not record it
    how = " (fp32 tensors, bf16 inputs, fp32 accumulation)" if precision == "bf16" else ""
    note = f" Matmul precision: {esc(precision)}{how}." if precision else ""
    if "batch_invariant" in d:  # a demo run's engine: whether a prompt's numbers depend on its batch-mates
        note += (" Batch-invariant engine: every prompt's numbers are the prompt's alone, whatever shares its batch."
                 if d["batch_invariant"] else " Plain engine: a prompt's numbers may differ in the last bits with its batch-mates.")
    return ("<p>Per prompt row; forward-equivalents = forward + 2 x backward; a generation's prefill is one forward, "
            f"its further tokens are counted apart.{note}</p>" + table(
                ["section", "stage", "forward", "backward", "forward-equiv.", "generations", "generated tokens",
                 "engine calls", "engine s", "wall s"], rows))
