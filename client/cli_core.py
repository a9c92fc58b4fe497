"""Core CLI commands: serve, info, generate, score, activations.

Rich tables for humans, `--json` for scripts. Client commands take `--server` ($REFUSAL_AUDIT_SERVER,
default localhost:50051) and `--token` ($REFUSAL_AUDIT_TOKEN). Intervention options (generate,
score, activations):

  --ablate LAYER:ID,ID,...          zero-ablate SAE latents (repeatable)
  --latent-set fs_...               ablate a registered latent set (repeatable)
  --clamp LAYER:ID=VALUE[,ID=VALUE] clamp SAE latents (repeatable)
  --scale LAYER:ID,ID,...@FACTOR    scale SAE latents by FACTOR (0 ablates, -3 flips; repeatable);
                                    SET_ID@FACTOR scales a registered latent set
  --ablate-direction ID[@L,L,...]   directional ablation (a registered id or a .npy file)
  --add-direction ID@LAYER[*COEF]   activation addition
  --scope all|prompt|generated|last:N|pos:P,P,...   token scope of every intervention above
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from ..audit.errors import InvalidRequest
from ..audit.spec import (
    AblateDirection,
    AblateLatents,
    AddDirection,
    ClampLatents,
    Intervention,
    Prompt,
    ScaleLatents,
    TokenScope,
    user_prompt,
)
from ._channel import DEFAULT_ADDRESS, SERVER_ENV, TOKEN_ENV
from .errors import RemoteError
from .sync import AuditClient

# ---------------------------------------------------------------------------- shared options

ServerOpt = Annotated[str, typer.Option("--server", envvar=SERVER_ENV, help="server host:port")]
TokenOpt = Annotated[str | None, typer.Option("--token", "--auth-token", envvar=TOKEN_ENV, help="bearer token")]
TlsCaOpt = Annotated[Path | None, typer.Option("--tls-ca", help="CA certificate (PEM) for a TLS server")]
TimeoutOpt = Annotated[float | None, typer.Option("--timeout", help="per-call deadline in seconds")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable JSON output")]
PromptsArg = Annotated[list[str] | None, typer.Argument(help="prompts (or use --file)", show_default=False)]
FileOpt = Annotated[Path | None, typer.Option("--file", "-f", help="prompts, one per line ('-' = stdin; .jsonl: {'prompt': ...})")]
ChatOpt = Annotated[bool, typer.Option("--chat/--raw", help="wrap prompts in the chat template (default) or send raw text")]
AblateOpt = Annotated[list[str] | None, typer.Option("--ablate", help="LAYER:ID,ID,... zero-ablate SAE latents")]
LatentSetOpt = Annotated[list[str] | None, typer.Option("--latent-set", help="ablate a registered latent set")]
ClampOpt = Annotated[list[str] | None, typer.Option("--clamp", help="LAYER:ID=VALUE or LAYER:ID=VALUE,ID=VALUE,...: clamp SAE latents")]
ScaleOpt = Annotated[list[str] | None, typer.Option("--scale", help="LAYER:ID,ID,...@FACTOR or SET_ID@FACTOR: multiply SAE latents by FACTOR (0 ablates, -3 flips)")]
AblateDirOpt = Annotated[list[str] | None, typer.Option("--ablate-direction", help="ID or ID@L,L,...: directional ablation at all (or these) layers; ID may be a .npy file")]
AddDirOpt = Annotated[list[str] | None, typer.Option("--add-direction", help="ID@LAYER or ID@LAYER*COEF: add a direction; ID may be a .npy file")]
ScopeOpt = Annotated[str, typer.Option("--scope", help="all | prompt | generated | last:N | pos:P,P,...")]

err_console = Console(stderr=True)


def _console() -> Console:
    """A stdout console created per command (so redirected/captured stdout is honoured)."""
    return Console(soft_wrap=False)


@contextmanager
def _errors() -> Iterator[None]:
    """Print server/input errors as one line and exit 1 (no traceback)."""
    try:
        yield
    except RemoteError as exc:
        err_console.print(f"[red]error[/red] {exc.code.name}: {exc.details}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    except InvalidRequest as exc:
        err_console.print(f"[red]error[/red] INVALID_ARGUMENT: {exc}", highlight=False)
        raise typer.Exit(1) from None


def _client(server: str, token: str | None, tls_ca: Path | None, timeout: float | None) -> AuditClient:
    return AuditClient(server, token=token, tls_ca=tls_ca, timeout=timeout)


# ---------------------------------------------------------------------------- parsing


def parse_scope(text: str) -> TokenScope:
    """all | prompt | generated | last:N | pos:P,P,... -> TokenScope."""
    t = text.strip().lower()
    try:
        if t in ("all", "prompt", "generated"):
            return TokenScope(kind=t)  # type: ignore[arg-type]
        if t.startswith("last:"):
            return TokenScope(kind="last_n_prompt", n=int(t[5:]))
        if t.startswith("pos:"):
            return TokenScope(kind="positions", positions=tuple(int(p) for p in t[4:].split(",") if p))
    except ValueError as exc:
        raise typer.BadParameter(f"--scope {text!r}: {exc}") from None
    raise typer.BadParameter(f"--scope must be all, prompt, generated, last:N or pos:P,P,..., got {text!r}")


def _int(text: str, opt: str, whole: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"{opt} {whole!r}: {text!r} is not an integer") from None


def parse_layer_ids(text: str, opt: str = "--ablate") -> tuple[int, list[int]]:
    """'LAYER:ID,ID,...' -> (layer, ids)."""
    if ":" not in text:
        raise typer.BadParameter(f"{opt} expects LAYER:ID,ID,..., got {text!r}")
    layer_s, ids_s = text.split(":", 1)
    ids = [_int(i.strip(), opt, text) for i in ids_s.split(",") if i.strip()]
    if not ids:
        raise typer.BadParameter(f"{opt} {text!r}: no latent ids")
    return _int(layer_s.strip(), opt, text), ids


def parse_clamp(text: str) -> tuple[int, list[tuple[int, float]]]:
    """'LAYER:ID=VALUE[,ID=VALUE]' -> (layer, [(id, value)])."""
    if ":" not in text:
        raise typer.BadParameter(f"--clamp expects LAYER:ID=VALUE[,ID=VALUE], got {text!r}")
    layer_s, rest = text.split(":", 1)
    pairs = []
    for part in rest.split(","):
        if "=" not in part:
            raise typer.BadParameter(f"--clamp expects LAYER:ID=VALUE[,ID=VALUE], got {text!r}")
        i, v = part.split("=", 1)
        try:
            pairs.append((_int(i.strip(), "--clamp", text), float(v)))
        except ValueError:
            raise typer.BadParameter(f"--clamp {text!r}: {v!r} is not a number") from None
    return _int(layer_s.strip(), "--clamp", text), pairs


def parse_scale(text: str, scope: TokenScope) -> ScaleLatents:
    """'LAYER:ID,ID,...@FACTOR' or 'SET_ID@FACTOR' -> ScaleLatents."""
    target, sep, factor_s = text.rpartition("@")
    if not sep or not target.strip():
        raise typer.BadParameter(f"--scale expects LAYER:ID,ID,...@FACTOR or SET_ID@FACTOR, got {text!r}")
    try:
        factor = float(factor_s)
    except ValueError:
        raise typer.BadParameter(f"--scale {text!r}: {factor_s!r} is not a number") from None
    if not np.isfinite(factor):
        raise typer.BadParameter(f"--scale {text!r}: the factor must be finite")
    if ":" in target:
        layer, ids = parse_layer_ids(target, "--scale")
        return ScaleLatents(latents={layer: tuple(ids)}, factor=factor, scope=scope)
    return ScaleLatents(latent_set_id=target.strip(), factor=factor, scope=scope)


def _direction_ref(ref: str) -> dict[str, Any]:
    """A registered id, or a .npy file of d_model floats sent inline."""
    if ref.endswith(".npy"):
        path = Path(ref).expanduser()
        if not path.exists():
            raise typer.BadParameter(f"direction file {ref!r} does not exist")
        return {"direction": tuple(float(x) for x in np.load(path).astype(np.float32).ravel())}
    return {"direction_id": ref}


def parse_add_direction(text: str, scope: TokenScope) -> AddDirection:
    """'ID@LAYER[*COEF]' -> AddDirection."""
    if "@" not in text:
        raise typer.BadParameter(f"--add-direction expects ID@LAYER[*COEF], got {text!r}")
    ref, rest = text.rsplit("@", 1)
    layer_s, _, coef_s = rest.partition("*")
    try:
        coef = float(coef_s) if coef_s else 1.0
    except ValueError:
        raise typer.BadParameter(f"--add-direction {text!r}: {coef_s!r} is not a number") from None
    return AddDirection(**_direction_ref(ref), layer=_int(layer_s, "--add-direction", text), coefficient=coef, scope=scope)


def parse_ablate_direction(text: str, scope: TokenScope) -> AblateDirection:
    """'ID[@L,L,...]' -> AblateDirection (all layers by default)."""
    ref, _, layers_s = text.partition("@")
    layers = tuple(_int(x, "--ablate-direction", text) for x in layers_s.split(",") if x.strip())
    return AblateDirection(**_direction_ref(ref), layers=layers, scope=scope)


def build_interventions(
    ablate: Sequence[str] | None = None,
    latent_set: Sequence[str] | None = None,
    clamp: Sequence[str] | None = None,
    ablate_direction: Sequence[str] | None = None,
    add_direction: Sequence[str] | None = None,
    scope: str = "all",
    scale: Sequence[str] | None = None,
) -> list[Intervention]:
    """The intervention list the CLI options describe (one ablation and one clamp op, merged per layer;
    one scale op per factor, explicit latents merged per layer)."""
    sc = parse_scope(scope)
    out: list[Intervention] = []
    latents: dict[int, list[int]] = {}
    for a in ablate or ():
        layer, ids = parse_layer_ids(a)
        latents.setdefault(layer, []).extend(ids)
    if latents:
        out.append(AblateLatents(latents={k: tuple(v) for k, v in latents.items()}, scope=sc))
    for set_id in latent_set or ():
        out.append(AblateLatents(latent_set_id=set_id, scope=sc))
    c_ids: dict[int, list[int]] = {}
    c_vals: dict[int, list[float]] = {}
    for c in clamp or ():
        layer, pairs = parse_clamp(c)
        c_ids.setdefault(layer, []).extend(i for i, _ in pairs)
        c_vals.setdefault(layer, []).extend(v for _, v in pairs)
    if c_ids:
        out.append(ClampLatents(latents={k: tuple(v) for k, v in c_ids.items()},
                                values={k: tuple(v) for k, v in c_vals.items()}, scope=sc))
    s_ids: dict[float, dict[int, list[int]]] = {}
    for text in scale or ():
        op = parse_scale(text, sc)
        if op.latent_set_id:
            out.append(op)
            continue
        merged = s_ids.setdefault(op.factor, {})
        for layer, ids in op.latents.items():
            merged.setdefault(layer, []).extend(ids)
    for factor, by_layer in s_ids.items():
        out.append(ScaleLatents(latents={k: tuple(v) for k, v in by_layer.items()}, factor=factor, scope=sc))
    out.extend(parse_ablate_direction(d, sc) for d in ablate_direction or ())
    out.extend(parse_add_direction(d, sc) for d in add_direction or ())
    return out


def read_prompts(prompts: Sequence[str] | None, file: Path | None, chat: bool) -> tuple[list[str], list[Prompt]]:
    """(display texts, prompts) from arguments and/or a file; chat wraps each in the chat template."""
    texts = list(prompts or [])
    if file is not None:
        raw = sys.stdin.read() if str(file) == "-" else file.read_text()
        for line in raw.splitlines():
            if not line.strip():
                continue
            if file.suffix == ".jsonl":
                obj = json.loads(line)
                texts.append(obj if isinstance(obj, str) else str(obj.get("prompt") or obj.get("instruction") or ""))
            else:
                texts.append(line)
    if not texts:
        raise typer.BadParameter("give at least one prompt (arguments or --file)")
    return texts, [user_prompt(t) if chat else t for t in texts]


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, indent=2))


# ---------------------------------------------------------------------------- commands


def register(app: typer.Typer) -> None:
    """Attach the core commands to the main app."""

    @app.command("serve")
    def serve_cmd(
        model: Annotated[str, typer.Option("--model", "-m", help="hub id or local path of the chat model")],
        sae: Annotated[list[str] | None, typer.Option("--sae", help="LAYER=release:sae_id or LAYER=/path (repeatable)")] = None,
        port: Annotated[int, typer.Option("--port", "-p")] = 50051,
        host: Annotated[str, typer.Option("--host", help="bind address (0.0.0.0 in a container)")] = "127.0.0.1",
        engine: Annotated[str, typer.Option("--engine", help="hf | vllm")] = "hf",
        data_dir: Annotated[Path, typer.Option("--data-dir", help="artifacts and jobs (SQLite + safetensors)")] = Path("data"),
        judge: Annotated[str, typer.Option("--judge", help="'substring' or host:port of a JudgeService")] = "substring",
        token: Annotated[str | None, typer.Option("--token", envvar=TOKEN_ENV, help="require this bearer token")] = None,
        tls_cert: Annotated[Path | None, typer.Option("--tls-cert")] = None,
        tls_key: Annotated[Path | None, typer.Option("--tls-key")] = None,
        metrics_port: Annotated[int | None, typer.Option("--metrics-port", help="Prometheus /metrics port")] = None,
        max_inflight: Annotated[int, typer.Option("--max-inflight", help="queued+running engine requests")] = 64,
        max_prompt_tokens: Annotated[int, typer.Option("--max-prompt-tokens")] = 4096,
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 1024,
        max_batch_items: Annotated[int, typer.Option("--max-batch-items")] = 256,
        max_latents_per_request: Annotated[int, typer.Option("--max-latents-per-request")] = 65536,
        default_max_new_tokens: Annotated[int, typer.Option("--default-max-new-tokens", help="when a request says 0")] = 64,
        max_concurrent_jobs: Annotated[int, typer.Option("--max-concurrent-jobs")] = 1,
        batch_window_ms: Annotated[float, typer.Option("--batch-window-ms", help="HF batching: collect until no call arrived for this long (or a tenth of a decode step, if longer)")] = 5.0,
        batch_max_wait_ms: Annotated[float, typer.Option("--batch-max-wait-ms", help="HF batching: longest collection window")] = 50.0,
        batch_max_tokens: Annotated[int, typer.Option("--batch-max-tokens", help="padded tokens per HF batch")] = 16384,
        batch_join_ratio: Annotated[float, typer.Option(
            "--batch-join-ratio", help="HF batching: Generate calls join a running generation once they number "
            "this x its rows (each join costs the running rows one prefill)")] = 0.25,
        batch_join_wait_steps: Annotated[int, typer.Option(
            "--batch-join-wait-steps", help="HF batching: ... or once the oldest has waited this many decode steps")] = 4,
        batch_interleave: Annotated[float, typer.Option(
            "--batch-interleave", help="HF batching: while rows generate, a prompt-only batch or a join between two decode "
            "steps takes about this x a step (inf: all at once, holding the streams)")] = 4.0,
        batch_invariant: Annotated[bool | None, typer.Option(
            "--batch-invariant/--no-batch-invariant", help="HF engine: every row bit-identical to the row run "
            "alone, whatever shares its batch (slower single requests; docs/engines.md). Default: on where "
            "the BLAS allows it")] = None,
        dtype: Annotated[str, typer.Option("--dtype")] = "float32",
        device: Annotated[str, typer.Option("--device")] = "cpu",
        grace: Annotated[float, typer.Option("--grace", help="drain period on SIGTERM (s)")] = 10.0,
        log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
        ray_address: Annotated[str | None, typer.Option(
            "--ray", help="engine replicas as Ray actors: 'auto' (a running cluster), 'local', or an address "
            "(needs the [ray] extra)")] = None,
        replicas: Annotated[int, typer.Option("--replicas", help="engine replicas with --ray")] = 2,
        tensor_parallel_size: Annotated[int, typer.Option(
            "--tensor-parallel-size", help="--engine vllm: GPUs (ranks) per model; hooks on every rank")] = 1,
        vllm_compiled: Annotated[bool, typer.Option(
            "--vllm-compiled", help="--engine vllm: torch.compile + piecewise CUDA graphs, hooks as a custom op "
            "(default: eager)")] = False,
        vllm_fused_hook: Annotated[bool, typer.Option(
            "--vllm-fused-hook/--no-vllm-fused-hook", help="--engine vllm on CPU: decode tokens' latent hook in one "
            "fused C pass (built with the system's C compiler; without one the slot path runs)")] = True,
        replica_cpus: Annotated[float, typer.Option("--replica-cpus", help="CPUs per replica (--ray)")] = 1.0,
        replica_gpus: Annotated[float, typer.Option("--replica-gpus", help="GPUs per replica (--ray; 1 on GPUs)")] = 0.0,
    ) -> None:
        """Serve a model with SAE hooks over gRPC until SIGTERM (then drain)."""
        import asyncio
        import logging

        from pydantic import ValidationError

        from ..server.app import serve
        from ..server.config import LimitsConfig, RayConfig, ServerConfig

        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            config = ServerConfig(
                model=model, saes=list(sae or []), engine=engine, host=host, port=port,  # type: ignore[arg-type]
                data_dir=data_dir, judge=judge, auth_token=token, tls_cert=tls_cert, tls_key=tls_key,
                metrics_port=metrics_port, max_inflight=max_inflight, max_concurrent_jobs=max_concurrent_jobs,
                dtype=dtype, device=device, grace_s=grace, batch_window_ms=batch_window_ms,
                batch_max_wait_ms=batch_max_wait_ms, batch_max_tokens=batch_max_tokens, batch_invariant=batch_invariant,
                batch_join_ratio=batch_join_ratio, batch_join_wait_steps=batch_join_wait_steps,
                batch_interleave=batch_interleave,
                tensor_parallel_size=tensor_parallel_size, vllm_compiled=vllm_compiled, vllm_fused_hook=vllm_fused_hook,
                ray=None if ray_address is None else RayConfig(
                    address=ray_address, replicas=replicas, num_cpus=replica_cpus, num_gpus=replica_gpus),
                limits=LimitsConfig(max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                                    max_batch_items=max_batch_items, max_latents_per_request=max_latents_per_request,
                                    default_max_new_tokens=default_max_new_tokens),
            )
        except ValidationError as exc:
            raise typer.BadParameter(str(exc)) from None

        def ready(handle: Any) -> None:
            print(f"serving {model} on {handle.address}", file=sys.stderr, flush=True)  # one line, never wrapped

        try:
            asyncio.run(serve(config, ready=ready))
        except (InvalidRequest, ValueError, RuntimeError) as exc:
            err_console.print(f"[red]error[/red] {exc}", highlight=False)
            raise typer.Exit(1) from None

    @app.command("info")
    def info_cmd(
        server: ServerOpt = DEFAULT_ADDRESS, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
        timeout: TimeoutOpt = 30.0, as_json: JsonOpt = False,
    ) -> None:
        """Model, layers, SAEs, special token ids and limits of a server."""
        with _errors(), _client(server, token, tls_ca, timeout) as c:
            info = c.get_info()
            limits = c.limits
        data = {
            "model": info.model, "architecture": info.architecture, "engine": info.engine, "dtype": info.dtype,
            "n_layers": info.n_layers, "d_model": info.d_model, "vocab_size": info.vocab_size,
            "bos_token_id": info.bos_token_id, "eos_token_ids": list(info.eos_token_ids),
            "pad_token_id": info.pad_token_id, "n_post_instruction_tokens": info.n_post_instruction_tokens,
            "special_token_ids": info.special_token_ids, "batch_invariant": info.batch_invariant,
            "saes": [s.__dict__ for s in info.saes], "limits": limits.__dict__,
        }
        if as_json:
            _echo_json(data)
            return
        con = _console()
        t = Table(title=f"{info.model} ({info.engine}, {info.dtype})", show_header=False)
        for k in ("architecture", "n_layers", "d_model", "vocab_size", "bos_token_id", "eos_token_ids",
                  "pad_token_id", "n_post_instruction_tokens", "batch_invariant"):
            t.add_row(k, str(data[k]))
        t.add_row("special tokens", ", ".join(f"{k}={v}" for k, v in info.special_token_ids.items()))
        t.add_row("limits", ", ".join(f"{k}={v}" for k, v in limits.__dict__.items()))
        con.print(t)
        st = Table(title="SAEs")
        for col in ("layer", "source", "architecture", "d_in", "d_sae", "separable"):
            st.add_column(col)
        for s in info.saes:
            st.add_row(str(s.layer), s.source, s.architecture, str(s.d_in), str(s.d_sae), str(s.separable))
        con.print(st)

    @app.command("generate")
    def generate_cmd(
        prompts: PromptsArg = None, file: FileOpt = None, chat: ChatOpt = True,
        ablate: AblateOpt = None, latent_set: LatentSetOpt = None, clamp: ClampOpt = None, scale: ScaleOpt = None,
        ablate_direction: AblateDirOpt = None, add_direction: AddDirOpt = None, scope: ScopeOpt = "all",
        max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", "-n", help="default: the server's")] = None,
        temperature: Annotated[float, typer.Option("--temperature", "-t")] = 0.0,
        top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
        seed: Annotated[int | None, typer.Option("--seed")] = None,
        ignore_eos: Annotated[bool, typer.Option(
            "--ignore-eos", help="do not stop at the model's end-of-sequence / end-of-turn tokens")] = False,
        stream: Annotated[bool, typer.Option("--stream", help="print tokens as they arrive (one prompt)")] = False,
        server: ServerOpt = DEFAULT_ADDRESS, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
        timeout: TimeoutOpt = None, as_json: JsonOpt = False,
    ) -> None:
        """Generate completions under interventions."""
        texts, ps = read_prompts(prompts, file, chat)
        with _errors():
            ivs = build_interventions(ablate, latent_set, clamp, ablate_direction, add_direction, scope, scale)
            sampling: dict[str, Any] = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                            seed=seed, ignore_eos=ignore_eos or None)
            with _client(server, token, tls_ca, timeout) as c:
                if stream and not as_json:
                    if len(ps) != 1:
                        raise typer.BadParameter("--stream takes exactly one prompt")
                    for ev in c.generate_stream(ps[0], ivs, **sampling):
                        sys.stdout.write(ev.text_delta)
                        sys.stdout.flush()
                    sys.stdout.write("\n")
                    return
                comps = c.generate(ps, ivs, **sampling)
        if as_json:
            _echo_json([{"prompt": t, **c.__dict__} for t, c in zip(texts, comps, strict=True)])
            return
        con = _console()
        for t, comp in zip(texts, comps, strict=True):
            con.print(Panel(comp.text, title=t, subtitle=f"{comp.finish_reason}, {len(comp.token_ids)} tokens",
                            title_align="left", highlight=False))

    @app.command("score")
    def score_cmd(
        prompts: PromptsArg = None, file: FileOpt = None, chat: ChatOpt = True,
        token_id: Annotated[list[int] | None, typer.Option("--token-id", help="token id to score (repeatable)")] = None,
        target_token: Annotated[list[str] | None, typer.Option(
            "--target-token", help="token text to score, e.g. I (repeatable); --token is the bearer token")] = None,
        top_k: Annotated[int, typer.Option("--top-k", help="also show the k most likely next tokens")] = 0,
        ablate: AblateOpt = None, latent_set: LatentSetOpt = None, clamp: ClampOpt = None, scale: ScaleOpt = None,
        ablate_direction: AblateDirOpt = None, add_direction: AddDirOpt = None, scope: ScopeOpt = "all",
        server: ServerOpt = DEFAULT_ADDRESS, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
        timeout: TimeoutOpt = None, as_json: JsonOpt = False,
    ) -> None:
        """Next-token log-probabilities after each prompt (default: the token "I", the refusal score)."""
        texts, ps = read_prompts(prompts, file, chat)
        with _errors(), _client(server, token, tls_ca, timeout) as c:
            ivs = build_interventions(ablate, latent_set, clamp, ablate_direction, add_direction, scope, scale)
            info = c.info
            named: list[tuple[str, int]] = []
            for tt in target_token or ():
                if tt in info.special_token_ids:
                    named.append((tt, info.special_token_ids[tt]))
                    continue
                ids = c.tokenize(tt, raw=True)[0]
                if len(ids) != 1:
                    raise typer.BadParameter(f"--target-token {tt!r} is {len(ids)} tokens {ids}; use --token-id")
                named.append((tt, ids[0]))
            named.extend((f"#{i}", int(i)) for i in token_id or ())
            if not named:
                if "I" not in info.special_token_ids:
                    raise typer.BadParameter("give --target-token or --token-id (this model has no 'I' token)")
                named.append(("I", info.special_token_ids["I"]))
            results = c.score(ps, [i for _, i in named], top_k=top_k, interventions=ivs)
        rows = []
        for t, r in zip(texts, results, strict=True):
            entry: dict[str, Any] = {
                "prompt": t,
                "tokens": [{"token": n, "token_id": i, "logprob": float(lp), "prob": float(np.exp(lp))}
                           for (n, i), lp in zip(named, r.logprobs, strict=True)],
            }
            if r.top_token_ids is not None and r.top_logprobs is not None:
                entry["top"] = [{"token_id": int(i), "logprob": float(lp)} for i, lp in zip(r.top_token_ids, r.top_logprobs, strict=True)]
            rows.append(entry)
        if as_json:
            _echo_json(rows)
            return
        table = Table(title="next-token scores")
        table.add_column("prompt", overflow="fold")
        for n, i in named:
            table.add_column(f"P({n}) [{i}]", justify="right")
        if top_k:
            table.add_column(f"top-{top_k} ids (logprob)", overflow="fold")
        for e in rows:
            cells = [e["prompt"], *[f"{x['prob']:.4f}" for x in e["tokens"]]]
            if top_k:
                cells.append(" ".join(f"{x['token_id']}({x['logprob']:.2f})" for x in e.get("top", [])))
            table.add_row(*cells)
        _console().print(table)

    @app.command("activations")
    def activations_cmd(
        prompts: PromptsArg = None, file: FileOpt = None, chat: ChatOpt = True,
        layer: Annotated[list[int] | None, typer.Option("--layer", "-l", help="SAE layer (repeatable; default all)")] = None,
        top_k: Annotated[int, typer.Option("--top-k", "-k", help="top latents per token")] = 8,
        latent: Annotated[list[str] | None, typer.Option("--latent", help="LAYER:ID,ID these latents' activations instead")] = None,
        ablate: AblateOpt = None, latent_set: LatentSetOpt = None, clamp: ClampOpt = None, scale: ScaleOpt = None,
        ablate_direction: AblateDirOpt = None, add_direction: AddDirOpt = None, scope: ScopeOpt = "all",
        server: ServerOpt = DEFAULT_ADDRESS, token: TokenOpt = None, tls_ca: TlsCaOpt = None,
        timeout: TimeoutOpt = None, as_json: JsonOpt = False,
    ) -> None:
        """SAE latent activations per token and layer (top-k, or chosen latents), under interventions."""
        texts, ps = read_prompts(prompts, file, chat)
        chosen: dict[int, list[int]] = {}
        for spec in latent or ():
            ly, ids = parse_layer_ids(spec, "--latent")
            chosen.setdefault(ly, []).extend(ids)
        with _errors(), _client(server, token, tls_ca, timeout) as c:
            ivs = build_interventions(ablate, latent_set, clamp, ablate_direction, add_direction, scope, scale)
            results = c.encode(ps, layers=layer or None, top_k=top_k, latents=chosen or None, interventions=ivs)
        out = []
        for t, r in zip(texts, results, strict=True):
            layers: dict[str, Any] = {}
            for ly, la in sorted(r.layers.items()):
                if la.values is not None and la.latents is not None:
                    layers[str(ly)] = {"latents": la.latents.tolist(), "values": la.values.tolist()}
                else:
                    layers[str(ly)] = [
                        {"latents": ix.tolist(), "values": [float(v) for v in vals]}
                        for ix, vals in zip(la.top_indices or [], la.top_values or [], strict=True)
                    ]
            out.append({"prompt": t, "token_ids": r.token_ids, "tokens": r.tokens, "layers": layers})
        if as_json:
            _echo_json(out)
            return
        con = _console()
        for entry in out:
            for ly, acts in entry["layers"].items():
                table = Table(title=f"{entry['prompt']} — layer {ly}", title_justify="left")
                table.add_column("pos", justify="right")
                table.add_column("token")
                if isinstance(acts, dict):
                    for lat in acts["latents"]:
                        table.add_column(f"#{lat}", justify="right")
                    for p, (tok, vals) in enumerate(zip(entry["tokens"], acts["values"], strict=True)):
                        table.add_row(str(p), repr(tok), *[f"{v:.3f}" for v in vals])
                else:
                    table.add_column("top latents (activation)", overflow="fold")
                    for p, (tok, a) in enumerate(zip(entry["tokens"], acts, strict=True)):
                        table.add_row(str(p), repr(tok), "  ".join(
                            f"{i}({v:.2f})" for i, v in zip(a["latents"], a["values"], strict=True)))
                con.print(table)
