"""Report sections for the analyses (issue 7), registered into the report's section registry
(`audit.report_html`).

One renderer per result kind: ``stage3`` (jailbreaks per K, FM training, Table 2), ``probe_baseline``
(the FM-vs-probe table), ``random_baseline``, ``obrien_baseline`` (ASR per k, the appendix
figure), ``hydra`` (redundant latents; the BOS clamp table, Tables 5/6), ``causality``,
``downstream_ce`` (Table 9) and ``taxonomy`` (Figure 3). Each takes the result JSON and returns
an HTML fragment with figures embedded as base64 PNG (`report.figure`). Importing this module
registers them (`audit.report` imports it).
"""

from __future__ import annotations

from typing import Any

from .report_html import esc, figure, fmt, register_section, table, titled_table

# ---------------------------------------------------------------------------- stage 3 / probe


def _per_k_figure(series: dict[str, list[dict[str, Any]]], caption: str) -> str:
    def draw(ax: Any) -> None:
        for label, rows in series.items():
            rows = [r for r in rows if isinstance(r.get("k"), int)]
            ax.plot([r["k"] for r in rows], [r["jailbroken"] for r in rows], marker="o", ms=3, label=label)
        ax.set_xlabel("K (latents added to the stage-2 set)")
        ax.set_ylabel("jailbroken prompts")
        ax.legend(fontsize=8)

    return figure(draw, caption)


@register_section("stage3", "Stage 3: interaction discovery (factorization machine)", order=40)
def render_stage3(d: dict[str, Any]) -> str:
    s, fm, f, t = d.get("summary") or {}, d.get("fm") or {}, d.get("features") or {}, d.get("timings") or {}
    parts = [
        "<h3>Table 2 (stage 3)</h3>",
        table(["prompts", "jailbroken (any K)", "ASR (gated)", "ASR ungated", "unique stage-3 latents", "mean first K",
               "FM test accuracy"],
              [[s.get("n_prompts"), s.get("jailbroken_any_k"), s.get("asr_any_k"), s.get("asr_any_k_ungated"),
                s.get("unique_stage3_latents"),
                s.get("mean_first_k"), s.get("test_accuracy")]]),
        f"<p>FM: embedding size {fmt(fm.get('embedding_dim'))}, best epoch {fmt(fm.get('best_epoch'))} "
        f"(val accuracy {fmt(fm.get('val_accuracy'))}), {fmt(fm.get('latents_embedded'))} latents embedded. "
        f"Features: {fmt(f.get('n_examples'))} prompts ({fmt(f.get('n_train'))}/{fmt(f.get('n_val'))}/"
        f"{fmt(f.get('n_test'))}), {fmt(f.get('n_features'))} (layer, latent, position) features, "
        f"{fmt(f.get('nnz_per_example_mean'))} non-zeros per prompt, last {fmt(f.get('n_positions'))} tokens of "
        f"layers {esc(d.get('layers'))} ({esc(d.get('layers_note', ''))}), transform {esc(f.get('transform'))}"
        + (f", <b>{fmt(f.get('saturated_tokens'))} tokens hit encode_top_k</b>" if f.get("saturated_tokens") else "")
        + ".</p>",
        f"<p>Time: encode {fmt(t.get('encode_s'))} s, FM training {fmt(fm.get('train_seconds'))} s, ranking "
        f"{fmt(t.get('rank_s'))} s, ablation sweep {fmt(t.get('sweep_s'))} s, total {fmt(t.get('total_s'))} s.</p>",
    ]
    per_k = d.get("per_k") or []
    if per_k:
        parts.append(_per_k_figure({"FM (stage 3)": per_k}, "Stage 3: jailbreaks per K (stage-2 set + top-K FM latents)"))
        parts.append(table(["K", "jailbroken (gated)", "ASR (gated)", "ASR ungated"],
                           [[r["k"], r["jailbroken"], r["asr"], r.get("asr_ungated")] for r in per_k]))
    hist = fm.get("history") or []
    if hist:
        def draw(ax: Any) -> None:
            ep = [h["epoch"] for h in hist]
            ax.plot(ep, [h["train_loss"] for h in hist], marker="o", ms=3, label="train BCE")
            ax.plot(ep, [h["val_loss"] for h in hist], marker="s", ms=3, label="val BCE")
            ax2 = ax.twinx()
            ax2.plot(ep, [h["val_accuracy"] for h in hist], color="tab:green", ls=":", marker="x", ms=3,
                     label="val accuracy")
            ax.set_xlabel("epoch")
            ax.set_ylabel("BCE")
            ax2.set_ylabel("accuracy")
            ax.legend(loc="upper left", fontsize=8)
            ax2.legend(loc="upper right", fontsize=8)

        parts.append(figure(draw, "FM training (best validation epoch kept)"))
    parts.append(titled_table(
        "Per prompt",
        ["#", "prompt", "stage-2 size", "stage-2 embedded", "ranked", "first jailbreak K", "top FM latents"],
        [[p["index"], p["prompt"][:70], p["stage2_size"], p.get("stage2_embedded"), p["n_ranked"],
          p.get("first_jailbreak_k"),
          " ".join(f"{x['layer']}-{x['latent']}" for x in (p.get("top_latents") or [])[:5])]
         for p in d.get("prompts") or []]))
    return "".join(parts)


