"""Downstream cost of the interventions: cross-entropy loss (the seed paper's Table 9).

Two samples, each scored under three conditions:

- *harmless instructions*: prompt = the chat-formatted instruction, completion = a reference answer
  when `reference_file` provides one (JSON / JSONL rows with instruction + output, e.g. Alpaca),
  else the model's own greedy answer generated without intervention (`completion_source` in the
  result says which). CE = mean token NLL of the completion given the prompt (`engine.loss`).
- *general text* (the paper: The Pile): LM loss of raw text (`engine.loss` with completion None),
  from `general_text_dataset` (default the hub's NeelNanda/pile-10k, loaded only when asked) or
  inline `general_texts`; texts truncated to `max_text_chars`.

Conditions: baseline; direction ablation (Arditi et al.: the refusal direction projected out at
every layer); latent-set ablation, once per prompt's set (stage 2, or stage 2 + stage 3): the
loss is averaged over texts per set, then mean and std over sets (Table 9's "Feat." column).

Per text we keep the mean NLL; a condition's `mean` is the mean over texts, `token_mean` the
token-weighted mean. Checkpoints are content-addressed, ``downstream/{sample}/ce/{fingerprint}`` of the
sample's texts and the condition's interventions (not its name), so a later call on the same context
-- the demo's method comparison after its downstream CE -- reuses every condition already scored
(the baseline; a stage-3 set that is also a named comparison condition) instead of recomputing it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .context import StageContext
from .datasets import DatasetUnavailable, load_prompts
from .engine import Engine
from .spec import AblateDirection, Intervention, Request, SamplingParams
from .stage_utils import (
    Latent,
    ablate,
    as_prompt,
    chunks,
    fingerprint,
    generate_batched,
    latents_to_dict,
    resumed,
    save_fingerprinted,
)
from .sweep import Stage2Sets, rankings_from

STAGE = "downstream"


class DownstreamConfig(BaseModel):
    """Downstream-CE configuration (round-trips through JSON)."""

    model_config = ConfigDict(extra="forbid")

    latent_sets_from: Literal["stage2", "stage3"] = "stage2"
    instruction_dataset: str = "temaq-abliterated:harmless"
    instruction_split: str = "test"
    n_instructions: int = Field(100, ge=1)
    reference_file: str | None = None  # JSON/JSONL with reference answers (e.g. Alpaca's `output`)
    reference_instruction_key: str = "instruction"
    reference_output_key: str = "output"
    answer_max_new_tokens: int = Field(64, ge=1)  # the model's own answer when there is no reference
    general_text_dataset: str | None = "hf:NeelNanda/pile-10k?column=text"
    general_texts: list[str] = Field(default_factory=list)  # inline; used instead of the dataset
    n_general: int = Field(100, ge=1)
    max_text_chars: int = Field(2000, ge=16)
    max_sets: int | None = Field(10, ge=1)  # latent sets evaluated (each costs a pass over both samples)
    seed: int = 0
    chat: bool = True
    batch_size: int = Field(8, ge=1)


def load_references(path: str, n: int, seed: int, ikey: str = "instruction", okey: str = "output") -> list[tuple[str, str]]:
    """(instruction, reference answer) pairs from a JSON list / JSONL file; a seeded sample of n.
    Rows with a non-empty `input` field (Alpaca) are skipped: the prompt would be incomplete."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetUnavailable(f"reference_file {path}: no such file")
    text = p.read_text(encoding="utf-8")
    rows = [json.loads(x) for x in text.splitlines() if x.strip()] if p.suffix == ".jsonl" else json.loads(text)
    pairs = [(str(r[ikey]).strip(), str(r[okey]).strip()) for r in rows
             if isinstance(r, dict) and r.get(ikey) and r.get(okey) and not str(r.get("input") or "").strip()]
    if not pairs:
        raise DatasetUnavailable(f"reference_file {path}: no rows with {ikey!r} and {okey!r}")
    if n < len(pairs):
        idx = np.sort(np.random.default_rng(seed).permutation(len(pairs))[:n])
        pairs = [pairs[i] for i in idx]
    return pairs


