"""`refusal-audit job start|watch|cancel|list|show` and `refusal-audit report JOB_ID`.

    refusal-audit job start refusal_rate --config '{"n": 16}' --watch
    refusal-audit job start stage1 --config @stage1.json --set direction_job_id=job_0123...
    refusal-audit job watch JOB_ID          # live progress bar: stage, done/total, ETA
    refusal-audit job list --kind stage2
    refusal-audit job show JOB_ID --json    # job + result + artifacts as JSON
    refusal-audit report JOB_ID --out report/

Every command takes --server (env REFUSAL_AUDIT_SERVER) and --token (env REFUSAL_AUDIT_TOKEN).
Exit status: 0 on success; 1 for a server error or a job that FAILED / was CANCELLED (watch).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import typer

SERVER_HELP = "host:port of the server (env REFUSAL_AUDIT_SERVER, default localhost:50051)"
TOKEN_HELP = "bearer token (env REFUSAL_AUDIT_TOKEN)"
STATE_STYLE = {"QUEUED": "yellow", "RUNNING": "cyan", "SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "magenta"}

ServerOpt = typer.Option(None, "--server", "-s", envvar="REFUSAL_AUDIT_SERVER", help=SERVER_HELP)
TokenOpt = typer.Option(None, "--token", envvar="REFUSAL_AUDIT_TOKEN", help=TOKEN_HELP)
TlsOpt = typer.Option(None, "--tls-ca", help="CA certificate (PEM) for a TLS server")


# ---------------------------------------------------------------------------- helpers


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


@contextmanager
def _client(server: str | None, token: str | None, tls_ca: Path | None) -> Iterator[Any]:
    """An AuditClient whose server errors become a one-line message and exit status 1."""
    from .errors import RemoteError
    from .sync import AuditClient

    client = AuditClient(server, token=token, tls_ca=str(tls_ca) if tls_ca else None)
    try:
        if client.jobs is None:  # pragma: no cover - jobs.py is beside this file
            _err("this client has no jobs API")
            raise typer.Exit(1)
        yield client
    except RemoteError as exc:
        _err(f"error: {exc}")
        raise typer.Exit(1) from None
    finally:
        client.close()


def parse_config(config: str | None, sets: list[str] | None) -> dict[str, Any]:
    """`--config` JSON text or @file.json, then `--set a.b=value` overrides (value parsed as JSON
    when it parses, else taken as a string)."""
    data: dict[str, Any] = {}
    if config:
        text = Path(config[1:]).read_text(encoding="utf-8") if config.startswith("@") else config
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="--config") from None
        if not isinstance(data, dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--config")
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise typer.BadParameter(f"{key}: {p} is not an object", param_hint="--set")
        node[last] = value
    return data


def _when(ts: float, short: bool = False) -> str:
    fmt = "%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S"
    return datetime.fromtimestamp(ts).strftime(fmt) if ts else "-"


def _eta(s: float) -> str:
    if s <= 0:
        return "-"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _elapsed(job: Any) -> str:
    """Run time of the job so far (server timestamps): started -> finished or now."""
    if not job.started_at:
        return "-"
    end = job.finished_at if job.terminal and job.finished_at else time.time()
    return _eta(max(end - job.started_at, 0.0)) if end - job.started_at >= 1 else "0:00"


def _progress(job: Any) -> str:
    return f"{job.done}/{job.total}" if job.total else "-"


def _summary(result: dict[str, Any], limit: int = 12) -> list[tuple[str, str]]:
    """The scalar top-level fields of a result (and of its summary), for `show`."""
    rows = []
    for key, value in list(result.items()) + list((result.get("summary") or {}).items()):
        if isinstance(value, (str, int, float, bool)) or value is None:
            rows.append((key, f"{value:.4g}" if isinstance(value, float) else str(value)))
    return rows[:limit]


def placement_lines(placement: Any) -> list[str]:
    """'replicas:' then one line per engine replica with the units it ran (jobs fanned out on Ray)."""
    if not isinstance(placement, dict) or not placement:
        return []
    ran: dict[str, list[str]] = {}
    for unit, where in placement.items():
        names = where.items() if isinstance(where, dict) else [("", where)]
        for part, replica in names:
            ran.setdefault(str(replica), []).append(f"{unit} {part}".strip())
    return ["replicas:"] + [f"  {r}: {len(units)} units: {', '.join(sorted(units))}" for r, units in sorted(ran.items())]


def watch_job(jobs: Any, job_id: str, partials: bool = False, reconnect_s: float = 60.0) -> Any:
    """Live rich progress bar until the job is terminal; reconnects while the server restarts."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .errors import RemoteError

    console = Console(stderr=True)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("ETA {task.fields[eta]}"), TextColumn("elapsed {task.fields[elapsed]}"),
               TextColumn("{task.fields[state]}")]
    last = None
    lost_since: float | None = None
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(job_id, total=None, eta="-", elapsed="-", state="")
        while True:
            try:
                for ev in jobs.watch(job_id):
                    lost_since = None
                    last = job = ev.job
                    style = STATE_STYLE.get(job.state, "white")
                    bar.update(task, description=job.stage or job.kind, completed=job.done,
                               total=job.total or None, eta=_eta(job.eta_s) if not job.terminal else "-",
                               elapsed=_elapsed(job), state=f"[{style}]{job.state}")
                    if partials and ev.partial is not None:
                        bar.console.print(json.dumps(ev.partial), markup=False, highlight=False)
                if last is not None and last.terminal:
                    break
            except RemoteError as exc:
                import grpc

                if exc.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > reconnect_s:
                    raise
                bar.update(task, state="[yellow]server unavailable, reconnecting")
                time.sleep(1.0)
    return last


