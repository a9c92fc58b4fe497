"""Map latents to the CoCoNot unsafe-request taxonomy (seed paper, "Mapping causal features to
unsafe taxonomy", Figure 3).

CoCoNot (Brahman et al. 2024) rows carry ``category`` / ``subcategory`` / ``prompt``. The seed paper
uses the "Requests with safety concerns" category and five of its subcategories: triggers for
offensive language, dangerous or sensitive topics, false information (``misinformation`` in the
data), privacy violations, copyright violations (the data also holds ``wildchats`` and a stray
``incomprehensible`` row; `subcategories=None` keeps every subcategory found).

A latent maps to a subcategory when it is active (activation > `active_threshold`, i.e. non-zero)
on at least `min_prompts` of that subcategory's prompts, anywhere on the prompt
(`token_scope="all"`, the paper) or only on the instruction's own tokens
(`token_scope="instruction"`: without the chat template's prefix — found as the common token
prefix of two probe prompts — and its post-instruction suffix; template tokens are shared by
every prompt, so latents firing there map to every category).

Prompts load from `coconot_path` (a local JSONL/JSON with those fields; tests use
``shared/datasets/coconot/coconot_eval.jsonl``) or, for users, from the hub (`hub_id`
``allenai/coconot``, config ``original``, split ``test``) through `datasets`, only when asked.
Encoding is batched (chosen-latents mode) and checkpointed per batch (``taxonomy/batch/{j}``).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .context import StageContext
from .datasets import DatasetUnavailable
from .engine import Engine
from .spec import Request
from .stage_utils import Latent, as_prompt, chunks, dict_to_latents, fingerprint, resumed, save_fingerprinted
from .sweep import Stage2Sets, chosen_latents, rankings_from

STAGE = "taxonomy"
SAFETY_CATEGORY = "Requests with safety concerns"
PAPER_SUBCATEGORIES = [
    "triggers for offensive language",
    "dangerous or sensitive topics",
    "misinformation",
    "privacy violations",
    "copyright violations",
]


class TaxonomyConfig(BaseModel):
    """Taxonomy-mapping configuration (round-trips through JSON)."""

    model_config = ConfigDict(extra="forbid")

    coconot_path: str | None = None  # local JSONL/JSON; None = the hub
    hub_id: str = "allenai/coconot"
    hub_config: str = "original"
    hub_split: str = "test"
    category: str = SAFETY_CATEGORY
    subcategories: list[str] | None = Field(default_factory=lambda: list(PAPER_SUBCATEGORIES))
    n_per_subcategory: int | None = Field(None, ge=1)
    seed: int = 0
    latent_source: Literal["stage3", "stage2", "explicit"] = "stage3"
    latents: dict[int, list[int]] = Field(default_factory=dict)  # latent_source="explicit"
    min_prompts: int = Field(1, ge=1)
    active_threshold: float = Field(0.0, ge=0)
    token_scope: Literal["all", "instruction"] = "all"
    chat: bool = True
    batch_size: int = Field(16, ge=1)


def load_coconot(cfg: TaxonomyConfig) -> list[dict[str, str]]:
    """Rows {prompt, subcategory} of the configured category/subcategories (seeded cap per subcategory)."""
    if cfg.coconot_path:
        p = Path(cfg.coconot_path).expanduser()
        if not p.is_file():
            raise DatasetUnavailable(f"coconot_path {cfg.coconot_path}: no such file")
        text = p.read_text(encoding="utf-8")
        rows = [json.loads(x) for x in text.splitlines() if x.strip()] if p.suffix == ".jsonl" else json.loads(text)
    else:
        try:
            import datasets  # noqa: PLC0415 - optional, needs network
        except ImportError as exc:  # pragma: no cover - environment
            raise DatasetUnavailable("the `datasets` package is not installed; set coconot_path") from exc
        try:
            rows = list(datasets.load_dataset(cfg.hub_id, cfg.hub_config, split=cfg.hub_split))
        except Exception as exc:  # noqa: BLE001 - offline, gated: unavailable here
            raise DatasetUnavailable(f"could not load {cfg.hub_id} ({cfg.hub_config}/{cfg.hub_split}): {exc}; "
                                     "set coconot_path to a local copy") from exc
    for r in rows[:1]:
        missing = {"prompt", "category", "subcategory"} - set(r)
        if missing:
            raise DatasetUnavailable(f"CoCoNot rows lack fields {sorted(missing)} (have {sorted(r)})")
    rows = [r for r in rows if r.get("category") == cfg.category and str(r.get("prompt", "")).strip()]
    wanted = cfg.subcategories
    by_sub: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        sub = str(r["subcategory"])
        if wanted is None or sub in wanted:
            by_sub.setdefault(sub, []).append({"prompt": str(r["prompt"]).strip(), "subcategory": sub})
    if wanted is not None:
        missing_subs = [s for s in wanted if s not in by_sub]
        if missing_subs:
            raise DatasetUnavailable(f"no CoCoNot prompts for subcategories {missing_subs} in {cfg.category!r}")
    out: list[dict[str, str]] = []
    rng = np.random.default_rng(cfg.seed)
    for sub in sorted(by_sub):
        xs = by_sub[sub]
        if cfg.n_per_subcategory is not None and len(xs) > cfg.n_per_subcategory:
            xs = [xs[i] for i in np.sort(rng.permutation(len(xs))[: cfg.n_per_subcategory])]
        out.extend(xs)
    return out


def latents_from_results(stage2: Any = None, stage3: Any = None) -> list[Latent]:
    """Union of the stage-2 sets, plus each prompt's top-K stage-3 latents at its first jailbreaking K."""
    items = Stage2Sets.from_result(stage2).selected(only_jailbroken=True) if stage2 is not None else []
    out = {x for it in items for x in it.pairs()}
    if stage3 is not None:
        rankings = rankings_from(stage3)
        d = stage3.to_json() if hasattr(stage3, "to_json") and not isinstance(stage3, dict) else stage3
        for p in d.get("prompts", []):
            k = p.get("first_jailbreak_k")
            if k:
                out |= set(rankings.get(int(p["index"]), [])[: int(k)])
    return sorted(out)


