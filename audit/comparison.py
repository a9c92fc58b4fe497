"""The two seeds' latent-finding methods side by side on the same prompts (issue 13, item 4).

Seed 1 (O'Brien-style dissection): stage 1 pools the top-K latents by decoder cosine until the
ablation jailbreaks, stage 2 prunes the pool to a faithful set by greedy block ablation (score
passes), stage 3 adds FM-similar latents. Seed 2 (Yeo et al., `refusal_features`): integrated-
gradient attribution over cosine candidates picks a per-prompt top-k and a global top-k.

`compare_methods` is pure (no engine): from the stage-1/2/3 and refusal_features JSON, the CE
measurements of `ce_conditions` (run through `downstream.run_downstream` on one text sample) and
the per-stage compute a `compute.MeteredEngine` recorded, it builds

- ``methods``: per method, the prompts it ran on, set sizes, jailbreak rate gated and ungated
  (denominator: every compared prompt; a prompt a method did not reach counts as not jailbroken),
  CE and its change from the unintervened baseline, and compute;
- ``per_prompt``: per prompt, each method's set size and verdict, Jaccard overlaps;
- ``per_layer``: per SAE layer, the union sets' sizes and Jaccard overlaps, and how many stage-2
  latents were among attribution's cosine candidates at all (attribution can only pick those);
- ``cost``: stage 2's and attribution's *search* passes per prompt (forward-equivalents, a backward
  counted as two forwards, the verification generations excluded on both sides and listed apart),
  their ratio, and the break-even pool size at which stage 2 would cost 10x attribution.

With `rf_atp` (a second `refusal_features` result with `method="atp"`: plain attribution patching,
one gradient at the clean state, on the same prompts and candidates) every table gets AtP next to
IG: its per-prompt sets' rows, their Jaccard overlaps with IG's and stage 2's sets, CE on the same
prompts (conditions ``atp/<index>``), and its search cost and ratio to stage 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .spec import Intervention, ScaleLatents
from .stage_utils import Latent, ablate, latents_to_dict

ATTR_STAGE = "refusal_features: attribution"
ATP_STAGE = "refusal_features_atp: attribution"


def _pairs(d: dict[Any, Sequence[int]] | None) -> set[Latent]:
    return {(int(ly), int(i)) for ly, ids in (d or {}).items() for i in ids}


def jaccard(a: set[Any], b: set[Any]) -> float | None:
    """|a & b| / |a | b|; None when both are empty."""
    u = a | b
    return len(a & b) / len(u) if u else None


def _mean(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return float(np.mean(v)) if v else None


def attribution_sets(rf: dict[str, Any]) -> tuple[list[str], list[set[Latent]], set[Latent]]:
    """(prompts, per-prompt top-k sets, global top-k set) of a refusal_features result."""
    sel = rf.get("selection") or {}
    per = [{(int(t[0]), int(t[1])) for t in p} for p in sel.get("per_prompt", [])]
    prompts = list(rf.get("prompts") or [])
    return prompts, per, {(int(t[0]), int(t[1])) for t in sel.get("global_set", [])}


def stage3_sets(stage3: dict[str, Any] | None, rankings: dict[int, list[Latent]] | None,
                stage2_sets: dict[int, set[Latent]]) -> dict[int, tuple[set[Latent] | None, bool, bool]]:
    """Per stage-2 prompt index: (stage-2 set | FM top-K at the first jailbreaking K, or None when no K
    jailbreaks or the ranking is unknown; jailbroken; jailbroken ungated)."""
    out: dict[int, tuple[set[Latent] | None, bool, bool]] = {}
    for p in (stage3 or {}).get("prompts", []):
        i, k = int(p["index"]), p.get("first_jailbreak_k")
        s: set[Latent] | None = None
        if k and rankings is not None and i in rankings:
            s = stage2_sets.get(i, set()) | set(rankings[i][: int(k)])
        out[i] = (s, k is not None, k is not None or p.get("first_jailbreak_k_ungated") is not None)
    return out


def ce_conditions(stage2: dict[str, Any], rf: dict[str, Any], stage3: dict[str, Any] | None = None,
                  stage3_rankings: dict[int, list[Latent]] | None = None, max_sets: int = 4,
                  global_alphas: Sequence[float] = (0.0, -3.0),
                  rf_atp: dict[str, Any] | None = None) -> list[tuple[str, list[Intervention]]]:
    """The CE conditions, named ``method/...``: `max_sets` stage-2-jailbroken prompts' sets (those stage 3
    also jailbroke first) for stage 2, stage 3, attribution and AtP (`rf_atp`; the same prompts, so the costs
    are matched), the stage-2 union, and attribution's global set scaled by each of `global_alphas` (0 =
    ablation)."""
    prompts, per, glob = attribution_sets(rf)
    by_text = {t: j for j, t in enumerate(prompts)}
    atp_prompts, atp_per, _ = attribution_sets(rf_atp or {})
    atp_by_text = {t: j for j, t in enumerate(atp_prompts)}
    s2 = {int(p["index"]): (p["prompt"], _pairs(p.get("final_latents"))) for p in stage2.get("prompts", [])
          if p.get("jailbroken")}
    s3 = stage3_sets(stage3, stage3_rankings, {i: s for i, (_, s) in s2.items()})
    conds: list[tuple[str, list[Intervention]]] = []
    # prompts where stage 3 also found a set first, so every per-prompt method gets a CE on the same prompts
    for i in sorted(s2, key=lambda i: (not s3.get(i, (None,))[0], i))[:max_sets]:
        text, s = s2[i]
        conds.append((f"stage2/{i}", list(ablate(latents_to_dict(sorted(s))))))
        s3set = s3.get(i, (None, False, False))[0]
        if s3set:
            conds.append((f"stage3/{i}", list(ablate(latents_to_dict(sorted(s3set))))))
        for family, index, sets in (("attribution", by_text, per), ("atp", atp_by_text, atp_per)):
            j = index.get(text)
            if j is not None and j < len(sets) and sets[j]:
                conds.append((f"{family}/{i}", list(ablate(latents_to_dict(sorted(sets[j]))))))
    union = set().union(*(s for _, s in s2.values())) if s2 else set()
    if union:
        conds.append(("stage2/union", list(ablate(latents_to_dict(sorted(union))))))
    if glob:
        d = latents_to_dict(sorted(glob))
        for a in global_alphas:
            conds.append((f"attribution/global/{a:g}",
                          [ScaleLatents(latents={ly: tuple(v) for ly, v in d.items()}, factor=float(a))]))
    return conds


def _ce_by_condition(ce: dict[str, Any] | None) -> dict[str, dict[str, float | None]]:
    """{condition: {sample: mean CE - baseline mean CE}} from a downstream_ce JSON with ``extra``."""
    out: dict[str, dict[str, float | None]] = {}
    for sample, entry in ((ce or {}).get("samples") or {}).items():
        base = (entry.get("baseline") or {}).get("mean")
        for name, st in (entry.get("extra") or {}).items():
            m = st.get("mean")
            out.setdefault(name, {})[sample] = (m - base) if m is not None and base is not None else None
    return out


def _ce_family(by_cond: dict[str, dict[str, float | None]], prefix: str) -> dict[str, float | None]:
    """Mean CE change over the per-prompt conditions ``prefix/<index>`` (digits only), per sample."""
    rows = [v for k, v in by_cond.items() if k.startswith(prefix + "/") and k[len(prefix) + 1:].isdigit()]
    samples = sorted({s for r in rows for s in r})
    return {s: _mean([r.get(s) for r in rows]) for s in samples}


def _stage(compute: dict[str, Any] | None, section: str, stage: str) -> dict[str, Any] | None:
    return (((compute or {}).get(section) or {}).get("stages") or {}).get(stage)


def _search(c: dict[str, Any] | None) -> float | None:
    """Forward-equivalents minus the generation prefills (the verification generations are apart)."""
    if not c:
        return None
    return float(c["forward_equivalents"]) - float(c.get("generations", 0))


def _selection_search(c: dict[str, Any] | None, sel: dict[str, Any]) -> float | None:
    """An attribution selection's search passes: the meter's count, else the selection's own."""
    metered = _search(c)
    if metered is None and sel:
        return float(sel.get("forward_equivalents", 0.0))
    return metered