def _print_job(job: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(show_header=False, box=None)
    style = STATE_STYLE.get(job.state, "white")
    rows = [("id", job.id), ("kind", job.kind), ("state", f"[{style}]{job.state}"),
            ("progress", f"{job.stage or '-'} {_progress(job)}" + (f" ETA {_eta(job.eta_s)}" if job.eta_s else "")),
            ("attempts", str(job.attempts)), ("created", _when(job.created_at)), ("started", _when(job.started_at)),
            ("finished", _when(job.finished_at))]
    if job.error:
        rows.append(("error", f"[red]{job.error}"))
    if job.artifact_ids:
        rows.append(("artifacts", ", ".join(job.artifact_ids)))
    rows.append(("config", json.dumps(job.config, sort_keys=True)))
    for k, v in rows:
        t.add_row(f"[bold]{k}", v)
    Console().print(t)


def _strip_arrays(obj: Any) -> Any:
    """Drop `arrays` entries (raw arrays: kept server-side as safetensors) for the report."""
    if isinstance(obj, dict):
        return {k: _strip_arrays(v) for k, v in obj.items() if k != "arrays"}
    if isinstance(obj, list):
        return [_strip_arrays(v) for v in obj]
    return obj


def report_inputs(kind: str, result: dict[str, Any]) -> dict[str, Any]:
    """{name: result} for `write_report`: a chain's parts, or the one stage's result."""
    if "kind" not in result and all(isinstance(v, dict) for v in result.values()):
        return _strip_arrays(result)  # type: ignore[no-any-return]
    return {str(result.get("kind", kind)): _strip_arrays(result)}


# ---------------------------------------------------------------------------- commands


def register(app: typer.Typer) -> None:
    """Attach `job ...` and `report` to the main CLI."""
    job_app = typer.Typer(no_args_is_help=True, help="Server-side audit jobs: start, watch, cancel, list, show.")

    @job_app.command("start")
    def start(
        kind: str = typer.Argument(..., help="refusal_rate | refusal_direction | stage1 | stage2 | chain"),
        config: str | None = typer.Option(None, "--config", "-c", help="the kind's config: JSON or @file.json"),
        sets: list[str] | None = typer.Option(None, "--set", help="override one field: KEY=VALUE (dotted keys nest)"),
        watch: bool = typer.Option(False, "--watch", "-w", help="then watch it with a progress bar"),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
        tls_ca: Path | None = TlsOpt,
    ) -> None:
        """Queue a job; prints its id (the job is durably recorded when this returns)."""
        cfg = parse_config(config, sets)
        with _client(server, token, tls_ca) as client:
            job = client.jobs.start(kind, cfg)
            typer.echo(job.id)
            if watch:
                final = watch_job(client.jobs, job.id)
                _finish(final)

    @job_app.command("watch")
    def watch_cmd(
        job_id: str = typer.Argument(...),
        partials: bool = typer.Option(False, "--partials", help="also print partial results as JSON lines"),
        reconnect_s: float = typer.Option(60.0, "--reconnect-s", help="keep retrying this long if the server is down"),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
        tls_ca: Path | None = TlsOpt,
    ) -> None:
        """Live progress (stage, done/total, ETA) until the job finishes. Ctrl-C stops watching only."""
        with _client(server, token, tls_ca) as client:
            try:
                final = watch_job(client.jobs, job_id, partials, reconnect_s)
            except KeyboardInterrupt:
                _err(f"stopped watching; the job goes on (refusal-audit job cancel {job_id} to stop it)")
                raise typer.Exit(130) from None
            _finish(final)

    @job_app.command("cancel")
    def cancel(
        job_id: str = typer.Argument(...),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
        tls_ca: Path | None = TlsOpt,
    ) -> None:
        """Cancel a job: a queued one at once, a running one at its next safe point."""
        with _client(server, token, tls_ca) as client:
            job = client.jobs.cancel(job_id)
            note = " (cancellation requested; it stops at its next checkpoint)" if job.state == "RUNNING" else ""
            typer.echo(f"{job.id} {job.state}{note}")

    @job_app.command("list")
    def list_cmd(
        kind: str = typer.Option("", "--kind", help="only this kind"),
        limit: int = typer.Option(50, "--limit", help="at most this many (newest first; 0 = all)"),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
        tls_ca: Path | None = TlsOpt,
    ) -> None:
        """Jobs, newest first."""
        from rich.console import Console
        from rich.table import Table

        with _client(server, token, tls_ca) as client:
            jobs = client.jobs.list(kind=kind, limit=limit)
        if as_json:
            typer.echo(json.dumps([j.to_dict() for j in jobs], indent=1))
            return
        t = Table()
        for name in ("id", "kind", "state", "stage", "progress", "ETA", "attempts", "created"):
            t.add_column(name, no_wrap=True)
        t.add_column("error", overflow="fold")
        for j in jobs:
            t.add_row(j.id, j.kind, f"[{STATE_STYLE.get(j.state, 'white')}]{j.state}", j.stage, _progress(j),
                      _eta(j.eta_s) if j.state == "RUNNING" else "", str(j.attempts), _when(j.created_at, short=True),
                      (j.error[:60] + "...") if len(j.error) > 60 else j.error)
        Console().print(t)

    @job_app.command("show")
    def show(
        job_id: str = typer.Argument(...),
        as_json: bool = typer.Option(False, "--json", help="job, result and artifacts as JSON"),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
        tls_ca: Path | None = TlsOpt,
    ) -> None:
        """A job's state, config and (when it succeeded) a summary of its result."""
        with _client(server, token, tls_ca) as client:
            res = client.jobs.result(job_id)
        if as_json:
            arts = [{"id": a.id, "kind": a.kind, "name": a.name, "source_job_id": a.source_job_id,
                     "metadata": a.metadata} for a in res.artifacts]
            typer.echo(json.dumps({"job": res.job.to_dict(), "result": res.result, "artifacts": arts}, indent=1))
            return
        _print_job(res.job)
        if res.result is not None:
            typer.echo("result:")
            for k, v in _summary(res.result):
                typer.echo(f"  {k}: {v}")
            for line in placement_lines(res.result.get("placement")):
                typer.echo(line)

    app.add_typer(job_app, name="job")

    @app.command("report")
    def report(
        job_id: str = typer.Argument(..., help="a SUCCEEDED job (refusal_direction, stage1, stage2, chain, ...)"),
        out: Path = typer.Option(Path("report"), "--out", "-o", help="output directory"),
        title: str | None = typer.Option(None, "--title", help="report title"),
        server: str | None = ServerOpt,
        token: str | None = TokenOpt,
        tls_ca: Path | None = TlsOpt,
    ) -> None:
        """Write a job's HTML + JSON report (report.html, report.json) into --out."""
        from ..audit.report import write_report

        with _client(server, token, tls_ca) as client:
            res = client.jobs.result(job_id)
        if res.result is None:
            _err(f"job {job_id} is {res.job.state}" + (f": {res.job.error}" if res.job.error else "")
                 + "; only a SUCCEEDED job has a result")
            raise typer.Exit(1)
        html_path, json_path = write_report(report_inputs(res.job.kind, res.result), out,
                                            title=title or f"refusal-audit report: {res.job.kind} job {job_id}")
        typer.echo(str(html_path))
        typer.echo(str(json_path))


def _finish(job: Any) -> None:
    """Print the final state of a watched job; exit 1 unless it succeeded."""
    if job is None:
        raise typer.Exit(1)
    line = f"{job.id} {job.state}" + (f": {job.error}" if job.error else "")
    if job.state == "SUCCEEDED":
        typer.echo(line, err=True)
        return
    _err(line)
    raise typer.Exit(1)

