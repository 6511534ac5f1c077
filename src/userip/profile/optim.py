"""Row-wise lazy Adam for the per-user table.

Dense Adam over the whole table keeps moving rows that got no gradient (their momentum is non-zero): wrong,
and O(table) per step. ``torch.optim.SparseAdam`` is lazy but bias-corrects with one global step count, so a
row's first update is mis-scaled (0.5-3x) once other rows have been updated many times. Here every row keeps
its own step count, so each row follows exactly the trajectory plain Adam would give it alone.
"""

from __future__ import annotations

import torch


class RowAdam:
    def __init__(self, table: torch.Tensor, lr: float = 0.1, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.table = table
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg = torch.zeros_like(table)
        self.exp_avg_sq = torch.zeros_like(table)
        self.steps = torch.zeros(table.shape[0], dtype=torch.long, device=table.device)

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Update ``table[rows]`` with ``grad`` ([len(rows), ...]); ``rows`` must be unique."""
        b1, b2 = self.betas
        t = self.steps[rows] + 1
        self.steps[rows] = t
        m = self.exp_avg[rows].mul_(b1).add_(grad, alpha=1 - b1)
        v = self.exp_avg_sq[rows].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        self.exp_avg[rows] = m
        self.exp_avg_sq[rows] = v
        shape = (-1,) + (1,) * (grad.dim() - 1)
        bc1 = (1 - b1 ** t.to(grad.dtype)).view(shape)
        bc2 = (1 - b2 ** t.to(grad.dtype)).view(shape)
        update = (m / bc1) / ((v / bc2).sqrt() + self.eps)
        self.table[rows] = self.table[rows] - self.lr * update

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.steps.copy_(state["steps"])