def template_span(engine: Engine, chat: bool) -> tuple[int, int]:
    """(prefix tokens, suffix tokens) of the prompt format around an instruction."""
    if not chat:
        return (1 if engine.info.bos_token_id >= 0 else 0), 0
    layer = engine.info.sae_layers[0]
    a, b = engine.encode([Request(prompt=as_prompt(t, chat)) for t in ("Hello there", "42 + 7 =")], latents={layer: [0]})
    n = 0
    while n < min(len(a.token_ids), len(b.token_ids)) and a.token_ids[n] == b.token_ids[n]:
        n += 1
    return n, int(engine.info.n_post_instruction_tokens)


@dataclass
class TaxonomyResult:
    categories: list[str]
    n_prompts: dict[str, int]
    latents: list[Latent]
    counts: np.ndarray  # [n_latents, n_categories] prompts of each category on which the latent fires
    min_prompts: int
    token_scope: str
    config: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def mapping(self) -> list[list[str]]:
        return [[c for j, c in enumerate(self.categories) if self.counts[i, j] >= self.min_prompts]
                for i in range(len(self.latents))]

    def figure_counts(self) -> dict[str, Any]:
        """Figure 3: latents firing on exactly one category (per category) and on several (per number)."""
        maps = self.mapping()
        single = Counter(m[0] for m in maps if len(m) == 1)
        by_n = Counter(len(m) for m in maps)
        return {"single": {c: int(single.get(c, 0)) for c in self.categories},
                "by_n_categories": {str(n): int(by_n.get(n, 0)) for n in range(len(self.categories) + 1)},
                "per_category_total": {c: int(sum(c in m for m in maps)) for c in self.categories}}

    def to_json(self) -> dict[str, Any]:
        maps = self.mapping()
        return {"kind": "taxonomy", "categories": self.categories, "n_prompts": self.n_prompts,
                "n_latents": len(self.latents), "figure": self.figure_counts(), "min_prompts": self.min_prompts,
                "token_scope": self.token_scope,
                "latents": [{"layer": ly, "latent": i, "categories": m,
                             "counts": {c: int(self.counts[r, j]) for j, c in enumerate(self.categories)}}
                            for r, ((ly, i), m) in enumerate(zip(self.latents, maps, strict=True))],
                "wall_s": self.wall_s, "config": self.config}


