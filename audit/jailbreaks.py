"""Jailbreak templates: wrap a plain harmful request in an adversarial prompt (the second seed paper's
jailbreak-suppression and out-of-distribution probe experiments).

The templates ship with the package (`audit/data/jailbreak_templates.json`: 90 templates from PyRIT,
MIT, see `audit/data/README.md`); each has ``{{ prompt }}`` where the request goes. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources

PLACEHOLDER = "{{ prompt }}"
# A default mix of classic role-play, instruction-override and output-shaping attacks.
DEFAULT_TEMPLATES = (
    "aim", "dan_11", "evil_confidant", "prefix_injection", "refusal_suppression", "style_injection",
    "dev_mode_2", "better_dan", "text_continuation", "hypothetical_response",
)


@lru_cache(maxsize=1)
def templates() -> dict[str, str]:
    """{name (file stem): template text} of every shipped template."""
    raw = resources.files("refusal_audit.audit").joinpath("data/jailbreak_templates.json").read_text("utf-8")
    return {k: str(v["value"]) for k, v in json.loads(raw).items()}


def resolve(names: Sequence[str], custom: Mapping[str, str] | None = None,
            field: str = "templates") -> dict[str, str]:
    """{name: template} for shipped `names` plus `custom` ones (ValueError naming the field when unknown
    or without the placeholder)."""
    shipped = templates()
    out: dict[str, str] = {}
    for n in names:
        if n not in shipped:
            raise ValueError(f"{field}: unknown jailbreak template {n!r} (shipped: {', '.join(sorted(shipped))})")
        out[n] = shipped[n]
    for n, t in (custom or {}).items():
        if PLACEHOLDER not in t:
            raise ValueError(f"custom_templates[{n!r}]: no {PLACEHOLDER!r} placeholder")
        if n in out:
            raise ValueError(f"custom_templates[{n!r}]: the name is also in {field}")
        out[n] = t
    if not out:
        raise ValueError(f"{field}: no templates")
    return out


def wrap(template: str, request: str) -> str:
    """The template with the request in place of every placeholder."""
    return template.replace(PLACEHOLDER, request)
