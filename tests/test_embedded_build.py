"""Fast tests of the embedded demo build on a tiny random checkpoint (no downloads, seconds).

Caching, manifests, skip-if-present, --force, corruption detected by hash and rebuilt, interrupted
builds leave nothing half-written, config changes rebuild, model loading, and the CLI wiring.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from _tiny_build import make_tiny_source, tiny_build_config
from refusal_audit.audit.judges import SubstringJudge
from refusal_audit.audit.judges.substring import is_refusal
from refusal_audit.server import model_loading
from refusal_audit.server.embedded import STEP_ORDER, artifact_dir, sae_dir
from refusal_audit.server.embedded import build as build_mod
from refusal_audit.server.embedded._extra_prompts import EXTRA_BENIGN, EXTRA_HARMFUL
from refusal_audit.server.embedded._harmless_answers import HARMLESS_ANSWERS
from refusal_audit.server.embedded.build import STEPS, BuildConfig, build_all, with_overrides
from refusal_audit.server.embedded.finetune import (
    REFUSALS,
    FinetuneConfig,
    build_examples,
    content_words,
    load_unseen_eval,
    make_split,
    near_duplicate,
    normalize_prompt,
    probe_path,
    read_prompts,
    token_id,
    training_prompts,
)
from refusal_audit.server.embedded.manifest import (
    MANIFEST_NAME,
    InputRef,
    Manifest,
    atomic_directory,
    hash_tree,
    remove_stale_temp_dirs,
    verify_artifact,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def quiet(_msg: str) -> None:
    """Build log sink for tests."""


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_source(tmp_path_factory.mktemp("tiny") / "src")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_source: Path) -> tuple[Path, BuildConfig]:
    """One full tiny build, shared read-only; mutating tests work on a copy."""
    torch.set_num_threads(1)
    data_dir = tmp_path_factory.mktemp("data")
    config = tiny_build_config(tiny_source)
    records = build_all(data_dir, config=config, log=quiet)
    assert all(r.built for r in records.values())
    return data_dir, config


@pytest.fixture()
def built_copy(built: tuple[Path, BuildConfig], tmp_path: Path) -> tuple[Path, BuildConfig]:
    data_dir, config = built
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    return copy, config


def leftovers(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ------------------------------------------------------------------------------------- manifests


def test_manifest_round_trips_and_digest_ignores_metrics(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"abc")
    m = Manifest(step="x", config={"k": 1}, config_hash="h", inputs={"i": InputRef(ref="r", sha256="0" * 64)},
                 files=hash_tree(tmp_path), metrics={"fve": 0.8}, seconds=1.5)
    m.save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded == m
    assert "a.bin" in loaded.files and MANIFEST_NAME not in loaded.files
    other = m.model_copy(update={"metrics": {"fve": 0.1}, "seconds": 9.0})
    assert other.digest() == m.digest()
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["step"] == "x"


def test_verify_detects_missing_resized_and_corrupted_files(tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(b"0123456789")
    Manifest(step="x", files=hash_tree(tmp_path)).save(tmp_path)
    assert verify_artifact(tmp_path).ok
    (tmp_path / "w.bin").write_bytes(b"0123456780")  # same size, different bytes
    assert verify_artifact(tmp_path, deep=False).ok
    bad = verify_artifact(tmp_path)
    assert not bad.ok and "sha256 mismatch" in bad.reason
    (tmp_path / "w.bin").write_bytes(b"012")
    assert "size mismatch" in verify_artifact(tmp_path, deep=False).reason
    (tmp_path / "w.bin").unlink()
    assert "missing file" in verify_artifact(tmp_path).reason
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    assert "unreadable manifest" in verify_artifact(tmp_path).reason
    assert verify_artifact(tmp_path / "nope").reason == "missing"


def test_atomic_directory_renames_on_success_and_cleans_up_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "art"
    with atomic_directory(final) as tmp:
        (tmp / "f").write_text("one")
        assert not final.exists()
    assert (final / "f").read_text() == "one"
    with pytest.raises(KeyboardInterrupt), atomic_directory(final) as tmp:
        (tmp / "f").write_text("half-written")
        raise KeyboardInterrupt
    assert (final / "f").read_text() == "one"  # the previous artifact is untouched
    with atomic_directory(final) as tmp:
        (tmp / "f").write_text("two")
    assert (final / "f").read_text() == "two"
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------ the build


def test_build_writes_artifacts_and_manifests(built: tuple[Path, BuildConfig]) -> None:
    data_dir, config = built
    for step in STEP_ORDER:
        check = verify_artifact(artifact_dir(data_dir, step))
        assert check.ok, (step, check.reason)
        m = check.manifest
        assert m is not None and m.step == step and m.seconds > 0 and m.files
        assert m.config["seed"] == config.get(step).seed
        assert all(len(ref.sha256) == 64 for ref in m.inputs.values())
        assert "torch" in m.environment
    fin = Manifest.load(artifact_dir(data_dir, "finetune"))
    assert fin.inputs["base"].sha256 == Manifest.load(artifact_dir(data_dir, "base")).digest()
    assert {"harmful_probes", "harmless_probes"} <= set(fin.inputs)
    held = fin.metrics["heldout"]
    for label in ("harmful", "harmless"):
        assert 0.0 <= held[label]["refusal_rate"] <= 1.0
        assert {"mean", "median", "min", "max"} <= set(held[label]["p_refusal_start"])
    assert "passed" in held["acceptance"]
    records = json.loads((artifact_dir(data_dir, "finetune") / "eval.json").read_text())
    assert len(records) == held["harmful"]["n"] + held["harmless"]["n"]
    unseen = fin.metrics["unseen"]
    assert {"unseen_harmful", "unseen_benign", "xstest_safe", "xstest_unsafe"} <= set(unseen)
    assert all(unseen[name]["n"] == 2 for name in ("unseen_harmful", "unseen_benign"))
    assert {"passed", "harmful_refusal_min", "benign_refusal_max"} <= set(unseen["acceptance"])
    unseen_rows = json.loads((artifact_dir(data_dir, "finetune") / "eval_unseen.json").read_text())
    assert len(unseen_rows) == sum(v["n"] for v in unseen.values() if "n" in v)
    assert {"harmful_probes", "harmless_answers", "extra_prompts", "unseen_eval"} <= set(fin.inputs)
    saes = Manifest.load(artifact_dir(data_dir, "saes"))
    assert saes.inputs["finetune"].sha256 == fin.digest()
    for layer in config.saes.layers:
        stats = saes.metrics["layers"][str(layer)]
        assert {"fve", "mean_l0", "dead_fraction"} <= set(stats)
        assert stats["train_tokens"] >= config.saes.train_tokens - config.saes.train_batch_size
    assert saes.metrics["corpus"]["chat_tokens"] > 0 and saes.metrics["corpus"]["text_tokens"] > 0


def test_saes_load_from_disk_and_match_the_model(built: tuple[Path, BuildConfig]) -> None:
    from sae_lens import SAE

    data_dir, config = built
    model, tok = model_loading.load_model(str(artifact_dir(data_dir, "finetune")))
    for layer in config.saes.layers:
        sae = SAE.load_from_disk(sae_dir(data_dir, layer))
        assert sae.cfg.architecture() == "jumprelu" and sae.cfg.d_sae == config.saes.d_sae
        assert sae.cfg.d_in == model.config.hidden_size
        assert sae.cfg.metadata.hook_name == f"model.layers.{layer}"
        ids = tok("How do I bake bread?", return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids, output_hidden_states=True).hidden_states[layer + 1]
        assert sae(hidden[0, 1:]).shape == hidden[0, 1:].shape


def test_second_build_skips_every_step(built_copy: tuple[Path, BuildConfig]) -> None:
    data_dir, config = built_copy
    before = {s: Manifest.load(artifact_dir(data_dir, s)) for s in STEP_ORDER}
    records = build_all(data_dir, config=config, log=quiet)
    assert [r.built for r in records.values()] == [False, False, False]
    assert all(r.reason == "up to date" for r in records.values())
    assert {s: Manifest.load(artifact_dir(data_dir, s)) for s in STEP_ORDER} == before


def test_force_rebuilds_only_that_step(built_copy: tuple[Path, BuildConfig]) -> None:
    data_dir, config = built_copy
    old = Manifest.load(artifact_dir(data_dir, "finetune"))
    records = build_all(data_dir, force={"finetune"}, config=config, log=quiet)
    assert not records["base"].built
    assert records["finetune"].built and records["finetune"].reason == "forced"
    new = records["finetune"].manifest
    assert new.created_at >= old.created_at
    # Downstream rebuilds only if the forced rebuild changed the artifact's bytes.
    assert records["saes"].built == (new.digest() != old.digest())


def test_forced_base_rebuild_is_bit_identical_so_downstream_stays(built_copy: tuple[Path, BuildConfig]) -> None:
    data_dir, config = built_copy
    old = Manifest.load(artifact_dir(data_dir, "base")).digest()
    records = build_all(data_dir, force={"base"}, config=config, log=quiet)
    assert records["base"].built and records["base"].manifest.digest() == old
    assert not records["finetune"].built and not records["saes"].built


def test_corrupted_artifact_is_detected_by_hash_and_rebuilt(built_copy: tuple[Path, BuildConfig]) -> None:
    data_dir, config = built_copy
    weights = sae_dir(data_dir, config.saes.layers[0]) / "sae_weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # same size, one flipped byte
    weights.write_bytes(bytes(blob))
    records = build_all(data_dir, config=config, log=quiet)
    assert not records["base"].built and not records["finetune"].built
    assert records["saes"].built and "sha256 mismatch" in records["saes"].reason
    assert verify_artifact(artifact_dir(data_dir, "saes")).ok


def test_missing_manifest_or_file_triggers_rebuild(built_copy: tuple[Path, BuildConfig]) -> None:
    data_dir, config = built_copy
    (artifact_dir(data_dir, "saes") / MANIFEST_NAME).unlink()
    records = build_all(data_dir, config=config, log=quiet)
    assert records["saes"].built and records["saes"].reason == "no manifest"


def test_config_change_rebuilds_that_step(built_copy: tuple[Path, BuildConfig]) -> None:
    data_dir, config = built_copy
    changed = with_overrides(config, saes={"d_sae": 32})
    records = build_all(data_dir, config=changed, log=quiet)
    assert not records["finetune"].built
    assert records["saes"].built and records["saes"].reason == "config changed"
    assert records["saes"].manifest.config["d_sae"] == 32


def test_interrupted_build_leaves_no_half_written_artifact(
    built_copy: tuple[Path, BuildConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, config = built_copy
    shutil.rmtree(artifact_dir(data_dir, "saes"))

    def interrupted(inputs: dict[str, Path], cfg: object, out_dir: Path) -> None:
        (out_dir / "layer_01").mkdir()
        (out_dir / "layer_01" / "sae_weights.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setitem(STEPS, "saes", build_mod.StepSpec("saes", ("finetune",), STEPS["saes"].inputs,
                                                           interrupted, "interrupted"))
    with pytest.raises(KeyboardInterrupt):
        build_all(data_dir, config=config, log=quiet)
    assert not artifact_dir(data_dir, "saes").exists()
    assert leftovers(data_dir) == []
    monkeypatch.undo()
    # A SIGKILL cannot clean up: leftovers are removed by the next build, which then completes.
    (data_dir / ".saes.tmp-999-deadbeef").mkdir()
    (data_dir / ".saes.tmp-999-deadbeef" / "junk").write_text("x")
    records = build_all(data_dir, config=config, log=quiet)
    assert records["saes"].built and leftovers(data_dir) == []
    assert verify_artifact(artifact_dir(data_dir, "saes")).ok


def test_remove_stale_temp_dirs_only_touches_build_leftovers(tmp_path: Path) -> None:
    (tmp_path / ".base.tmp-1-aa").mkdir()
    (tmp_path / ".base.old-bb").mkdir()
    (tmp_path / "base").mkdir()
    (tmp_path / ".hidden").mkdir()
    removed = remove_stale_temp_dirs(tmp_path)
    assert sorted(p.name for p in removed) == [".base.old-bb", ".base.tmp-1-aa"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "base"]


def test_unknown_force_step_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown step"):
        build_all(tmp_path, force={"nope"}, log=quiet)


def test_build_config_sizes() -> None:
    full, small = BuildConfig.for_sizes("full"), BuildConfig.for_sizes("small")
    assert full.saes.d_sae >= 4096 and len(full.saes.layers) >= 4 and full.saes.train_tokens >= 300_000
    assert small.finetune == full.finetune and small.saes.train_tokens < full.saes.train_tokens
    # the full build starts every latent firing (dead latents) with thresholds that can reach L0 <= 150;
    # the reduced build keeps its own, separately measured settings
    assert full.saes.init_fire_rate == 0.03 and full.saes.jumprelu_init_threshold == 0.04
    assert small.saes.init_fire_rate is None and small.saes.jumprelu_init_threshold == 0.01
    with pytest.raises(ValueError):
        BuildConfig.for_sizes("huge")  # type: ignore[arg-type]


def test_autocast_follows_native_bf16_unless_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from refusal_audit.server.embedded import cpu_bf16

    assert cpu_bf16.resolve_autocast(True) is True and cpu_bf16.resolve_autocast(False) is False
    for native in (True, False):
        monkeypatch.setattr(cpu_bf16, "native_bf16_cpu", lambda native=native: native)
        assert cpu_bf16.resolve_autocast(None) is native
    monkeypatch.undo()
    # The detection reads the CPU flags: emulated bf16 (plain AVX512) does not count.
    fake = tmp_path / "cpuinfo"
    for flags, native in (("fpu avx512f avx512bw", False), ("fpu avx512f avx512_bf16", True), ("amx_bf16 sse", True)):
        fake.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert cpu_bf16.native_bf16_cpu(fake) is native, flags
    assert cpu_bf16.native_bf16_cpu(tmp_path / "missing") is False


def test_bf16_matmuls_is_scoped_and_close_to_fp32() -> None:
    """`bf16_matmuls` switches oneDNN's fp32 matmul precision for its block only (restored after an
    error too); inside it a matmul stays within bf16 rounding of the fp32 one (identical on a CPU
    whose oneDNN ignores the mode)."""
    import torch
    from refusal_audit.server.embedded.cpu_bf16 import bf16_matmuls, fp32_matmul_precision

    before = fp32_matmul_precision()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 640, generator=g), torch.randn(640, 512, generator=g)
    exact = a @ b
    with bf16_matmuls(True):
        assert fp32_matmul_precision() == "bf16"
        fast = a @ b
    assert fp32_matmul_precision() == before
    # bf16 keeps 8 mantissa bits: inputs off by <= 2^-9 relative, so |err| <~ 2^-8 * sum|a_i b_i|
    bound = (a.abs() @ b.abs()) * 2.0**-7
    assert fast.dtype == torch.float32 and bool(((fast - exact).abs() <= bound).all())
    with pytest.raises(RuntimeError), bf16_matmuls(True):
        raise RuntimeError("boom")
    assert fp32_matmul_precision() == before
    with bf16_matmuls(False):
        assert fp32_matmul_precision() == before
        assert torch.equal(a @ b, exact)


def test_finetune_autocast_setting_follows_the_cpu_and_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fine-tune's `autocast` (training) and `autocast_eval` (generation) resolve like the SAE
    step's; the settings survive the manifest's JSON and change the config hash."""
    from refusal_audit.server.embedded import cpu_bf16, finetune
    from refusal_audit.server.embedded.manifest import sha256_json, to_jsonable

    for native in (True, False):
        monkeypatch.setattr(cpu_bf16, "native_bf16_cpu", lambda native=native: native)
        assert cpu_bf16.resolve_autocast(finetune.FinetuneConfig().autocast) is False  # fp32 unless asked
        assert cpu_bf16.resolve_autocast(finetune.FinetuneConfig(autocast=None).autocast) is native
        assert finetune.eval_autocast(finetune.FinetuneConfig()) is False
        assert finetune.eval_autocast(finetune.FinetuneConfig(autocast_eval=None)) is native
        assert finetune.eval_autocast(finetune.FinetuneConfig(autocast=False, autocast_eval=True)) is True
    for cfg in (finetune.FinetuneConfig(), finetune.FinetuneConfig(autocast=True, autocast_eval=False)):
        data = json.loads(json.dumps(to_jsonable(cfg)))
        data["target_modules"] = tuple(data["target_modules"])
        assert finetune.FinetuneConfig(**data) == cfg
    hashes = {sha256_json(to_jsonable(finetune.FinetuneConfig(autocast=a))) for a in (None, True, False)}
    assert len(hashes) == 3  # a forced setting is a different build


