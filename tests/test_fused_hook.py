"""The fused CPU kernel of the latent hook (server/fused_hook.py) against independent computations.

* its edits equal sae-lens's own dense encode / decode (h + (z'_S - z_S) W_dec[S]) for ablation,
  clamp and scaling, JumpReLU and ReLU SAEs, with b_dec subtracted from the input and with
  sae-lens's constant-norm rescaling;
* a token's result is bit-identical whatever else the call holds: alone, beside other sets' tokens,
  and as any token of a block of its own set's tokens (batch invariance by construction);
* through a plan (`compile_plan(fused=True)`) it takes the decode tokens, leaves a long prefill to
  the slot path, leaves rows with several ops to the slot path, and agrees with the unfused plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from refusal_audit.audit.spec import AblateLatents, ClampLatents, ScaleLatents, TokenScope
from refusal_audit.server import fused_hook
from refusal_audit.server.interventions import TokenContext, compile_plan
from refusal_audit.server.sae_runtime import build_layer_saes
from tiny import make_sae

if not fused_hook.available():  # pragma: no cover - depends on the machine
    pytest.skip("the fused hook kernel could not be built here (no C compiler with OpenMP; see the log)",
                allow_module_level=True)

D, D_SAE, N_LAYERS = 48, 96, 4


def _ctx(counts: list[int], plens: list[int]) -> tuple[TokenContext, torch.Tensor]:
    """A packed step: row r brings counts[r] tokens (a prefill from 0, or one decode token at plens[r])."""
    row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    pos = torch.cat([torch.arange(n) + (plens[r] if n == 1 else 0) for r, n in enumerate(counts)])
    plen = torch.tensor(plens)
    return TokenContext.packed(pos, pos < plen[row], plen, row), row


def _dense(sae: Any, h: torch.Tensor, row: torch.Tensor, edits: list[tuple[tuple[int, ...], float, float]]) -> torch.Tensor:
    """h + sum_{i in S} (a z_i + b - z_i) W_dec[i] per row, through sae-lens's own encode (z) and
    W_dec, with its output scale when the SAE normalises its input."""
    z = sae.encode(h)
    out = h.clone()
    for r, (ids, a, b) in enumerate(edits):
        sel, idx = row == r, torch.tensor(ids)
        zs = z[sel][:, idx]
        recon_delta = ((a - 1.0) * zs + b) @ sae.W_dec[idx]
        if sae.cfg.normalize_activations == "constant_norm_rescale":  # decode-space delta times ||h|| / sqrt(d)
            recon_delta = recon_delta * (h[sel].norm(dim=-1, keepdim=True) / D**0.5)
        out[sel] += recon_delta
    return out


@pytest.mark.parametrize("arch,norm", [("jumprelu", "none"), ("standard", "none"), ("jumprelu", "constant_norm_rescale")])
def test_fused_edits_equal_the_dense_sae(arch: str, norm: str) -> None:
    assert fused_hook.MAX_TOKENS >= 8
    sae = make_sae(D, D_SAE, arch, seed=3, norm=4.0, normalize_activations=norm)  # type: ignore[arg-type]
    saes = build_layer_saes({1: sae}, D, N_LAYERS)
    sets = [tuple(range(0, D_SAE, 3)), (1, 2, 9), tuple(range(10, 70)), (7,), tuple(range(5, 40, 2))]
    edits = [(sets[0], 0.0, 0.0), (sets[1], 0.0, 2.5), (sets[2], -3.0, 0.0), (sets[3], 0.0, 0.0), (sets[4], 0.5, 0.0)]
    rows = [
        (AblateLatents(latents={1: sets[0]}),),
        (ClampLatents(latents={1: sets[1]}, value=2.5),),
        (ScaleLatents(latents={1: sets[2]}, factor=-3.0),),
        (AblateLatents(latents={1: sets[3]}),),
        (ScaleLatents(latents={1: sets[4]}, factor=0.5),),
    ]
    counts, plens = [1, 1, 8, 1, 3], [4, 6, 8, 2, 3]  # decodes and short prefills: all within MAX_TOKENS
    ctx, row = _ctx(counts, plens)
    h = torch.randn(1, len(row), D, generator=torch.Generator().manual_seed(2)) * 4.0
    fused = compile_plan(rows, plens, saes, N_LAYERS, D, torch.device("cpu"), fused=True).latent_layers[1]
    with torch.no_grad():
        assert fused._fused_arrays is not None
        out = fused.apply(h, ctx)[0]
        want = _dense(saes[1].sae, h[0], row, edits)
        z = saes[1].sae.encode(h[0])
    assert saes[1].pool.writes == 0, "every token took the fused kernel: no slot was written"
    assert float((z > 0).float().mean()) > 0.05, "some latents must fire for the test to mean anything"
    assert torch.allclose(out, want, atol=1e-4, rtol=1e-4), float((out - want).abs().max())
    assert not torch.allclose(out, h[0], atol=1e-3), "the edits must act"


def test_a_token_is_bit_identical_whatever_its_batch() -> None:
    """Each token alone equals the same token inside calls of other compositions: beside other sets'
    tokens, in a block with its own set's tokens (at any position in the block), sets reordered."""
    sae = make_sae(640, 2048, "jumprelu", seed=1, norm=8.0)  # the model width: a real vectorised dot product
    saes = build_layer_saes({1: sae}, 640, N_LAYERS)
    arrays = saes[1].fused_arrays()
    assert arrays is not None
    g = torch.Generator().manual_seed(0)
    sets = [torch.randperm(2048, generator=g)[:300].sort().values for _ in range(3)]
    tables = fused_hook.set_tables([(s, torch.full((len(s),), a), torch.full((len(s),), b))
                                    for s, a, b in zip(sets, (0.0, 0.0, -3.0), (0.0, 1.5, 0.0), strict=True)])
    x = torch.randn(40, 640, generator=g) * 8.0
    tok_set = np.array([0] * 20 + [1] * 3 + [2] * 17)
    together = fused_hook.fused_delta(x, tok_set, tables, arrays)
    for t in range(40):
        alone = fused_hook.fused_delta(x[t:t + 1], tok_set[t:t + 1], tables, arrays)
        assert torch.equal(alone[0], together[t]), t
    # the same tokens, the sets' order and block boundaries shifted (set 0 starts at token 5 of a block)
    perm = np.r_[23:40, 20:23, 0:20]
    shifted = fused_hook.fused_delta(x[perm], tok_set[perm], tables, arrays)
    assert torch.equal(shifted, together[perm])
    assert float(together.abs().max()) > 0, "the edits must act"
    # edited in place of a stream: the tokens' rows are x + their terms, bit for bit, other rows copies
    stream = torch.randn(50, 640, generator=g) * 8.0
    at = np.sort(torch.randperm(50, generator=g)[:40].numpy())
    stream[at] = x
    edited = fused_hook.fused_edit(stream, at, tok_set, tables, arrays)
    assert torch.equal(edited[at], x + together)
    rest = np.setdiff1d(np.arange(50), at)
    assert torch.equal(edited[rest], stream[rest])


