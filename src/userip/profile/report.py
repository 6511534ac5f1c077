"""Readable summaries of a profile fit (terminal tables; the markdown/HTML report builds on the same data)."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table


def summary_table(metrics: dict[str, Any]) -> Group:
    """Per-epoch held-out NLL four ways with the gaps, then code usage of the best epoch."""
    t = Table(title=f"profile fit: {metrics.get('n_users', '?')} users, best epoch {metrics.get('best_epoch')}",
              caption="held-out NLL per token; gap = mean - own (> 0: the personal part predicts the future)")
    for col in ("ep", "train", "own", "shuf", "mean", "code", "gap", "gap/user", "s"):
        t.add_column(col, justify="right", no_wrap=True)
    for m in metrics.get("epochs", []):
        h = m.get("heldout", {})
        t.add_row(
            str(m["epoch"]), f"{m['train_nll']:.3f}",
            *(f"{h[k]:.4f}" if k in h else "-" for k in ("own", "shuffled", "mean", "codeword")),
            f"{m.get('gap_own_vs_mean', float('nan')):+.4f}", f"{m.get('gap_own_vs_mean_user', float('nan')):+.4f}",
            f"{m.get('wall_s', 0):.0f}",
        )
    c = Table(title="codes (best epoch)")
    for col in ("profile", "users per code", "perplexity", "dead", "NMI with activity"):
        c.add_column(col, justify="right", no_wrap=True)
    for name, s in metrics.get("final", {}).get("codes", {}).items():
        c.add_row(name, " ".join(map(str, s["usage"])), f"{s['perplexity']:.2f}", str(s["dead"]),
                  f"{s['nmi_activity']:.3f}")
    return Group(t, c)
