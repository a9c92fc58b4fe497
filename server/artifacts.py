"""Registered directions and latent sets: SQLite (WAL) rows plus safetensors payloads.

Layout under the data directory: `artifacts.sqlite` (one row per artifact) and
`artifacts/<id>.safetensors` (the direction vector, or one int32 tensor per layer of a latent set).
The payload file is written and fsynced before the row is committed, so an acknowledged id always
resolves. The store is the server's `Resolver`: interventions reference artifacts by id.
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import load_file, save_file

from ..audit.engine import ModelInfo
from ..audit.errors import InvalidRequest, NotFound
from ..audit.spec import ChatMessage, Prompt
from ..proto.convert import Artifact
from .interventions import Resolver

ArtifactRecord = Artifact
"""The store's record type (the wire-neutral `Artifact` of proto.convert)."""

KINDS = ("direction", "latent_set", "prompt_set")
MAX_PROMPT_SET = 10000  # prompts per registered prompt set

_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    layer INTEGER NOT NULL DEFAULT 0,
    metadata_json TEXT NOT NULL DEFAULT '{}',
    source_job_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS artifacts_kind ON artifacts(kind, created_at);
"""


class ArtifactValidator(Protocol):
    """Checks a payload against the served model before it is registered (raises InvalidRequest)."""

    def check_direction(self, values: np.ndarray, layer: int) -> None: ...

    def check_latent_set(self, latents: Mapping[int, Sequence[int]]) -> None: ...


class ModelValidator:
    """Validates artifacts against a ModelInfo: d_model, finiteness, norm, SAE layers, d_sae."""

    def __init__(self, info: ModelInfo, max_latents: int | None = None) -> None:
        self.info = info
        self.max_latents = max_latents

    def check_direction(self, values: np.ndarray, layer: int) -> None:
        """Dimension d_model, finite, nonzero; layer in [-1, n_layers) (-1 = embeddings)."""
        if values.ndim != 1 or values.shape[0] != self.info.d_model:
            raise InvalidRequest(
                f"values: direction has dimension {tuple(values.shape)}, expected ({self.info.d_model},)"
            )
        if not np.all(np.isfinite(values)):
            raise InvalidRequest("values: direction contains NaN or Inf")
        if float(np.linalg.norm(values)) <= 1e-12:
            raise InvalidRequest("values: direction has zero norm")
        if not -1 <= layer < self.info.n_layers:
            raise InvalidRequest(f"layer: layer {layer} out of range [-1, {self.info.n_layers})")

    def check_latent_set(self, latents: Mapping[int, Sequence[int]]) -> None:
        """Non-empty; every layer has an SAE; every id in [0, d_sae)."""
        if not latents or not any(len(v) for v in latents.values()):
            raise InvalidRequest("latents: empty latent set")
        sae_layers = {s.layer: s for s in self.info.saes}
        total = 0
        for layer, ids in latents.items():
            if layer not in sae_layers:
                raise InvalidRequest(f"latents: no SAE at layer {layer} (SAE layers: {sorted(sae_layers)})")
            d_sae = sae_layers[layer].d_sae
            bad = [i for i in ids if not 0 <= int(i) < d_sae]
            if bad:
                raise InvalidRequest(f"latents[{layer}]: latent id {bad[0]} out of range [0, {d_sae})")
            total += len(ids)
        if self.max_latents is not None and total > self.max_latents:
            raise InvalidRequest(f"latents: {total} latents exceed the limit of {self.max_latents} per request")


def _new_id(kind: str) -> str:
    prefix = {"direction": "dir_", "latent_set": "fs_", "prompt_set": "ps_"}[kind]
    return prefix + uuid.uuid4().hex[:12]


def _prompt_json(p: Prompt) -> Any:
    return p if isinstance(p, str) else [{"role": m.role, "content": m.content} for m in p]


def _prompt_from_json(v: Any) -> Prompt:
    return v if isinstance(v, str) else tuple(ChatMessage(**m) for m in v)


class ArtifactStore(Resolver):
    """Persistent directions and latent sets; also the Resolver interventions use for ids."""

    def __init__(self, data_dir: str | Path, validator: ArtifactValidator | None = None, cache_size: int = 128) -> None:
        self.data_dir = Path(data_dir)
        self.blob_dir = self.data_dir / "artifacts"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.validator = validator
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.data_dir / "artifacts.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._cache: OrderedDict[str, Artifact] = OrderedDict()
        self._cache_size = cache_size

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ registration

    def register_direction(
        self, name: str, values: np.ndarray | Sequence[float], layer: int, metadata: dict[str, Any] | None = None,
        source_job_id: str = "",
    ) -> Artifact:
        """Validate and persist a direction; returns its record (id `dir_<12 hex>`)."""
        vec = np.asarray(values, dtype=np.float32)
        if self.validator is not None:
            self.validator.check_direction(vec, int(layer))
        elif vec.ndim != 1 or vec.size == 0 or not np.all(np.isfinite(vec)) or not np.any(vec):
            raise InvalidRequest("values: direction must be a finite, nonzero vector")
        aid = _new_id("direction")
        self._write_blob(aid, {"direction": np.ascontiguousarray(vec)})
        rec = Artifact(aid, "direction", name, time.time(), direction=vec.copy(), direction_layer=int(layer),
                       metadata=dict(metadata or {}), source_job_id=source_job_id)
        self._insert(rec)
        return rec

    def register_latent_set(
        self, name: str, latents: Mapping[int, Sequence[int]], metadata: dict[str, Any] | None = None,
        source_job_id: str = "",
    ) -> Artifact:
        """Validate and persist a latent set (ids sorted, deduplicated); id `fs_<12 hex>`."""
        clean = {int(ly): sorted({int(i) for i in ids}) for ly, ids in latents.items() if len(ids)}
        if self.validator is not None:
            self.validator.check_latent_set(clean)
        elif not clean:
            raise InvalidRequest("latents: empty latent set")
        aid = _new_id("latent_set")
        self._write_blob(aid, {f"layer_{ly}": np.asarray(ids, dtype=np.int32) for ly, ids in clean.items()})
        rec = Artifact(aid, "latent_set", name, time.time(), latents=clean, direction_layer=0,
                       metadata=dict(metadata or {}), source_job_id=source_job_id)
        self._insert(rec)
        return rec

    def register_prompt_set(
        self, name: str, prompts: Sequence[Prompt], metadata: dict[str, Any] | None = None, source_job_id: str = ""
    ) -> Artifact:
        """Persist a set of prompts (e.g. a mean attribution baseline's reference set); id `ps_<12 hex>`."""
        prompts = list(prompts)
        if not prompts:
            raise InvalidRequest("prompts: empty prompt set")
        if len(prompts) > MAX_PROMPT_SET:
            raise InvalidRequest(f"prompts: {len(prompts)} prompts exceed the limit of {MAX_PROMPT_SET}")
        for i, p in enumerate(prompts):
            if (isinstance(p, str) and not p) or (not isinstance(p, str) and not any(m.content for m in p)):
                raise InvalidRequest(f"prompts[{i}]: empty prompt")
        aid = _new_id("prompt_set")
        final = self.blob_dir / f"{aid}.json"
        tmp = final.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump([_prompt_json(p) for p in prompts], f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        rec = Artifact(aid, "prompt_set", name, time.time(), metadata=dict(metadata or {}), source_job_id=source_job_id,
                       prompts=prompts)
        self._insert(rec)
        return rec

    def _write_blob(self, aid: str, tensors: dict[str, np.ndarray]) -> None:
        final = self.blob_dir / f"{aid}.safetensors"
        tmp = final.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def _insert(self, rec: Artifact) -> None:
        try:
            meta = json.dumps(rec.metadata, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"metadata: not JSON-serialisable ({exc})") from None
        with self._lock:
            self._db.execute(
                "INSERT INTO artifacts (id, kind, name, created_at, layer, metadata_json, source_job_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (rec.id, rec.kind, rec.name, rec.created_at, rec.direction_layer, meta, rec.source_job_id),
            )
            self._remember(rec)

    def _remember(self, rec: Artifact) -> None:
        self._cache[rec.id] = rec
        self._cache.move_to_end(rec.id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    # ------------------------------------------------------------------ lookup

    @staticmethod
    def _row_to_record(row: tuple[Any, ...]) -> Artifact:
        aid, kind, name, created_at, layer, meta, source = row
        return Artifact(aid, kind, name, created_at, direction_layer=int(layer), metadata=json.loads(meta or "{}"),
                        source_job_id=source)

    def get(self, artifact_id: str) -> Artifact:
        """The record with its payload; NotFound for an unknown id."""
        with self._lock:
            hit = self._cache.get(artifact_id)
            if hit is not None:
                self._cache.move_to_end(artifact_id)
                return hit
            row = self._db.execute(
                "SELECT id, kind, name, created_at, layer, metadata_json, source_job_id FROM artifacts WHERE id = ?",
                (artifact_id,),
            ).fetchone()
        if row is None:
            raise NotFound(f"id: artifact {artifact_id!r} is not registered")
        rec = self._row_to_record(row)
        if rec.kind == "prompt_set":
            with open(self.blob_dir / f"{rec.id}.json", encoding="utf-8") as f:
                rec.prompts = [_prompt_from_json(v) for v in json.load(f)]
            with self._lock:
                self._remember(rec)
            return rec
        tensors = load_file(str(self.blob_dir / f"{rec.id}.safetensors"))
        if rec.kind == "direction":
            rec.direction = tensors["direction"].astype(np.float32)
        else:
            rec.latents = {
                int(k.removeprefix("layer_")): [int(i) for i in v] for k, v in sorted(tensors.items())
            }
        with self._lock:
            self._remember(rec)
        return rec

    def list(self, kind: str | None = None) -> builtins.list[Artifact]:
        """All records (newest first) without payloads, optionally of one kind."""
        if kind and kind not in KINDS:
            raise InvalidRequest(f"kind: unknown artifact kind {kind!r} (one of {', '.join(KINDS)})")
        sql = "SELECT id, kind, name, created_at, layer, metadata_json, source_job_id FROM artifacts"
        args: tuple[Any, ...] = ()
        if kind:
            sql += " WHERE kind = ?"
            args = (kind,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_at DESC", args).fetchall()
        return [self._row_to_record(r) for r in rows]

    # ------------------------------------------------------------------ Resolver

    def _payload(self, artifact_id: str, kind: str, attr: str, where: str = "") -> Any:
        """The payload (`attr`) of a registered artifact of this kind; NotFound, prefixed by the
        request field `where`, when the id is unknown or names another kind."""
        prefix = f"{where}: " if where else ""
        try:
            rec = self.get(artifact_id)
        except NotFound:
            raise NotFound(f"{prefix}{artifact_id!r} is not registered") from None
        value = getattr(rec, attr)
        if rec.kind != kind or value is None:
            raise NotFound(f"{prefix}{artifact_id!r} is a {rec.kind}, not a {kind.replace('_', ' ')}")
        return value

    def latent_set(self, set_id: str) -> dict[int, builtins.list[int]]:
        """Resolver: the latents of a registered latent set."""
        return self._payload(set_id, "latent_set", "latents", "latent_set_id")

    def direction(self, direction_id: str) -> np.ndarray:
        """Resolver: the vector of a registered direction."""
        return self._payload(direction_id, "direction", "direction", "direction_id")

    def prompt_set(self, set_id: str) -> builtins.list[Prompt]:
        """Resolver: the prompts of a registered prompt set."""
        return self._payload(set_id, "prompt_set", "prompts")