def test_fused_step_groups_tokens_itself_and_leaves_long_sets() -> None:
    """`fused_step` (grouping in C) equals `fused_edit` given the same tokens sorted by set: tokens of no
    row (-1), rows with no op (-1) and rows interleaved in any order; a set past `max_tokens` is left
    unedited and named in the mask, the others still edited bit for bit."""
    sae = make_sae(640, 2048, "jumprelu", seed=3, norm=8.0)
    arrays = build_layer_saes({1: sae}, 640, N_LAYERS)[1].fused_arrays()
    assert arrays is not None
    g = torch.Generator().manual_seed(7)
    sets = [torch.randperm(2048, generator=g)[:300].sort().values for _ in range(3)]
    tables = fused_hook.set_tables([(s, torch.zeros(len(s)), torch.zeros(len(s))) for s in sets])
    tok_row = np.array([2, 0, -1, 3, 2, 1, 0, 4, 0, 0, -1, 3])  # row 1 has no op, rows 4+ do not exist
    row_set = np.array([1, -1, 0, 2])
    h = torch.randn(len(tok_row), 640, generator=g) * 8.0
    out, left = fused_hook.fused_step(h, tok_row, row_set, tables, arrays)
    assert left is None
    touched = np.flatnonzero((tok_row >= 0) & (tok_row < 4))
    touched = touched[row_set[tok_row[touched]] >= 0]
    sets_of = row_set[tok_row[touched]]
    order = np.argsort(sets_of, kind="stable")
    ref = fused_hook.fused_edit(h, touched[order], sets_of[order], tables, arrays)
    assert torch.equal(out, ref)
    assert not torch.equal(out[touched], h[touched]), "the edits must act"
    untouched = np.setdiff1d(np.arange(len(tok_row)), touched)
    assert torch.equal(out[untouched], h[untouched])
    # set 1 (row 0: four tokens) past max_tokens = 3: left as it was, flagged; sets 0 and 2 (two tokens each)
    # edited as before
    out2, left2 = fused_hook.fused_step(h, tok_row, row_set, tables, arrays, max_tokens=3)
    assert left2 is not None and left2.tolist() == [False, True, False]
    of_set1 = np.flatnonzero(tok_row == 0)
    assert torch.equal(out2[of_set1], h[of_set1])
    others = np.setdiff1d(np.arange(len(tok_row)), of_set1)
    assert torch.equal(out2[others], out[others])
    with pytest.raises(ValueError, match="tok_row"):
        fused_hook.fused_step(h, tok_row[:-1], row_set, tables, arrays)