@dataclass
class CEStats:
    per_text: list[float]
    n_tokens: list[int]

    @property
    def mean(self) -> float:
        v = [x for x in self.per_text if np.isfinite(x)]
        return float(np.mean(v)) if v else float("nan")

    @property
    def token_mean(self) -> float:
        tot = sum(n for x, n in zip(self.per_text, self.n_tokens, strict=True) if np.isfinite(x))
        return float(sum(x * n for x, n in zip(self.per_text, self.n_tokens, strict=True) if np.isfinite(x)) / tot) if tot else float("nan")

    def to_json(self) -> dict[str, Any]:
        v = [x for x in self.per_text if np.isfinite(x)]
        return {"mean": self.mean, "std": float(np.std(v)) if v else None, "token_mean": self.token_mean,
                "n_texts": len(v), "n_tokens": int(sum(self.n_tokens)), "per_text": list(self.per_text)}


def ce(engine: Engine, prompts: Sequence[Any], completions: Sequence[str | None], interventions: Sequence[Intervention],
       batch_size: int) -> CEStats:
    """Per-text mean NLL (engine.loss) of completions given prompts, under the interventions."""
    losses: list[float] = []
    counts: list[int] = []
    idx = list(range(len(prompts)))
    for part in chunks(idx, batch_size):
        res = engine.loss([Request(prompt=prompts[i], interventions=tuple(interventions)) for i in part],
                          [completions[i] for i in part])
        losses += [r.loss for r in res]
        counts += [r.n_tokens for r in res]
    return CEStats(losses, counts)


@dataclass
class DownstreamResult:
    samples: dict[str, dict[str, Any]]  # sample -> {"n", "source", "baseline", "direction", "latent_sets", ...}
    completion_source: str
    n_sets: int
    config: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def table(self) -> list[dict[str, Any]]:
        """The paper's Table 9: one row per sample with baseline, direction and feature CE."""
        rows = []
        for name, s in self.samples.items():
            rows.append({"sample": name, "baseline": s["baseline"]["mean"],
                         "direction": (s.get("direction") or {}).get("mean"),
                         "latents_mean": (s.get("latents") or {}).get("mean"),
                         "latents_std": (s.get("latents") or {}).get("std")})
        return rows

    def to_json(self) -> dict[str, Any]:
        return {"kind": "downstream_ce", "table": self.table(), "samples": self.samples,
                "completion_source": self.completion_source, "n_sets": self.n_sets, "wall_s": self.wall_s,
                "config": self.config}


def latent_sets_for(cfg: DownstreamConfig, stage2: Any, stage3: Any = None) -> list[dict[int, list[int]]]:
    """The per-prompt sets to ablate: stage-2 final sets, or stage 2 + the top-K stage-3 latents
    at each prompt's first jailbreaking K. Seeded sample of at most `max_sets`."""
    items = Stage2Sets.from_result(stage2).selected(only_jailbroken=True) if stage2 is not None else []
    sets: list[list[Latent]] = []
    if cfg.latent_sets_from == "stage3":
        if stage3 is None:
            raise ValueError("latent_sets_from='stage3' needs a stage-3 result")
        rankings = rankings_from(stage3)
        d = stage3.to_json() if hasattr(stage3, "to_json") and not isinstance(stage3, dict) else stage3
        first = {int(p["index"]): p.get("first_jailbreak_k") for p in d.get("prompts", [])}
        for it in items:
            k = first.get(it.index)
            if k:
                sets.append(sorted(set(it.pairs()) | set(rankings.get(it.index, [])[:k])))
    else:
        sets = [it.pairs() for it in items]
    if cfg.max_sets is not None and len(sets) > cfg.max_sets:
        idx = np.sort(np.random.default_rng(cfg.seed).permutation(len(sets))[: cfg.max_sets])
        sets = [sets[i] for i in idx]
    return [latents_to_dict(s) for s in sets]


