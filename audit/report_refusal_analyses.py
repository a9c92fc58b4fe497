"""Report sections for `latent_edges`, `jailbreak_suppression` and `probe_ood` (registered on import by
`audit.report`), each next to the second seed paper's number it reproduces."""

from __future__ import annotations

from typing import Any

from .report_html import esc, register_section, table, titled_table


@register_section("latent_edges", "Upstream latents driving the refusal latents (Yeo et al.)", order=38)
def render_latent_edges(d: dict[str, Any]) -> str:
    """The top upstream latents, the per-downstream edges, the ablation check and its control."""
    down = "; ".join(f"layer {ly}: {', '.join(map(str, ids))}" for ly, ids in (d.get("downstream") or {}).items())
    parts = [f"<p>Downstream (refusal) latents: {esc(down)}. Baseline: {esc(d.get('baseline'))}, "
             f"{esc(d.get('method'))} with {esc(d.get('n_steps'))} step(s), upstream SAE layers up to "
             f"{esc(d.get('max_back'))} back; {esc(d.get('n_prompts'))} prompts. Passes per prompt row, summed: "
             f"{esc(d.get('forward_passes'))} forward, {esc(d.get('backward_passes'))} backward.</p>"]
    ab = d.get("ablation") or {}
    rows = [[name, len(a.get("upstream") or []), a.get("factor"), sum(a.get("before") or []),
             sum(a.get("after") or []), a.get("relative_drop")]
            for name, a in (("top upstream", ab.get("top")), ("random upstream (control)", ab.get("control"))) if a]
    parts.append(titled_table(
        "Ablation check (the paper: 0.45 relative drop)",
        ["upstream set", "latents", "factor", "downstream activation before", "after", "relative drop"], rows))
    parts.append(titled_table(
        "Upstream latents by mean edge into the refusal latents",
        ["#", "layer", "latent", "mean edge (summed over downstream)"],
        [[i + 1, t[0], t[1], t[2]] for i, t in enumerate(d.get("top_upstream") or [])]))
    parts.append(titled_table(
        "Per downstream latent", ["downstream (layer/latent)", "top upstream (layer/latent: mean edge)"],
        [[k, ", ".join(f"{u[0]}/{u[1]}: {u[2]:.3g}" for u in v)]
         for k, v in (d.get("top_upstream_per_downstream") or {}).items()]))
    return "".join(parts)


@register_section("jailbreak_suppression", "Jailbreaks suppress the refusal latents (Yeo et al.)", order=39)
def render_jailbreak_suppression(d: dict[str, Any]) -> str:
    """Relative drop of the refusal latents' activation, split by judged success (gated / ungated)."""
    s = d.get("summary") or {}

    def row(name: str, g: dict[str, Any] | None) -> list[Any]:
        g = g or {}
        return [name, g.get("n"), g.get("plain"), g.get("wrapped"), g.get("relative_drop"), g.get("mean_pair_drop")]

    head = ["pairs", "n", "activation plain", "activation wrapped", "relative drop", "mean per-pair drop"]
    gated, ungated = s.get("gated") or {}, s.get("ungated") or {}
    parts = [f"<p>{esc(s.get('n_pairs'))} (request, template) pairs, {esc(len(d.get('templates') or []))} templates, "
             f"activation summed over the refusal latents at the last {esc(d.get('last_n'))} prompt token(s); judge "
             f"{esc(d.get('judge'))}; {esc(s.get('n_degenerate'))} answers vetoed as degenerate by the coherence gate. "
             "The paper: 0.73 drop for jailbreaks that work, 0.18 for those that fail.</p>",
             table(head, [row("all", s.get("all")),
                          row("jailbroken (gated)", gated.get("jailbroken")),
                          row("not jailbroken (gated)", gated.get("not_jailbroken")),
                          row("jailbroken (ungated)", ungated.get("jailbroken")),
                          row("not jailbroken (ungated)", ungated.get("not_jailbroken"))])]
    parts.append(titled_table(
        "Per template", ["template", "n", "jailbreak rate", "ungated", "relative drop"],
        [[k, v.get("n"), v.get("jailbreak_rate"), v.get("jailbreak_rate_ungated"), v.get("relative_drop")]
         for k, v in (s.get("per_template") or {}).items()]))
    return "".join(parts)


@register_section("probe_ood", "Refusal-latent probe vs dense probe on jailbreak-wrapped prompts (Yeo et al.)",
                  order=40)
def render_probe_ood(d: dict[str, Any]) -> str:
    """Accuracies of both probes per group."""
    probes = d.get("probes") or {}
    groups = ["train_harmful", "train_harmless", "test_harmful", "test_harmless", "ood_harmful", "ood_harmless"]
    rows = [[name, p.get("n_features"), *[(p.get("accuracy") or {}).get(g) for g in groups], p.get("ood_accuracy")]
            for name, p in (("refusal latents", probes.get("latents")),
                            (f"dense residual (layer {d.get('dense_layer')})", probes.get("dense"))) if p]
    n = d.get("n") or {}
    return (f"<p>Trained on plain harmful vs harmless requests; ood = test requests in "
            f"{esc(len(d.get('templates') or []))} jailbreak templates (n: {esc(n)}). The paper: 0.87 (latents) vs "
            "0.51 (dense) on adversarial harmful prompts, i.e. the ood harmful column.</p>"
            + table(["probe", "features", *groups, "ood (both)"], rows))
