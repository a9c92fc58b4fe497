"""The HF engine's batch-invariant mode: every row bit-identical to the row alone (server/batch_invariant.py).

The SAEs' JumpReLU thresholds are planted exactly at pre-activations the rows produce alone, so a
rounding difference of one ulp anywhere upstream flips a latent and shows up in the outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from refusal_audit.audit.spec import (
    AblateLatents,
    Request,
    SamplingParams,
    ScaleLatents,
    TokenScope,
    user_prompt,
)
from refusal_audit.server import batch_invariant as bi
from refusal_audit.server.batching import Batcher
from refusal_audit.server.hf_engine import HFEngine
from refusal_audit.server.sae_runtime import build_layer_saes
from test_batch_invariance import _mixed_requests, _run_threads, _wait_pending
from tiny import ARCHS, Arch, build_engine, make_model, make_saes, make_tokenizer


def _floor_or_skip(k: int) -> int:
    try:
        return bi.row_floor(k, torch.float32, torch.device("cpu"))
    except bi.NoRowFloor as exc:
        pytest.skip(f"this BLAS has no row floor, batch-invariant matmuls are impossible here: {exc}")


# ---------------------------------------------------------------------------------------------- matmuls


def test_row_floor_is_measured_once_per_shape(monkeypatch):
    floor = _floor_or_skip(48)
    assert 1 <= floor <= 64
    monkeypatch.setattr(bi, "_probe", lambda *a: pytest.fail("probed twice"))
    assert bi.row_floor(48, torch.float32, torch.device("cpu")) == floor


def test_every_matmul_entry_point_gives_the_plain_result():
    g = torch.Generator().manual_seed(0)
    x2, x3 = torch.randn(3, 40, generator=g), torch.randn(2, 1, 40, generator=g)
    w, bias = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    a3, b3 = torch.randn(4, 2, 40, generator=g), torch.randn(4, 40, 6, generator=g)
    full_bias, vec = torch.randn(3, 24, generator=g), torch.randn(40, generator=g)
    cases = [
        lambda: F.linear(x2, w, bias), lambda: F.linear(x3, w), lambda: F.linear(x3, w, bias=bias),
        lambda: x2 @ w.T, lambda: torch.matmul(x3, w.T), lambda: x2.matmul(w.T), lambda: torch.mm(x2, w.T),
        lambda: x2.mm(w.T), lambda: torch.addmm(bias, x2, w.T), lambda: torch.addmm(full_bias, x2, w.T, beta=0.5),
        lambda: full_bias.addmm(x2, w.T, alpha=2.0), lambda: a3 @ b3, lambda: torch.bmm(a3, b3), lambda: a3.bmm(b3),
        lambda: torch.baddbmm(torch.randn(4, 1, 6, generator=torch.Generator().manual_seed(1)), a3, b3),
        lambda: torch.baddbmm(torch.ones(4, 2, 6), a3, b3, beta=2.0),
        lambda: torch.matmul(vec, w.T),  # a vector: not a row count, passed through
    ]
    for i, case in enumerate(cases):
        plain = case()
        with bi.InvariantMatmuls():
            got = case()
        assert got.shape == plain.shape, i
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5, msg=f"case {i}")


def test_a_rows_projection_does_not_depend_on_how_many_rows_share_the_call():
    floor = _floor_or_skip(640)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(40, 640, generator=g), torch.randn(256, 640, generator=g)
    with bi.InvariantMatmuls():
        alone = F.linear(x[:1], w)
        shared = [F.linear(x[:m], w)[:1] for m in range(1, 40)]
        batched = [torch.bmm(x[:m].unsqueeze(0), w.T.unsqueeze(0))[0, :1] for m in range(1, 40)]
    assert all(torch.equal(s, alone) for s in shared), f"row floor {floor}"
    # each op against its own call alone: F.linear goes to oneDNN on CPU where it has a floor, bmm to the BLAS
    assert all(torch.equal(b, batched[0]) for b in batched)
    torch.testing.assert_close(batched[0], alone, rtol=1e-5, atol=2e-4)  # |entries| ~ 25: float32 rounding


def test_cpu_float32_linears_go_to_onednn_where_it_has_a_floor():
    g_floor = bi.onednn_floor(640, torch.float32, torch.device("cpu"))
    if g_floor is None:
        pytest.skip("oneDNN's linear has no measured floor on this build: F.linear stays on the BLAS")
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(3, 640, generator=g), torch.randn(300, 640, generator=g), torch.randn(300, generator=g)
    with bi.InvariantMatmuls():
        got = F.linear(x[:1], w, b)
        wide = F.linear(x[:1], w[:1], b[:1])  # fewer output columns than the floor: padded too
    want = bi._onednn_linear(bi._pad(x[:1], 0, g_floor), w, b)[:1]
    assert torch.equal(got, want)
    assert torch.equal(wide, got[:, :1])


def test_a_build_whose_onednn_linear_fails_keeps_the_blas(monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("mkldnn::_linear_pointwise: not supported on this CPU")

    monkeypatch.setattr(bi, "_onednn_linear", broken)
    monkeypatch.setattr(bi, "_onednn_floors", {})
    assert bi.onednn_floor(96, torch.float32, torch.device("cpu")) is None
    floor = _floor_or_skip(96)
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(5, 96, generator=g), torch.randn(40, 96, generator=g)
    with bi.InvariantMatmuls():
        alone = F.linear(x[:1], w)
        shared = F.linear(x, w)[:1]
    assert torch.equal(alone, shared), f"row floor {floor}"


def test_a_linear_that_needs_gradients_takes_the_blas_and_backpropagates():
    """oneDNN's inference op has no backward: attribution's gradients go through the padded BLAS."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 640, generator=g, requires_grad=True)
    w = torch.randn(64, 640, generator=g)
    with bi.InvariantMatmuls():
        F.linear(x, w).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, -1), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------- attention


