"""The one JSON codec: plain JSON values from results, configs and manifests (torch-free).

Used by job checkpoints and results (`server/jobs`), reports (`audit/report.py`) and the
embedded build's manifests and config hashes (`server/embedded/manifest.py`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidRequest


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values from nested results: numpy (and torch) scalars and arrays, tuples, sets
    (sorted), paths, pydantic models, objects with `to_json()`, dataclasses; dict keys become
    strings; non-finite floats become None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(to_jsonable(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return to_jsonable(obj.model_dump(mode="json"))
    if hasattr(obj, "to_json"):
        return to_jsonable(obj.to_json())
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, np.generic) or (hasattr(obj, "item") and callable(obj.item)):  # numpy / torch scalars
        return to_jsonable(obj.item())
    return obj


def reject_json_constant(constant: str, where: str) -> float:
    """json.loads' parse_constant for request JSON: NaN / Infinity are not JSON (and would come back
    in responses), so they are InvalidRequest naming the field."""
    raise InvalidRequest(f"{where}: {constant} is not a JSON number (use a finite number or null)")


def dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON of `to_jsonable(obj)` (compact unless `indent` is given)."""
    seps = (",", ":") if indent is None else (",", ": ")
    return json.dumps(to_jsonable(obj), separators=seps, indent=indent, allow_nan=False)
