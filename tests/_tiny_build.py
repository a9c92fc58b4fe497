"""A tiny random Gemma-3 / Llama checkpoint on disk, and a build config sized for it.

Used by the fast build tests: the whole base -> finetune -> saes pipeline runs on it in seconds,
offline (the tokenizer is a byte-level BPE trained here with the `tokenizers` library).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from refusal_audit.server.embedded.base_model import BaseConfig
from refusal_audit.server.embedded.build import BuildConfig
from refusal_audit.server.embedded.finetune import FinetuneConfig, probe_path, read_prompts
from refusal_audit.server.embedded.train_saes import SaeBuildConfig
from tiny import train_bpe, wrap_tokenizer
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab 512) trained on the probe prompts; no chat template on purpose
    (the loader must add Gemma's)."""
    corpus = read_prompts(probe_path("harmful"))[:60] + read_prompts(probe_path("harmless"))[:60]
    corpus += ["I cannot help with that. I'm sorry, but I can't assist.", "Sure! Here is a short answer."]
    return wrap_tokenizer(train_bpe(corpus * 2, 512, SPECIALS), chat_template=None)


def make_model(vocab_size: int, arch: Literal["gemma3", "llama"] = "gemma3", seed: int = 0) -> PreTrainedModel:
    """A 4-layer, 64-wide random causal LM."""
    common: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                  bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    if arch == "gemma3":
        return Gemma3ForCausalLM(Gemma3TextConfig(**common, sliding_window=16, query_pre_attn_scalar=32))
    return LlamaForCausalLM(LlamaConfig(**common))


def make_tiny_source(directory: Path, arch: Literal["gemma3", "llama"] = "gemma3") -> Path:
    """Write a tiny checkpoint + tokenizer to `directory` (an HF dir usable as a base source)."""
    directory = Path(directory)
    tok = make_tokenizer()
    model = make_model(len(tok), arch)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def tiny_build_config(source: Path) -> BuildConfig:
    """A build config that runs the three steps on the tiny checkpoint in seconds."""
    return BuildConfig(
        base=BaseConfig(source=str(source)),
        finetune=FinetuneConfig(max_train_per_class=6, max_eval_per_class=3, epochs=1, batch_size=4,
                                max_target_tokens=12, max_new_tokens=4, eval_batch_size=4, max_unseen_per_set=2),
        saes=SaeBuildConfig(layers=(1, 2), d_sae=64, train_tokens=2048, eval_tokens=256, context_len=32,
                            forward_batch_size=16, train_batch_size=128, lr_warm_up_steps=2,
                            l0_warm_up_steps=2, dead_feature_window=8, dead_check_train_tokens=512),
    )