def test_in_place_edit_of_the_hidden_residual_pair_equals_the_new_stream() -> None:
    """vLLM hands the stream as (hidden, residual): editing hidden in place after adding residual into it
    (and zeroing residual) gives the same bits as the edit of hidden + residual into a new tensor, also
    through a plan whose long prefill is left to the slot path."""
    sae = make_sae(D, D_SAE, "jumprelu", seed=5, norm=4.0)
    long = fused_hook.MAX_TOKENS + 8
    sets = [tuple(range(0, 64, 3)), (1, 2, 9), tuple(range(10, 60))]
    rows = [(AblateLatents(latents={1: s}),) for s in sets]
    for counts, plens in (([1, 1, 1], [5, 3, 4]), ([long, 1, 1], [long, 3, 4])):
        ctx, row = _ctx(counts, plens)
        g = torch.Generator().manual_seed(2)
        hidden, residual = torch.randn(len(row), D, generator=g) * 4.0, torch.randn(len(row), D, generator=g)
        saes = build_layer_saes({1: sae}, D, N_LAYERS)
        plan = compile_plan(rows, plens, saes, N_LAYERS, D, torch.device("cpu"), fused=True).latent_layers[1]
        with torch.no_grad():
            want = plan.apply((hidden + residual).unsqueeze(0), ctx)[0]
            h2, r2 = hidden.clone(), residual.clone()
            assert plan.edit_in_place(h2, r2, ctx)
        assert torch.equal(h2, want), counts
        assert not r2.any()
        assert not torch.equal(want, hidden + residual), "the edits must act"
        # a residual of another layout: nothing touched, the caller takes the general path
        h3, r3 = hidden.clone(), residual.t().contiguous().t()
        assert not plan.edit_in_place(h3, r3, ctx)
        assert torch.equal(h3, hidden)


