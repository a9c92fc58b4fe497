"""README.md's fenced Python and shell blocks, run as written against a tiny served model.

The text is the README's own; only the names that differ on the tiny model are substituted, through
`SUBSTITUTIONS` (every key must still occur in the README, so the mapping cannot rot either). Python
blocks run in order in one namespace (a notebook session); shell lines starting `refusal-audit` run
through the real CLI app. Blocks that need real checkpoints or minutes of compute are skipped by
`SKIP` with a printed reason; any other block runs, so a new README block is tested by default.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from refusal_audit.client import AuditClient
from refusal_audit.client.cli import app
from refusal_audit.server.app import ThreadedServer
from tiny import build_engine
from typer.testing import CliRunner

README = Path(__file__).resolve().parents[1] / "README.md"
TOKEN = "readme-token"

# README text -> tiny-model text. The tiny Llama has SAEs (d_sae=128) at layers 1 and 2.
SUBSTITUTIONS: list[tuple[str, str]] = [
    ('token="..."', f'token="{TOKEN}"'),
    ("{12: [1234, 567], 16: [89]}", "{1: [12, 56], 2: [89]}"),
    ("{12: [1234]}", "{1: [12]}"),
    ("12:1234,567", "1:12,56"),
    ("layers=[12]", "layers=[1]"),
    (")[12]", ")[1]"),
    (".layers[12]", ".layers[1]"),
    ("--layer 12", "--layer 1"),
]
# (a substring identifying the block, why it is not run here)
SKIP: list[tuple[str, str]] = [
    ("pip install", "installs the package (what CI's own setup does)"),
    ("--model google/gemma-2-2b-it", "downloads Gemma-2-2B-IT and GemmaScope SAEs from the hub (GPU-size)"),
    ("--model meta-llama/Llama-3.1-8B-Instruct", "downloads Llama-3.1-8B-Instruct and LlamaScope SAEs (gated, GPU-size)"),
    ("job start chain --config @chain.json", "a full chain job on the configured datasets (minutes); "
                                             "the job CLI is tested in tests/test_jobs_server.py"),
]


def _blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block with a language tag, in README order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w+)\n(.*?)```", README.read_text(), re.S)]


def _skip_reason(text: str) -> str | None:
    return next((why for key, why in SKIP if key in text), None)


def _substitute(text: str, extra: dict[str, str]) -> str:
    for old, new in [*SUBSTITUTIONS, *extra.items()]:
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def server(start_server: Callable[..., ThreadedServer]) -> ThreadedServer:
    return start_server(build_engine(model_name="tiny"), model="tiny", auth_token=TOKEN)


def test_substitutions_and_skips_match_the_readme() -> None:
    text = README.read_text()
    for old, _ in SUBSTITUTIONS:
        assert old in text, f"SUBSTITUTIONS key {old!r} no longer occurs in README.md"
    blocks = _blocks()
    for key, _ in SKIP:
        assert any(key in b for _, b in blocks), f"SKIP key {key!r} matches no README block"
    assert {lang for lang, _ in blocks} <= {"bash", "python"}, "a README block in a language this test cannot run"


def test_readme_blocks_run(server: ThreadedServer, capsys: pytest.CaptureFixture[str]) -> None:
    with AuditClient(server.address, token=TOKEN) as c:
        direction = np.random.default_rng(0).standard_normal(c.info.d_model).astype(np.float32)
        dir_id = c.register_direction("readme", direction).id
    extra = {"gpu-box:50051": server.address, "DIRECTION_ID": dir_id}
    namespace: dict[str, Any] = {}
    ran = {"python": 0, "bash": 0}
    skipped: list[str] = []
    for i, (lang, raw) in enumerate(_blocks()):
        reason = _skip_reason(raw)
        if reason is not None:
            skipped.append(reason)
            with capsys.disabled():
                print(f"\nREADME block {i} ({lang}) skipped: {reason}")
            continue
        code = _substitute(raw, extra)
        if lang == "python":
            exec(compile(code, f"README.md block {i}", "exec"), namespace)  # noqa: S102 - the README's own code
        else:
            for line in code.splitlines():
                for cmd in line.split(";"):
                    args = shlex.split(cmd, comments=True)
                    if not args:
                        continue
                    assert args[0] == "refusal-audit", f"block {i}: cannot run {cmd!r} here; add a SKIP entry"
                    res = CliRunner().invoke(app, args[1:], env={"REFUSAL_AUDIT_TOKEN": TOKEN})
                    assert res.exit_code == 0, (i, cmd, res.output, res.exception)
        ran[lang] += 1
    assert ran["python"] >= 3 and ran["bash"] >= 1 and set(skipped) == {why for _, why in SKIP}
    # the quickstart's objects exist and say what the README says they are
    base, ablated = namespace["base"], namespace["ablated"]
    assert len(base.token_ids) <= 64 and len(ablated.token_ids) <= 64
    assert namespace["top"] is not None and len(namespace["s1"].prompts) == 1
    assert namespace["ids"][0] == namespace["info"].bos_token_id