@register_section("probe_baseline", "FM vs linear probe", order=50)
def render_probe(d: dict[str, Any]) -> str:
    s, pr = d.get("summary") or {}, d.get("probe") or {}
    parts = [f"<p>Logistic probe on the same SAE features ({esc(pr.get('source', ''))}): test accuracy "
             f"{fmt(pr.get('test_accuracy'))}, best epoch {fmt(pr.get('best_epoch'))}. Latents ranked by |w|; the "
             f"top K ablated with each prompt's stage-2 set: {fmt(s.get('jailbroken_any_k'))} of "
             f"{fmt(s.get('n_prompts'))} prompts jailbroken at some K.</p>"]
    comp = d.get("comparison")
    if comp:
        parts.append("<h3>FM vs linear probe</h3>" + table(
            ["K", "prompts", "FM jailbroken", "probe jailbroken"],
            [[r["k"], r["n_prompts"], r.get("fm_jailbroken"), r.get("probe_jailbroken")] for r in comp]))
        rows = [r for r in comp if isinstance(r["k"], int)]
        series = {"FM": [{"k": r["k"], "jailbroken": r["fm_jailbroken"]} for r in rows if r.get("fm_jailbroken") is not None],
                  "linear probe": [{"k": r["k"], "jailbroken": r["probe_jailbroken"]} for r in rows
                                   if r.get("probe_jailbroken") is not None]}
        parts.append(_per_k_figure(series, "Jailbreaks per K: FM-ranked vs probe-ranked latents"))
    else:
        per_k = d.get("per_k") or []
        parts.append(table(["K", "jailbroken (gated)", "ASR (gated)", "ASR ungated"],
                           [[r["k"], r["jailbroken"], r["asr"], r.get("asr_ungated")] for r in per_k]))
    top = (d.get("top_latents") or [])[:20]
    parts.append(titled_table("Largest |w|", ["layer", "latent", "|w|"],
                              [[t["layer"], t["latent"], t["abs_weight"]] for t in top]))
    return "".join(parts)


# ---------------------------------------------------------------------------- controls


@register_section("random_baseline", "Control: random active latents", order=55)
def render_random(d: dict[str, Any]) -> str:
    s = d.get("summary") or {}
    parts = [table(["prompts", "draws", "jailbroken per draw (gated)", "ungated", "mean ASR (gated)",
                    "mean ASR ungated", "any draw", "mean set size", "shortfall"],
                   [[s.get("n_prompts"), len(s.get("jailbroken_per_draw") or []), s.get("jailbroken_per_draw"),
                     s.get("jailbroken_per_draw_ungated"), s.get("asr_mean"), s.get("asr_mean_ungated"),
                     s.get("jailbroken_any_draw"), s.get("mean_set_size"),
                     s.get("total_shortfall")]]),
             "<p>Each prompt's stage-2 set replaced by as many randomly chosen latents active on that prompt "
             "(per layer); shortfall = latents that could not be drawn (too few active).</p>"]
    prompts = d.get("prompts") or []
    if prompts:
        parts.append(table(["#", "prompt", "set size", "active latents", "jailbroken (any draw)"],
                           [[p["index"], p["prompt"][:70], p["stage2_size"], p["n_active"], p["jailbroken_any"]]
                            for p in prompts[:50]]))
    return "".join(parts)


