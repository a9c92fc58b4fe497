"""The packed TokenContext (vLLM's flattened batch) applies exactly the padded layout's edits.

Rows of different lengths, mixing prompt and generated tokens (as in a continuous-batching step:
a chunked prefill beside decodes), every scope kind, latent ablation / clamp on separable and
TopK SAEs, direction ablation and addition: the packed [1, N, d] result must equal the padded
[B, T, d] result token for token, and padding tokens must be left untouched.
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from refusal_audit.audit.spec import (
    AblateDirection,
    AblateLatents,
    AddDirection,
    ClampLatents,
    ScaleLatents,
    TokenScope,
)
from refusal_audit.server.interventions import (
    _SPARSE_DECODE_FRACTION,
    TokenContext,
    compile_plan,
    decode_coefficients,
)
from refusal_audit.server.sae_runtime import build_layer_saes
from tiny import make_sae

D = 32
N_LAYERS = 4


def _rows(seed: int) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    r1 = tuple(torch.randn(D, generator=g).tolist())
    r2 = tuple(torch.randn(D, generator=g).tolist())
    return [
        (),
        (AblateLatents(latents={1: (0, 3, 5, 9)}),),
        (ClampLatents(latents={1: (3, 7), 2: (1,)}, value=2.0, scope=TokenScope(kind="last_n_prompt", n=2)),
         AblateDirection(direction=r1, layers=(1, 2))),
        (AblateLatents(latents={2: tuple(range(0, 48, 3))}, scope=TokenScope(kind="generated")),
         AddDirection(direction=r2, layer=1, coefficient=3.0, scope=TokenScope(kind="prompt"))),
        (AblateDirection(direction=r2), AblateDirection(direction=r1, scope=TokenScope(kind="positions", positions=(0, -1))),
         AblateLatents(latents={1: (2,)}, scope=TokenScope(kind="positions", positions=(1, -2)))),
        (ScaleLatents(latents={1: (0, 3, 11), 2: (5, 6)}, factor=-3.0),
         ScaleLatents(latents={2: (7, 8)}, factor=2.5, scope=TokenScope(kind="prompt"))),
    ]


@pytest.mark.parametrize("sae_arch", ["jumprelu", "topk"])
def test_packed_equals_padded(sae_arch: Literal["jumprelu", "topk"]) -> None:
    torch.manual_seed(0)
    saes = build_layer_saes({ly: make_sae(D, 48, sae_arch, seed=ly, norm=4.0) for ly in (1, 2)}, D, N_LAYERS)
    rows = _rows(1)
    prompt_lens = [5, 7, 4, 6, 3, 4]
    # Step layout per row: (first position, number of tokens) — prefill chunks and decodes mixed.
    spans = [(0, 5), (3, 4), (5, 1), (2, 6), (3, 1), (2, 3)]
    B, T = len(rows), max(n for _, n in spans)
    plan = compile_plan(rows, prompt_lens, saes, N_LAYERS, D, torch.device("cpu"))
    h_pad = torch.randn(B, T, D) * 4.0
    pos_pad = torch.full((B, T), -1, dtype=torch.long)
    for b, (start, n) in enumerate(spans):
        pos_pad[b, :n] = torch.arange(start, start + n)
    plen = torch.tensor(prompt_lens)
    prompt_pad = (pos_pad >= 0) & (pos_pad < plen.unsqueeze(1))
    ctx_pad = TokenContext(pos_pad, prompt_pad, plen)
    # The same tokens flattened in row order, plus two padding tokens at the end.
    valid = pos_pad >= 0
    n_pad = 2
    h_flat = torch.cat([h_pad[valid], torch.randn(n_pad, D)]).unsqueeze(0)
    row = torch.cat([torch.arange(B).unsqueeze(1).expand(B, T)[valid], torch.full((n_pad,), -1)])
    pos = torch.cat([pos_pad[valid], torch.full((n_pad,), -1)])
    is_prompt = (pos >= 0) & (pos < plen[row.clamp(min=0)])
    ctx_packed = TokenContext.packed(pos, is_prompt, plen, row)

    def run(h: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        for layer in range(N_LAYERS):
            assert plan.ablations is not None
            h = plan.ablations.ablate(h, ctx, layer)
            if layer in plan.latent_layers:
                h = plan.latent_layers[layer].apply(h, ctx)
            if layer in plan.additions:
                h = plan.additions[layer].add(h, ctx)
        return h

    out_pad = run(h_pad.clone(), ctx_pad)
    out_packed = run(h_flat.clone(), ctx_packed)
    n_valid = int(valid.sum())
    assert torch.allclose(out_packed[0, :n_valid], out_pad[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(out_packed[0, n_valid:], h_flat[0, n_valid:]), "padding tokens must stay untouched"
    assert torch.equal(out_packed[0, row == 0], h_flat[0, row == 0]), "a row without interventions must stay untouched"
    assert not torch.allclose(out_packed, h_flat), "the interventions must act"


def test_rows_are_grouped_by_latent_set_and_equal_their_solo_run() -> None:
    """Per-row gathers: rows with the same edits share one group (one gather over their own latents),
    distinct sets get their own, and every row's tokens come out as when the row runs alone."""
    saes = build_layer_saes({1: make_sae(D, 64, "jumprelu", seed=3, norm=4.0)}, D, N_LAYERS)
    sets = [tuple(range(0, 64, 2)), tuple(range(1, 64, 3)), tuple(range(0, 64, 2))]
    rows = [(AblateLatents(latents={1: sets[0]}),), (ScaleLatents(latents={1: sets[1]}, factor=-3.0),),
            (AblateLatents(latents={1: sets[2]}),), (),
            (ClampLatents(latents={1: (5, 6)}, value=1.0, scope=TokenScope(kind="prompt")),
             ScaleLatents(latents={1: (6, 7)}, factor=0.5, scope=TokenScope(kind="generated")))]
    plens = [4, 3, 5, 2, 3]
    counts = [4, 3, 5, 2, 5]
    plan = compile_plan(rows, plens, saes, N_LAYERS, D, torch.device("cpu"))
    lp = plan.latent_layers[1]
    assert sorted(len(g.key) for g in lp.groups) == [3, 21, 32] and sorted(g.ops.shape[0] for g in lp.groups) == [1, 1, 2]
    row = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(counts))
    pos = torch.cat([torch.arange(n) for n in counts])
    plen = torch.tensor(plens)
    h = torch.randn(1, len(row), D, generator=torch.Generator().manual_seed(0)) * 4.0
    out = lp.apply(h, TokenContext.packed(pos, pos < plen[row], plen, row))
    # float32 rounding at the operands' scale: the batch encodes with one `bmm` over the slots, a row
    # alone with a matmul over its own group, and which kernel rounds how differs between CPUs
    # (an entry that is a small difference of two ~20-sized terms is only exact to ~1e-6 absolute)
    atol = 1e-6 * float(h.abs().max() + out.abs().max())
    for r in range(len(rows)):
        alone = compile_plan([rows[r]], [plens[r]], saes, N_LAYERS, D, torch.device("cpu")).latent_layers.get(1)
        sel = row == r
        p = torch.arange(counts[r])
        solo = h[:, sel] if alone is None else alone.apply(
            h[:, sel], TokenContext.packed(p, p < plens[r], plen[r : r + 1], torch.zeros_like(p)))
        assert torch.allclose(out[:, sel], solo, atol=atol, rtol=1e-6), (r, float((out[:, sel] - solo).abs().max()), atol)
        assert (r == 3) == torch.equal(out[:, sel], h[:, sel]), f"row {r}: only the row without ops stays as it is"
    # row 4 (a prompt clamp and a generated scale on overlapping latents: the weighted path) acts on its prompt
    assert not torch.allclose(out[:, row == 4][:, :3], h[:, row == 4][:, :3])


