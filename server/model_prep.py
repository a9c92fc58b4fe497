"""Preparing HF checkpoints: chat template, pad token and stop ids (so callers can rely on
`apply_chat_template` and on generation stopping at end-of-turn), dtype names, the data directory,
and the one-off GGUF -> fp32 safetensors conversion.

The low layer under `model_loading` (which resolves names and loads) and the embedded demo build
(`server/embedded`), which both use it; it imports neither.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DATA_DIR_ENV = "REFUSAL_AUDIT_DATA_DIR"

# Gemma's chat template (a system message is folded into the first user turn, as Gemma does).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ (message['content'] | trim) + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# A neutral fallback for non-Gemma checkpoints that ship no template.
GENERIC_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{%- for message in messages -%}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + (message['content'] | trim) + '\n\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\n' }}{%- endif -%}"
)

END_OF_TURN = "<end_of_turn>"


def default_data_dir() -> Path:
    """Where the demo build lives: $REFUSAL_AUDIT_DATA_DIR, else $XDG_CACHE_HOME/refusal-audit,
    else ~/.cache/refusal-audit."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "refusal-audit"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' / 'fp32' / 'bfloat16' / 'bf16' / 'float16' / 'fp16' / a torch.dtype -> torch.dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
    try:
        return aliases[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(aliases)}") from None


# ------------------------------------------------------------------------------ tokenizer fixing


def token_id_of(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """Id of a vocabulary entry, or None when absent.

    Avoids `get_vocab()`, which builds a 262k-entry dict (about a second) on every call.
    """
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(tid)  # type: ignore[arg-type]  # one token in, one id out


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, model_type: str | None = None) -> None:
    """Give the tokenizer a chat template when it has none (Gemma's for Gemma-like vocabularies)."""
    if getattr(tokenizer, "chat_template", None):
        return
    is_gemma = (model_type or "").startswith("gemma") or token_id_of(tokenizer, END_OF_TURN) is not None
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE if is_gemma else GENERIC_CHAT_TEMPLATE


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batched generation needs a pad token: use `<pad>` if the vocabulary has one, else EOS."""
    if tokenizer.pad_token_id is not None:
        return
    if token_id_of(tokenizer, "<pad>") is not None:
        tokenizer.pad_token = "<pad>"
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:  # pragma: no cover - exotic tokenizers
        tokenizer.add_special_tokens({"pad_token": "<pad>"})


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS plus the end-of-turn token when there is one (Gemma: [1, 106])."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    eot = token_id_of(tokenizer, END_OF_TURN)
    if eot is not None and eot not in ids:
        ids.append(int(eot))
    return ids


def prepare(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Eval mode, pad token, chat template, and generation stop ids that include end-of-turn."""
    model.eval()
    ensure_pad_token(tokenizer)
    ensure_chat_template(tokenizer, getattr(model.config, "model_type", None))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        stops = stop_token_ids(tokenizer)
        if stops:
            gen.eos_token_id = stops if len(stops) > 1 else stops[0]
        gen.pad_token_id = tokenizer.pad_token_id


# ------------------------------------------------------------------------------------ GGUF caching


@contextlib.contextmanager
def _reuse_gguf_reader() -> Iterator[None]:
    """Parse a GGUF file's metadata once instead of three times.

    transformers opens a fresh `gguf.GGUFReader` for the tokenizer, the config and the weights; with a
    262k-entry vocabulary each parse costs ~20 s on this CPU. The reader is a read-only memmap, so
    sharing it within one conversion is safe; if transformers stops importing it this way the patch
    simply has no effect.
    """
    try:
        import gguf
    except ImportError:  # pragma: no cover
        yield
        return
    original = gguf.GGUFReader
    cache: dict[tuple[Any, ...], Any] = {}

    def cached_reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original(path, *args, **kwargs)
        return cache[key]

    gguf.GGUFReader = cached_reader  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        gguf.GGUFReader = original  # type: ignore[misc]


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Dequantize a GGUF checkpoint into an fp32 safetensors HF directory at `out_dir`.

    Strips `quantization_config` (so the copy loads as a plain model), adds a chat template when
    the GGUF carries none, and sets the generation stop ids to EOS + end-of-turn. Returns notes for
    the manifest.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    with _reuse_gguf_reader():  # one metadata parse for the tokenizer, the config and the weights
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True
        )
    had_template = bool(getattr(tokenizer, "chat_template", None))
    # The weights are already dequantized; drop the quantizer so the model saves as plain fp32.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.dtype = torch.float32
    prepare(model, tokenizer)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "gguf_had_chat_template": had_template,
        "stop_token_ids": stop_token_ids(tokenizer),
    }
