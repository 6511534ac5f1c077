"""Training loop: Adam + BCE-with-logits, seeded shuffling, early stopping on validation AUC."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class TrainSettings:
    """How a CTR model is trained: the one home of these defaults (``fit``, ``run_ctr_table``, ``train_ctr``,
    ``userip ctr train`` and the FuxiCTR export read them from :data:`TRAIN`)."""

    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 4096
    max_epochs: int = 20
    patience: int = 2  # epochs without a better validation AUC before stopping


TRAIN = TrainSettings()


class RowLookup:
    """A per-row input gathered lazily from a per-user table: ``table[index[rows]]``.

    Lets a wide dense field (e.g. ``theta``, thousands of floats per user) ride along with the
    examples without materialising ``[N, dim]``.
    """

    def __init__(self, table: torch.Tensor, index: torch.Tensor):
        self.table, self.index = table, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows) -> torch.Tensor:
        return self.table[self.index[rows]]


Inputs = dict[str, "torch.Tensor | RowLookup"]


def _take(inputs: Inputs, rows: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in inputs.items()}


def _n_rows(inputs: Inputs) -> int:
    return len(next(iter(inputs.values())))


@dataclass
class FitResult:
    epochs: int  # epochs actually run
    best_epoch: int  # 1-based epoch whose weights were restored
    best_val_auc: float
    wall_s: float
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, val_auc, val_logloss


def metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Test AUC and LogLoss (scikit-learn). AUC is NaN when ``y`` holds one class only."""
    from sklearn.metrics import log_loss, roc_auc_score

    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    if len(y) == 0:
        return {"auc": math.nan, "logloss": math.nan}
    auc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else math.nan
    return {"auc": auc, "logloss": float(log_loss(y, p, labels=[0, 1]))}


@torch.no_grad()
def predict(model: nn.Module, inputs: Inputs, batch_size: int = 65536) -> np.ndarray:
    """Click probabilities for every row, in order (eval mode)."""
    was_training = model.training
    model.eval()
    n = _n_rows(inputs)
    out = [torch.sigmoid(model(_take(inputs, slice(i, i + batch_size)))) for i in range(0, n, batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def fit(
    model: nn.Module,
    train: Inputs,
    y_train: torch.Tensor,
    val: Inputs,
    y_val: np.ndarray,
    *,
    seed: int = 0,
    settings: TrainSettings = TRAIN,
    progress: bool = False,
    desc: str | None = None,
) -> FitResult:
    """Train ``model`` in place by ``settings``; the weights of the best validation-AUC epoch are restored at the
    end.

    Shuffling uses its own ``torch.Generator(seed)``; dropout uses the global torch RNG, so the caller
    seeds it (``torch.manual_seed``) before building the model for a fully deterministic run.
    """
    t0 = time.perf_counter()
    lr, weight_decay, batch_size = settings.lr, settings.weight_decay, settings.batch_size
    max_epochs, patience = settings.max_epochs, settings.patience
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    y_train = torch.as_tensor(y_train, dtype=torch.float32)
    n = len(y_train)
    best_score, best_epoch, best_auc, best_state, wait = -math.inf, 0, math.nan, None, 0
    history: list[dict] = []
    bar = tqdm(range(1, max_epochs + 1), desc=desc or "ctr", disable=not progress, leave=False, unit="epoch")
    for epoch in bar:
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch_size):
            rows = perm[i : i + batch_size]
            logits = model(_take(train, rows))
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y_train[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
        m = metrics(y_val, predict(model, val))
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / max(n, 1),
                "val_auc": m["auc"],
                "val_logloss": m["logloss"],
            }
        )
        bar.set_postfix(loss=f"{total / max(n, 1):.4f}", val_auc=f"{m['auc']:.4f}")
        # AUC decides; a single-class validation set falls back to (negative) LogLoss.
        score = m["auc"] if not math.isnan(m["auc"]) else -m["logloss"]
        if score > best_score:
            best_score, best_epoch, best_auc, wait = score, epoch, m["auc"], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            wait += 1
            if wait >= patience:
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(
        epochs=len(history),
        best_epoch=best_epoch,
        best_val_auc=best_auc,
        wall_s=time.perf_counter() - t0,
        history=history,
    )
