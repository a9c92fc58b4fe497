"""Server-side audit jobs: a durable FIFO queue of typed jobs, run on worker threads, with
per-prompt checkpoints in SQLite (WAL) so a killed server resumes them (docs/jobs.md).
`JobsService` is what `AuditServicer` delegates the six job RPCs to."""

from . import (
    kinds_analysis,  # noqa: F401  (registers the issue-7 analysis kinds)
    kinds_attribution,  # noqa: F401  (registers refusal_features, issue 13)
    kinds_refusal_analyses,  # noqa: F401  (registers latent_edges, jailbreak_suppression, probe_ood)
)
from .kinds import KINDS, JobKind, register_kind
from .manager import JobManager
from .service import JobsService
from .store import JobRecord, JobStore

__all__ = ["JobsService", "JobManager", "JobStore", "JobRecord", "JobKind", "KINDS", "register_kind"]
