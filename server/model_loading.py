"""Load a causal LM and its tokenizer from a hub id, a local directory, a `.gguf` file, or the
embedded demo models (`embedded:gemma-3-270m`, `embedded:gemma-3-270m-refusal`).

A `.gguf` file is dequantized once into an fp32 safetensors directory keyed by the file's sha256
(transformers' GGUF loader takes about a minute; the cached copy reloads in a few seconds). Every
loaded model is put in eval mode and its tokenizer is given a pad token and a chat template
(Gemma's when the checkpoint does not carry one), so callers can rely on `apply_chat_template`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .model_prep import (  # re-exported: the names callers used before the split
    DATA_DIR_ENV,
    END_OF_TURN,
    GEMMA_CHAT_TEMPLATE,
    GENERIC_CHAT_TEMPLATE,
    convert_gguf,
    default_data_dir,
    ensure_chat_template,
    ensure_pad_token,
    prepare,
    resolve_dtype,
    stop_token_ids,
    token_id_of,
)

log = logging.getLogger(__name__)

__all__ = [
    "DATA_DIR_ENV", "EMBEDDED_BASE", "EMBEDDED_REFUSAL", "END_OF_TURN", "GEMMA_CHAT_TEMPLATE", "GENERIC_CHAT_TEMPLATE",
    "cached_gguf_dir", "convert_gguf", "default_data_dir", "embedded_dir", "ensure_chat_template", "ensure_pad_token",
    "gguf_cache_dir", "load_model", "prepare", "resolve_dtype", "stop_token_ids", "token_id_of",
]

EMBEDDED_BASE = "embedded:gemma-3-270m"
EMBEDDED_REFUSAL = "embedded:gemma-3-270m-refusal"

def gguf_cache_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """The cached safetensors directory for a GGUF file, keyed by the file's sha256."""
    from .embedded.manifest import sha256_file

    root = Path(cache_dir) if cache_dir is not None else default_data_dir()
    return root / "gguf-cache" / sha256_file(Path(gguf_path))[:24]


def cached_gguf_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Convert `gguf_path` once (atomically, with a manifest) and return the cached directory."""
    from .embedded.manifest import (
        InputRef,
        Manifest,
        Timer,
        atomic_directory,
        environment_info,
        file_lock,
        hash_tree,
        sha256_file,
        verify_artifact,
    )

    gguf_path = Path(gguf_path).expanduser().resolve()
    target = gguf_cache_dir(gguf_path, cache_dir)
    if verify_artifact(target, deep=False).ok:
        return target
    with file_lock(target.parent / ".lock"):
        if verify_artifact(target, deep=False).ok:  # another process converted it meanwhile
            return target
        timer = Timer()
        with atomic_directory(target) as tmp:
            notes = convert_gguf(gguf_path, tmp)
            manifest = Manifest(
                step="gguf-convert",
                config={"dtype": "float32"},
                inputs={"gguf": InputRef(ref=str(gguf_path), sha256=sha256_file(gguf_path))},
                files=hash_tree(tmp),
                environment=environment_info(),
                notes=notes,
            )
            manifest.seconds = timer.elapsed
            manifest.save(tmp)
    return target


# ----------------------------------------------------------------------------------------- loading


def embedded_dir(name: str, data_dir: Path | None = None, *, build_base: bool = True) -> Path:
    """Directory of an embedded model; builds the base conversion on first use (about a minute).

    The refusal-tuned model is never built implicitly (minutes of training): a missing build is an
    error that says to run `refusal-audit build`.
    """
    from .embedded import artifact_dir
    from .embedded.manifest import verify_artifact

    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if name == EMBEDDED_BASE:
        path = artifact_dir(data_dir, "base")
        if not verify_artifact(path, deep=False).ok:
            if not build_base:
                raise FileNotFoundError(f"{name} is not built under {data_dir}")
            from .embedded.build import build_step

            build_step("base", data_dir)
        return path
    if name == EMBEDDED_REFUSAL:
        path = artifact_dir(data_dir, "finetune")
        check = verify_artifact(path, deep=False)
        if not check.ok:
            raise FileNotFoundError(
                f"{name} is not built under {data_dir} ({check.reason}); run `refusal-audit build"
                + ("" if data_dir == default_data_dir() else f" --data-dir {data_dir}")
                + "` first (about 5 minutes on a laptop CPU)."
            )
        return path
    raise ValueError(f"unknown embedded model {name!r}; known: {EMBEDDED_BASE}, {EMBEDDED_REFUSAL}")


def load_model(
    model: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    cache_dir: Path | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) for a hub id, a local HF directory, a `.gguf` file or an embedded name.

    `cache_dir` is the data directory for embedded builds and GGUF conversions (default:
    `default_data_dir()`); for hub ids it is passed to transformers as its download cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    data_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
    kwargs: dict[str, Any] = {}
    if model.startswith("embedded:"):
        source: str = str(embedded_dir(model, data_dir))
        kwargs["local_files_only"] = True
    elif model.lower().endswith(".gguf"):
        gguf_path = Path(model).expanduser()
        if not gguf_path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
        source = str(cached_gguf_dir(gguf_path, data_dir))
        kwargs["local_files_only"] = True
    elif Path(model).expanduser().is_dir():
        source = str(Path(model).expanduser())
        kwargs["local_files_only"] = True
    else:  # a hub id: transformers resolves it (offline when HF_HUB_OFFLINE=1)
        source = model
        if data_dir is not None:
            kwargs["cache_dir"] = str(data_dir)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(source, **kwargs)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text_cfg, "attn_logit_softcapping", None):
        # sdpa silently drops Gemma-2's attention-logit softcapping; eager applies it (as vLLM does)
        kwargs["attn_implementation"] = "eager"
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)  # type: ignore[arg-type]
    if device != "cpu":
        lm = lm.to(device)  # type: ignore[arg-type]
    prepare(lm, tokenizer)
    return lm, tokenizer