def test_row_attention_without_padding_info_is_the_models_own():
    engine = build_engine("gemma3")
    ids = engine.tokenizer(["a b c d e f g h i j k", "x"], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = engine.model(**ids).logits
        bi.use_row_attention(engine.model)
        rows = engine.model(**ids).logits  # no padded_batch: the wrapped sdpa itself
    assert torch.equal(plain, rows)


def test_only_sdpa_and_eager_have_a_rows_variant():
    engine = build_engine("llama")
    engine.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa and eager"):
        bi.use_row_attention(engine.model)


# ---------------------------------------------------------------------------------------------- end to end


def _engine_with_planted_ties(arch: Arch, requests: list[Request]) -> HFEngine:
    """A batch-invariant engine whose SAEs' JumpReLU thresholds sit exactly at pre-activations the
    requests' prompts produce (latent j's threshold := its pre-activation at one of their tokens), so
    an ulp of batch-dependent rounding upstream flips latents."""
    plain = build_engine(arch)
    for ly, layer_sae in plain.saes.items():
        sae = layer_sae.sae
        x = torch.cat([torch.from_numpy(plain.residuals([Request(prompt=r.prompt)], [ly], [0, 1, -2, -1])[0, 0])
                       for r in requests])
        with torch.no_grad():
            pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # [tokens, d_sae]
            j = torch.arange(sae.cfg.d_sae)
            sae.threshold.copy_(pre[j % pre.shape[0], j].clamp_min(1e-3))
    saes = build_layer_saes({ly: s.sae for ly, s in plain.saes.items()}, plain.d_model, plain.n_layers)
    return HFEngine(make_model(arch), make_tokenizer(), saes, batch_invariant=True)


def _requests() -> list[Request]:
    reqs = _mixed_requests(64)
    long_prompt = user_prompt("One two three four five six seven eight nine ten eleven twelve thirteen fourteen.")
    reqs.append(Request(prompt=long_prompt, interventions=(AblateLatents(latents={1: tuple(range(64))}),),
                        sampling=SamplingParams(max_new_tokens=14)))  # past the tiny models' 8-token window
    reqs.append(Request(prompt="Hi", interventions=(ScaleLatents(latents={2: tuple(range(0, 128, 3))}, factor=0.5,
                                                                  scope=TokenScope(kind="generated")),),
                        sampling=SamplingParams(max_new_tokens=6)))
    return reqs


@pytest.mark.parametrize("arch", ARCHS)
def test_every_row_is_bit_identical_to_the_row_alone(arch):
    reqs = _requests()
    engine = _engine_with_planted_ties(arch, reqs)
    batch_gen = engine.generate(reqs)
    batch_score = engine.score(reqs, [5, 6, 7], return_full_logprobs=True)
    batch_enc = engine.encode(reqs, [1, 2], top_k=8)
    batch_res = engine.residuals(reqs, [0, 3], [-1, 0])
    batch_loss = engine.loss(reqs, ["a b c"] * len(reqs))
    for i, req in enumerate(reqs):
        assert engine.generate([req])[0].token_ids == batch_gen[i].token_ids, f"generate {i}"
        alone = engine.score([req], [5, 6, 7], return_full_logprobs=True)[0]
        assert np.array_equal(alone.full_logprobs, batch_score[i].full_logprobs), (
            f"score {i}: max |diff| {np.abs(alone.full_logprobs - batch_score[i].full_logprobs).max():.2e}")
        enc = engine.encode([req], [1, 2], top_k=8)[0]
        for ly in (1, 2):
            for a, b in zip(enc.layers[ly].top_values, batch_enc[i].layers[ly].top_values, strict=True):
                assert np.array_equal(a, b), f"encode {i} layer {ly}"
        assert np.array_equal(engine.residuals([req], [0, 3], [-1, 0])[0], batch_res[i]), f"residuals {i}"
        assert engine.loss([req], ["a b c"])[0].loss == batch_loss[i].loss, f"loss {i}"
    # the interventions act (the planted thresholds did not switch every latent off)
    plain = engine.score([Request(prompt=r.prompt) for r in reqs], [5, 6, 7], return_full_logprobs=True)
    assert any(not np.array_equal(p.full_logprobs, b.full_logprobs) for p, b in zip(plain, batch_score, strict=True))


def test_concurrent_calls_through_the_batcher_are_bit_identical_to_sequential():
    reqs = _requests()
    engine = _engine_with_planted_ties("gemma3", reqs)
    alone_gen = [engine.generate([r])[0].token_ids for r in reqs]
    alone_score = [engine.score([r], [5, 6], return_full_logprobs=True)[0].full_logprobs for r in reqs]
    batcher = Batcher(engine, window_s=0.0)
    try:
        with batcher.paused():  # every call queued first: they run as merged batches
            fns = [lambda r=r: batcher.generate([r])[0].token_ids for r in reqs]
            fns += [lambda r=r: batcher.score([r], [5, 6], return_full_logprobs=True)[0].full_logprobs for r in reqs]
            threads, results = _run_threads(fns)
            _wait_pending(batcher, 2 * len(reqs))
        for t in threads:
            t.join(timeout=120)
    finally:
        batcher.close()
    n = len(reqs)
    assert not [r for r in results if isinstance(r, Exception)]
    for i in range(n):
        assert results[i] == alone_gen[i], f"generate {i}"
        assert np.array_equal(results[n + i], alone_score[i]), f"score {i}"


def test_auto_mode_stays_off_with_a_warning_where_the_blas_has_no_floor(monkeypatch, caplog):
    def no_floor(k, dtype, device):
        raise bi.NoRowFloor(f"no floor for K={k}")

    monkeypatch.setattr("refusal_audit.server.hf_engine.row_floor", no_floor)
    with pytest.raises(bi.NoRowFloor):
        HFEngine(make_model("llama"), make_tokenizer(), {}, batch_invariant=True)  # asked for: refused
    with caplog.at_level("WARNING"):
        engine = HFEngine(make_model("llama"), make_tokenizer(), {}, batch_invariant=None)  # auto: off, said so
    assert engine.batch_invariant is False
    assert "batch-invariant mode off" in caplog.text and "no floor for K=" in caplog.text
    assert HFEngine(make_model("llama"), make_tokenizer(), {}, batch_invariant=None).model.config._attn_implementation == "sdpa"


def test_auto_mode_is_on_where_the_blas_has_a_floor():
    _floor_or_skip(64)
    engine = HFEngine(make_model("gemma3"), make_tokenizer(), {}, batch_invariant=None)
    assert engine.batch_invariant is True
    assert engine.model.config._attn_implementation == "rows-sdpa"


@pytest.mark.parametrize("sae_arch", ["standard", "topk"])
def test_other_sae_architectures_are_bit_identical_too(sae_arch):
    """ReLU SAEs (the slot path) and TopK SAEs (not separable: the per-group loop over the full encode)."""
    model = make_model("gemma3")
    saes = build_layer_saes(make_saes(model, arch=sae_arch), model.config.hidden_size, model.config.num_hidden_layers)
    engine = HFEngine(model, make_tokenizer(), saes, batch_invariant=True)
    reqs = _requests()
    batch_gen = engine.generate(reqs)
    batch_score = engine.score(reqs, [5, 6, 7], return_full_logprobs=True)
    for i, req in enumerate(reqs):
        assert engine.generate([req])[0].token_ids == batch_gen[i].token_ids, f"generate {i}"
        alone = engine.score([req], [5, 6, 7], return_full_logprobs=True)[0]
        assert np.array_equal(alone.full_logprobs, batch_score[i].full_logprobs), f"score {i}"


def test_the_per_token_path_has_no_einsum():
    """`InvariantMatmuls` sees matmul entry points, not `torch.einsum` (it reaches the BLAS below
    Python): a contraction on the per-token path must be written as a matmul."""
    import refusal_audit.server.hf_engine as hf_engine
    import refusal_audit.server.interventions as interventions
    import refusal_audit.server.sae_runtime as sae_runtime

    for mod in (hf_engine, interventions, sae_runtime):
        assert mod.__file__ is not None
        assert "einsum(" not in Path(mod.__file__).read_text(encoding="utf-8"), mod.__name__
