"""Do jailbreaks work by suppressing the refusal latents? (the second seed paper: wrapping a harmful
request in a jailbreak template lowers the refusal latents' activation, by 0.73 for the jailbreaks that
work vs 0.18 for those that fail).

For each harmful request p and jailbreak template t (`audit.jailbreaks`):

- A(x): the refusal latents' activation summed over the latents and the last `last_n` prompt tokens
  of prompt x (`engine.encode` with the chosen latents; the last tokens are the chat template's
  generation prompt, identical for plain and wrapped prompts, where the model decides to refuse);
- the wrapped prompt t(p) is answered greedily and judged (the behaviour is p itself); the judge is
  the caller's (a job's: the server judge behind the coherence gate), so each pair has a gated verdict
  (`jailbroken`) and an ungated one (`jailbroken or degenerate`).

Per group of pairs (all; jailbroken / not, gated and ungated; per template):
relative drop = 1 - sum A(t(p)) / sum A(p), and the mean of the per-pair drops 1 - A(t(p)) / A(p)
over the pairs with A(p) > 0. Checkpointed per prompt (``jailbreak_suppression/{i}``). Torch-free:
runs in a job or through `AuditClient` (encode + generate over the wire, a local judge).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import ConfigDict, Field

from .jailbreaks import TemplateChoice, wrap
from .judges import JudgeItem
from .refusal_latents import latents_key
from .spec import Prompt, Request, SamplingParams
from .stage_utils import as_prompt, chunks, fingerprint, restore_items, save_fingerprinted


class JailbreakSuppressionConfig(TemplateChoice):
    """The `jailbreak_suppression` algorithm (the refusal latents are an argument; a job names them)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "temaq-abliterated:harmful"
    split: Literal["train", "val", "test", "all"] = "test"
    n: int | None = Field(default=16, ge=1)
    seed: int = 0
    prompts: list[str] = Field(default_factory=list)  # inline harmful requests, instead of the dataset
    chat: bool = True
    last_n: int = Field(default=1, ge=1)  # prompt tokens (from the end) the activation is summed over
    max_new_tokens: int = Field(default=64, ge=1)
    batch_size: int = Field(default=8, ge=1)


def activation(res: Any, last_n: int) -> float:
    """Sum of the chosen latents' values over the last `last_n` tokens of one EncodeResult."""
    return float(sum(np.asarray(la.values, dtype=np.float64)[-last_n:].sum() for la in res.layers.values()))


def activations(engine: Any, prompts: Sequence[Prompt], latents: dict[int, list[int]], last_n: int,
                batch_size: int) -> list[float]:
    """A(x) for each prompt (module docstring)."""
    out: list[float] = []
    for part in chunks(list(prompts), batch_size):
        out.extend(activation(r, last_n) for r in engine.encode([Request(prompt=p) for p in part], latents=latents))
    return out