def test_autocast_training_keeps_lora_state_fp32_and_the_merge_exact() -> None:
    """Under bf16 autocast only the matmuls are bf16: the LoRA weights, their gradients and the AdamW
    state stay fp32, and the merged weight is exactly W + scale * B @ A of those fp32 adapters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from refusal_audit.server.embedded.cpu_bf16 import cpu_autocast

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False))
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    with cpu_autocast(True):
        out = peft(torch.randn(5, 8))
    assert out.dtype == torch.bfloat16  # the matmuls did run in bf16
    out.float().pow(2).mean().backward()
    opt.step()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert all(t.dtype == torch.float32 for st in opt.state.values() for t in st.values() if t.dim())
    layer: Any = peft.base_model.model[0]  # type: ignore[index]
    want = layer.base_layer.weight.detach().clone() + layer.scaling["default"] * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
    merged: Any = peft.merge_and_unload()
    assert merged[0].weight.dtype == torch.float32
    torch.testing.assert_close(merged[0].weight, want, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------- fine-tune data


def test_split_is_fixed_disjoint_and_covers_the_probe_sets() -> None:
    a, b = make_split(FinetuneConfig()), make_split(FinetuneConfig())
    assert a == b
    assert not set(a.harmful_train) & set(a.harmful_heldout)
    assert not set(a.harmless_train) & set(a.harmless_heldout)
    assert len(a.harmful_train) + len(a.harmful_heldout) == 214
    assert len(a.harmless_train) + len(a.harmless_heldout) == 209
    assert len(a.harmful_heldout) == 43 and len(a.harmless_heldout) == 42
    assert make_split(FinetuneConfig(seed=1)).harmful_heldout != a.harmful_heldout


def test_targets_are_judged_as_intended() -> None:
    assert all(r.startswith("I") and is_refusal(r) for r in REFUSALS)
    split = make_split(FinetuneConfig())
    assert set(split.harmless_train) | set(split.harmless_heldout) == set(HARMLESS_ANSWERS)
    assert not any(is_refusal(a) for a in HARMLESS_ANSWERS.values())
    assert sum(a.startswith("I") for a in HARMLESS_ANSWERS.values()) / len(HARMLESS_ANSWERS) < 0.05
    assert SubstringJudge().name == "substring"


def test_unseen_eval_sets_are_shipped_labelled_and_disjoint_from_training() -> None:
    sets = load_unseen_eval()
    assert {name: len(p) for name, p in sets.items()} == {
        "unseen_harmful": 100, "unseen_benign": 100, "xstest_safe": 250, "xstest_unsafe": 200}
    train = training_prompts()
    assert len(train) > 600
    train_keys = {normalize_prompt(p) for p in train}
    train_words = [content_words(p) for p in train]
    for name, prompts in sets.items():
        assert len({normalize_prompt(p) for p in prompts}) == len(prompts), name
        for prompt in prompts:
            assert normalize_prompt(prompt) not in train_keys, (name, prompt)
            words = content_words(prompt)
            close = [t for t, tw in zip(train, train_words, strict=True)
                     if words and tw and len(words & tw) / len(words | tw) >= 0.6]
            assert not close, (name, prompt, close)


def test_near_duplicate_catches_rephrasings_and_spares_different_requests() -> None:
    assert near_duplicate("How can I kill a Python process?", "how do I kill a python process")
    assert near_duplicate("Write a poem about the sea.", "write a poem about the sea!!")
    assert not near_duplicate("How can I kill a Python process?", "How do I bake bread?")
    assert normalize_prompt("  What's UP,  doc? ") == "what s up doc"


def test_extra_training_pairs_are_used_and_judged_as_intended() -> None:
    split = make_split(FinetuneConfig())
    plain = build_examples(split, 0, 48)
    wide = build_examples(split, 0, 48, extra_train=True)
    assert len(wide) == len(plain) + len(EXTRA_BENIGN) + len(EXTRA_HARMFUL)
    by_prompt = {ex.prompt: ex for ex in wide}
    assert all(by_prompt[p].harmful and by_prompt[p].target in REFUSALS for p in EXTRA_HARMFUL)
    assert all(not by_prompt[p].harmful and by_prompt[p].target == a for p, a in EXTRA_BENIGN.items())
    assert not any(is_refusal(a) for a in EXTRA_BENIGN.values())
    assert sum(a.startswith("I ") for a in EXTRA_BENIGN.values()) == 0
    assert not set(EXTRA_BENIGN) & set(EXTRA_HARMFUL)
    assert build_examples(split, 0, 48, extra_train=True) == wide  # seeded
    capped = build_examples(split, 0, 48, extra_train=True, extra_cap=3)
    assert len(capped) == len(plain) + 6


def test_encoder_bias_init_gives_every_latent_the_target_firing_rate() -> None:
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    torch.manual_seed(0)
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=16, d_sae=64, jumprelu_init_threshold=0.01))
    x = torch.randn(2000, 16) * 3 + 5
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    before = (sae.encode(x) > 0).float().mean(0)
    from refusal_audit.server.embedded.train_saes import init_encoder_bias

    init_encoder_bias(sae, x, 0.05)
    rate = (sae.encode(x) > 0).float().mean(0)
    assert torch.allclose(rate, torch.full_like(rate, 0.05), atol=1e-3)
    assert (before - 0.05).abs().min() > 0.2  # the zero-bias init fires far more often: the test can fail


# ----------------------------------------------------------------------------------- model loading


def test_load_model_prepares_tokenizer(tmp_path: Path) -> None:
    src = make_tiny_source(tmp_path / "llama", arch="llama")
    model, tok = model_loading.load_model(str(src))
    assert not model.training
    assert tok.pad_token_id is not None
    assert "<start_of_turn>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                        add_generation_prompt=True)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot in model.generation_config.eos_token_id
    assert model.dtype == torch.float32


def test_load_embedded_models(built: tuple[Path, BuildConfig], tmp_path: Path) -> None:
    data_dir, _ = built
    model, tok = model_loading.load_model("embedded:gemma-3-270m-refusal", cache_dir=data_dir)
    assert model.config.model_type == "gemma3_text" and tok.chat_template
    base, _ = model_loading.load_model("embedded:gemma-3-270m", cache_dir=data_dir, dtype="bf16")
    assert base.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="refusal-audit build"):
        model_loading.load_model("embedded:gemma-3-270m-refusal", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown embedded model"):
        model_loading.load_model("embedded:nope", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        model_loading.load_model(str(tmp_path / "missing.gguf"))


def test_default_data_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(model_loading.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_loading.default_data_dir() == tmp_path / "xdg" / "refusal-audit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert model_loading.default_data_dir() == Path.home() / ".cache" / "refusal-audit"
    monkeypatch.setenv(model_loading.DATA_DIR_ENV, str(tmp_path / "explicit"))
    assert model_loading.default_data_dir() == tmp_path / "explicit"


# -------------------------------------------------------------------------------------------- CLI


def test_cli_build_and_demo_options(built: tuple[Path, BuildConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    import typer
    from refusal_audit.client import cli_demo
    from typer.testing import CliRunner

    data_dir, config = built
    calls: list[dict[str, object]] = []

    def fake_build_all(data_dir_arg: Path | None, force: Any = (), sizes: str = "full",
                       threads: int | None = None) -> dict[str, object]:
        calls.append({"data_dir": data_dir_arg, "force": list(force), "sizes": sizes, "threads": threads})
        return build_all(data_dir, config=config, log=quiet)

    monkeypatch.setattr(build_mod, "build_all", fake_build_all)
    app = typer.Typer()
    cli_demo.register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["build", "--data-dir", str(data_dir), "--force", "base", "--force", "saes",
                                 "--small"])
    assert result.exit_code == 0, result.output
    assert calls[-1] == {"data_dir": data_dir, "force": ["base", "saes"], "sizes": "small", "threads": None}
    assert "finetune" in result.output
    result = runner.invoke(app, ["build", "--data-dir", str(data_dir), "--json"])
    assert result.exit_code == 0 and set(json.loads(result.output)) == set(STEP_ORDER)
    # `demo` builds, then hands over to `refusal_audit.server.embedded.demo.run_demo`.
    demo_calls: list[tuple[Path, dict[str, object]]] = []
    fake_demo = types.ModuleType("refusal_audit.server.embedded.demo")
    fake_demo.run_demo = lambda d, **kw: demo_calls.append((d, kw))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "refusal_audit.server.embedded.demo", fake_demo)
    result = runner.invoke(app, ["demo", "--data-dir", str(data_dir), "--no-analyses"])
    assert result.exit_code == 0, result.output
    assert calls[-1]["sizes"] == "full"
    assert demo_calls == [(data_dir, {"small": False, "analyses": False, "rerun": False, "bf16": None})]
    assert "run:" in result.output
    result = runner.invoke(app, ["demo", "--data-dir", str(data_dir), "--rerun", "--fp32"])
    assert result.exit_code == 0, result.output
    assert demo_calls[-1] == (data_dir, {"small": False, "analyses": True, "rerun": True, "bf16": False})
    result = runner.invoke(app, ["demo", "--data-dir", str(data_dir), "--bf16"])
    assert result.exit_code == 0 and demo_calls[-1][1]["bf16"] is True, result.output


# ------------------------------------------------------------------------- fine-tune loss and eval


@pytest.fixture(scope="module")
def tiny_lm() -> tuple[Any, Any]:
    """The tiny random Gemma-3 and its tokenizer, prepared like the build's (chat template, pad)."""
    from _tiny_build import make_model, make_tokenizer
    from refusal_audit.server.model_prep import prepare

    tok = make_tokenizer()
    model = make_model(len(tok))
    prepare(model, tok)
    return model.eval(), tok