@register_section("obrien_baseline", "Baseline: O'Brien et al. (latents active on >= k tokens)", order=56)
def render_obrien(d: dict[str, Any]) -> str:
    rows = d.get("per_k") or []
    parts = [f"<p>O'Brien et al.: per prompt, the latents active on at least k prompt tokens (layers "
             f"{esc(d.get('layers'))}) ablated. Max ASR {fmt(d.get('max_asr'))} (ungated: {fmt(d.get('max_asr_ungated'))}) "
             f"over {fmt(d.get('n_evaluated'))} "
             f"prompts ({fmt(d.get('n_prompts'))} run; those not refused without ablation left out when checked).</p>"]
    if rows:
        def draw(ax: Any) -> None:
            ax.plot([r["k"] for r in rows], [r["asr"] for r in rows], marker="o", ms=3, label="gated")
            if all(r.get("asr_ungated") is not None for r in rows):
                ax.plot([r["k"] for r in rows], [r["asr_ungated"] for r in rows], marker="x", ms=3, ls="--",
                        label="ungated")
                ax.legend(fontsize=8)
            ax.set_xlabel("k (minimum active tokens)")
            ax.set_ylabel("ASR")
            ax.set_ylim(-0.02, 1.02)

        parts.append(figure(draw, "Baseline: latents active on at least k tokens, ablated — ASR per k"))
        parts.append(table(["k", "jailbroken (gated)", "ASR (gated)", "ASR ungated", "mean set size"],
                           [[r["k"], r["jailbroken"], r["asr"], r.get("asr_ungated"), r["mean_set_size"]]
                            for r in rows]))
    return "".join(parts)


# ---------------------------------------------------------------------------- hydra / causality


@register_section("hydra", "Redundant (hydra) latents", order=65)
def render_hydra(d: dict[str, Any]) -> str:
    s = d.get("summary") or {}
    parts = [
        table(["prompts", "with inactive latents", "inactive latents", "jailbroken (full set)",
               "jailbroken (active only)", "jailbroken (inactive only)", "impacted"],
              [[s.get("n_prompts"), s.get("n_with_inactive"), s.get("inactive_latents"), s.get("jailbroken_full"),
                s.get("jailbroken_active_only"), s.get("jailbroken_inactive_only"), s.get("n_impacted")]]),
        f"<p>On impacted prompts (the full set jailbreaks, the active latents alone do not), "
        f"{fmt(s.get('woken_latents'))} of {fmt(s.get('impacted_inactive_latents'))} inactive latents wake up when "
        f"the active ones are ablated ({fmt(s.get('woken_fraction'))}); of those, "
        f"{fmt(s.get('woken_on_system_tokens'))} fire on template/special tokens and {fmt(s.get('woken_on_bos'))} "
        f"on BOS ({fmt(s.get('bos_share_of_system'))} of the system-token ones).</p>",
    ]
    shares = s.get("activation_share_by_class") or {}
    if shares:
        parts.append("<h3>Where woken latents fire (share of latent-token activations)</h3>"
                     + table(list(shares), [[shares[k] for k in shares]]))
    top = s.get("top_tokens") or []
    if top:
        parts.append(table(["token", "activations", "share"], [[t["token"], t["count"], t["share"]] for t in top]))
    woken = (d.get("woken_latents") or [])[:40]
    parts.append(titled_table(
        "Woken latents", ["layer", "latent", "prompts", "on BOS", "max activation"],
        [[w["layer"], w["latent"], w["n_prompts"], w["n_bos"], w["max"]] for w in woken]))
    clamp = d.get("clamp") or {}
    if clamp.get("rows"):
        lat = clamp.get("latents") or {}
        n = sum(len(v) for v in lat.values())
        parts.append(f"<h3>Clamping the redundant latents at BOS (Tables 5/6)</h3><p>{n} latents clamped at "
                     f"position 0 to each value; benign prompts, greedy.</p>")
        parts.append(table(["prompt", "clamp", "response"],
                           [[r["prompt"], "baseline" if r["value"] is None else r["value"], r["completion"]]
                            for r in clamp["rows"]], "clamp"))
    elif clamp.get("note"):
        parts.append(f"<p>{esc(clamp['note'])}</p>")
    return "".join(parts)