def run_downstream(engine: Engine, cfg: DownstreamConfig, ctx: StageContext, direction: Any = None,
                   latent_sets: Sequence[dict[int, Sequence[int]]] = (), instructions: Sequence[str] | None = None,
                   references: Sequence[str] | None = None, general_texts: Sequence[str] | None = None,
                   extra_conditions: Sequence[tuple[str, Sequence[Intervention]]] = ()) -> DownstreamResult:
    """CE on both samples under baseline / direction ablation / each latent set (module doc).

    `direction`: a vector (ablated inline), a registered direction id (str), or None (skipped).
    `instructions` / `references` / `general_texts` override the configured sources.
    `extra_conditions`: further named intervention lists (e.g. a ScaleLatents steering), reported
    per sample under ``extra`` by name."""
    t0 = time.perf_counter()
    # instruction sample + completions
    if instructions is None:
        if cfg.reference_file:
            pairs = load_references(cfg.reference_file, cfg.n_instructions, cfg.seed, cfg.reference_instruction_key,
                                    cfg.reference_output_key)
            instructions, references = [p for p, _ in pairs], [r for _, r in pairs]
        else:
            instructions = load_prompts(cfg.instruction_dataset, cfg.instruction_split, cfg.n_instructions, cfg.seed)
    instructions = list(instructions)
    prompts = [as_prompt(t, cfg.chat) for t in instructions]
    if references is not None:
        answers = list(references)
        source = "reference"
    else:
        key = fingerprint([*instructions, str(cfg.answer_max_new_tokens), str(cfg.chat)])
        got = resumed(ctx, "downstream/answers", key)
        if got is not None:
            answers = list(got["answers"])
        else:
            sp = SamplingParams(max_new_tokens=cfg.answer_max_new_tokens)
            comps = generate_batched(engine, [Request(prompt=p, sampling=sp) for p in prompts], cfg.batch_size)
            answers = [c.text for c in comps]
            save_fingerprinted(ctx, "downstream/answers", key, answers=answers)
        source = "model_greedy"
    # general text sample
    general_note = None
    if general_texts is None:
        if cfg.general_texts:
            general_texts = cfg.general_texts[: cfg.n_general]
        elif cfg.general_text_dataset:
            try:
                general_texts = load_prompts(cfg.general_text_dataset, "all", cfg.n_general, cfg.seed)
            except DatasetUnavailable as exc:
                general_texts, general_note = [], f"skipped: {exc}"
        else:
            general_texts, general_note = [], "skipped: no general text configured"
    general = [t[: cfg.max_text_chars] for t in general_texts if t.strip()]

    samples_in: dict[str, tuple[list[Any], list[str | None]]] = {"instructions": (prompts, list(answers))}
    if general:
        samples_in["general_text"] = (list(general), [None] * len(general))
    conditions: list[tuple[str, list[Intervention]]] = [("baseline", [])]
    if direction is not None:
        iv = AblateDirection(direction_id=direction) if isinstance(direction, str) else \
            AblateDirection(direction=tuple(float(x) for x in np.asarray(direction).reshape(-1)))
        conditions.append(("direction", [iv]))
    for j, s in enumerate(latent_sets):
        conditions.append((f"set/{j}", list(ablate({int(k): list(v) for k, v in s.items()}))))
    extra = [(f"extra/{name}", list(ivs)) for name, ivs in extra_conditions]
    conditions += extra
    total = len(samples_in) * len(conditions)
    n_done = 0
    out: dict[str, dict[str, Any]] = {}
    for name, (ps, cs) in samples_in.items():
        data_fp = fingerprint([str(p) for p in ps] + [str(c) for c in cs])
        stats: dict[str, CEStats] = {}
        for cond, ivs in conditions:
            ctx.check_cancelled()
            fp = fingerprint([data_fp, json.dumps([iv.model_dump(mode="json") for iv in ivs], sort_keys=True)])
            key = f"downstream/{name}/ce/{fp}"  # by content: the same interventions under another name resume
            got = resumed(ctx, key, fp)
            if got is not None:
                stats[cond] = CEStats(list(got["per_text"]), list(got["n_tokens"]))
            else:
                stats[cond] = ce(engine, ps, cs, ivs, cfg.batch_size)
                save_fingerprinted(ctx, key, fp, per_text=stats[cond].per_text, n_tokens=stats[cond].n_tokens)
            n_done += 1
            ctx.progress(STAGE, n_done, total, {"sample": name, "condition": cond, "mean": stats[cond].mean})
        set_means = [stats[c].mean for c, _ in conditions if c.startswith("set/")]
        entry: dict[str, Any] = {"n": len(ps), "baseline": stats["baseline"].to_json(),
                                 "direction": stats["direction"].to_json() if "direction" in stats else None,
                                 "latents": {"mean": float(np.mean(set_means)), "std": float(np.std(set_means)),
                                             "per_set": set_means,
                                             "per_set_stats": [stats[c].to_json() for c, _ in conditions
                                                               if c.startswith("set/")]} if set_means else None}
        if extra:
            entry["extra"] = {c.removeprefix("extra/"): stats[c].to_json() for c, _ in extra}
        out[name] = entry
    if general_note:
        out["general_text"] = {"n": 0, "note": general_note, "baseline": {"mean": None}, "direction": None,
                               "latents": None}
    return DownstreamResult(out, source, len(latent_sets), cfg.model_dump(mode="json"), time.perf_counter() - t0)