@pytest.mark.parametrize("prefill", [1, 40])
@pytest.mark.parametrize("sparse", [False, True])
def test_batched_groups_equal_the_loop_and_the_dense_sae(prefill: int, sparse: bool) -> None:
    """Several distinct latent sets of different sizes: the batched path (tokens padded per group,
    one bmm against the slot pool's slices, zero-padded to the largest set) equals the per-group loop and
    an independent dense computation (full encode, h - z_S W_dec[S]). With one long prefill beside
    decodes the padding would dwarf the work, so that group runs on its own and the decodes stay
    batched.
    `sparse`: thresholds raised until few latents fire, as in a trained SAE, so that decode steps go
    through the non-zero coefficients only (`decode_coefficients`' sparse branch)."""
    tiny_sae = make_sae(D, 64, "jumprelu", seed=5, norm=4.0)
    if sparse:
        with torch.no_grad():
            tiny_sae.threshold.add_(30.0)
    saes = build_layer_saes({1: tiny_sae}, D, N_LAYERS)
    sets = [tuple(range(0, 64, 3)), (1, 2, 9), tuple(range(10, 60)), (7,)]
    rows = [(AblateLatents(latents={1: s}),) for s in sets]
    counts = [prefill, 1, 1, 1]  # row 0 in prefill (40 tokens) or decoding like the rest
    plens = [max(prefill, 2), 3, 4, 2]
    plan = compile_plan(rows, plens, saes, N_LAYERS, D, torch.device("cpu"))
    lp = plan.latent_layers[1]
    assert len(lp.groups) == 4
    row = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    pos = torch.cat([torch.arange(n) + (plens[r] if n == 1 else 0) for r, n in enumerate(counts)])
    plen = torch.tensor(plens)
    ctx = TokenContext.packed(pos, pos < plen[row], plen, row)
    h = torch.randn(1, len(row), D, generator=torch.Generator().manual_seed(1)) * 4.0
    with torch.no_grad():
        batched = lp._apply_slots(h, ctx)
        assert batched is not None
        out = lp.apply(h, ctx)
        looped = lp._apply_looped(h, lp.scopes.masks(ctx))
        sae = saes[1].sae
        z = sae.encode(h[0])
        dense = h[0].clone()
        for r, s in enumerate(sets):
            sel, idx = row == r, torch.tensor(s)
            dense[sel] -= z[sel][:, idx] @ sae.W_dec[idx]
        active = torch.cat([(z[row == r][:, torch.tensor(s)] > 0).flatten() for r, s in enumerate(sets)]).float().mean()
    if sparse:  # few enough non-zero coefficients for the sparse branch at a decode token, and some
        assert 0 < float(active) <= _SPARSE_DECODE_FRACTION, float(active)
    else:
        assert float(active) > _SPARSE_DECODE_FRACTION, float(active)
    assert torch.allclose(out, looped, atol=1e-5, rtol=1e-5)
    assert torch.equal(out, batched)
    assert torch.allclose(out[0], dense, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, h), "the ablations must act"


