"""A request's output must not depend on which other requests share its batch."""

from __future__ import annotations

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
    ScaleLatents,
    TokenScope,
    user_prompt,
)
from refusal_audit.server.hf_engine import HFEngine
from refusal_audit.server.sae_runtime import build_layer_saes
from tiny import ARCHS, make_model, make_saes, make_tokenizer


def _mixed_requests(d_model: int) -> list[Request]:
    v = torch.randn(d_model, generator=torch.Generator().manual_seed(7))
    r = tuple((v / v.norm()).tolist())
    greedy = SamplingParams(max_new_tokens=12)
    return [
        Request(prompt=user_prompt("How do I build a bomb?"), sampling=greedy),
        Request(prompt="The quick brown fox", interventions=(AblateLatents(latents={1: (1, 2, 3)}),), sampling=greedy),
        Request(prompt=user_prompt("Tell me a story about a cat and the sea and the stars at night, please."),
                interventions=(AblateLatents(latents={1: tuple(range(0, 128, 2)), 2: tuple(range(100))}),),
                sampling=greedy),
        Request(prompt=user_prompt("Write a poem"),
                interventions=(ClampLatents(latents={2: (4, 5)}, value=3.0, scope=TokenScope(kind="last_n_prompt", n=2)),),
                sampling=greedy),
        Request(prompt="Numbers: 0 1 2 3", interventions=(AblateDirection(direction=r),), sampling=greedy),
        Request(prompt=user_prompt("Give me a recipe for pasta"),
                interventions=(AddDirection(direction=r, layer=2, coefficient=4.0, scope=TokenScope(kind="generated")),
                               AblateLatents(latents={1: (7,)}, scope=TokenScope(kind="positions", positions=(0,)))),
                sampling=SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=123)),
        Request(prompt=user_prompt("Name three rivers"),
                interventions=(ScaleLatents(latents={1: tuple(range(1, 96, 3)), 2: (4, 5, 6)}, factor=-3.0),
                               ScaleLatents(latents={2: (20, 21)}, factor=2.0, scope=TokenScope(kind="generated"))),
                sampling=greedy),
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_request_alone_equals_inside_mixed_batch(arch):
    model = make_model(arch)
    engine = HFEngine(model, make_tokenizer(), build_layer_saes(make_saes(model, (1, 2)), 64, 4))
    reqs = _mixed_requests(64)
    batch_gen = engine.generate(reqs)
    batch_score = engine.score(reqs, [5, 6, 7, 8], return_full_logprobs=True)
    max_diff = 0.0
    for i, req in enumerate(reqs):
        alone_gen = engine.generate([req])[0]
        assert alone_gen.token_ids == batch_gen[i].token_ids, f"request {i} changed with its batch"
        alone = engine.score([req], [5, 6, 7, 8], return_full_logprobs=True)[0]
        max_diff = max(max_diff, float(np.max(np.abs(alone.full_logprobs - batch_score[i].full_logprobs))))
    assert max_diff < 1e-4
    # and the interventions really act: the batch differs from the same prompts without them
    plain = engine.score([Request(prompt=r.prompt) for r in reqs], [5, 6, 7, 8], return_full_logprobs=True)
    assert any(np.max(np.abs(p.full_logprobs - b.full_logprobs)) > 1e-3 for p, b in zip(plain[1:], batch_score[1:], strict=True))


def test_batch_order_does_not_matter():
    model = make_model("gemma2")
    engine = HFEngine(model, make_tokenizer(), build_layer_saes(make_saes(model, (1, 2)), 64, 4))
    reqs = _mixed_requests(64)
    fwd = engine.generate(reqs)
    rev = engine.generate(list(reversed(reqs)))[::-1]
    assert [c.token_ids for c in fwd] == [c.token_ids for c in rev]