def drop(pairs: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """{n, plain, wrapped, relative_drop, mean_pair_drop} of (A(p), A(t(p))) pairs."""
    sp = float(sum(p for p, _ in pairs))
    sw = float(sum(w for _, w in pairs))
    per = [1.0 - w / p for p, w in pairs if p > 0]
    return {"n": len(pairs), "plain": sp, "wrapped": sw, "relative_drop": (1.0 - sw / sp) if sp > 0 else None,
            "mean_pair_drop": float(np.mean(per)) if per else None}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The groups of the module docstring from the per-prompt rows."""
    pairs = [(r["plain"], name, t) for r in rows for name, t in r["templates"].items()]

    def group(pred: Any) -> dict[str, Any]:
        return drop([(p, t["activation"]) for p, name, t in pairs if pred(name, t)])

    templ = sorted({name for _, name, _ in pairs})
    return {
        "all": group(lambda n, t: True),
        "gated": {"jailbroken": group(lambda n, t: t["jailbroken"]),
                  "not_jailbroken": group(lambda n, t: not t["jailbroken"])},
        "ungated": {"jailbroken": group(lambda n, t: t["jailbroken"] or t["degenerate"]),
                    "not_jailbroken": group(lambda n, t: not (t["jailbroken"] or t["degenerate"]))},
        "per_template": {name: {**group(lambda n, t, name=name: n == name),
                                "jailbreak_rate": float(np.mean([t["jailbroken"] for _, n, t in pairs if n == name])),
                                "jailbreak_rate_ungated": float(np.mean([t["jailbroken"] or t["degenerate"]
                                                                         for _, n, t in pairs if n == name]))}
                         for name in templ},
        "n_pairs": len(pairs),
        "n_degenerate": sum(bool(t["degenerate"]) for _, _, t in pairs),
    }


def run_jailbreak_suppression(engine: Any, cfg: JailbreakSuppressionConfig, ctx: Any, judge: Any,
                              prompts: Sequence[str], latents: dict[int, list[int]]) -> dict[str, Any]:
    """Per prompt: A(plain), and per template A(wrapped), the greedy answer and its verdicts; summary."""
    t0 = time.perf_counter()
    if not prompts:
        raise ValueError("no prompts")
    tmpl = cfg.chosen()
    lat_key = latents_key(latents)
    base_fp = fingerprint([*(f"{k}\x01{v}" for k, v in tmpl.items()), lat_key,
                           cfg.model_dump_json(include={"chat", "last_n", "max_new_tokens"}),
                           str(getattr(judge, "name", type(judge).__name__))])
    fps = {i: fingerprint([t, base_fp]) for i, t in enumerate(prompts)}
    rows: dict[int, dict[str, Any]] = restore_items(ctx, "jailbreak_suppression", fps, dict, field="row")
    restored = len(rows)
    ctx.progress("jailbreak_suppression", restored, len(prompts))
    sp = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    names = list(tmpl)
    for idx in chunks([i for i in range(len(prompts)) if i not in rows], cfg.batch_size):
        ctx.check_cancelled()
        plain = activations(engine, [as_prompt(prompts[i], cfg.chat) for i in idx], latents, cfg.last_n, cfg.batch_size)
        pairs = [(i, name, as_prompt(wrap(tmpl[name], prompts[i]), cfg.chat)) for i in idx for name in names]
        acts = activations(engine, [p for _, _, p in pairs], latents, cfg.last_n, cfg.batch_size)
        comps: list[Any] = []
        for part in chunks(pairs, cfg.batch_size):
            comps.extend(engine.generate([Request(prompt=p, sampling=sp) for _, _, p in part]))
        verdicts = judge.judge([JudgeItem(behavior=prompts[i], generation=c.text, prompt=p)
                                for (i, _, p), c in zip(pairs, comps, strict=True)])
        if len(verdicts) != len(pairs):
            raise RuntimeError(f"the judge returned {len(verdicts)} verdicts for {len(pairs)} items")
        for k, i in enumerate(idx):
            row = {"index": i, "prompt": prompts[i], "plain": plain[k], "templates": {}}
            for (j, name, _), a, c, v in zip(pairs, acts, comps, verdicts, strict=True):
                if j == i:
                    row["templates"][name] = {"activation": a, "completion": c.text, "jailbroken": bool(v.jailbroken),
                                              "refused": bool(v.refused), "degenerate": bool(v.degenerate)}
            save_fingerprinted(ctx, f"jailbreak_suppression/{i}", fps[i], row=row)
            rows[i] = row
        ctx.progress("jailbreak_suppression", len(rows), len(prompts))
    per_prompt = [rows[i] for i in range(len(prompts))]
    return {"kind": "jailbreak_suppression", "latents": {str(k): v for k, v in latents.items()},
            "templates": names, "last_n": cfg.last_n, "judge": str(getattr(judge, "name", type(judge).__name__)),
            "summary": summarize(per_prompt), "resumed_prompts": restored, "per_prompt": per_prompt,
            "wall_s": time.perf_counter() - t0}
