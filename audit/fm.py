"""Second-order factorization machine (Rendle 2010; the seed paper's Eq. 2) over sparse inputs.

    y(x) = w0 + sum_i w_i x_i + sum_{i<j} <v_i, v_j> x_i x_j

The pairwise term is computed with Rendle's identity in O(k * nnz) per example:

    sum_{i<j} <v_i, v_j> x_i x_j = 1/2 sum_f [ (sum_i v_if x_i)^2 - sum_i v_if^2 x_i^2 ]

Inputs are CSR-like batches (`SparseRows`: flat feature indices, values and row offsets), the
EmbeddingBag layout: one gather of the nnz embedding rows, then per-row sums with `index_add_`.
No dense [batch, n_features] tensor is ever built, so 262k-feature spaces (4 SAE layers x 16k
latents x 4 positions) train on a CPU in seconds. `naive_pairwise` is the O(n^2) reference used
by the tests.

`train_fm` / `train_logistic`: BCE-with-logits, Adam, a fixed number of epochs, the best epoch
on the validation set kept (accuracy, ties broken by lower loss) and evaluated on the test set,
as in the paper's appendix ("Dataset for training Factorization Machines").
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .features import SparseRows


def _row_ids(offsets: torch.Tensor) -> torch.Tensor:
    """[nnz] row number of each entry, from CSR offsets."""
    lens = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(len(lens), device=offsets.device), lens)


class FactorizationMachine(nn.Module):
    """y(x) = w0 + <w, x> + sum_{i<j} <v_i, v_j> x_i x_j, computed in O(k * nnz) per batch.

    With `sparse=True` the gathers of w and V produce sparse gradients (only the rows a batch
    touches), which `train_model` steps with `torch.optim.SparseAdam` ("lazy" Adam, the usual FM /
    recommender choice): a step costs O(k * nnz) instead of O(k * n_features)."""

    def __init__(self, n_features: int, k: int = 20, init_std: float = 0.1, generator: torch.Generator | None = None,
                 sparse: bool = True):
        super().__init__()
        if n_features <= 0 or k <= 0:
            raise ValueError("n_features and k must be > 0")
        self.n_features, self.k, self.sparse = int(n_features), int(k), bool(sparse)
        self.w0 = nn.Parameter(torch.zeros(()))
        self.w = nn.Parameter(torch.zeros(n_features, 1))  # [n, 1]: an embedding table of width 1
        self.V = nn.Parameter(torch.randn(n_features, k, generator=generator) * init_std)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.w, self.V] if self.sparse else []

    def linear_weights(self) -> np.ndarray:
        """[n_features] linear weights w."""
        return self.w.detach().reshape(-1).numpy().copy()

    def forward(self, indices: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Logits [n] for CSR rows (indices [nnz], values [nnz], offsets [n + 1])."""
        n = len(offsets) - 1
        rows = _row_ids(offsets)
        wx = F.embedding(indices, self.w, sparse=self.sparse).squeeze(1) * values
        linear = torch.zeros(n, dtype=wx.dtype, device=wx.device).index_add_(0, rows, wx)
        vx = F.embedding(indices, self.V, sparse=self.sparse) * values.unsqueeze(1)  # [nnz, k]: the O(k * nnz) part
        s = torch.zeros(n, self.k, dtype=vx.dtype, device=vx.device).index_add_(0, rows, vx)
        s2 = torch.zeros(n, self.k, dtype=vx.dtype, device=vx.device).index_add_(0, rows, vx * vx)
        pair = 0.5 * (s * s - s2).sum(dim=1)
        return self.w0 + linear + pair


