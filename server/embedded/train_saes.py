"""Build step 3: small JumpReLU SAEs on the residual stream of the refusal-tuned model.

Activations are computed once, in one pass for all layers (the forward stops after the deepest
requested layer, so the 262k-vocabulary head never runs), kept in memory in fp32, and each SAE is
then trained with sae-lens' own `SAETrainer` + `JumpReLUTrainingSAE` from those cached activations.
The residual stream at layer L is the output of `model.model.layers[L]` (= `hidden_states[L+1]`).
The BOS position is excluded from training and evaluation: its norm is orders of magnitude larger
than any other token's and would dominate the reconstruction loss.

Training text (offline and licence-clean): the chat-formatted fine-tune training conversations
(temaq-abliterated prompts, MIT, with the fine-tune's targets) plus English prose shipped with
CPython itself -- the `pydoc_data.topics` documentation and the docstrings of the standard library
(both under the PSF License). Metrics (fraction of variance explained, mean L0, dead-latent
fraction) are measured on held-out sequences that no SAE saw during training.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import random
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .cpu_bf16 import cpu_autocast, resolve_autocast
from .manifest import InputRef, StepOutput, sha256_bytes

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class SaeBuildConfig:
    """Which layers, how wide, how many tokens, and the JumpReLU / optimiser settings."""

    seed: int = 0
    architecture: str = "jumprelu"  # "jumprelu" (JumpReLUTrainingSAE) or "batchtopk" (saved as JumpReLU)
    k: float = 48  # batchtopk only: mean active latents per token
    layers: tuple[int, ...] = (3, 6, 9, 12)
    d_sae: int = 4096
    train_tokens: int = 300_000  # per SAE, BOS excluded
    eval_tokens: int = 12_000  # held-out sequences for the reported metrics
    context_len: int = 128  # tokens per text chunk, BOS included
    forward_batch_size: int = 32  # sequences per forward pass
    train_batch_size: int = 256  # activations per SAE step (small batches: more steps per token)
    lr: float = 2e-3
    lr_warm_up_steps: int = 20
    lr_end_fraction: float = 0.1
    # "centre_and_scale" (see input_statistics) or one of sae-lens' own modes
    normalize_activations: str = "centre_and_scale"
    centred_sq_norm: float | None = 1.0  # target E||scale*(x-mean)||^2 (None = d_in)
    sparsity_loss_mode: str = "step"
    # Barely moves L0 in this short run: Adam normalises the thresholds' gradient, so they move by
    # about lr per step whatever the coefficient (0.01 / 0.015 / 0.02: L0 176 / 166 / 165 at layer 3).
    l0_coefficient: float = 0.015
    l0_warm_up_steps: int = 100
    target_l0: float | None = None  # only for sparsity_loss_mode="quadratic"
    # What sets L0 here: thresholds move multiplicatively (sae-lens trains log-thresholds), so a
    # larger start lets them reach the pre-activations' scale within the run. With the fire-rate
    # init below, layers 3 / 12: 0.01 -> L0 166 / 169, FVE 0.947 / 0.829; 0.04 -> 143 / 131, 0.945 /
    # 0.814; 0.05 -> 136 / 121, 0.944 / 0.809 (dead latents at layer 3: 7.6 / 14.5 / 17.3 %);
    # 0.1 -> FVE 0.783 at layer 12 (benchmarks/RESULTS.md, "SAE quality goals").
    jumprelu_init_threshold: float = 0.04
    jumprelu_bandwidth: float = 0.05
    pre_act_loss_coefficient: float | None = None
    jumprelu_ste_to_input: bool = False  # let the L0 gradient reach the pre-activations too
    # Data-dependent encoder-bias init (see `init_encoder_bias`): every latent starts firing on
    # this fraction of a sample of training activations (None: sae-lens' zero bias). 0.03 ~ the
    # target L0 / d_sae. On the demo's activations, layers 3 / 6 / 9 / 12, dead latents 10 / 23 /
    # 36 / 1 % without it (benchmarks/RESULTS.md, "SAE dead latents"). Lower starting rates (0.02,
    # 0.015) end at the same L0: it is the thresholds' start that sets L0 (above).
    init_fire_rate: float | None = 0.03
    dead_feature_window: int = 400  # steps
    # bf16 autocast for SAE training matmuls / for the activation pass (the residual stream stays
    # fp32). None = only where the CPU has native bf16 (AVX512-BF16 or AMX): measured 1.9x faster
    # there, but 2.8x *slower* where bf16 is emulated (244 vs 680 tok/s on a 2-core AVX512 Xeon).
    autocast: bool | None = None
    forward_autocast: bool | None = None
    dead_check_train_tokens: int = 52_000  # training activations added to the dead-latent check
    # Speed options that change the SAEs' bits (so the demo downstream must be re-verified with a
    # full run when they change). Measurements: benchmarks/RESULTS.md, "Time cuts in the SAE step".
    # Adam's fused CPU kernel (one pass per parameter instead of ~8 elementwise ops): same maths,
    # different rounding. Adam is about a third of a training step's time.
    fused_adam: bool = True
    # Train the layers in this many forked worker processes, each with (torch threads // workers)
    # threads, instead of one after another in this process. On 2 cores 2 x 1 thread beats 1 x 2
    # threads (the elementwise ops scale poorly); a different thread count changes reduction
    # order, hence the bits.
    train_workers: int = 2
    include_chat: bool = True
    text_corpus: str = "cpython-docs"  # pydoc topics + stdlib docstrings (PSF License)


# ------------------------------------------------------------------------------------------ corpus


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo"}
    return sorted(p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & skip))


def cpython_docs_text(max_chars: int) -> Iterator[str]:
    """English documentation shipped with CPython, in a fixed order, up to `max_chars` characters.

    First the `pydoc_data.topics` reference topics, then module / class / function docstrings of
    the standard library (parsed with `ast`, never imported). Licence: PSF License Version 2.
    """
    import pydoc_data.topics

    total = 0
    for key in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[key].strip()
        if text:
            total += len(text)
            yield text
            if total >= max_chars:
                return
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 200:  # prose, not one-liners
                total += len(doc)
                yield doc
                if total >= max_chars:
                    return


def chat_conversations(finetune_dir: Path) -> list[tuple[str, str]]:
    """(prompt, answer) pairs the fine-tune was trained on (its `train_examples.json`)."""
    data = json.loads((Path(finetune_dir) / "train_examples.json").read_text())
    return [(ex["prompt"], ex["target"]) for ex in data]


def build_sequences(tokenizer: PreTrainedTokenizerBase, config: SaeBuildConfig,
                    conversations: Sequence[tuple[str, str]]) -> tuple[list[list[int]], dict[str, Any]]:
    """Token sequences (each starting with BOS) holding >= train+eval non-BOS tokens in total."""
    from .finetune import chat_prompt, end_of_answer_id

    bos = tokenizer.bos_token_id
    prefix = [int(bos)] if bos is not None else []
    sequences: list[list[int]] = []
    chat_tokens = 0
    if config.include_chat:
        eot = end_of_answer_id(tokenizer)
        for prompt, answer in conversations:
            ids = tokenizer(chat_prompt(tokenizer, prompt) + answer, add_special_tokens=False)["input_ids"]
            ids = list(ids)[: config.context_len - 1] + [eot]
            sequences.append(ids)
            chat_tokens += len(ids) - len(prefix)
    # Margin: held-out sequences overshoot eval_tokens by up to one sequence, and training uses
    # whole batches, so cut a little more than train + eval.
    need = config.train_tokens + config.eval_tokens + 2 * config.context_len + config.train_batch_size - chat_tokens
    chunk = config.context_len - len(prefix)
    text_tokens = 0
    n_docs = 0
    buffer: list[int] = []
    # ~4 characters per token; ask for generous text, stop as soon as enough tokens are cut.
    for doc in cpython_docs_text(max_chars=max(8 * need, 10_000)):
        n_docs += 1
        buffer += tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"]
        while len(buffer) >= chunk and text_tokens < need:
            sequences.append(prefix + buffer[:chunk])
            buffer = buffer[chunk:]
            text_tokens += chunk
        if text_tokens >= need:
            break
    if chat_tokens + text_tokens < config.train_tokens + config.eval_tokens:
        raise RuntimeError(f"text corpus too small: {chat_tokens + text_tokens} tokens")
    info = {"chat_sequences": len(conversations) if config.include_chat else 0, "chat_tokens": chat_tokens,
            "text_sequences": text_tokens // chunk, "text_tokens": text_tokens, "text_documents": n_docs,
            "corpus_sha256": sha256_bytes(json.dumps(sequences).encode())}
    return sequences, info


# ------------------------------------------------------------------------------------- activations


class _StopForward(Exception):
    pass


def collect_activations(model: PreTrainedModel, sequences: Sequence[list[int]], layers: Sequence[int],
                        eval_mask: Sequence[bool], *, pad_id: int, batch_size: int, exclude_first: bool = True,
                        autocast: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[str, Any]]:
    """Residual-stream activations (output of `model.model.layers[L]`) for every non-pad token.

    One forward pass per batch serves all layers; it is cut short after the deepest layer. Returns
    ({layer: train acts [N, d]}, {layer: eval acts [M, d]}, stats), fp32, BOS rows excluded.

    With `autocast`, the linear layers run in bf16 (about 1.9x faster on a native-bf16 CPU) while the
    residual stream itself stays fp32; the error this adds is measured on the first batch against
    a plain fp32 pass and reported as a fraction of the activations' variance.
    """
    import torch

    decoder_layers = model.get_decoder().layers
    d_model = int(model.config.hidden_size)
    skip = 1 if exclude_first else 0
    n_train = sum(len(s) - skip for s, e in zip(sequences, eval_mask, strict=True) if not e)
    n_eval = sum(len(s) - skip for s, e in zip(sequences, eval_mask, strict=True) if e)
    train = {layer: torch.empty((n_train, d_model), dtype=torch.float32) for layer in layers}
    held = {layer: torch.empty((n_eval, d_model), dtype=torch.float32) for layer in layers}
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def make_hook(layer: int):  # noqa: ANN202 - torch hook signature
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _StopForward

        return hook

    handles = [decoder_layers[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    # Batch sequences of similar length together (chat turns vary; text chunks are all equal).
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    pos = {"train": 0, "eval": 0}
    t0 = time.perf_counter()
    n_tokens = 0
    autocast_error: dict[str, float] = {}

    def forward(ids: torch.Tensor, attn: torch.Tensor, use_autocast: bool) -> dict[int, torch.Tensor]:
        captured.clear()
        with cpu_autocast(use_autocast), contextlib.suppress(_StopForward):
            model.get_decoder()(input_ids=ids, attention_mask=attn, use_cache=False)
        return {k: v.float() for k, v in captured.items()}

    bar = tqdm(total=n_train + n_eval, desc="saes: activations", unit="tok", unit_scale=True)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(sequences[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                attn = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                    attn[row, : len(sequences[i])] = 1
                acts = forward(ids, attn, autocast)
                if autocast and not autocast_error:
                    exact = forward(ids, attn, False)
                    valid = attn.bool()
                    valid[:, :skip] = False
                    for layer in layers:
                        ref = exact[layer][valid]
                        err = (acts[layer][valid] - ref).pow(2).sum(-1).mean()
                        autocast_error[str(layer)] = float(err / (ref - ref.mean(0)).pow(2).sum(-1).mean())
                for row, i in enumerate(idx):
                    n = len(sequences[i]) - skip
                    split = "eval" if eval_mask[i] else "train"
                    dest = held if eval_mask[i] else train
                    for layer in layers:
                        dest[layer][pos[split] : pos[split] + n] = acts[layer][row, skip : len(sequences[i])]
                    pos[split] += n
                    n_tokens += n
                bar.update(sum(len(sequences[i]) - skip for i in idx))
    finally:
        for h in handles:
            h.remove()
        bar.close()
    seconds = time.perf_counter() - t0
    stats: dict[str, Any] = {"seconds": seconds, "tokens": n_tokens, "tokens_per_second": n_tokens / max(seconds, 1e-9),
                             "autocast_bf16": autocast}
    if autocast_error:
        stats["autocast_error_fraction_of_variance"] = autocast_error
    return train, held, stats


# ---------------------------------------------------------------------------------------- training


def _batches(acts: torch.Tensor, batch_size: int, seed: int, scale: float = 1.0) -> Iterator[torch.Tensor]:
    """Endless shuffled mini-batches times `scale` (a fresh seeded permutation per pass)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(acts.shape[0], generator=gen)
        for start in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[perm[start : start + batch_size]] * scale