def test_decode_coefficients_sparse_equals_the_matmul_and_ignores_batch_mates() -> None:
    """Sparse coefficients (an ablation's -z where few latents fire) decode through their non-zero terms
    only: equal to the dense `bmm` up to summation order, and each token's result is bit-identical
    whichever other tokens and groups share the call. Dense coefficients take the `bmm` itself."""
    g = torch.Generator().manual_seed(3)
    G, T, S = 3, 5, 200
    W_dec = torch.randn(G, S, D, generator=g)
    coeff = torch.randn(G, T, S, generator=g) * (torch.rand(G, T, S, generator=g) < 0.01)
    assert 0 < int(coeff.count_nonzero()) <= _SPARSE_DECODE_FRACTION * G * S
    out = decode_coefficients(coeff, W_dec)
    assert torch.allclose(out, torch.bmm(coeff, W_dec).view(G * T, D), atol=1e-5, rtol=1e-5)
    for gi, t in [(0, 0), (1, 3), (2, 4)]:
        alone = decode_coefficients(coeff[gi : gi + 1, t : t + 1], W_dec[gi : gi + 1])
        assert torch.equal(alone[0], out[gi * T + t]), (gi, t)
    dense = torch.randn(G, T, S, generator=g)
    assert torch.equal(decode_coefficients(dense, W_dec), torch.bmm(dense, W_dec).view(G * T, D))
    # The slot pool's form: rows read from the SAE's own decoder by latent id, the gathered decoder
    # made only for a dense decode (here never); a decoder in another precision sums in the coefficients'.
    full = torch.randn(1000, D, generator=g)
    ids = torch.randperm(1000, generator=g)[: G * S].view(G, S)

    def never() -> torch.Tensor:
        raise AssertionError("the sparse path made the gathered decoder")

    want = torch.bmm(coeff, full[ids]).view(G * T, D)
    assert torch.allclose(decode_coefficients(coeff, never, (ids, full)), want, atol=1e-5, rtol=1e-5)
    low = decode_coefficients(coeff, never, (ids, full.bfloat16()))
    assert low.dtype == torch.float32
    assert torch.allclose(low, torch.bmm(coeff, full[ids].bfloat16().float()).view(G * T, D), atol=1e-5, rtol=1e-5)
    for gi, t in [(0, 0), (2, 4)]:
        alone = decode_coefficients(coeff[gi : gi + 1, t : t + 1], never, (ids[gi : gi + 1], full))
        assert torch.equal(alone[0], decode_coefficients(coeff, never, (ids, full))[gi * T + t]), (gi, t)
    made: list[int] = []

    def gathered() -> torch.Tensor:
        made.append(1)
        return full[ids]

    assert torch.allclose(decode_coefficients(dense, gathered, (ids, full)),
                          torch.bmm(dense, full[ids]).view(G * T, D), atol=1e-4, rtol=1e-4)
    assert made == [1], "dense coefficients decode through the gathered rows"