def _per_prompt_methods(label: str, family: str, note: str, sets: list[set[Latent]], ppv: dict[float, Any],
                        sel: dict[str, Any], by_cond: dict[str, Any], c: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One methods row per validated scale of an attribution selection's per-prompt sets (CE for the
    ablation, x0, from the ``family/<index>`` conditions)."""
    k = sel.get("per_prompt_k", len(sets[0]) if sets else 0)
    return [{
        "method": f"{label} per-prompt top-{k}, x{a:g} ({note})", "prompts_run": len(sets),
        "mean_set_size": _mean([float(len(s)) for s in sets]),
        "unique_latents": len(set().union(*sets)) if sets else 0,
        "jailbreak_rate": r.get("jailbreak_rate"), "jailbreak_rate_ungated": r.get("jailbreak_rate_ungated"),
        "ce_delta": _ce_family(by_cond, family) if a == 0.0 else {},
        "compute": c} for a, r in sorted(ppv.items(), reverse=True)]


def compare_methods(stage1: dict[str, Any] | None, stage2: dict[str, Any], rf: dict[str, Any],
                    stage3: dict[str, Any] | None = None, stage3_rankings: dict[int, list[Latent]] | None = None,
                    compute: dict[str, Any] | None = None, ce: dict[str, Any] | None = None,
                    sections: dict[str, str] | None = None, rf_atp: dict[str, Any] | None = None) -> dict[str, Any]:
    """The comparison section's JSON (module docstring). `compute`: {section: compute.stages_json(...)};
    `sections` names the sections holding stage 1/2, stage 3, refusal_features and refusal_features_atp
    (demo defaults); `rf_atp`: the AtP selection's result, when one ran."""
    sec = {"stage1": "chain", "stage2": "chain", "stage3": "stage3", "refusal_features": "refusal_features",
           "refusal_features_atp": "refusal_features_atp", **(sections or {})}
    prompts, per, glob = attribution_sets(rf)
    atp_prompts, atp_per_list, _ = attribution_sets(rf_atp or {})
    atp_by_text = {t: s for t, s in zip(atp_prompts, atp_per_list, strict=False)}
    atp_ppv = {float(r["alpha"]): r for r in (rf_atp or {}).get("per_prompt_validation") or []}
    atp_index = {t: j for j, t in enumerate(atp_prompts)}
    ppv = {float(r["alpha"]): r for r in rf.get("per_prompt_validation") or []}
    s1 = {p["prompt"]: p for p in (stage1 or {}).get("prompts", [])}
    s2 = {p["prompt"]: p for p in stage2.get("prompts", [])}
    s2_sets = {int(p["index"]): _pairs(p.get("final_latents")) for p in stage2.get("prompts", []) if p.get("jailbroken")}
    s3 = stage3_sets(stage3, stage3_rankings, s2_sets)
    texts = prompts or [p["prompt"] for p in (stage1 or stage2).get("prompts", [])]
    n = len(texts)

    def s2_ungated(p: dict[str, Any]) -> bool:
        return bool(p.get("jailbroken")) or any(t.get("degenerate") for t in p.get("taus", []))

    rows = []
    for j, text in enumerate(texts):
        p2 = s2.get(text)
        a_set = per[j] if j < len(per) else set()
        s2set = _pairs(p2.get("final_latents")) if p2 and p2.get("jailbroken") else set()
        idx = int(p2["index"]) if p2 else None
        s3set, s3_jb, s3_un = s3.get(idx, (None, False, False)) if idx is not None else (None, False, False)
        row: dict[str, Any] = {
            "prompt": text, "stage1_status": (s1.get(text) or {}).get("status"),
            "stage1_pool": sum(len(v) for v in ((s1.get(text) or {}).get("latents") or {}).values()),
            "stage2_ran": p2 is not None, "stage2_size": len(s2set), "stage2_jailbroken": bool(p2 and p2["jailbroken"]),
            "stage2_jailbroken_ungated": bool(p2 and s2_ungated(p2)),
            "stage3_size": len(s3set) if s3set else None, "stage3_jailbroken": s3_jb,
            "attribution_size": len(a_set), "jaccard_stage2_attribution": jaccard(s2set, a_set) if s2set else None,
            "jaccard_stage3_attribution": jaccard(s3set, a_set) if s3set else None,
        }
        for a, r in ppv.items():
            jb = r.get("jailbroken") or []
            row[f"attribution_jailbroken@{a:g}"] = bool(jb[j]) if j < len(jb) else None
        if rf_atp is not None:
            t_set = atp_by_text.get(text, set())
            k = atp_index.get(text)
            row.update({"atp_size": len(t_set), "jaccard_atp_attribution": jaccard(t_set, a_set),
                        "jaccard_stage2_atp": jaccard(s2set, t_set) if s2set else None})
            for a, r in atp_ppv.items():
                jb = r.get("jailbroken") or []
                row[f"atp_jailbroken@{a:g}"] = bool(jb[k]) if k is not None and k < len(jb) else None
        rows.append(row)

    def rate(key: str) -> float | None:
        return sum(bool(r.get(key)) for r in rows) / n if n else None

    by_cond = _ce_by_condition(ce)
    c_s1 = _stage(compute, sec["stage1"], "stage1")
    c_s2 = _stage(compute, sec["stage2"], "stage2")
    c_s3 = (compute or {}).get(sec["stage3"], {}).get("total") if compute else None
    c_attr = _stage(compute, sec["refusal_features"], ATTR_STAGE)
    c_val = {k: v for k, v in (((compute or {}).get(sec["refusal_features"]) or {}).get("stages") or {}).items()
             if k != ATTR_STAGE and v.get("engine_calls")}
    n_s2 = sum(1 for r in rows if r["stage2_ran"])
    sel = rf.get("selection") or {}
    methods = [
        {"method": "stage 1 (cosine top-K pools; seed 1)", "prompts_run": len(s1) if stage1 else None,
         "mean_set_size": _mean([float(r["stage1_pool"]) for r in rows if r["stage1_status"] == "jailbroken"]),
         "jailbreak_rate": sum(1 for r in rows if r["stage1_status"] == "jailbroken") / n if n and stage1 else None,
         "jailbreak_rate_ungated": None, "ce_delta": {}, "compute": c_s1},
        {"method": "stage 2 (block pruning of the pools; seed 1)", "prompts_run": n_s2,
         "mean_set_size": _mean([float(r["stage2_size"]) for r in rows if r["stage2_jailbroken"]]),
         "unique_latents": len(set().union(*s2_sets.values())) if s2_sets else 0,
         "jailbreak_rate": rate("stage2_jailbroken"), "jailbreak_rate_ungated": rate("stage2_jailbroken_ungated"),
         "ce_delta": _ce_family(by_cond, "stage2"), "ce_delta_union": by_cond.get("stage2/union"), "compute": c_s2},
        {"method": "stage 3 (stage 2 + FM top-K; seed 1)", "prompts_run": len(s3),
         "mean_set_size": _mean([float(r["stage3_size"]) for r in rows if r["stage3_size"]]),
         "jailbreak_rate": rate("stage3_jailbroken"),
         "jailbreak_rate_ungated": (sum(1 for v in s3.values() if v[2]) / n) if n else None,
         "ce_delta": _ce_family(by_cond, "stage3"), "compute": c_s3},
    ]
    methods += _per_prompt_methods("attribution", "attribution", "seed 2", per, ppv, sel, by_cond, c_attr)
    for r in rf.get("sweep") or []:
        if r.get("alpha") is None or int(r.get("k", 0)) != len(glob):
            continue
        methods.append({
            "method": f"attribution global top-{len(glob)}, x{r['alpha']:g} (seed 2)", "prompts_run": n,
            "mean_set_size": float(len(glob)), "unique_latents": len(glob),
            "jailbreak_rate": r.get("jailbreak_rate"), "jailbreak_rate_ungated": r.get("jailbreak_rate_ungated"),
            "ce_delta": by_cond.get(f"attribution/global/{r['alpha']:g}", {}), "compute": c_attr})
    c_atp = _stage(compute, sec["refusal_features_atp"], ATP_STAGE)
    atp_sel = (rf_atp or {}).get("selection") or {}
    methods += _per_prompt_methods("AtP", "atp", "seed 2, n=1", atp_per_list, atp_ppv, atp_sel, by_cond, c_atp)

    # per layer: union sets
    a_union = set().union(*per) if per else set()
    s2_union = set().union(*s2_sets.values()) if s2_sets else set()
    s3_union = set().union(*(v[0] for v in s3.values() if v[0])) if s3 else set()
    t_union = set().union(*atp_per_list) if atp_per_list else set()
    cands = _pairs({int(k): v for k, v in (sel.get("candidates") or {}).items()})
    layers = sorted({ly for ly, _ in a_union | s2_union | s3_union | cands})
    per_layer = []
    for ly in layers:
        def at(s: set[Latent], ly: int = ly) -> set[Latent]:
            return {x for x in s if x[0] == ly}
        per_layer.append({
            "layer": ly, "stage2_union": len(at(s2_union)), "stage3_union": len(at(s3_union)),
            "attribution_union": len(at(a_union)), "attribution_global": len(at(glob)),
            "attribution_candidates": len(at(cands)),
            "stage2_in_candidates": len(at(s2_union) & cands),
            "jaccard_stage2_attribution": jaccard(at(s2_union), at(a_union)),
            "jaccard_stage3_attribution": jaccard(at(s3_union), at(a_union)),
            **({"atp_union": len(at(t_union)), "jaccard_atp_attribution": jaccard(at(t_union), at(a_union)),
                "jaccard_stage2_atp": jaccard(at(s2_union), at(t_union))} if rf_atp is not None else {}),
        })

    # cost: search passes per prompt
    s2_search = _search(c_s2)
    if s2_search is None and stage2.get("prompts"):
        s2_search = float(sum(p["forward_passes"] for p in stage2["prompts"]))
    attr_search = _selection_search(c_attr, sel)
    cfg2 = stage2.get("config") or {}
    n_seeds, block = len(cfg2.get("seeds") or [0, 1, 2]), int(cfg2.get("block_size") or 5)
    s2_pp = s2_search / n_s2 if s2_search is not None and n_s2 else None
    a_pp = attr_search / len(per) if attr_search is not None and per else None
    ratio = s2_pp / a_pp if s2_pp and a_pp else None
    pools = [float(p["pool_size"]) for p in stage2.get("prompts", [])]
    cost = {
        "stage2_search_fwd_equiv": s2_search, "stage2_prompts": n_s2, "stage2_per_prompt": s2_pp,
        "stage2_mean_pool": _mean(pools), "stage2_seeds": n_seeds, "stage2_block_size": block,
        "attribution_search_fwd_equiv": attr_search, "attribution_prompts": len(per), "attribution_per_prompt": a_pp,
        "attribution_forward_passes": sel.get("forward_passes"), "attribution_backward_passes": sel.get("backward_passes"),
        "ratio_stage2_over_attribution": ratio, "meets_10x": bool(ratio is not None and ratio >= 10),
        "stage1_plus_2_per_prompt": ((_search(c_s1) or 0.0) + (s2_search or 0.0)) / n if n and c_s1 else None,
        "stage1_generations": (c_s1 or {}).get("generations"),
        "stage2_verification_generations": (c_s2 or {}).get("generations"),
        "attribution_validation": {k: v for k, v in c_val.items()},
    }
    if a_pp:
        # stage 2 costs about 2 + seeds * |C| / N score passes per prompt (audit/stage2.py)
        cost["break_even_pool_10x"] = block * (10 * a_pp - 2) / n_seeds
    if rf_atp is not None:
        t_search = _selection_search(c_atp, atp_sel)
        t_pp = t_search / len(atp_per_list) if t_search is not None and atp_per_list else None
        t_ratio = s2_pp / t_pp if s2_pp and t_pp else None
        cost.update({
            "atp_search_fwd_equiv": t_search, "atp_prompts": len(atp_per_list), "atp_per_prompt": t_pp,
            "atp_forward_passes": atp_sel.get("forward_passes"), "atp_backward_passes": atp_sel.get("backward_passes"),
            "ratio_stage2_over_atp": t_ratio, "meets_10x_atp": bool(t_ratio is not None and t_ratio >= 10),
            "ratio_attribution_over_atp": a_pp / t_pp if a_pp and t_pp else None,
            "break_even_pool_10x_atp": block * (10 * t_pp - 2) / n_seeds if t_pp else None,
            "mean_jaccard_atp_attribution": _mean([r.get("jaccard_atp_attribution") for r in rows]),
        })
    return {"kind": "method_comparison", "n_prompts": n, "methods": methods, "per_prompt": rows,
            "per_layer": per_layer, "cost": cost,
            "ce_samples": {s: (e.get("baseline") or {}).get("mean") for s, e in ((ce or {}).get("samples") or {}).items()},
            "note": "forward-equivalents = forward passes + 2 x backward passes, per prompt row; search passes exclude "
                    "the verification generations (listed apart); jailbreak rates over all compared prompts"}
