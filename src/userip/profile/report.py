"""Readable summaries of a profile fit (terminal tables; the HTML/markdown report builds on the same data)."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def summary_table(metrics: dict[str, Any]) -> Table:
    """Per-epoch table: train NLL, held-out NLL four ways, the own-vs-mean gap, code perplexity and NMI."""
    t = Table(title=f"profile fit: {metrics.get('n_users', '?')} users, best epoch {metrics.get('best_epoch')}")
    for col in ("epoch", "train", "own", "shuffled", "mean", "codeword", "mean-own", "mean-own/user", "codes",
                "s"):
        t.add_column(col, justify="right")
    for m in metrics.get("epochs", []):
        h = m.get("heldout", {})
        codes = " ".join(f"{k}:ppl {c['perplexity']:.1f} nmi {c['nmi_activity']:.2f}"
                         for k, c in m.get("codes", {}).items())
        t.add_row(
            str(m["epoch"]), f"{m['train_nll']:.4f}",
            *(f"{h[k]:.4f}" if k in h else "-" for k in ("own", "shuffled", "mean", "codeword")),
            f"{m.get('gap_own_vs_mean', float('nan')):+.4f}", f"{m.get('gap_own_vs_mean_user', float('nan')):+.4f}",
            codes, f"{m.get('wall_s', 0):.0f}",
        )
    return t
