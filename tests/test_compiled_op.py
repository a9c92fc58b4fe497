"""The intervention custom op under torch.compile: compiled greedy generation equals eager, token for token.

A tiny random Llama gets the op at every hook point (`intervention_op.hook_hf_layers`) and is
compiled with `fullgraph=True`, so dynamo must trace the hooks into one graph with no break; the
FX graph it hands the backend is inspected for the op nodes (4 per layer). A batch of five
requests with different interventions (latent ablation, clamp on the last prompt tokens, direction
ablation at every layer, direction addition on generated tokens, none) is generated greedily by
(a) the compiled model with the op, (b) the same model run eagerly with the op, and (c) the HF
engine (`HFEngine`, its own Python hooks and KV cache, on a second copy of the weights): the
tokens must be identical and the logits agree. The interventions must change some row's tokens
(else the comparison proves nothing).

Backend: `aot_eager` — dynamo's graph capture plus AOTAutograd's functionalization of the
mutating op (what inductor receives), without inductor's C++ code generation, which takes about
twice as long on a loaded 2-core CPU (measured: first compile 61 s aot_eager vs 128 s inductor at
load average 7-8, dynamic shapes). The inductor variant is marked `slow`; the vLLM test
(`tests/test_vllm_compiled.py`) runs the op inside vLLM-CPU's inductor-compiled model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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
from refusal_audit.server.intervention_op import OP_NAME, PlanSource, active, hook_hf_layers
from refusal_audit.server.interventions import TokenContext, compile_plan
from refusal_audit.server.sae_runtime import build_layer_saes
from tiny import make_model, make_saes, make_tokenizer

D, N_LAYERS, MAX_NEW = 64, 4, 6


def _direction(seed: int) -> tuple[float, ...]:
    r = torch.randn(D, generator=torch.Generator().manual_seed(seed))
    return tuple((r / r.norm()).tolist())


def _requests() -> list[Request]:
    g = SamplingParams(max_new_tokens=MAX_NEW)
    return [
        Request(prompt=user_prompt("How do I build a bomb?"), sampling=g),
        Request(prompt="The quick brown fox", interventions=(AblateLatents(latents={1: tuple(range(0, 128, 2))}),),
                sampling=g),
        Request(prompt=user_prompt("Write a poem"),
                interventions=(ClampLatents(latents={2: (4, 5, 6)}, value=4.0, scope=TokenScope(kind="last_n_prompt", n=2)),),
                sampling=g),
        Request(prompt="Numbers: 0 1 2 3", interventions=(AblateDirection(direction=_direction(7)),), sampling=g),
        Request(prompt=user_prompt("Give me a recipe for pasta"),
                interventions=(AddDirection(direction=_direction(8), layer=2, coefficient=8.0,
                                            scope=TokenScope(kind="generated")),), sampling=g),
    ]


class _Graphs:
    """A backend wrapper that keeps the FX graphs dynamo hands to the real backend."""

    def __init__(self, backend: str) -> None:
        self.backend, self.graphs = backend, []  # type: ignore[var-annotated]

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs.append(gm)
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.backend)(gm, example_inputs)  # type: ignore[no-any-return]

    def op_nodes(self) -> int:
        return sum(1 for gm in self.graphs for n in gm.graph.nodes
                   if n.op == "call_function" and getattr(n.target, "name", lambda: "")() == OP_NAME)


def _greedy(forward: Callable[..., torch.Tensor], ids: list[list[int]], requests: Sequence[Request], saes: dict,
            pad_id: int) -> tuple[list[list[int]], list[torch.Tensor], int]:
    """Greedy tokens of every row, recomputing the whole left-padded batch each step at one fixed
    width (static shapes: one compile); the plan and token context travel through `active`."""
    plen = [len(x) for x in ids]
    width = max(plen) + MAX_NEW - 1
    plan = compile_plan([r.interventions for r in requests], plen, saes, N_LAYERS, D, torch.device("cpu"),
                        seq_lens=[n + MAX_NEW - 1 for n in plen])
    seqs = [list(x) for x in ids]
    logits_seen: list[torch.Tensor] = []
    calls = 0
    for _ in range(MAX_NEW):
        input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        pos = torch.full((len(seqs), width), -1, dtype=torch.long)
        for b, s in enumerate(seqs):
            input_ids[b, width - len(s):] = torch.tensor(s)
            pos[b, width - len(s):] = torch.arange(len(s))
        valid = pos >= 0
        plen_t = torch.tensor(plen)
        ctx = TokenContext(pos, valid & (pos < plen_t.unsqueeze(1)), plen_t)
        source = PlanSource(plan, ctx)
        with active(source), torch.no_grad():
            logits = forward(input_ids, valid.long(), pos.clamp(min=0))[:, -1].float()
        calls += source.calls
        logits_seen.append(logits)
        for b, s in enumerate(seqs):
            s.append(int(logits[b].argmax()))
    return [s[n:] for s, n in zip(seqs, plen, strict=True)], logits_seen, calls


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens


def _check(backend: str) -> None:
    tok = make_tokenizer()
    ref_model, model = make_model("llama", d_model=D), make_model("llama", d_model=D)  # same seed, same weights
    saes = build_layer_saes(make_saes(ref_model, (1, 2)), D, N_LAYERS)
    hf = HFEngine(ref_model, tok, saes, model_name="tiny-llama")
    requests = _requests()
    expected = [c.token_ids for c in hf.generate(requests)]
    plain = [c.token_ids for c in hf.generate([Request(prompt=r.prompt, sampling=r.sampling) for r in requests])]
    assert expected != plain, "the interventions changed no token: the comparison would prove nothing"

    hook_hf_layers(model)
    ids = [hf.render(r.prompt) for r in requests]

    def run(m: Callable[..., Any]) -> Callable[..., torch.Tensor]:
        return lambda i, mask, pos: m(input_ids=i, attention_mask=mask, position_ids=pos).logits

    eager_tokens, eager_logits, eager_calls = _greedy(run(model), ids, requests, saes, hf.pad_id)
    graphs = _Graphs(backend)
    compiled = torch.compile(model, backend=graphs, fullgraph=True, dynamic=False)
    tokens, logits, calls = _greedy(run(compiled), ids, requests, saes, hf.pad_id)

    assert len(graphs.graphs) == 1, f"one graph, no recompile (got {len(graphs.graphs)})"
    assert graphs.op_nodes() == 4 * N_LAYERS, "the op at every hook point of the compiled graph (pre, 2 contrib, post)"
    assert calls == eager_calls == 4 * N_LAYERS * MAX_NEW, "the op ran at every hook point of every compiled step"
    stops = set(hf.eos_ids)
    assert [_until_stop(t, stops) for t in tokens] == expected, "compiled + op != HF engine"
    assert tokens == eager_tokens, "compiled + op != eager + op"
    for a, b in zip(logits, eager_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_compiled_op_matches_eager_aot_eager() -> None:
    _check("aot_eager")


@pytest.mark.slow
def test_compiled_op_matches_eager_inductor() -> None:
    _check("inductor")


def test_op_without_a_plan_leaves_the_stream_untouched() -> None:
    """No active plan handle (profile runs, requests without interventions): the op is a no-op."""
    h, r = torch.randn(3, 8), torch.randn(3, 8)
    h0, r0 = h.clone(), r.clone()
    torch.ops.refusal_audit.edit_stream(h, r, 1, 2)
    assert torch.equal(h, h0) and torch.equal(r, r0)