def test_group_constants_are_reused_across_compositions_and_keep_the_last_listing() -> None:
    """Under load every step has a new batch composition; a new plan reuses the constants of groups it
    has seen (same edits, same tensors) instead of rebuilding them. A latent listed twice in one op
    keeps its last value, as the math in docs/interventions.md says, whichever plan it is in."""
    saes = build_layer_saes({1: make_sae(D, 64, "jumprelu", seed=4, norm=4.0)}, D, N_LAYERS)
    clamp = ClampLatents(latents={1: (9, 2, 9)}, values={1: (1.0, 2.0, 3.0)}, value=0.0)
    other = AblateLatents(latents={1: (4, 5)})
    first = compile_plan([(clamp,), (other,)], [3, 3], saes, N_LAYERS, D, torch.device("cpu")).latent_layers[1]
    second = compile_plan([(other,), (), (clamp,)], [2, 3, 4], saes, N_LAYERS, D, torch.device("cpu")).latent_layers[1]
    g1 = next(g for g in first.groups if g.key == (2, 9))
    g2 = next(g for g in second.groups if g.key == (2, 9))
    assert g1.membership is g2.membership and g1.targets is g2.targets
    assert g1.targets.tolist() == [[2.0, 3.0]]  # latent 9: its last value, 3.0
    assert g2.ops.tolist() == [[1]] and g1.ops.tolist() == [[0]]  # the rows' own op indices, per plan
    # and the edit acts as the closed form says: z'_9 = 3, z'_2 = 2
    h = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(2)) * 4.0
    p = torch.arange(3)
    out = first.apply(h, TokenContext.packed(p, p < 3, torch.tensor([3, 3]), torch.zeros_like(p)))
    sae = saes[1].sae
    z = sae.encode(h[0])
    want = h[0] + (torch.tensor([2.0, 3.0]) - z[:, [2, 9]]) @ sae.W_dec[[2, 9]]
    assert torch.allclose(out[0], want, atol=1e-5, rtol=1e-5)


def _decode_ctx(n_rows: int, plen: int = 3) -> TokenContext:
    """One decode token per row (position `plen`, a generated token)."""
    row = torch.arange(n_rows)
    pos = torch.full((n_rows,), plen)
    return TokenContext.packed(pos, pos < plen, torch.full((n_rows,), plen), row)


def test_slot_pool_writes_only_new_sets_and_every_composition_equals_the_dense_sae() -> None:
    """Under load the batch composition changes almost every step. The batched path keeps each latent
    set in a slot of the SAE's pool while it is in use, so a new composition writes only the sets it
    brings; slots of sets that left are reused. Every composition still equals the dense
    computation (full encode, then each row's own closed form), including two groups with the same
    latents edited differently (each gets its own slot); new sets take the lowest free slots, so the
    matmul covers only the leading slots."""
    saes = build_layer_saes({1: make_sae(D, 64, "jumprelu", seed=6, norm=4.0)}, D, N_LAYERS)
    sae = saes[1].sae
    pool = saes[1].pool
    sets = {name: tuple(range(start, 64, step)) for name, start, step in
            [("a", 0, 3), ("b", 1, 4), ("c", 2, 5), ("d", 5, 7), ("e", 3, 2)]}

    def run(names: list[str], clamp_b: bool = False) -> None:
        rows = [(ClampLatents(latents={1: sets["b"]}, value=1.5),) if clamp_b and n == "b!" else
                (AblateLatents(latents={1: sets[n.rstrip("!")]}),) for n in names]
        lp = compile_plan(rows, [3] * len(rows), saes, N_LAYERS, D, torch.device("cpu")).latent_layers[1]
        h = torch.randn(1, len(rows), D, generator=torch.Generator().manual_seed(len(names))) * 4.0
        with torch.no_grad():
            out = lp._apply_slots(h, _decode_ctx(len(rows)))
            assert out is not None
            z = sae.encode(h[0])
            for r, n in enumerate(names):
                idx = torch.tensor(sets[n.rstrip("!")])
                target = 1.5 if n.endswith("!") else 0.0
                want = h[0, r] + (target - z[r, idx]) @ sae.W_dec[idx]
                assert torch.allclose(out[0, r], want, atol=1e-5, rtol=1e-5), (names, r)

    run(["a", "b", "c"])
    assert pool.writes == 3 and pool.stack is not None and pool.stack.W_enc_rows.shape[0] == 3
    run(["b", "c", "d"])  # "a" left, "d" joins: one write, into a's slot
    assert pool.writes == 4 and pool.stack.W_enc_rows.shape[0] == 3
    run(["c", "d", "b", "e"])  # one more set: the pool grows, keeping its slots
    assert pool.writes == 5 and pool.stack.W_enc_rows.shape[0] == 4
    run(["b", "b!", "c", "d"], clamp_b=True)  # b ablated and b clamped: two groups, two slots
    assert pool.writes == 6
    run(["e", "a"])  # 2 sets in a 4-slot pool: kept
    assert pool.stack.W_enc_rows.shape[0] == 4
    run(["a", "b", "c", "d", "e"])  # 5 sets: grows by half, to 6 slots
    assert pool.stack.W_enc_rows.shape[0] == 6
    n_before = pool.writes
    new = [tuple(range(40, 40 + i)) for i in (3, 4)]  # two unseen sets take the lowest slots
    rows = [(AblateLatents(latents={1: s}),) for s in new]
    lp = compile_plan(rows, [3, 3], saes, N_LAYERS, D, torch.device("cpu")).latent_layers[1]
    groups = lp._batch_consts()
    assert pool.assign(groups.keys, groups.edits) == [0, 1] and pool.writes == n_before + 2
    h = torch.randn(1, 2, D, generator=torch.Generator().manual_seed(7)) * 4.0
    with torch.no_grad():
        out = lp._apply_slots(h, _decode_ctx(2))
        looped = lp._apply_looped(h, lp.scopes.masks(_decode_ctx(2)))
    assert out is not None and torch.allclose(out, looped, atol=1e-5, rtol=1e-5)
    assert pool.writes == n_before + 2, "both sets were in their slots already"
    # a set that was in a slot for another edit (clamped, not ablated) is a new group: it takes a slot of its own
    clamp = compile_plan([(ClampLatents(latents={1: new[0]}, value=2.0),), rows[1]], [3, 3], saes, N_LAYERS, D,
                         torch.device("cpu")).latent_layers[1]
    with torch.no_grad():
        out = clamp._apply_slots(h, _decode_ctx(2))
        looped = clamp._apply_looped(h, clamp.scopes.masks(_decode_ctx(2)))
    assert out is not None and torch.allclose(out, looped, atol=1e-5, rtol=1e-5)
    assert pool.writes == n_before + 3



