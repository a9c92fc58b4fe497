"""Whether to run a build step's matmuls under bf16 autocast on this CPU.

bf16 autocast pays off only where the CPU does bf16 matmuls in hardware (x86 AVX512-BF16 / AMX):
measured 1.9x faster there for the SAE step, but 2.8x *slower* where bf16 is emulated (244 vs
680 tok/s on a 2-core AVX512 Xeon). The fine-tune and the SAE step both resolve their `autocast`
settings here, so one rule decides for the whole build.
"""

from __future__ import annotations

import contextlib
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