def test_plan_sends_long_prefills_and_multi_op_rows_to_the_slot_path() -> None:
    sae = make_sae(D, D_SAE, "jumprelu", seed=5, norm=4.0)
    saes = build_layer_saes({1: sae}, D, N_LAYERS)
    long = fused_hook.MAX_TOKENS + 8
    sets = [tuple(range(0, 64, 3)), (1, 2, 9), tuple(range(10, 60))]
    rows = [(AblateLatents(latents={1: s}),) for s in sets]
    counts, plens = [long, 1, 1], [long, 3, 4]
    ctx, row = _ctx(counts, plens)
    h = torch.randn(1, len(row), D, generator=torch.Generator().manual_seed(1)) * 4.0
    fused = compile_plan(rows, plens, saes, N_LAYERS, D, torch.device("cpu"), fused=True).latent_layers[1]
    plain_saes = build_layer_saes({1: sae}, D, N_LAYERS)
    plain = compile_plan(rows, plens, plain_saes, N_LAYERS, D, torch.device("cpu")).latent_layers[1]
    with torch.no_grad():
        out, ref = fused.apply(h, ctx), plain.apply(h, ctx)
        want = _dense(sae, h[0], row, [(s, 0.0, 0.0) for s in sets])
    assert saes[1].pool.writes == 1, "only the long prefill's set went through the slot pool"
    assert torch.equal(out[0, row == 0], ref[0, row == 0]), "the long prefill took the slot path, as unfused"
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out[0], want, atol=1e-4, rtol=1e-4)

    # a row with two ops of different scopes needs per-token op weights: the whole layer keeps the slot path
    multi = [(AblateLatents(latents={1: sets[0]}), ClampLatents(latents={1: (0, 3)}, value=1.0, scope=TokenScope(kind="prompt"))),
             rows[1][0:1]]
    mp = compile_plan(multi, [3, 3], saes, N_LAYERS, D, torch.device("cpu"), fused=True).latent_layers[1]
    assert mp._fused_arrays is None
    # and a batch-invariant plan never takes the kernel (its mode fixes one path)
    inv = compile_plan(rows, plens, saes, N_LAYERS, D, torch.device("cpu"), fused=True, batch_invariant=True)
    assert not inv.latent_layers[1].fused