def test_slot_pool_moves_its_top_set_into_a_hole_and_results_stay_exact() -> None:
    """When requests leave, their slots become holes below the batch's highest slot, and the matmul
    still reads them. Each call moves the highest set into the lowest hole (encoder rows, biases,
    thresholds, edit constants, gathered decoder rows), so the batch settles in the leading slots;
    results before and after a move equal the dense computation, on the sparse and the dense decode."""
    saes = build_layer_saes({1: make_sae(D, 64, "jumprelu", seed=8, norm=4.0)}, D, N_LAYERS)
    sae, pool = saes[1].sae, saes[1].pool
    sets = {name: tuple(range(start, 64, step)) for name, start, step in
            [("a", 0, 3), ("b", 1, 4), ("c", 2, 5), ("d", 5, 7)]}

    def run(names: list[str], prefill: int = 1) -> list[int]:
        rows = [(AblateLatents(latents={1: sets[n]}),) for n in names]
        lp = compile_plan(rows, [3] * len(rows), saes, N_LAYERS, D, torch.device("cpu")).latent_layers[1]
        n = len(rows) * prefill
        h = torch.randn(1, n, D, generator=torch.Generator().manual_seed(n)) * 4.0
        p = torch.arange(prefill).repeat(len(rows))  # each row's first `prefill` positions
        ctx = TokenContext.packed(p, p < 3, torch.full((len(rows),), 3),
                                  torch.arange(len(rows)).repeat_interleave(prefill))
        with torch.no_grad():
            out = lp._apply_slots(h, ctx)
            z = sae.encode(h[0])
            for r, name in enumerate(names):
                idx = torch.tensor(sets[name])
                for t in range(r * prefill, (r + 1) * prefill):
                    want = h[0, t] - z[t, idx] @ sae.W_dec[idx]
                    assert torch.allclose(out[0, t], want, atol=1e-5, rtol=1e-5), (names, t)
        groups = lp._batch_consts()
        return pool.assign(groups.keys, groups.edits)

    assert run(["a", "b", "c", "d"], prefill=40) == [0, 1, 2, 3]
    assert pool.moves == 0 and pool._dec_ready[3] < 0, "40 tokens a row decode densely: decoder rows gathered"
    assert sorted(run(["a", "d"])) == [0, 1] and pool.moves == 1, "d moved from slot 3 into the hole at 1"
    assert pool.writes == 4, "moving is not re-gathering"
    run(["a", "d"], prefill=40)  # the moved set's decoder rows moved with it (dense decode)
    assert pool.moves == 1 and pool.writes == 4
