"""A few refusal latents as a harmfulness probe that survives jailbreak wrapping (the second seed paper:
a linear probe on the refusal latents at the last token reaches 0.87 accuracy on adversarial harmful
prompts where a dense residual probe reaches 0.51).

Features at the last prompt token: the refusal latents' activations (`engine.encode`, chosen latents)
and the dense residual stream after `dense_layer` (`engine.residuals`). Both probes are L2-regularised
logistic regressions (`fit_logistic`: standardised features, mean log-loss + l2/2 |w|^2, bias
unpenalised, L-BFGS in float64 from zero: convex, so the optimum is unique and the fit deterministic),
trained on plain harmful (1) vs harmless (0) train-split requests and evaluated on

- the plain test split (in distribution),
- ``ood_harmful``: test-split harmful requests wrapped in jailbreak templates (cycled over the
  templates; the paper's number is the accuracy here, i.e. the fraction still flagged harmful),
- ``ood_harmless``: test-split harmless requests in the same templates (adversarial-looking benign).

Features are checkpointed per prompt (``probe_ood/{group}/{i}``); the fits are redone on resume (cheap,
deterministic), so a resumed job gives the identical result. Training needs torch (the server side).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import ConfigDict, Field

from .jailbreaks import TemplateChoice, wrap
from .refusal_latents import latents_key
from .spec import Request
from .stage_utils import as_prompt, chunks, fingerprint, restore_items, save_fingerprinted

GROUPS = ("train_harmful", "train_harmless", "test_harmful", "test_harmless", "ood_harmful", "ood_harmless")


class ProbeOODConfig(TemplateChoice):
    """The `probe_ood` algorithm (the refusal latents are an argument; a job names them)."""

    model_config = ConfigDict(extra="forbid")

    harmful_dataset: str = "temaq-abliterated:harmful"
    harmless_dataset: str = "temaq-abliterated:harmless"
    n_train: int | None = Field(default=64, ge=1)  # per class, train split
    n_test: int | None = Field(default=32, ge=1)  # per class, test split (plain and wrapped)
    seed: int = 0
    chat: bool = True
    dense_layer: int | None = None  # the dense probe's residual layer (default: the deepest refusal-latent layer)
    l2: float = Field(default=1e-2, ge=0.0)
    batch_size: int = Field(default=8, ge=1)


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """(w, b, mean, std): the L2 logistic regression on standardised X (module docstring)."""
    import torch

    X = np.asarray(X, dtype=np.float64)
    mean = X.mean(0)
    std = X.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    Xs = torch.tensor((X - mean) / std, dtype=torch.float64)
    yt = torch.tensor(np.asarray(y, dtype=np.float64))
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=1000, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(Xs @ w + b, yt) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    for _ in range(5):  # L-BFGS restarts until the gradient is ~0 (each run is capped at max_iter)
        opt.step(closure)
        assert w.grad is not None and b.grad is not None
        if max(float(w.grad.abs().max()), float(b.grad.abs())) < 1e-9:
            break
    return w.detach().numpy().copy(), float(b.detach()), mean, std


def predict(model: tuple[np.ndarray, float, np.ndarray, np.ndarray], X: np.ndarray) -> np.ndarray:
    """1 (harmful) where the probe's logit is > 0."""
    w, b, mean, std = model
    return ((((np.asarray(X, dtype=np.float64) - mean) / std) @ w + b) > 0).astype(np.int64)


def features(engine: Any, prompts: Sequence[Any], latents: dict[int, list[int]], dense_layer: int,
             batch_size: int) -> list[dict[str, list[float]]]:
    """Per prompt: the refusal latents at the last token (layer order, ids in order) and the residual."""
    out: list[dict[str, list[float]]] = []
    for part in chunks(list(prompts), batch_size):
        reqs = [Request(prompt=p) for p in part]
        enc = engine.encode(reqs, latents=latents)
        res = np.asarray(engine.residuals(reqs, layers=[dense_layer], positions=[-1]), dtype=np.float64)
        for k, r in enumerate(enc):
            lat = [float(v) for ly in sorted(latents) for v in np.asarray(r.layers[ly].values)[-1]]
            out.append({"latents": lat, "dense": res[k, 0, 0].tolist()})
    return out


