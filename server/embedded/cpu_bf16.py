"""Whether to run a build step's matmuls under bf16 autocast on this CPU.

bf16 autocast pays off only where the CPU does bf16 matmuls in hardware (x86 AVX512-BF16 / AMX):
measured 1.9x faster there for the SAE step, but 2.8x *slower* where bf16 is emulated (244 vs
680 tok/s on a 2-core AVX512 Xeon). The fine-tune and the SAE step both resolve their `autocast`
settings here, so one rule decides for the whole build.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def native_bf16_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU does bf16 matmuls in hardware (x86 AVX512-BF16 / AMX-BF16, Linux flags).

    Elsewhere bf16 is emulated and slower than fp32, so autocast would only cost time."""
    try:
        flags = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_autocast(setting: bool | None) -> bool:
    """An explicit True/False wins; None means bf16 autocast only on a native-bf16 CPU."""
    return native_bf16_cpu() if setting is None else bool(setting)


def cpu_autocast(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """`torch.autocast("cpu", bfloat16)` when enabled, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16)


def _mkldnn_matmul() -> Any:
    import torch

    return torch.backends.mkldnn.matmul  # type: ignore[attr-defined]  # not in torch's stubs


def fp32_matmul_precision() -> str:
    """oneDNN's current fp32 matmul precision: "bf16" inside `bf16_matmuls`, else "none" / "ieee"."""
    return str(_mkldnn_matmul().fp32_precision)


@contextlib.contextmanager
def bf16_matmuls(enabled: bool) -> Iterator[None]:
    """fp32 matmuls computed with bf16 inputs and fp32 accumulation (oneDNN's bf16 fpmath mode),
    for the duration of the block; the previous setting is restored after it.

    The CPU counterpart of TF32 on GPUs: tensors and weights stay fp32 (no copies, no casts in the
    model), only the matmul kernels round their inputs to bf16. Unlike autocast it does not re-cast
    frozen weights at every call, so it also speeds up decoding: measured on a native-bf16 Xeon, the
    262k x 640 LM head on 16 rows 1.6x faster. Process-wide while active (torch has no per-thread
    switch), so it never wraps a server's request. Only the demo's run step, the last thing its
    process does, uses it: wrapped around the fine-tune's evaluation, the SAE step that followed in
    the same process ran its autocast activation pass 20x slower (not understood; benchmarks/RESULTS.md)."""
    if not enabled:
        yield
        return
    mm = _mkldnn_matmul()
    previous = mm.fp32_precision
    mm.fp32_precision = "bf16"
    try:
        yield
    finally:
        mm.fp32_precision = previous