def run_taxonomy(engine: Engine, latents: Sequence[Latent] | dict[int, Sequence[int]], cfg: TaxonomyConfig,
                 ctx: StageContext, rows: Sequence[dict[str, str]] | None = None) -> TaxonomyResult:
    """Count, per latent and subcategory, the prompts on which the latent is active; map (module doc)."""
    t0 = time.perf_counter()
    lat: list[Latent] = sorted(set(dict_to_latents(latents) if isinstance(latents, dict)
                                   else [(int(a), int(b)) for a, b in latents]))
    if not lat:
        raise ValueError("no latents to map")
    sae_layers = set(engine.info.sae_layers)
    bad = sorted({ly for ly, _ in lat if ly not in sae_layers})
    if bad:
        raise ValueError(f"latents at layers without an SAE: {bad}")
    rows = list(rows) if rows is not None else load_coconot(cfg)
    cats = sorted({r["subcategory"] for r in rows})
    if cfg.subcategories is not None:
        cats = [c for c in cfg.subcategories if c in cats]
    cat_idx = {c: j for j, c in enumerate(cats)}
    rows = [r for r in rows if r["subcategory"] in cat_idx]
    chosen = chosen_latents(lat)
    col = {(ly, i): n for n, (ly, i) in enumerate((ly, i) for ly, ids in chosen.items() for i in ids)}
    order = [col[x] for x in lat]  # chosen-dict order -> sorted latent order
    prefix, suffix = template_span(engine, cfg.chat) if cfg.token_scope == "instruction" else (0, 0)
    counts = np.zeros((len(lat), len(cats)), np.int64)
    batches = list(chunks(list(range(len(rows))), cfg.batch_size))
    cfg_fp = cfg.model_dump_json(include={"active_threshold", "token_scope", "chat"})
    for j, idx in enumerate(batches):
        fp = fingerprint([*(rows[i]["prompt"] for i in idx), str(lat), cfg_fp])
        got = resumed(ctx, f"taxonomy/batch/{j}", fp)
        if got is not None:
            active_lists = got["active"]
        else:
            ctx.check_cancelled()
            res = engine.encode([Request(prompt=as_prompt(rows[i]["prompt"], cfg.chat)) for i in idx], latents=chosen)
            active_lists = []
            for r in res:
                n_tok = len(r.token_ids)
                lo, hi = (prefix, n_tok - suffix) if cfg.token_scope == "instruction" else (0, n_tok)
                if hi <= lo:
                    lo, hi = 0, n_tok
                vals = np.concatenate([np.asarray(r.layers[ly].values)[lo:hi] for ly in chosen], axis=1)
                on = vals.max(axis=0) > cfg.active_threshold
                active_lists.append([int(x) for x in np.flatnonzero(on[order])])
            save_fingerprinted(ctx, f"taxonomy/batch/{j}", fp, active=active_lists)
        for i, act in zip(idx, active_lists, strict=True):
            counts[act, cat_idx[rows[i]["subcategory"]]] += 1
        ctx.progress(STAGE, min(len(rows), (j + 1) * cfg.batch_size), len(rows))
    n_prompts = {c: sum(r["subcategory"] == c for r in rows) for c in cats}
    return TaxonomyResult(cats, n_prompts, lat, counts, cfg.min_prompts, cfg.token_scope, cfg.model_dump(mode="json"),
                          time.perf_counter() - t0)