def test_the_int8_screen_skips_most_rows_and_changes_no_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The screen proves most latents silent from an int8 copy of their encoder row and computes
    the rest in full: bit-identical to the kernel without it, also for latents whose threshold sits
    a hair below (fires) or at (does not) the exact pre-activation, and for non-finite inputs."""
    d, d_sae = 640, 4096
    sae = make_sae(d, d_sae, "jumprelu", seed=2, norm=8.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, d, generator=g) * 8.0
    with torch.no_grad():  # thresholds as a trained SAE's: ~1 % of the latents fire on these inputs
        pre = x @ sae.W_enc + sae.b_enc - sae.b_dec @ sae.W_enc
        sae.threshold.copy_(pre.quantile(0.99, dim=0).clamp(min=0.0))
    saes = build_layer_saes({1: sae}, d, N_LAYERS)
    arrays = saes[1].fused_arrays()
    assert arrays is not None
    sets = [torch.randperm(d_sae, generator=g)[:800].sort().values for _ in range(6)]
    tables = fused_hook.set_tables([(s, torch.zeros(len(s)), torch.zeros(len(s))) for s in sets])
    # 4 tokens of each of five sets (screened: at most SCREEN_MAX_TOKENS), and 4 of the last set too
    tok_set = np.repeat(np.arange(6), 4)
    assert fused_hook.SCREEN_MAX_TOKENS >= 4
    # the pre-activations (torch's matmul, within float32 rounding of the kernel's), to put thresholds at them
    exact_pre = torch.from_numpy(arrays.b_enc)[None, :] + x @ torch.from_numpy(arrays.enc_rows).T
    floor = arrays.floor.copy()
    for t, s in ((0, 0), (9, 2), (17, 4)):
        i = int(sets[s][5])
        floor[i] = np.nextafter(np.float32(exact_pre[t, i]), np.float32(-np.inf))  # fires, by one ulp
        j = int(sets[s][6])
        floor[j] = np.float32(exact_pre[t, j])  # silent: pre is not above the threshold
    arrays = dataclasses.replace(arrays, floor=floor)  # the screen's numbers follow the new thresholds
    assert np.array_equal(arrays.screen_meta[:, 0], floor.astype(np.float64) - arrays.b_enc.astype(np.float64))
    full = fused_hook.fused_delta(x, tok_set, tables, arrays, screen=False)
    fused_hook.counts(reset=True)
    screened = fused_hook.fused_delta(x, tok_set, tables, arrays, screen=True)
    counted = fused_hook.counts(reset=True)
    assert torch.equal(screened, full)
    assert counted["screened"] == 24 * 800, counted  # every pair of these small sets went through the screen
    assert 0 < counted["exact"] < 0.1 * 24 * 800, counted  # most rows skipped, the firing ones computed
    # two sets of 13 and 11 tokens, within the limit: blocks of four tokens per row read and the rest
    assert fused_hook.SCREEN_MAX_TOKENS >= 13
    some = np.repeat(np.arange(2), [13, 11])
    assert torch.equal(fused_hook.fused_delta(x, some, tables, arrays, screen=True),
                       fused_hook.fused_delta(x, some, tables, arrays, screen=False))
    assert fused_hook.counts(reset=True)["screened"] == 24 * 800
    # one set of 24 tokens (three blocks of tokens per row read), screened
    assert fused_hook.SCREEN_MAX_TOKENS >= 24
    many = np.zeros(24, dtype=np.int64)
    assert torch.equal(fused_hook.fused_delta(x, many, tables, arrays, screen=True),
                       fused_hook.fused_delta(x, many, tables, arrays, screen=False))
    assert fused_hook.counts(reset=True)["screened"] == 24 * 800
    # a set with more tokens than SCREEN_MAX_TOKENS skips the screen: the same bits again
    monkeypatch.setattr(fused_hook, "SCREEN_MAX_TOKENS", 16)
    assert torch.equal(fused_hook.fused_delta(x, many, tables, arrays, screen=True),
                       fused_hook.fused_delta(x, many, tables, arrays, screen=False))
    assert fused_hook.counts(reset=True)["screened"] == 0
    assert float(full.abs().max()) > 0
    x_bad = x.clone()
    x_bad[1, 3] = float("inf")
    x_bad[10, 0] = float("nan")
    full_bad = fused_hook.fused_delta(x_bad, tok_set, tables, arrays, screen=False)
    screened_bad = fused_hook.fused_delta(x_bad, tok_set, tables, arrays, screen=True)
    assert torch.equal(screened_bad.isnan(), full_bad.isnan())
    ok = ~full_bad.isnan()
    assert torch.equal(screened_bad[ok], full_bad[ok])


def test_screen_slack_bounds_the_estimate_error() -> None:
    """The bound the screen relies on holds: with the token split into its heavy dimensions x_h
    (computed apart) and the rest x_r quantised to int16 as the kernel does (sx = max|x_r| / xmax,
    xq = round(x_r / sx)), |fl(x . e) - x_h . e_h - scale sx (xq . q)| <= ||x|| rounding +
    ||x_r|| q_err + ||x_r - sx xq|| q_norm (checked in float64 against float32 dot products, over rows
    of many magnitudes and inputs aligned with them or with massive dimensions, as residual streams
    have; with no heavy dimension and with two)."""
    g = torch.Generator().manual_seed(4)
    d = 640
    rows = torch.randn(256, d, generator=g) * torch.logspace(-3, 1, 256)[:, None]
    rows[7, 5] = 40.0  # one large entry: a coarse scale for the rest of its row
    q, scale = fused_hook.quantise_rows(rows)
    q_err, rounding, q_norm = (torch.from_numpy(a) for a in fused_hook.screen_bounds(rows, q, scale))
    qf = q.float() * scale[:, None]
    massive = torch.randn(16, d, generator=g)
    massive[:, 3] = 300.0
    massive[:8, 11] = -120.0
    x = torch.cat([torch.randn(16, d, generator=g), rows[:16].sign(), qf[:16], (rows - qf)[:16].sign(), massive])
    xmax = min(16383, (2**31 - 1) // (127 * d))
    ref = (x @ rows.T).double()
    ratios, bounds = [], []
    for heavy in ([], [3, 11]):
        xr = x.double().clone()
        xr[:, heavy] = 0.0
        sx = xr.abs().amax(dim=1, keepdim=True) / xmax
        xq = torch.round(xr / sx).clamp(-xmax, xmax)
        est = (xq @ q.double().T) * sx * scale.double()[None, :] + x.double()[:, heavy] @ rows.double()[:, heavy].T
        resid = (xr - sx * xq).norm(dim=1, keepdim=True)
        bound = (x.double().norm(dim=1, keepdim=True) * rounding[None, :] + xr.norm(dim=1, keepdim=True) * q_err[None, :]
                 + resid * q_norm[None, :])
        err = (ref - est).abs()
        assert bool((err <= bound).all()), (heavy, float((err / bound).max()))
        ratios.append(float((err / bound).max()))
        bounds.append(bound)
    assert min(ratios) > 0.05, "the bound should not be vacuous"
    # the massive inputs' bound shrinks with their heavy dimensions taken apart
    assert float(bounds[1][-16:].mean()) < 0.5 * float(bounds[0][-16:].mean())


def test_heavy_dimensions_tighten_the_screen_and_change_no_bit() -> None:
    """Inputs with massive dimensions (as residual streams have): the screen with those dimensions taken
    apart computes fewer pairs in full than without, and every result is bit-identical to the
    unscreened kernel; the first screened call chooses them (`pick_heavy_dims`), once."""
    d, d_sae = 640, 4096
    sae = make_sae(d, d_sae, "jumprelu", seed=5, norm=8.0)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, d, generator=g) * 2.0
    x[:, 100] = 400.0
    x[:, 7] = -150.0
    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc - sae.b_dec @ sae.W_enc
        sae.threshold.copy_(pre.quantile(0.97, dim=0).clamp(min=0.0))
    plain = build_layer_saes({1: sae}, d, N_LAYERS)[1].fused_arrays()
    assert plain is not None and plain.n_heavy == 0
    sets = [torch.randperm(d_sae, generator=g)[:1000].sort().values for _ in range(4)]
    tables = fused_hook.set_tables([(s, torch.zeros(len(s)), torch.zeros(len(s))) for s in sets])
    tok_set = np.repeat(np.arange(4), 4)
    full = fused_hook.fused_delta(x, tok_set, tables, plain, screen=False)
    exact = {}
    for name, dims in (("none", None), ("massive", [100, 7])):
        arrays = dataclasses.replace(plain)  # fresh arrays: heavy dimensions not chosen yet
        assert arrays.set_heavy_dims(np.array(dims or [], dtype=np.int64))
        assert not arrays.set_heavy_dims(np.array([1, 2]))  # once per arrays
        assert arrays.n_heavy == len(dims or []) and list(arrays.heavy[:arrays.n_heavy]) == (dims or [])
        fused_hook.counts(reset=True)
        got = fused_hook.fused_delta(x, tok_set, tables, arrays, screen=True)
        exact[name] = fused_hook.counts(reset=True)["exact"]
        assert torch.equal(got, full), name
    assert exact["massive"] < 0.7 * exact["none"], exact
    # chosen from the first screened call: the massive dimensions come first
    auto = dataclasses.replace(plain)
    assert torch.equal(fused_hook.fused_delta(x, tok_set, tables, auto, screen=True), full)
    assert set(auto.heavy[:2].tolist()) == {100, 7} and auto.n_heavy == fused_hook.HEAVY_DIMS
    assert list(fused_hook.pick_heavy_dims(x.numpy(), 2)) == [100, 7]


def _calibrated_arrays(d: int, d_sae: int, x: torch.Tensor, seed: int, fire: float) -> fused_hook.SAEArrays:
    """A JumpReLU SAE's kernel arrays with thresholds at which about `fire` of the latents fire on x."""
    sae = make_sae(d, d_sae, "jumprelu", seed=seed, norm=8.0)
    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc - sae.b_dec @ sae.W_enc
        sae.threshold.copy_(pre.quantile(1.0 - fire, dim=0).clamp(min=0.0))
    arrays = build_layer_saes({1: sae}, d, N_LAYERS)[1].fused_arrays()
    assert arrays is not None
    return arrays


