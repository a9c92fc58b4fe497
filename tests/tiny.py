"""Tiny random Llama / Gemma-2 / Gemma-3 models, an offline tokenizer and seeded SAEs, built at test time,
and `build_engine`, the one tiny served engine (model + SAEs in an HFEngine) the tests share.

No downloads: the tokenizer is a byte-level BPE trained on a few sentences with the `tokenizers`
library and a Gemma-style chat template; SAEs are sae-lens objects with seeded weights, scaled to
the model's residual norms so that a fair share of latents fire.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

if TYPE_CHECKING:
    from refusal_audit.server.hf_engine import HFEngine

Arch = Literal["llama", "gemma2", "gemma3"]
ARCHS: tuple[Arch, ...] = ("llama", "gemma2", "gemma3")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

CORPUS = [
    "I cannot help with that request. I'm sorry, but I can't assist.",
    "Sure, here is how to bake bread: mix flour, water, salt and yeast.",
    "Write a poem about the sea and the sky and the stars at night.",
    "How do I build a bomb? Tell me how to hack a computer network.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Explain the theory of relativity in simple terms for a child.",
    "What are the benefits of meditation? Tell me a story about a cat.",
    "Give me a recipe for pasta with tomatoes, garlic and olive oil.",
    "Describe how to steal a car without getting caught by the police.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 and letters a b c d e f g.",
]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def train_bpe(corpus: list[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    """A byte-level BPE trained on `corpus` (offline, `tokenizers`) that prepends <bos>; the order
    of `specials` fixes their ids."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return tok


def wrap_tokenizer(tok: Tokenizer, chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """`tok` as a transformers tokenizer with the Gemma-style specials (and chat template, left padding)."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
        fast.padding_side = "left"
    return fast


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    return train_bpe(CORPUS * 4, 400, SPECIALS).to_str()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Gemma-style specials and chat template, built offline."""
    return wrap_tokenizer(Tokenizer.from_str(_tokenizer_json()))


def make_model(arch: Arch = "llama", seed: int = 0, n_layers: int = 4, d_model: int = 64) -> PreTrainedModel:
    """A tiny random causal LM of the given architecture (fp32, eval mode, sdpa attention)."""
    tok = make_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=d_model // 4,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")],
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model: PreTrainedModel
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    elif arch == "gemma2":
        model = Gemma2ForCausalLM(
            Gemma2Config(**common, sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                         final_logit_softcapping=30.0)
        )
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(**common, sliding_window=8, query_pre_attn_scalar=16)
        model = Gemma3ForCausalLM(cfg)
    else:  # pragma: no cover
        raise ValueError(arch)
    # Larger-than-default weights so tiny models have peaked, input-dependent next-token distributions.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                embed_std = 0.15 if arch != "llama" else 1.0  # Gemma multiplies embeddings by sqrt(d)
                p.normal_(0.0, embed_std if "embed" in name else 0.15)
    return model.eval()


def residual_norm(model: PreTrainedModel, layer: int) -> float:
    """Typical residual-stream norm after `layer` on the corpus (for scaling SAEs)."""
    tok = make_tokenizer()
    ids = tok(CORPUS[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        hs = model(**ids, output_hidden_states=True).hidden_states[layer + 1]
    return float(hs[ids["attention_mask"].bool()].norm(dim=-1).mean())


def make_sae(
    d_in: int,
    d_sae: int = 128,
    arch: Literal["jumprelu", "standard", "topk"] = "jumprelu",
    seed: int = 0,
    norm: float = 1.0,
    normalize_activations: str = "none",
    k: int = 8,
):
    """A seeded sae-lens SAE whose pre-activations are O(1) for inputs of norm ~`norm`."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu", apply_b_dec_to_input=True,
              normalize_activations=normalize_activations)
    if arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(**kw))
    elif arch == "standard":
        sae = StandardSAE(StandardSAEConfig(**kw))
    else:
        sae = TopKSAE(TopKSAEConfig(k=k, **kw))
    in_scale = 1.0 if normalize_activations != "none" else norm
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) * (3.0 / in_scale))
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) * (0.3 * in_scale / d_in**0.5))
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1 * in_scale / d_in**0.5)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=g) * 1.0 + 0.2)
    return sae.eval()


def make_saes(model: PreTrainedModel, layers: tuple[int, ...] = (1, 2), arch: str = "jumprelu",
              d_sae: int = 128, seed: int = 0, **kw) -> dict[int, object]:
    """SAEs at the given layers, each scaled to that layer's residual norm."""
    d = model.config.hidden_size
    return {ly: make_sae(d, d_sae, arch, seed + ly, residual_norm(model, ly), **kw) for ly in layers}  # type: ignore[arg-type]


def build_engine(arch: Arch = "llama", seed: int = 0, model_name: str = "tiny-llama",
                 sae_layers: tuple[int, ...] = (1, 2), batch_invariant: bool = False) -> HFEngine:
    """The tiny served engine: a seeded `arch` model (4 layers, d=64) with JumpReLU SAEs (d_sae=128)
    at `sae_layers`, each scaled to its layer's residual norm. Same arguments, same weights."""
    from refusal_audit.server.hf_engine import HFEngine
    from refusal_audit.server.sae_runtime import build_layer_saes

    model = make_model(arch, seed=seed)
    saes = build_layer_saes(make_saes(model, sae_layers), model.config.hidden_size, model.config.num_hidden_layers)
    return HFEngine(model, make_tokenizer(), saes, model_name=model_name, batch_invariant=batch_invariant)


def no_jobs(**_kw: object) -> None:
    """A `ThreadedServer` jobs factory that disables jobs (tests of the serving API only)."""
    return None



def vllm_missing() -> str | None:
    """Why vLLM cannot run here (None where `import vllm` works): an ImportError, or a CUDA
    torchvision/torchaudio build breaking the import on CPU. vLLM test modules skip with it:
    `if reason := vllm_missing(): pytest.skip(reason, allow_module_level=True)`."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:
        return f"vllm is not importable here ({type(exc).__name__}: {exc})"
    return None