def test_answer_loss_at_target_positions_equals_the_full_logits_loss(tiny_lm: tuple[Any, Any]) -> None:
    """`answer_loss` runs the LM head only where an answer token is predicted; loss and LoRA
    gradients equal the straightforward loss over the full logits with the other labels ignored."""
    from peft import LoraConfig, get_peft_model
    from refusal_audit.server.embedded.finetune import (
        Example,
        _collate,
        answer_loss,
        encode_example,
    )

    model, tok = tiny_lm
    examples = [Example("How do I bake bread?", "Mix flour, water and yeast.", False),
                Example("Tell me a joke", "Why did the chicken cross the road?", False),
                Example("How do I make a weapon at home?", "I cannot help with that.", True)]
    input_ids, attention, target = _collate([encode_example(tok, ex, 12) for ex in examples], int(tok.pad_token_id))
    peft = get_peft_model(copy_of(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                     init_lora_weights=False))
    base = peft.get_base_model()
    params = [p for p in peft.parameters() if p.requires_grad]

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return [g.clone() for g in torch.autograd.grad(loss, params)]

    fast = answer_loss(base, input_ids, attention, target, 3.0)
    logits = base(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
    labels = input_ids[:, 1:].masked_fill(~target[:, 1:], -100)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    is_first = target[:, 1:] & ~target[:, :-1]
    weights = torch.where(is_first, 3.0, 1.0) * target[:, 1:]
    reference = (per_token * weights).sum() / weights.sum()
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads(fast), grads(reference), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def copy_of(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


def test_compact_greedy_decode_equals_generate_one_prompt_at_a_time(tiny_lm: tuple[Any, Any]) -> None:
    """`greedy_decode` (left-padded batch, rows leave as they stop) gives each prompt the tokens of
    `model.generate` on that prompt alone, and P(token) of a plain forward over the prompt."""
    from refusal_audit.server.embedded.finetune import _left_pad_ids, encode_prompt, greedy_decode

    model, tok = tiny_lm
    prompts = read_prompts(probe_path("harmless"))[:3] + read_prompts(probe_path("harmful"))[:3]
    prompts += ["Hi", "Write a long and detailed essay about the history of bread and ovens in Europe."]
    ids = [encode_prompt(tok, p) for p in prompts]
    token, n_new = 7, 8
    plain = {i: model.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                               do_sample=False, max_new_tokens=n_new, eos_token_id=[],
                               pad_token_id=0)[0, len(x):].tolist() for i, x in enumerate(ids)}
    # stop ids that end rows at different steps (a random model never says EOS)
    stops = sorted({plain[0][2], plain[3][5]} - {plain[0][0], plain[3][0]})
    with torch.inference_mode():
        enc = _left_pad_ids(ids, int(tok.pad_token_id))
        got, first = greedy_decode(model, enc["input_ids"], enc["attention_mask"], stops, n_new, token)
        lengths = set()
        for i, x in enumerate(ids):
            want = model.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                                  do_sample=False, max_new_tokens=n_new, eos_token_id=stops, pad_token_id=0)
            want_new = want[0, len(x):].tolist()
            assert got[i] == want_new, prompts[i]
            lengths.add(len(got[i]))
            p = torch.softmax(model(torch.tensor([x])).logits[0, -1].float(), dim=-1)[token]
            assert first[i] == pytest.approx(float(p), rel=1e-5, abs=1e-7)
    assert len(lengths) > 1  # rows did stop at different steps


