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


def ctr_auc(runs: pd.DataFrame, path: Path) -> Path:
    """Mean test AUC (all users) per variant with seed std, one panel per setting, a bar group per backbone."""
    r = runs[runs["slice"] == "all"]
    settings = list(dict.fromkeys(r["setting"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.4), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        s = r[r["setting"] == setting].groupby(["backbone", "variant"], sort=False)["auc"].agg(["mean", "std"])
        table = s["mean"].unstack("variant")
        err = s["std"].unstack("variant").fillna(0)
        table.plot.bar(ax=ax, yerr=err, capsize=2, width=0.85)
        lo = float(table.min().min())
        ax.set_ylim(lo - 0.01, float(table.max().max()) + 0.01)
        ax.set(title=f"test AUC, {setting}", ylabel="AUC", xlabel="")
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))
        ax.tick_params(axis="x", rotation=0)
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