@register_section("causality", "Causal link between stage-2 and stage-3 latents", order=60)
def render_causality(d: dict[str, Any]) -> str:
    s = d.get("summary") or {}
    parts = [table(["prompts", "jailbroken by stage-3 latents only (gated)", "fraction (gated)", "fraction ungated",
                    "mean fraction of active stage-2 latents switched off", "max fraction off",
                    "mean activation drop (still on)"],
                   [[s.get("n_prompts"), s.get("jailbroken_stage3_only"), s.get("fraction_jailbroken"),
                     s.get("fraction_jailbroken_ungated"),
                     s.get("mean_fraction_off"), s.get("max_fraction_off"), s.get("mean_drop_still_on")]])]
    prompts = d.get("prompts") or []
    fr = [p["fraction_off"] for p in prompts if p.get("fraction_off") is not None]
    if fr:
        def draw(ax: Any) -> None:
            ax.hist(fr, bins=min(20, max(5, len(fr) // 2)), range=(0, 1))
            ax.set_xlabel("fraction of active stage-2 latents switched off by the stage-3 ablation")
            ax.set_ylabel("prompts")

        parts.append(figure(draw, "Stage 3 -> stage 2: how many stage-2 latents the stage-3 ablation switches off"))
    if prompts:
        parts.append(table(["#", "prompt", "K", "stage-3 size", "jailbroken", "stage-2 active", "switched off",
                            "mean drop"],
                           [[p["index"], p["prompt"][:60], p["k"], p["stage3_size"], p["jailbroken_stage3_only"],
                             p["n_stage2_active"], p["n_switched_off"], p.get("mean_drop_still_on")]
                            for p in prompts[:50]]))
    return "".join(parts)


# ---------------------------------------------------------------------------- downstream / taxonomy


@register_section("downstream_ce", "Downstream cost: cross-entropy", order=70)
def render_downstream(d: dict[str, Any]) -> str:
    rows = []
    for r in d.get("table") or []:
        feat = "–" if r.get("latents_mean") is None else f"{fmt(r['latents_mean'])} ({fmt(r.get('latents_std'))})"
        rows.append([r["sample"], r.get("baseline"), r.get("direction"), feat])
    src = {"reference": "reference answers", "model_greedy": "the model's own greedy answers (no reference)"}
    parts = ["<h3>Table 9</h3>", table(["sample", "baseline CE", "Dir. ablation", "Feat. ablation mean (std)"], rows),
             f"<p>Instruction completions: {esc(src.get(d.get('completion_source', ''), d.get('completion_source')))}; "
             f"feature ablation averaged over {fmt(d.get('n_sets'))} per-prompt latent sets.</p>"]
    for name, s in (d.get("samples") or {}).items():
        if s.get("note"):
            parts.append(f"<p>{esc(name)}: {esc(s['note'])}</p>")
    return "".join(parts)


@register_section("taxonomy", "Mapping latents to the CoCoNot unsafe taxonomy", order=80)
def render_taxonomy(d: dict[str, Any]) -> str:
    cats = d.get("categories") or []
    fig = d.get("figure") or {}
    single, by_n = fig.get("single") or {}, fig.get("by_n_categories") or {}
    labels = [*cats, *[f"{n} types" for n in sorted(by_n, key=int) if int(n) >= 2]]
    values = [single.get(c, 0) for c in cats] + [by_n[n] for n in sorted(by_n, key=int) if int(n) >= 2]

    def draw(ax: Any) -> None:
        colors = ["tab:blue"] * len(cats) + ["tab:orange"] * (len(labels) - len(cats))
        ax.bar(range(len(labels)), values, color=colors)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("latents")

    parts = [f"<p>{fmt(d.get('n_latents'))} latents; a latent maps to a subcategory when it is active on at least "
             f"{fmt(d.get('min_prompts'))} of its prompts (tokens: {esc(d.get('token_scope'))}); "
             f"{fmt(by_n.get('0', 0))} latents map to none.</p>",
             figure(draw, "Figure 3: latents per CoCoNot unsafe subcategory (single type: blue; several types: orange)",
                    size=(7.0, 3.8)),
             table(["subcategory", "prompts", "latents (single type)", "latents (any)"],
                   [[c, (d.get("n_prompts") or {}).get(c), single.get(c), (fig.get("per_category_total") or {}).get(c)]
                    for c in cats])]
    return "".join(parts)