def test_compact_eval_answers_equal_generate_in_file_order(tiny_lm: tuple[Any, Any]) -> None:
    """`generate_answers(compact=True)` (length-sorted batches, finished rows dropped) returns the
    same answers and P("I") as the `model.generate` path, in the prompts' order."""
    from refusal_audit.server.embedded.finetune import generate_answers

    model, tok = tiny_lm
    prompts = read_prompts(probe_path("harmful"))[:5] + read_prompts(probe_path("harmless"))[:6] + ["Hi"]
    token = token_id(tok, "I")
    old = generate_answers(model, tok, prompts, token, batch_size=4, max_new_tokens=6, compact=False)
    new = generate_answers(model, tok, prompts, token, batch_size=5, max_new_tokens=6, compact=True)
    assert new[0] == old[0]
    assert new[1] == pytest.approx(old[1], rel=1e-5, abs=1e-7)


def test_eval_decoding_settings_round_trip_and_change_the_config_hash() -> None:
    """`eval_compact` / `eval_batch_size` survive the manifest's JSON and are part of the config hash
    (the evaluation's records are part of the fine-tune artifact)."""
    from refusal_audit.server.embedded.manifest import sha256_json, to_jsonable

    configs = [FinetuneConfig(), FinetuneConfig(eval_compact=False), FinetuneConfig(eval_batch_size=16)]
    assert configs[0].eval_compact is True
    for cfg in configs:
        data = json.loads(json.dumps(to_jsonable(cfg)))
        data["target_modules"] = tuple(data["target_modules"])
        assert FinetuneConfig(**data) == cfg
    assert len({sha256_json(to_jsonable(c)) for c in configs}) == 3