def test_set_row_copies_change_no_bit() -> None:
    """The screen reading the sets' int8 row copies (`SAEArrays.set_rows`) gives the bits it gives reading
    the SAE's table, and those of the unscreened kernel: a set longer than the screen's chunk of latents
    (and not a multiple of it), a set of two blocks of tokens, a set with a constant term (every latent's
    term non-zero, firing or not), a set of most of the SAE (no copy: read in order anyway) and a width
    with a tail past the vector lanes."""
    d, d_sae = 96, 512
    g = torch.Generator().manual_seed(11)
    x = torch.randn(21, d, generator=g) * 4.0
    arrays = _calibrated_arrays(d, d_sae, x, seed=12, fire=0.04)
    lens = [150, 7, 300, 1]
    sets = [torch.randperm(d_sae, generator=g)[:n].sort().values for n in lens]
    assert lens[0] > 2 * 64 and lens[0] % 64 and 2 * lens[2] > d_sae
    edits = [(-0.0, 0.0), (0.5, 0.0), (0.0, 0.25), (2.0, 0.0)]  # (a, b): z' = a z + b
    tables = fused_hook.set_tables([(s, torch.full((len(s),), a), torch.full((len(s),), b))
                                    for s, (a, b) in zip(sets, edits, strict=True)])
    tok_set = np.repeat(np.arange(4), [12, 3, 5, 1])  # set 0: two blocks of 8 tokens (the second of 4)
    assert fused_hook.SCREEN_MAX_TOKENS >= 12
    copies = [arrays.set_rows(s) for s in tables.sets]
    assert copies[2] is None and all(c is not None for i, c in enumerate(copies) if i != 2)
    for s, c in zip(tables.sets, copies, strict=True):
        if c is not None:
            assert np.array_equal(c, arrays.enc_q[s.ids]) and c.ctypes.data % 64 == 0
            assert arrays.set_rows(s) is c  # made once per set
    full = fused_hook.fused_delta(x, tok_set, tables, arrays, screen=False)
    fused_hook.counts(reset=True)
    from_table = fused_hook.fused_delta(x, tok_set, tables, arrays, screen=True, set_rows=False)
    counted = fused_hook.counts(reset=True)
    from_copies = fused_hook.fused_delta(x, tok_set, tables, arrays, screen=True)
    assert fused_hook.counts(reset=True) == counted
    assert torch.equal(from_table, full) and torch.equal(from_copies, full)
    assert 0 < counted["exact"] < 0.5 * counted["screened"], counted
    assert float(full[tok_set == 2].abs().min()) > 0  # the constant term reached every token of set 2


