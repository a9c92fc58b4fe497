"""The SAE step's speed options: training the layers in worker processes reproduces sequential
training bit for bit at the same thread count, fused Adam trains to (nearly) the same SAE, and both
settings round-trip through the manifest's JSON and change the config hash."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from refusal_audit.server.embedded.manifest import sha256_json, to_jsonable
from refusal_audit.server.embedded.train_saes import SaeBuildConfig, train_layers
from safetensors.torch import load_file

LAYERS = (1, 4, 7)
TINY = SaeBuildConfig(layers=LAYERS, d_sae=48, train_tokens=40 * 32, eval_tokens=256, train_batch_size=32,
                      lr_warm_up_steps=5, l0_warm_up_steps=10, dead_feature_window=20, dead_check_train_tokens=512,
                      autocast=False, fused_adam=False, train_workers=1)


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _acts() -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    train = {layer: torch.randn(1600, 24, generator=gen) * (1 + layer) + layer for layer in LAYERS}
    held = {layer: torch.randn(256, 24, generator=gen) * (1 + layer) + layer for layer in LAYERS}
    return train, held


def _train(config: SaeBuildConfig, out: Path) -> tuple[dict[str, dict[str, float]], dict[int, dict[str, torch.Tensor]]]:
    train, held = _acts()
    metrics = train_layers(train, held, config, "tiny", out)
    weights = {layer: load_file(out / f"layer_{layer:02d}" / "sae_weights.safetensors") for layer in config.layers}
    return {k: {m: v for m, v in d.items() if m != "seconds"} for k, d in metrics.items()}, weights


def test_parallel_training_equals_sequential_bitwise(tmp_path: Path, one_thread: None) -> None:
    seq_metrics, seq = _train(TINY, tmp_path / "seq")
    par_metrics, par = _train(replace(TINY, train_workers=2), tmp_path / "par")
    assert list(par_metrics) == [str(layer) for layer in LAYERS]
    assert par_metrics == seq_metrics
    for layer in LAYERS:
        for name, tensor in seq[layer].items():
            assert torch.equal(tensor.view(torch.int32), par[layer][name].view(torch.int32)), (layer, name)
    # the layers differ from each other, so equal results are not one layer copied
    assert not torch.equal(seq[LAYERS[0]]["W_enc"], seq[LAYERS[1]]["W_enc"])


def test_fused_adam_trains_nearly_the_same_sae(tmp_path: Path, one_thread: None) -> None:
    config = replace(TINY, layers=(4,))
    plain_metrics, plain = _train(config, tmp_path / "plain")
    fused_metrics, fused = _train(replace(config, fused_adam=True), tmp_path / "fused")
    for name, tensor in plain[4].items():
        assert torch.allclose(tensor, fused[4][name], rtol=1e-3, atol=1e-4), name
    assert abs(plain_metrics["4"]["fve"] - fused_metrics["4"]["fve"]) < 1e-3
    # ... but not the same bits: the fused kernel did run (and the option is a different build)
    assert any(not torch.equal(tensor, fused[4][name]) for name, tensor in plain[4].items())


def test_speed_options_round_trip_and_change_the_config_hash() -> None:
    plain = SaeBuildConfig(fused_adam=False, train_workers=1)
    configs = [plain, replace(plain, fused_adam=True), replace(plain, train_workers=2)]
    for config in configs:
        data = json.loads(json.dumps(to_jsonable(config)))
        data["layers"] = tuple(data["layers"])
        assert SaeBuildConfig(**data) == config
    assert len({sha256_json(to_jsonable(c)) for c in configs}) == len(configs)


def _burn_cpu(seconds: float) -> None:
    import time

    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_build_timer_counts_the_workers_cpu() -> None:
    """A manifest's cpu_seconds includes forked workers' CPU (the SAE step trains in them)."""
    import multiprocessing

    from refusal_audit.server.embedded.manifest import Timer

    timer = Timer()
    child = multiprocessing.get_context("fork").Process(target=_burn_cpu, args=(0.3,))
    child.start()
    child.join()
    assert child.exitcode == 0
    assert timer.cpu_elapsed >= 0.3  # the child's own CPU clock reached 0.3 s before it exited