def input_statistics(acts: torch.Tensor, max_rows: int = 65_536,
                     target: float | None = None) -> tuple[torch.Tensor, float]:
    """(mean activation, scale) such that `scale * (x - mean)` has mean squared norm `target` (d_in).

    Gemma's residual stream carries a few huge, nearly constant dimensions (norms of 10^3-10^4):
    normalising by the raw norm (sae-lens' `expected_average_only_in`) leaves the informative,
    centred part tiny, and a zero-initialised `b_dec` cannot learn the mean within a few hundred
    steps. So the SAE is trained on `scale * x` with `b_dec` starting at `scale * mean`, and the
    scale is folded back into the weights afterwards (sae-lens `fold_activation_norm_scaling_factor`).
    """
    sample = acts[:: max(1, acts.shape[0] // max_rows)]
    mean = sample.mean(0)
    centred = float((sample - mean).pow(2).sum(-1).mean())
    return mean, ((target or acts.shape[1]) / max(centred, 1e-12)) ** 0.5


def init_encoder_bias(sae: Any, sample: torch.Tensor, fire_rate: float) -> None:
    """Set `b_enc` so that each latent's pre-activation exceeds its initial threshold on
    `fire_rate` of `sample` (activations as the SAE sees them, i.e. already scaled).

    With sae-lens' zero bias, a latent whose random encoder direction points away from where the
    data lies starts (and often stays) below its threshold: it never fires, gets no reconstruction
    gradient, and ends up dead. Starting every latent at the same firing rate (about the target
    L0 / d_sae) gives each one gradient from the first step.
    """
    import torch

    with torch.no_grad():
        sae.b_enc.zero_()
        pre = sae.process_sae_in(sample) @ sae.W_enc
        k = min(pre.shape[0], max(1, round((1.0 - fire_rate) * pre.shape[0])))
        cut = pre.kthvalue(k, dim=0).values  # (torch.quantile refuses inputs over 2**24 elements)
        threshold = sae.threshold if hasattr(sae, "threshold") else torch.zeros_like(cut)
        sae.b_enc.copy_(threshold - cut)


def sae_metrics(sae: Any, acts: torch.Tensor, extra: torch.Tensor | None = None,
                batch_size: int = 4096) -> dict[str, Any]:
    """Fraction of variance explained (vs. the mean), mean L0 and dense-latent fraction on the
    held-out `acts`; dead-latent fraction = never active on `acts` plus `extra` (a sample of
    training activations, so that rare latents are not counted as dead on a small eval set)."""
    import torch

    mean = acts.mean(0)
    sse = 0.0
    sst = 0.0
    l0_sum = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    fired_extra = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    with torch.inference_mode():
        for start in range(0, acts.shape[0], batch_size):
            x = acts[start : start + batch_size]
            feats = sae.encode(x)
            recon = sae.decode(feats)
            sse += float((recon - x).pow(2).sum())
            sst += float((x - mean).pow(2).sum())
            active = feats > 0
            l0_sum += float(active.sum())
            fired += active.sum(0)
        if extra is not None:
            for start in range(0, extra.shape[0], batch_size):
                fired_extra += (sae.encode(extra[start : start + batch_size]) > 0).sum(0)
    n = acts.shape[0]
    n_extra = 0 if extra is None else extra.shape[0]
    freq = fired.float() / n
    return {
        "fve": 1.0 - sse / sst,
        "mean_l0": l0_sum / n,
        "dead_fraction": float(((fired + fired_extra) == 0).float().mean()),
        "dead_fraction_tokens": n + n_extra,
        "dead_fraction_eval_only": float((fired == 0).float().mean()),
        "dense_fraction": float((freq > 0.1).float().mean()),
        "eval_tokens": n,
    }


def _use_fused_adam(trainer: Any) -> None:
    """Swap the trainer's Adam for `Adam(fused=True)` with the same settings, and rebuild its lr
    scheduler (which holds the optimizer) the way `SAETrainer.__init__` does."""
    from sae_lens.training.optim import get_lr_scheduler
    from torch.optim import Adam

    cfg = trainer.cfg
    trainer.optimizer = Adam(trainer.sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)
    trainer.lr_scheduler = get_lr_scheduler(
        cfg.lr_scheduler_name, lr=cfg.lr, optimizer=trainer.optimizer, warm_up_steps=cfg.lr_warm_up_steps,
        decay_steps=cfg.lr_decay_steps, training_steps=cfg.total_training_steps, lr_end=cfg.lr_end,
        num_cycles=cfg.n_restart_cycles,
    )


def train_one_sae(train_acts: torch.Tensor, eval_acts: torch.Tensor, layer: int, config: SaeBuildConfig,
                  model_name: str, out_dir: Path) -> dict[str, Any]:
    """Train one JumpReLU SAE with sae-lens on cached activations, save it, and measure it."""
    import torch
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(config.seed * 1000 + layer)
    metadata = SAEMetadata(
        model_name=model_name, hook_name=f"model.layers.{layer}", hook_layer=layer,
        hf_hidden_states_index=layer + 1, context_size=config.context_len, prepend_bos=True,
        exclude_bos_from_training=True, dataset=config.text_corpus,
    )
    normalize = "none" if config.normalize_activations == "centre_and_scale" else config.normalize_activations
    sae: Any
    if config.architecture == "jumprelu":
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
            d_in=int(train_acts.shape[1]), d_sae=config.d_sae, dtype="float32", device="cpu",
            normalize_activations=normalize,  # type: ignore[arg-type]
            jumprelu_init_threshold=config.jumprelu_init_threshold, jumprelu_bandwidth=config.jumprelu_bandwidth,
            jumprelu_sparsity_loss_mode=config.sparsity_loss_mode,  # type: ignore[arg-type]
            l0_coefficient=config.l0_coefficient, l0_warm_up_steps=config.l0_warm_up_steps,
            target_l0=config.target_l0, pre_act_loss_coefficient=config.pre_act_loss_coefficient,
            jumprelu_ste_to_input=config.jumprelu_ste_to_input, metadata=metadata,
        ))
    elif config.architecture == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
            d_in=int(train_acts.shape[1]), d_sae=config.d_sae, dtype="float32", device="cpu",
            normalize_activations=normalize,  # type: ignore[arg-type]
            k=config.k, metadata=metadata,
        ))
    else:
        raise ValueError(f"unknown SAE architecture {config.architecture!r}")
    mean, scale = input_statistics(train_acts, target=config.centred_sq_norm)
    if config.normalize_activations == "centre_and_scale":
        with torch.no_grad():
            sae.b_dec.copy_(mean * scale)
    else:
        scale = 1.0
    if config.init_fire_rate is not None:
        rows = torch.randperm(train_acts.shape[0], generator=torch.Generator().manual_seed(config.seed * 1000 + layer))
        init_encoder_bias(sae, train_acts[rows[:8192]] * scale, config.init_fire_rate)
    autocast = resolve_autocast(config.autocast)
    bs = config.train_batch_size
    n_samples = min(-(-config.train_tokens // bs) * bs, train_acts.shape[0] - train_acts.shape[0] % bs)
    steps = n_samples // bs
    trainer_cfg = SAETrainerConfig(
        total_training_samples=n_samples, train_batch_size_samples=config.train_batch_size, lr=config.lr,
        lr_end=config.lr * config.lr_end_fraction, lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=config.lr_warm_up_steps, lr_decay_steps=max(1, steps - config.lr_warm_up_steps),
        device="cpu", autocast=autocast, dead_feature_window=config.dead_feature_window,
        feature_sampling_window=max(steps + 1, 2), n_batches_for_norm_estimate=min(32, steps),
    )
    # The norm estimate draws its batches from the same stream; they are trained on later in it.
    provider = _batches(train_acts, config.train_batch_size, config.seed * 1000 + layer, scale)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider)
    if config.fused_adam:
        _use_fused_adam(trainer)
    t0 = time.perf_counter()
    trainer.fit()  # sae-lens' own progress bar (and its own scaling, for sae-lens' modes)
    if scale != 1.0:
        sae.fold_activation_norm_scaling_factor(scale)  # now reads raw residual activations
    seconds = time.perf_counter() - t0
    sae.eval()
    sample = train_acts[torch.randperm(train_acts.shape[0], generator=torch.Generator().manual_seed(layer))[
        : config.dead_check_train_tokens]]
    metrics = sae_metrics(sae, eval_acts, sample)
    metrics.update({
        "train_tokens": trainer.n_training_samples,
        "steps": trainer.n_training_steps,
        "seconds": seconds,
        "train_window_l0": float(sae.cfg.metadata.l0) if sae.cfg.metadata.l0 is not None else None,
        "train_window_dead_fraction": float(trainer.dead_neurons.float().mean()),
        "input_scale": scale,
        "autocast_bf16": autocast,
    })
    sae.cfg.metadata.eval_metrics = {k: v for k, v in metrics.items() if k != "seconds"}
    sae.save_inference_model(out_dir)  # JumpReLUSAE format, read by SAE.load_from_disk
    return metrics


# The forked workers' view of the activations: set just before the pool forks, so the children
# read the parent's tensors (copy-on-write, never written) instead of receiving pickled copies.
_SHARED: dict[str, Any] = {}


def _train_in_worker(layer: int) -> tuple[int, dict[str, Any]]:
    shared = _SHARED
    return layer, train_one_sae(shared["train"][layer], shared["held"][layer], layer, shared["config"],
                                shared["model_name"], shared["out_dir"] / f"layer_{layer:02d}")


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def train_layers(train: dict[int, torch.Tensor], held: dict[int, torch.Tensor], config: SaeBuildConfig,
                 model_name: str, out_dir: Path) -> dict[str, Any]:
    """Train one SAE per layer into `out_dir/layer_XX`; return {layer: metrics} in layer order.

    `config.train_workers == 1`: one after another in this process (freeing each layer's
    activations when done). More: in that many forked processes with `threads // workers` torch
    threads each; every layer is seeded on its own, so the result does not depend on which worker
    trains it or when, only on the thread count.
    """
    import torch

    per_layer: dict[str, Any] = {}

    def report(layer: int, metrics: dict[str, Any]) -> None:
        per_layer[str(layer)] = metrics
        tqdm.write(f"saes: layer {layer}: " + ", ".join(
            f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)))

    workers = min(config.train_workers, len(config.layers))
    if workers <= 1:
        for layer in config.layers:
            report(layer, train_one_sae(train[layer], held[layer], layer, config, model_name,
                                        out_dir / f"layer_{layer:02d}"))
            del train[layer]
        return per_layer
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, torch.get_num_threads() // workers)
    _SHARED.update(train=train, held=held, config=config, model_name=model_name, out_dir=out_dir)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_init_worker, initargs=(threads,)) as pool:
            done = dict(pool.map(_train_in_worker, config.layers))
    finally:
        _SHARED.clear()
    for layer in config.layers:
        report(layer, done[layer])
    return per_layer


