"""`refusal-audit` command line: serve, info, generate, score, activations, attribute, and the sub-commands
(demo/build, job, report, judge) that live in their own modules."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="refusal-audit: SAE interventions served over gRPC.")


def _register_subcommands() -> None:
    """Each sub-command group lives in its own module."""
    from . import cli_attribute, cli_core, cli_demo, cli_jobs, cli_judge

    for module in (cli_core, cli_attribute, cli_demo, cli_jobs, cli_judge):
        module.register(app)


_register_subcommands()

if __name__ == "__main__":
    app()
