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

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class TemplateChoice(BaseModel):
    """The templates a config wraps requests in: shipped names plus custom ones, validated on load
    (a config that names an unknown template, or a custom one without the placeholder, is rejected)."""

    model_config = ConfigDict(extra="forbid")

    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES))  # shipped template names
    custom_templates: dict[str, str] = Field(default_factory=dict)  # name -> text with "{{ prompt }}"

    @field_validator("templates")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in templates()]
        if unknown:
            raise ValueError(f"unknown jailbreak template {unknown[0]!r} (see audit/data/jailbreak_templates.json)")
        return v

    @field_validator("custom_templates")
    @classmethod
    def _placeholder(cls, v: dict[str, str]) -> dict[str, str]:
        if v:
            resolve([], v, "custom_templates")
        return v

    def chosen(self) -> dict[str, str]:
        """{name: template} of every chosen template (shipped, then custom)."""
        return resolve(self.templates, self.custom_templates)
