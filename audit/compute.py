"""Compute accounting for any audit run: forward / backward passes, generations and seconds, per stage.

`MeteredEngine` wraps an engine (in-process or the gRPC client) and counts what every call costs,
so no algorithm counts its own passes: the demo and the job manager wrap their engine once and
every stage is measured the same way. The current stage is the last name the run reported through
its context's ``progress(stage, ...)`` (`ComputeMeter.set_stage`), which every audit stage already
calls before it starts working.

What is counted, per prompt row (a batch of 8 prompts is 8 passes, as in stage 2's own counts):

- ``forward_passes``: one full forward over a prompt: `score`, `loss`, `encode`, `residuals` rows,
  the prefill of each `generate` row, and the forward passes an `attribute` or `latent_edges` call reports (one per
  row and integrated-gradient step, plus its clean / baseline / patched runs);
- ``backward_passes``: the backward passes `attribute` / `latent_edges` report (one per row and gradient step);
- ``generations`` and ``generated_tokens``: `generate` rows and the tokens they produced; each
  generated token after the first is one incremental (KV-cached) decode step, reported apart and
  not converted into forward passes;
- ``forward_equivalents`` = forward_passes + 2 x backward_passes (a backward pass costs about two
  forwards), the unit the method comparison uses;
- ``engine_s``: seconds spent inside the engine calls; ``wall_s``: seconds the stage was current.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

COUNTED = ("generate", "score", "encode", "residuals", "loss", "attribute", "latent_edges")


def forward_equivalents(forward_passes: int, backward_passes: int) -> float:
    """The one cost unit: forward passes plus two per backward pass (a backward costs about two forwards)."""
    return float(forward_passes + 2 * backward_passes)


@dataclass
class Compute:
    """What one stage spent (module docstring)."""

    forward_passes: int = 0
    backward_passes: int = 0
    generations: int = 0
    generated_tokens: int = 0
    engine_calls: int = 0
    engine_s: float = 0.0
    wall_s: float = 0.0

    @property
    def forward_equivalents(self) -> float:
        return forward_equivalents(self.forward_passes, self.backward_passes)

    def add(self, other: Compute) -> Compute:
        return Compute(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values(), strict=True)))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "forward_equivalents": self.forward_equivalents}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Compute:
        return cls(**{k: d.get(k, 0) for k in asdict(cls())})


class ComputeMeter:
    """Counters per stage name; thread-safe (a job's fan-out may call the engine from threads)."""

    def __init__(self, stage: str = "setup", clock: Callable[[], float] = time.perf_counter) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.stages: dict[str, Compute] = {}
        self.stage = stage
        self._since = clock()

    def set_stage(self, stage: str) -> None:
        """Charge what follows to `stage` (the time since the last switch goes to the previous one)."""
        with self._lock:
            if stage == self.stage:
                return
            self._close_wall()
            self.stage = stage

    def _close_wall(self) -> None:
        now = self._clock()
        if now > self._since or self.stage in self.stages:  # no empty entries for stages that did nothing
            self.stages.setdefault(self.stage, Compute()).wall_s += now - self._since
        self._since = now

    def charge(self, forward: int = 0, backward: int = 0, generations: int = 0, generated_tokens: int = 0,
               seconds: float = 0.0, tag: str | None = None) -> None:
        """Add one call's cost to the current stage (to ``"<stage>: <tag>"`` with a tag)."""
        with self._lock:
            c = self.stages.setdefault(f"{self.stage}: {tag}" if tag else self.stage, Compute())
            c.forward_passes += forward
            c.backward_passes += backward
            c.generations += generations
            c.generated_tokens += generated_tokens
            c.engine_calls += 1
            c.engine_s += seconds

    def snapshot(self) -> dict[str, Compute]:
        """Per stage, with the current stage's wall time up to now."""
        with self._lock:
            self._close_wall()
            return {k: Compute(**asdict(v)) for k, v in self.stages.items()}

    def take(self) -> dict[str, Compute]:
        """The snapshot, then start from zero (the demo's per-section accounting)."""
        with self._lock:
            self._close_wall()
            out, self.stages = self.stages, {}
            return out


def stages_json(stages: dict[str, Compute]) -> dict[str, Any]:
    """{stage: counts} plus their total, for a result's ``compute`` field."""
    total = Compute()
    for c in stages.values():
        total = total.add(c)
    return {"stages": {k: v.to_json() for k, v in stages.items()}, "total": total.to_json(),
            "unit": "passes per prompt row; forward_equivalents = forward + 2 x backward"}


class MeteredEngine:
    """An engine proxy that charges every counted call to a `ComputeMeter`; everything else passes through.

    Methods the wrapped engine lacks stay missing (``hasattr(engine, "attribute")`` still tells). With a
    `tag`, calls are charged to ``"<current stage>: <tag>"``: the demo gives its coherence gate such an
    engine, so the gate's NLL checks are listed apart from the stage whose verdicts they check."""

    def __init__(self, engine: Any, meter: ComputeMeter, tag: str | None = None) -> None:
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "meter", meter)
        object.__setattr__(self, "tag", tag)

    @property
    def wrapped(self) -> Any:
        return self._engine

    def __setattr__(self, name: str, value: Any) -> None:  # e.g. `engine.resolver = ...` reaches the engine
        setattr(self._engine, name, value)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._engine, name)
        if name not in COUNTED or not callable(target):
            return target
        meter: ComputeMeter = self.meter
        tag: str | None = self.tag

        def counted(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = target(*args, **kwargs)
            dt = time.perf_counter() - t0
            if name in ("attribute", "latent_edges"):  # they report their own per-row pass counts
                meter.charge(int(out.forward_passes), int(out.backward_passes), seconds=dt, tag=tag)
            elif name == "generate":
                meter.charge(len(out), generations=len(out),
                             generated_tokens=sum(len(c.token_ids) for c in out), seconds=dt, tag=tag)
            else:
                meter.charge(len(out) if name != "residuals" else int(out.shape[0]), seconds=dt, tag=tag)
            return out

        counted.__name__ = name
        counted.__doc__ = getattr(target, "__doc__", None)
        return counted
