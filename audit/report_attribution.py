"""Report section for the `refusal_features` job (registered on import by `audit.report`)."""

from __future__ import annotations

from typing import Any

from .report_html import register_section, table, titled_table


@register_section("refusal_features", "Attribution-found refusal latents and steering (Yeo et al.)", order=37)
def render_refusal_features(d: dict[str, Any]) -> str:
    """Compute spent, the global set by mean attribution, and the ScaleLatents sweep."""
    sel = d.get("selection") or {}
    parts = ["<h3>Compute (per prompt row, summed)</h3>" + table(
        ["forward passes", "backward passes", "forward-equivalents", "selection wall s", "job wall s"],
        [[sel.get("forward_passes"), sel.get("backward_passes"), sel.get("forward_equivalents"), sel.get("wall_s"),
          d.get("wall_s")]])]
    gs = sel.get("global_set") or []
    parts.append(titled_table(
        f"Global set ({len(gs)} latents, registered as {d.get('latent_set_id', '')})",
        ["#", "layer", "latent", "mean attribution"], [[i + 1, g[0], g[1], g[2]] for i, g in enumerate(gs)]))
    parts.append(titled_table(
        "Each prompt's own top set scaled by alpha (0 = ablated, as stage 2 verifies)",
        ["alpha", "refusal rate", "jailbreak rate", "jailbreak rate (ungated)", "degenerate", "wall s"],
        [[r.get("alpha"), r.get("refusal_rate"), r.get("jailbreak_rate"), r.get("jailbreak_rate_ungated"),
          r.get("n_degenerate"), r.get("wall_s")] for r in d.get("per_prompt_validation") or []]))
    parts.append(titled_table(
        "Steering: latents scaled by alpha (every position)",
        ["alpha", "k", "refusal rate", "jailbreak rate", "jailbreak rate (ungated)", "CE", "CE delta", "wall s"],
        [["none" if r.get("alpha") is None else r["alpha"], r.get("k"), r.get("refusal_rate"),
          r.get("jailbreak_rate"), r.get("jailbreak_rate_ungated"), r.get("ce"), r.get("ce_delta"), r.get("wall_s")]
         for r in d.get("sweep") or []]))
    return "".join(parts)