class LogisticProbe(nn.Module):
    """The linear baseline: y(x) = b + <w, x> on the same sparse rows (sparse gradients for w)."""

    def __init__(self, n_features: int, sparse: bool = True):
        super().__init__()
        self.n_features, self.sparse = int(n_features), bool(sparse)
        self.b = nn.Parameter(torch.zeros(()))
        self.w = nn.Parameter(torch.zeros(n_features, 1))

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.w] if self.sparse else []

    def linear_weights(self) -> np.ndarray:
        """[n_features] weights w."""
        return self.w.detach().reshape(-1).numpy().copy()

    def forward(self, indices: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        rows = _row_ids(offsets)
        n = len(offsets) - 1
        wx = F.embedding(indices, self.w, sparse=self.sparse).squeeze(1) * values
        return self.b + torch.zeros(n, dtype=wx.dtype, device=wx.device).index_add_(0, rows, wx)


def naive_pairwise(x: np.ndarray, w0: float, w: np.ndarray, V: np.ndarray) -> float:
    """Eq. 2 for one dense example by the O(n^2) double sum (reference for the identity)."""
    x = np.asarray(x, dtype=np.float64)
    V = np.asarray(V, dtype=np.float64)
    y = float(w0) + float(np.dot(np.asarray(w, dtype=np.float64), x))
    n = len(x)
    for i in range(n):
        if x[i] == 0:
            continue
        for j in range(i + 1, n):
            if x[j] != 0:
                y += float(V[i] @ V[j]) * x[i] * x[j]
    return y


# ---------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Training hyper-parameters (the paper: lr 1e-3, 20 epochs, best validation epoch)."""

    lr: float = 1e-3
    epochs: int = 20
    batch_size: int = 32
    weight_decay: float = 0.0
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads while training (process-wide; restored after)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with `n` torch intra-op threads (None: unchanged). Small sparse batches are
    dominated by OpenMP start-up on a busy CPU; one thread is often several times faster."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class TrainResult:
    """The best-validation-epoch model and its metrics; `history` has one row per epoch."""

    model: nn.Module
    best_epoch: int
    val_accuracy: float
    val_loss: float
    test_accuracy: float | None
    test_loss: float | None
    train_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0

    def metrics(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "val_accuracy": self.val_accuracy, "val_loss": self.val_loss,
                "test_accuracy": self.test_accuracy, "test_loss": self.test_loss,
                "train_accuracy": self.train_accuracy, "train_seconds": self.train_seconds,
                "history": self.history}


def _tensors(rows: SparseRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(rows.indices), torch.from_numpy(rows.values), torch.from_numpy(rows.offsets))


@torch.no_grad()
def predict_logits(model: nn.Module, rows: SparseRows, batch_size: int = 1024) -> np.ndarray:
    """Logits for every row, in batches."""
    model.eval()
    out = []
    for start in range(0, rows.n, batch_size):
        part = rows.rows(np.arange(start, min(rows.n, start + batch_size)))
        out.append(model(*_tensors(part)).float().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def evaluate(model: nn.Module, rows: SparseRows) -> tuple[float, float]:
    """(accuracy, mean BCE) of a model on labelled rows."""
    if rows.n == 0 or rows.labels is None:
        return float("nan"), float("nan")
    logits = torch.from_numpy(predict_logits(model, rows))
    y = torch.from_numpy(rows.labels)
    loss = float(F.binary_cross_entropy_with_logits(logits, y))
    acc = float(((logits > 0).float() == y).float().mean())
    return acc, loss


def train_model(model: nn.Module, train: SparseRows, val: SparseRows, test: SparseRows | None, cfg: TrainConfig,
                on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Mini-batch Adam on BCE-with-logits; keeps the best validation epoch (accuracy, then loss)."""
    if train.labels is None or train.n == 0:
        raise ValueError("training rows need labels")
    with torch_threads(cfg.num_threads):
        return _train(model, train, val, test, cfg, on_epoch)


def _train(model: nn.Module, train: SparseRows, val: SparseRows, test: SparseRows | None, cfg: TrainConfig,
           on_epoch: Callable[[int, dict[str, float]], None] | None) -> TrainResult:
    assert train.labels is not None
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(int(cfg.seed))
    sparse = list(getattr(model, "sparse_parameters", list)()) if cfg.weight_decay == 0 else []
    if cfg.weight_decay > 0:
        for m in model.modules():  # SparseAdam has no weight decay: dense gradients then
            if hasattr(m, "sparse"):
                setattr(m, "sparse", False)  # noqa: B010
    dense = [p for p in model.parameters() if all(p is not q for q in sparse)]
    opts: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay)]
    if sparse:
        opts.append(torch.optim.SparseAdam(sparse, lr=cfg.lr))
    labels = torch.from_numpy(train.labels)
    best: tuple[float, float] | None = None
    best_state: dict[str, torch.Tensor] = copy.deepcopy(model.state_dict())
    best_epoch, history = 0, []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(train.n, generator=gen).numpy()
        total, seen = 0.0, 0
        for start in range(0, train.n, cfg.batch_size):
            which = order[start : start + cfg.batch_size]
            part = train.rows(which)
            logits = model(*_tensors(part))
            loss = F.binary_cross_entropy_with_logits(logits, labels[torch.from_numpy(which)])
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in opts:
                opt.step()
            total += float(loss.detach()) * len(which)
            seen += len(which)
        val_acc, val_loss = evaluate(model, val) if val.n else evaluate(model, train)
        row = {"epoch": epoch, "train_loss": total / max(seen, 1), "val_accuracy": val_acc, "val_loss": val_loss}
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row)
        key = (val_acc, -val_loss)
        if best is None or key > best:
            best, best_epoch = key, epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    val_acc, val_loss = evaluate(model, val) if val.n else (float("nan"), float("nan"))
    test_acc, test_loss = evaluate(model, test) if test is not None and test.n else (None, None)
    train_acc, _ = evaluate(model, train)
    return TrainResult(model, best_epoch, val_acc, val_loss, test_acc, test_loss, train_acc, history,
                       time.perf_counter() - t0)


def train_fm(train: SparseRows, val: SparseRows, test: SparseRows | None, n_features: int, k: int = 20,
             cfg: TrainConfig | None = None, init_std: float = 0.1,
             on_epoch: Callable[[int, dict[str, float]], None] | None = None, sparse: bool = True) -> TrainResult:
    """Train a `FactorizationMachine` (embedding size k) with the paper's recipe."""
    cfg = cfg or TrainConfig()
    model = FactorizationMachine(n_features, k, init_std, generator=torch.Generator().manual_seed(int(cfg.seed)),
                                 sparse=sparse)
    return train_model(model, train, val, test, cfg, on_epoch)


def train_logistic(train: SparseRows, val: SparseRows, test: SparseRows | None, n_features: int,
                   cfg: TrainConfig | None = None,
                   on_epoch: Callable[[int, dict[str, float]], None] | None = None, sparse: bool = True) -> TrainResult:
    """Train the `LogisticProbe` baseline on the same rows with the same recipe."""
    cfg = cfg or TrainConfig()
    return train_model(LogisticProbe(n_features, sparse), train, val, test, cfg, on_epoch)
