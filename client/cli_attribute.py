"""`refusal-audit attribute`: gradient attribution of a metric to SAE latents (docs/attribution.md)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from ..audit.attribution import AttributionScope, Baseline, LogitDiff, LogProb
from .cli_core import (
    DEFAULT_ADDRESS,
    AblateDirOpt,
    AblateOpt,
    AddDirOpt,
    ChatOpt,
    ClampOpt,
    FileOpt,
    JsonOpt,
    LatentSetOpt,
    PromptsArg,
    ScopeOpt,
    ServerOpt,
    TimeoutOpt,
    TlsCaOpt,
    TokenOpt,
    _client,
    _console,
    _echo_json,
    _errors,
    build_interventions,
    parse_layer_ids,
    read_prompts,
)
from .sync import AuditClient


def token_id(c: AuditClient, text: str, opt: str) -> int:
    """A token id from '#123', a special token name, or text that is exactly one token."""
    if text.startswith("#") and text[1:].lstrip("-").isdigit():
        return int(text[1:])
    info = c.info
    if text in info.special_token_ids:
        return info.special_token_ids[text]
    ids = c.tokenize(text, raw=True)[0]
    if len(ids) != 1:
        raise typer.BadParameter(f"{opt} {text!r} is {len(ids)} tokens {ids}; use {opt} '#ID'")
    return ids[0]


def parse_attr_scope(text: str) -> AttributionScope:
    """after_bos | all | last:N | pos:P,P,..."""
    if text in ("after_bos", "all"):
        return AttributionScope(kind=text)  # type: ignore[arg-type]
    kind, _, rest = text.partition(":")
    try:
        if kind == "last":
            return AttributionScope(kind="last_n", n=int(rest))
        if kind == "pos":
            return AttributionScope(kind="positions", positions=tuple(int(x) for x in rest.split(",") if x.strip()))
    except ValueError:
        pass
    raise typer.BadParameter(f"--attr-scope expects after_bos | all | last:N | pos:P,P,..., got {text!r}")


def register(app: typer.Typer) -> None:
    """Attach `attribute` to the main app."""

    @app.command("attribute")
    def attribute_cmd(
        prompts: PromptsArg = None, file: FileOpt = None, chat: ChatOpt = True,
        positive: Annotated[str | None, typer.Option("--positive", help="metric logit(POSITIVE) - logit(NEGATIVE); token text or '#ID'")] = None,
        negative: Annotated[str, typer.Option("--negative", help="the subtracted token (default I)")] = "I",
        logprob: Annotated[str | None, typer.Option("--logprob", help="metric log P(TOKEN) instead")] = None,
        method: Annotated[str, typer.Option("--method", help="ig | atp")] = "ig",
        steps: Annotated[int, typer.Option("--steps", help="ig steps (0 = 10)")] = 0,
        rule: Annotated[str, typer.Option("--rule", help="ig: left | midpoint")] = "left",
        baseline: Annotated[str, typer.Option("--baseline", help="zero | mean:PROMPT_SET_ID | interventions (the --ablate* options)")] = "zero",
        layer: Annotated[list[int] | None, typer.Option("--layer", "-l", help="SAE layer (repeatable; default all)")] = None,
        top_k: Annotated[int, typer.Option("--top-k", "-k", help="top latents per layer")] = 20,
        latent: Annotated[list[str] | None, typer.Option("--latent", help="LAYER:ID,ID also return these latents")] = None,
        attr_scope: Annotated[str, typer.Option("--attr-scope", help="after_bos | all | last:N | pos:P,P,...")] = "after_bos",
        per_position: Annotated[bool, typer.Option("--per-position", help="scores per position too")] = False,
        ablate: AblateOpt = None, latent_set: LatentSetOpt = None, clamp: ClampOpt = None,
        ablate_direction: AblateDirOpt = None, add_direction: AddDirOpt = None, scope: ScopeOpt = "all",
        server: ServerOpt = DEFAULT_ADDRESS, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
        timeout: TimeoutOpt = None, as_json: JsonOpt = False,
    ) -> None:
        """Attribute a metric to SAE latents (integrated gradients or attribution patching)."""
        texts, ps = read_prompts(prompts, file, chat)
        chosen: dict[int, tuple[int, ...]] = {}
        for spec in latent or ():
            ly, ids = parse_layer_ids(spec, "--latent")
            chosen[ly] = chosen.get(ly, ()) + tuple(ids)
        with _errors(), _client(server, token, tls_ca, timeout) as c:
            ivs = build_interventions(ablate, latent_set, clamp, ablate_direction, add_direction, scope)
            if baseline == "zero":
                base = Baseline()
            elif baseline.startswith("mean:"):
                base = Baseline(kind="mean", reference_set_id=baseline[5:])
            elif baseline == "interventions":
                if not ivs:
                    raise typer.BadParameter("--baseline interventions needs --ablate-direction, --ablate, ...")
                base = Baseline(kind="interventions", interventions=tuple(ivs))
            else:
                raise typer.BadParameter(f"--baseline expects zero | mean:ID | interventions, got {baseline!r}")
            if ivs and baseline != "interventions":
                raise typer.BadParameter("intervention options only define the baseline here: add --baseline interventions")
            metric: LogitDiff | LogProb
            if logprob is not None:
                metric = LogProb(token=token_id(c, logprob, "--logprob"))
            elif positive is not None:
                metric = LogitDiff(positive=token_id(c, positive, "--positive"), negative=token_id(c, negative, "--negative"))
            else:
                raise typer.BadParameter("give --positive (a logit difference against --negative) or --logprob")
            resp = c.attribute(ps, metric, method=method, n_steps=steps, rule=rule, baseline=base,
                               layers=tuple(layer or ()), scope=parse_attr_scope(attr_scope), top_k=top_k,
                               latents=chosen, per_position=per_position)
        out: list[dict[str, Any]] = []
        for t, r in zip(texts, resp.results, strict=True):
            out.append({
                "prompt": t, "metric_clean": r.metric_clean, "metric_baseline": r.metric_baseline,
                "metric_patched": r.metric_patched, "positions": r.positions,
                "layers": {str(ly): {"latents": la.latents.tolist(), "scores": [float(v) for v in la.scores],
                                     "error": la.error, "total": la.total,
                                     **({"per_position": la.per_position.tolist()} if la.per_position is not None else {})}
                           for ly, la in sorted(r.layers.items())},
            })
        if as_json:
            _echo_json({"results": out, "forward_passes": resp.forward_passes,
                        "backward_passes": resp.backward_passes, "wall_s": resp.wall_s})
            return
        con = _console()
        for entry in out:
            table = Table(title=(f"{entry['prompt']} — metric clean {entry['metric_clean']:.3f}, baseline "
                                 f"{entry['metric_baseline']:.3f}, patched {entry['metric_patched']:.3f}"),
                          title_justify="left")
            table.add_column("layer", justify="right")
            table.add_column("latent", justify="right")
            table.add_column("attribution", justify="right")
            for ly, la in entry["layers"].items():
                for i, v in zip(la["latents"], la["scores"], strict=True):
                    table.add_row(ly, str(i), f"{v:+.4f}")
                table.add_row(ly, "error", f"{la['error']:+.4f}")
                table.add_row(ly, "all latents", f"{la['total']:+.4f}")
            con.print(table)
        con.print(f"{resp.forward_passes} forward + {resp.backward_passes} backward passes (per prompt row), {resp.wall_s:.2f} s")