def test_set_row_copies_stay_within_their_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past SET_ROWS_BUDGET bytes an SAE drops its least recently used copies; a StepKernel keeps the
    copies it was made with, and its results stay those of the unscreened kernel."""
    d, d_sae = 96, 1024
    g = torch.Generator().manual_seed(13)
    x = torch.randn(6, d, generator=g) * 4.0
    arrays = _calibrated_arrays(d, d_sae, x, seed=14, fire=0.04)
    sets = [torch.randperm(d_sae, generator=g)[:100].sort().values for _ in range(6)]
    tables = fused_hook.set_tables([(s, torch.zeros(len(s)), torch.zeros(len(s))) for s in sets])
    monkeypatch.setattr(fused_hook, "SET_ROWS_BUDGET", 4 * 100 * d + 64)  # four copies of 100 rows
    kernel = fused_hook.StepKernel(np.arange(6), tables, arrays)  # makes all six copies, holds them
    assert all(c is not None for c in kernel.set_rows)
    assert len(arrays._set_rows) == 4 and arrays._set_rows_bytes[0] == 4 * 100 * d
    kept = {id(s) for s, _ in arrays._set_rows.values()}
    assert kept == {id(s) for s in tables.sets[2:]}  # the two oldest dropped
    assert arrays.set_rows(tables.sets[0]) is not kernel.set_rows[0]  # a new copy, the old one still held
    out, left = kernel(x, np.arange(6))
    assert left is None
    ref = fused_hook.fused_edit(x, np.arange(6), np.arange(6), tables, arrays, screen=False)
    assert torch.equal(out, ref)
    assert not torch.equal(out, x), "the edits must act"