def accuracy(model: Any, X: np.ndarray, label: int) -> float:
    return float((predict(model, X) == label).mean()) if len(X) else float("nan")


def evaluate(feats: dict[str, list[dict[str, list[float]]]], l2: float) -> dict[str, Any]:
    """Fit both probes on the train groups; accuracies on every group."""
    out: dict[str, Any] = {}
    for kind in ("latents", "dense"):
        X = {g: np.asarray([f[kind] for f in feats[g]], dtype=np.float64) for g in GROUPS}
        Xtr = np.concatenate([X["train_harmful"], X["train_harmless"]])
        ytr = np.concatenate([np.ones(len(X["train_harmful"])), np.zeros(len(X["train_harmless"]))])
        model = fit_logistic(Xtr, ytr, l2)
        acc = {g: accuracy(model, X[g], 0 if g.endswith("harmless") else 1) for g in GROUPS}
        n_t = len(X["test_harmful"]) + len(X["test_harmless"])
        n_o = len(X["ood_harmful"]) + len(X["ood_harmless"])
        out[kind] = {
            "n_features": int(Xtr.shape[1]),
            "accuracy": acc,
            "test_accuracy": (acc["test_harmful"] * len(X["test_harmful"])
                              + acc["test_harmless"] * len(X["test_harmless"])) / max(1, n_t),
            "ood_accuracy": (acc["ood_harmful"] * len(X["ood_harmful"])
                             + acc["ood_harmless"] * len(X["ood_harmless"])) / max(1, n_o),
            "weights": model[0].tolist() if kind == "latents" else None,
        }
    return out


def run_probe_ood(engine: Any, cfg: ProbeOODConfig, ctx: Any, texts: dict[str, list[str]],
                  latents: dict[int, list[int]]) -> dict[str, Any]:
    """`texts`: plain requests of train_/test_ harmful / harmless; the ood groups wrap the test ones."""
    t0 = time.perf_counter()
    tmpl = cfg.chosen()
    names = list(tmpl)
    layer = cfg.dense_layer if cfg.dense_layer is not None else max(latents)
    groups: dict[str, list[str]] = {g: list(texts[g]) for g in GROUPS[:4]}
    for cls in ("harmful", "harmless"):
        groups[f"ood_{cls}"] = [wrap(tmpl[names[i % len(names)]], t) for i, t in enumerate(texts[f"test_{cls}"])]
    for g in ("train_harmful", "train_harmless"):
        if not groups[g]:
            raise ValueError(f"no {g} prompts")
    lat_key = latents_key(latents)
    base = fingerprint([lat_key, str(layer), str(cfg.chat)])
    feats: dict[str, list[dict[str, list[float]]]] = {}
    total = sum(len(v) for v in groups.values())
    done = restored = 0
    for g in GROUPS:
        fps = {i: fingerprint([t, base]) for i, t in enumerate(groups[g])}
        got: dict[int, dict[str, list[float]]] = restore_items(ctx, f"probe_ood/{g}", fps, dict, field="features")
        restored += len(got)
        pending = [i for i in range(len(groups[g])) if i not in got]
        for idx in chunks(pending, cfg.batch_size):
            ctx.check_cancelled()
            fs = features(engine, [as_prompt(groups[g][i], cfg.chat) for i in idx], latents, layer, cfg.batch_size)
            for i, f in zip(idx, fs, strict=True):
                save_fingerprinted(ctx, f"probe_ood/{g}/{i}", fps[i], features=f)
                got[i] = f
            ctx.progress("probe_ood: features", done + len(got), total)
        feats[g] = [got[i] for i in range(len(groups[g]))]
        done += len(groups[g])
    res = evaluate(feats, cfg.l2)
    return {"kind": "probe_ood", "latents": {str(k): v for k, v in latents.items()}, "dense_layer": layer,
            "templates": names, "n": {g: len(groups[g]) for g in GROUPS}, "l2": cfg.l2,
            "probes": res, "resumed_prompts": restored, "wall_s": time.perf_counter() - t0}