def saes_inputs(config: SaeBuildConfig) -> dict[str, InputRef]:
    """The text corpus' identity (Python version; the token-level hash is recorded after building)."""
    ref = f"cpython-{sys.version.split()[0]}: pydoc_data.topics + stdlib docstrings"
    return {"text_corpus": InputRef(ref=ref, sha256=sha256_bytes(ref.encode()))}


def build_saes(inputs: dict[str, Path], config: SaeBuildConfig, out_dir: Path) -> StepOutput:
    """Compute activations once, train one SAE per layer, write layer_XX/ dirs + metrics.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..model_prep import prepare

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    model_dir = inputs["finetune"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    prepare(model, tokenizer)
    n_layers = int(model.config.num_hidden_layers)
    bad = [layer for layer in config.layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a {n_layers}-layer model")

    t0 = time.perf_counter()
    sequences, corpus = build_sequences(tokenizer, config, chat_conversations(model_dir))
    corpus["seconds"] = time.perf_counter() - t0
    # Hold out whole sequences (seeded) until they cover eval_tokens.
    rng = random.Random(config.seed)
    order = list(range(len(sequences)))
    rng.shuffle(order)
    eval_mask = [False] * len(sequences)
    covered = 0
    for i in order:
        if covered >= config.eval_tokens:
            break
        eval_mask[i] = True
        covered += len(sequences[i]) - 1
    train, held, act_stats = collect_activations(
        model, sequences, config.layers, eval_mask, pad_id=int(tokenizer.pad_token_id),
        batch_size=config.forward_batch_size, autocast=resolve_autocast(config.forward_autocast),
    )
    del model
    out_dir = Path(out_dir)
    t1 = time.perf_counter()
    per_layer = train_layers(train, held, config, "embedded:gemma-3-270m-refusal", out_dir)
    train_stats = {"seconds": time.perf_counter() - t1, "workers": config.train_workers}
    metrics = {"layers": per_layer, "activations": act_stats, "training": train_stats, "corpus": corpus}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    notes = {
        "hook": "output of model.model.layers[L] == hidden_states[L+1]; BOS position excluded",
        "text_corpus": "CPython pydoc_data.topics + standard-library docstrings (PSF License Version 2), "
                       "plus chat-formatted fine-tune training conversations (temaq-abliterated prompts, MIT)",
        "load": "sae_lens.SAE.load_from_disk(<dir>/layer_XX)",
    }
    return StepOutput(metrics=metrics, notes=notes)
