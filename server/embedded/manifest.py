"""Build manifests, hashing and atomic artifact directories for the embedded demo build.

Every build step writes its artifact into a directory and a `manifest.json` inside it (beside the
artifact files): the inputs and their hashes, the step's parameters, its metrics, the time it took
and the sha256 of every file it wrote. A step is skipped when its directory holds a manifest whose
files still hash to the recorded values and whose config and inputs match the requested ones.

Directories are written under a temporary name and renamed into place only after the manifest is
written, so an interrupted build never leaves a half-written artifact under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ...audit.codec import to_jsonable

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


class FileEntry(BaseModel):
    """One artifact file: its sha256 and size in bytes."""

    sha256: str
    size: int


class InputRef(BaseModel):
    """One input of a step: what it is (a path, package, or upstream step) and its hash."""

    ref: str
    sha256: str


class Manifest(BaseModel):
    """What a build step produced, from what, with which parameters, and how it went."""

    schema_version: int = SCHEMA_VERSION
    step: str
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # CPU time, all threads and worker processes (robust to a busy machine)
    peak_rss_mb: float = 0.0  # the build process' memory high-water mark when the step ended
    config: dict[str, Any] = Field(default_factory=dict)
    config_hash: str = ""
    inputs: dict[str, InputRef] = Field(default_factory=dict)
    files: dict[str, FileEntry] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    environment: dict[str, str] = Field(default_factory=dict)
    notes: dict[str, Any] = Field(default_factory=dict)

    def digest(self) -> str:
        """Identity of the artifact: a hash over its files' hashes (not over timings or metrics)."""
        return sha256_json({k: v.sha256 for k, v in sorted(self.files.items())})

    def save(self, directory: Path) -> Path:
        """Write `manifest.json` into `directory` (fsynced, via a temp file + rename)."""
        path = Path(directory) / MANIFEST_NAME
        _atomic_write_text(path, self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        """Read `manifest.json` from `directory`; raises on a missing or malformed file."""
        return cls.model_validate_json((Path(directory) / MANIFEST_NAME).read_text())


# ----------------------------------------------------------------------------------------- hashing


def sha256_file(path: Path, chunk_size: int = 4 << 20) -> str:
    """sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON form of `obj` (sorted keys, no whitespace)."""
    text = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"))
    return sha256_bytes(text.encode())


def hash_tree(directory: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file under `directory` except the manifest, by relative path."""
    directory = Path(directory)
    out: dict[str, FileEntry] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST_NAME:
            continue
        out[rel] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    return out


def environment_info() -> dict[str, str]:
    """Versions of the things that shape a build's numbers (recorded in each manifest)."""
    info = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("torch", "transformers", "peft", "sae_lens", "safetensors", "gguf"):
        try:
            module = __import__(name)
            info[name] = str(getattr(module, "__version__", "?"))
        except Exception:  # pragma: no cover - optional packages
            continue
    try:
        import torch

        info["torch_threads"] = str(torch.get_num_threads())
    except Exception:  # pragma: no cover
        pass
    return info


# ------------------------------------------------------------------------------------ verification


class VerifyResult(BaseModel):
    """Whether an artifact directory is complete and intact, and if not, why."""

    ok: bool
    reason: str = ""
    manifest: Manifest | None = None


def verify_artifact(directory: Path, *, deep: bool = True) -> VerifyResult:
    """Check that `directory` holds a readable manifest and every file it lists, unchanged.

    `deep=True` re-hashes the files (about 1 s per GB); `deep=False` only checks presence and sizes.
    Files present but not listed are ignored (a user may drop notes there).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return VerifyResult(ok=False, reason="missing")
    try:
        manifest = Manifest.load(directory)
    except FileNotFoundError:
        return VerifyResult(ok=False, reason="no manifest")
    except Exception as exc:  # malformed JSON / schema
        return VerifyResult(ok=False, reason=f"unreadable manifest: {exc.__class__.__name__}")
    if manifest.schema_version != SCHEMA_VERSION:
        return VerifyResult(ok=False, reason=f"manifest schema {manifest.schema_version} != {SCHEMA_VERSION}")
    if not manifest.files:
        return VerifyResult(ok=False, reason="manifest lists no files", manifest=manifest)
    for rel, entry in manifest.files.items():
        path = directory / rel
        if not path.is_file():
            return VerifyResult(ok=False, reason=f"missing file {rel}", manifest=manifest)
        if path.stat().st_size != entry.size:
            return VerifyResult(ok=False, reason=f"size mismatch on {rel}", manifest=manifest)
        if deep and sha256_file(path) != entry.sha256:
            return VerifyResult(ok=False, reason=f"sha256 mismatch on {rel}", manifest=manifest)
    return VerifyResult(ok=True, manifest=manifest)


# ------------------------------------------------------------------------------- atomic directories


def _atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TMP_MARK}")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())


def remove_stale_temp_dirs(parent: Path) -> list[Path]:
    """Delete leftovers of interrupted builds (`.NAME.tmp-*`, `.NAME.old-*`) under `parent`.

    Only call this while holding the build lock, so no live build owns them.
    """
    removed: list[Path] = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for path in parent.iterdir():
        if path.name.startswith(".") and (_TMP_MARK in path.name or _OLD_MARK in path.name):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temp directory beside `final`; on success it replaces `final` by rename.

    On any exception (including KeyboardInterrupt) the temp directory is deleted and `final` is left
    as it was. A SIGKILL leaves a `.NAME.tmp-*` directory that `remove_stale_temp_dirs` cleans up.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}{_OLD_MARK}{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (fcntl) so two builds never write the same data dir at once."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def peak_rss_mb() -> float:
    """This process' peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / (1024 * 1024)


@dataclass
class StepOutput:
    """What a step function reports back to the builder (which adds hashes, timing, inputs)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


def _cpu_time() -> float:
    """CPU seconds of this process and of its finished (waited-for) children: the SAE step trains
    its layers in forked workers, whose time `time.process_time()` alone would miss."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


class Timer:
    """Wall-clock and CPU timer for the `seconds` / `cpu_seconds` fields of manifests."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.cpu_start = _cpu_time()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def cpu_elapsed(self) -> float:
        return _cpu_time() - self.cpu_start
