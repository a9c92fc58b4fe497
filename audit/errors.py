"""Errors raised at the engine / API edge; the gRPC layer maps them to status codes."""

from __future__ import annotations

from pydantic import ValidationError


class InvalidRequest(ValueError):
    """Bad input (INVALID_ARGUMENT). The message names the offending field."""


class NotFound(KeyError):
    """An unknown registered id or job (NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "not found"


class LimitExceeded(RuntimeError):
    """A configured limit was hit (RESOURCE_EXHAUSTED)."""


def validation_message(exc: ValidationError, where: str) -> str:
    """Flatten a pydantic error into 'where.loc: message; ...' (names every offending field)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("function-after",))
        name = f"{where}.{loc}" if loc else where
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{name}: {msg}")
    return "; ".join(parts) or f"{where}: invalid"


class NonFiniteOutput(RuntimeError):
    """A forward pass produced NaN/inf for a request without interventions (INTERNAL: a server fault)."""


def non_finite(item: int, what: str, has_interventions: bool) -> Exception:
    """The error for NaN/inf in items[item]'s `what`: InvalidRequest when the item's own interventions
    can have caused it (a clamp value or coefficient too large for the model), else NonFiniteOutput."""
    if has_interventions:
        return InvalidRequest(
            f"items[{item}].interventions: the {what} became non-finite (NaN/inf) under this item's "
            "interventions; a clamp value, scale factor or add_direction coefficient is too large for the model"
        )
    return NonFiniteOutput(f"items[{item}]: the {what} became non-finite (NaN/inf) without any intervention")
