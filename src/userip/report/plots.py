"""Matplotlib figures (headless Agg backend), one PNG each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def em_curves(epochs: list[dict[str, Any]], path: Path, ceiling: dict[str, Any] | None = None) -> Path:
    """Train and held-out NLL per epoch; held-out with own, shuffled, mean and codeword soft tokens."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ep = [m["epoch"] for m in epochs]
    a.plot(ep, [m["train_nll"] for m in epochs], "o-", label="train")
    for k, style in (("own", "o-"), ("shuffled", "s--"), ("mean", "^--"), ("codeword", "d:")):
        if all(k in m.get("heldout", {}) for m in epochs):
            a.plot(ep, [m["heldout"][k] for m in epochs], style, label=f"held-out {k}")
    a.set(xlabel="epoch", ylabel="NLL / token", title="Profiles: NLL per epoch")
    a.legend(fontsize=8)
    b.axhline(0, color="grey", lw=0.8)
    for key, style, label in (("own_vs_mean", "o-", "mean - own"), ("own_vs_shuffled", "s--", "shuffled - own")):
        g = [m.get("report", {}).get("gaps", {}).get(key, {}) for m in epochs]
        if all("lo" in x for x in g):  # report half with its 95% interval
            y = [x["token"] for x in g]
            err = [[x["token"] - x["lo"] for x in g], [x["hi"] - x["token"] for x in g]]
            b.errorbar(ep, y, yerr=err, fmt=style, capsize=3, label=f"{label} (95% CI)")
        else:
            b.plot(ep, [m.get("gap_" + key, 0) for m in epochs], style, label=label)
    if ceiling and ceiling.get("personal_gain"):
        b.axhline(ceiling["personal_gain"], color="C3", ls=":", label="ceiling: own vs other history")
    b.set(xlabel="epoch", ylabel="nats / token", title="Personal signal (> 0 is good)")
    b.legend(fontsize=8)
    return _save(fig, path)


def code_usage(codes: dict[str, dict[str, Any]], path: Path) -> Path:
    fig, axes = plt.subplots(1, max(len(codes), 1), figsize=(4 * max(len(codes), 1), 3), squeeze=False)
    for ax, (name, c) in zip(axes[0], codes.items(), strict=False):
        u = c["usage"]
        ax.bar(range(1, len(u) + 1), u)
        ax.set(xlabel="code", ylabel="users", title=f"{name}: perplexity {c['perplexity']:.2f}")
        ax.set_xticks(range(1, len(u) + 1))
    return _save(fig, path)


def ctr_forest(lifts: pd.DataFrame, path: Path) -> Path:
    """Forest plot of the paired lifts: per setting (rows) and slice (columns), each source x backbone with its
    ΔAUC over base (its reference) and over its permuted twin, 95% bootstrap intervals, a line at 0.

    Why not AUC bars: the differences that decide anything are a tenth of the seed spread of raw AUC on a cut
    axis; plotting the paired difference with its interval shows at a glance which lifts exclude 0.
    """
    from userip.ctr import variants as V
    from userip.ctr.table import DISPLAY_ORDER, SETTINGS_ORDER, SLICES_ORDER, _order

    settings = _order(lifts["setting"], SETTINGS_ORDER)
    slices = _order(lifts["slice"], SLICES_ORDER)
    shown = [v for v in _order(lifts["variant"], DISPLAY_ORDER) if V.role(v) in ("source", "control")]
    backbones = _order(lifts["backbone"], [])
    labels = [(v, b) for v in shown for b in backbones]
    height = 1.6 + 0.22 * max(len(labels), 1)
    fig, axes = plt.subplots(len(settings), len(slices), figsize=(6.2 * len(slices), height * len(settings)),
                             squeeze=False)
    idx = lifts.set_index(["variant", "control", "backbone", "setting", "slice"])
    styles = (("reference", "o", "C0", "over base (its reference)"), ("twin", "s", "C3", "over its permuted twin"))
    for i, setting in enumerate(settings):
        for j, sl in enumerate(slices):
            ax = axes[i][j]
            for k, (kind, marker, color, label) in enumerate(styles):
                ys, xs, lo, hi = [], [], [], []
                for row, (v, b) in enumerate(labels):
                    control = V.twin(v) if kind == "twin" else (V.BASE if V.role(v) == "control" else V.reference(v))
                    key = (v, control, b, setting, sl)
                    if control is None or key not in idx.index:
                        continue
                    r = idx.loc[key]
                    ys.append(row + (0.18 if k else -0.18))
                    xs.append(r["d_auc"])
                    lo.append(r["d_auc"] - r["d_auc_low"] if r["d_auc_low"] == r["d_auc_low"] else 0)
                    hi.append(r["d_auc_high"] - r["d_auc"] if r["d_auc_high"] == r["d_auc_high"] else 0)
                if xs:
                    ax.errorbar(xs, ys, xerr=[lo, hi], fmt=marker, color=color, ms=4, capsize=2, lw=1, label=label)
            ax.axvline(0, color="grey", lw=0.8)
            for row in range(1, len(labels)):
                if labels[row][0] != labels[row - 1][0]:
                    ax.axhline(row - 0.5, color="#ddd", lw=0.6)
            ax.set_yticks(range(len(labels)))
            ax.set_yticklabels([f"{v}  {b}" for v, b in labels], fontsize=7)
            ax.invert_yaxis()
            ax.set(title=f"{setting}, {sl} users", xlabel="ΔAUC (95% paired bootstrap interval)")
            if i == len(settings) - 1:  # one legend under the bottom row, never over the intervals
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    return _save(fig, path)


def stage_costs(stages: dict[str, dict[str, Any]], path: Path) -> Path:
    names = list(stages)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    a.barh(names, [stages[n].get("wall_s", 0) for n in names])
    a.set(xlabel="seconds", title="wall time per stage")
    b.barh(names, [stages[n].get("peak_rss_mb", 0) / 1024 for n in names])
    b.set(xlabel="GiB", title="peak RSS per stage")
    a.invert_yaxis()
    b.invert_yaxis()
    return _save(fig, path)
