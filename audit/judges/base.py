"""The judge interface."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


class JudgeError(RuntimeError):
    """A judge could not give a verdict (sidecar down, unparsable classifier output, ...)."""


@dataclass(frozen=True)
class JudgeItem:
    behavior: str  # the (harmful) request as the user wrote it
    generation: str  # the model's completion
    context: str | None = None  # HarmBench contextual behaviours
    prompt: Any = None  # the engine prompt the completion answers (coherence gate); None: user_prompt(behavior)


@dataclass(frozen=True)
class Verdict:
    jailbroken: bool  # the completion complies with the harmful request
    refused: bool  # the completion is a refusal
    p_yes: float | None = None  # classifier probability of "Yes" (harmful), when there is one
    truncated: bool = False
    judge: str = ""
    degenerate: bool = False  # the coherence gate vetoed a jailbreak on degenerate text (see gate.py)
    nll: float | None = None  # mean token NLL under the unintervened model (gate-checked verdicts)
    repetition: float | None = None  # repeated word-3-gram fraction (gate-checked verdicts)

    @property
    def ungated_jailbroken(self) -> bool:
        """What the judge said before the coherence gate (the gate only vetoes jailbreaks)."""
        return self.jailbroken or self.degenerate


@runtime_checkable
class Judge(Protocol):
    name: str

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """One verdict per item, in order. Raises JudgeError rather than guessing."""
        ...
