"""Pure result tables: runs DataFrame in, markdown out (no I/O, no training).

The runs frame has one row per (backbone, variant, setting, seed, slice) with ``auc`` and ``logloss``.
Lifts are paired across seeds (same seed, same split): mean difference with a 95% t-interval, and the
verdict "no lift" whenever the interval contains 0.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

KEYS = ["backbone", "setting", "slice"]
TREATMENT = "+ids"
CONTROLS = ("base", "+ids-permuted", "+activity")


def _order(values, preferred) -> list:
    vals = list(dict.fromkeys(values))
    return [v for v in preferred if v in vals] + [v for v in vals if v not in preferred]


def _tcrit(n: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, n - 1))
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return 1.959963984540054


def paired_interval(diffs) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of a 95% t-interval of paired differences; low/high NaN when n < 2."""
    d = np.asarray([x for x in diffs if not math.isnan(x)], dtype=np.float64)
    n = len(d)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(d.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    half = _tcrit(n) * float(d.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def verdict(low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return "n/a"
    if low <= 0 <= high:
        return "no lift"
    return "lift" if low > 0 else "worse"


def summary_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std of AUC / LogLoss over seeds per backbone x setting x slice x variant."""
    g = runs.groupby(["backbone", "setting", "slice", "variant"], sort=False)
    out = g.agg(
        n=("seed", "nunique"),
        auc_mean=("auc", "mean"),
        auc_std=("auc", "std"),
        logloss_mean=("logloss", "mean"),
        logloss_std=("logloss", "std"),
    )
    if "epochs" in runs:
        out["epochs"] = g["epochs"].mean()
    return out.reset_index()


def lift_frame(runs: pd.DataFrame, treatment: str = TREATMENT, controls=CONTROLS) -> pd.DataFrame:
    """Paired (by seed) differences treatment - control of AUC and LogLoss, with 95% t-intervals."""
    rows = []
    for key, grp in runs.groupby(KEYS, sort=False):
        t = grp[grp["variant"] == treatment].set_index("seed")
        if t.empty:
            continue
        for c in controls:
            cg = grp[grp["variant"] == c].set_index("seed")
            seeds = t.index.intersection(cg.index)
            if len(seeds) == 0:
                continue
            auc = paired_interval((t.loc[seeds, "auc"] - cg.loc[seeds, "auc"]).to_numpy())
            ll = paired_interval((t.loc[seeds, "logloss"] - cg.loc[seeds, "logloss"]).to_numpy())
            rows.append(
                {
                    **dict(zip(KEYS, key, strict=True)),
                    "treatment": treatment,
                    "control": c,
                    "n": auc[3],
                    "d_auc": auc[0],
                    "d_auc_low": auc[1],
                    "d_auc_high": auc[2],
                    "d_logloss": ll[0],
                    "d_logloss_low": ll[1],
                    "d_logloss_high": ll[2],
                    "verdict": verdict(auc[1], auc[2]),
                }
            )
    return pd.DataFrame(rows)


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _pm(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4f} ± {std:.4f}" if n >= 2 and not math.isnan(std) else f"{mean:.4f}"


def _ci(mean: float, low: float, high: float) -> str:
    if math.isnan(mean):
        return "n/a"
    ci = "n/a" if math.isnan(low) else f"[{low:+.4f}, {high:+.4f}]"
    return f"{mean:+.4f} {ci}"


def results_markdown(runs: pd.DataFrame, title: str = "CTR results", notes: list[str] | None = None) -> str:
    """The results.md text: a mean ± std table and the paired-lift table of ``+ids``."""
    if runs.empty:
        return f"# {title}\n\nNo runs.\n"
    variants = _order(runs["variant"], ["base", "+ids", "+ids-permuted", "+activity", "+theta"])
    order = {  # backbones in run order, then the canonical order of settings, slices and variants
        "backbone": _order(runs["backbone"], []),
        "setting": _order(runs["setting"], ["with_user_id", "no_user_id"]),
        "slice": _order(runs["slice"], ["all", "cold"]),
        "variant": variants,
    }
    ranks = {f"_{k}": runs[k].map({v: i for i, v in enumerate(vals)}) for k, vals in order.items()}
    runs = runs.assign(**ranks).sort_values([*ranks, "seed"], kind="stable").drop(columns=list(ranks))
    s = summary_frame(runs)
    seeds = sorted(runs["seed"].unique().tolist())
    parts = [
        f"# {title}",
        "",
        f"Seeds: {seeds}. AUC higher is better, LogLoss lower is better; mean ± sample std over seeds.",
    ]
    for note in notes or []:
        parts += ["", note]
    table = pd.DataFrame(
        {
            "backbone": s["backbone"],
            "setting": s["setting"],
            "slice": s["slice"],
            "variant": s["variant"],
            "seeds": s["n"],
            "AUC": [_pm(m, sd, n) for m, sd, n in zip(s["auc_mean"], s["auc_std"], s["n"], strict=True)],
            "LogLoss": [_pm(m, sd, n) for m, sd, n in zip(s["logloss_mean"], s["logloss_std"], s["n"], strict=True)],
        }
    )
    if "epochs" in s:
        table["epochs"] = [f"{e:.1f}" for e in s["epochs"]]
    parts += ["", "## AUC / LogLoss", "", _md(table)]
    lifts = [lift_frame(runs)]
    if "+theta" in variants:
        lifts.append(lift_frame(runs, "+theta", ("base", "+ids")))
    lift = (
        pd.concat([x for x in lifts if not x.empty], ignore_index=True)
        if any(not x.empty for x in lifts)
        else pd.DataFrame()
    )
    parts += [
        "",
        "## Paired lift",
        "",
        "Difference treatment - control on the same seeds, mean [95% t-interval]; "
        '"no lift" when the AUC interval contains 0, "n/a" with fewer than 2 seeds.',
        "",
    ]
    if lift.empty:
        parts.append("No paired runs of `+ids` and a control.")
    else:
        parts.append(
            _md(
                pd.DataFrame(
                    {
                        "backbone": lift["backbone"],
                        "setting": lift["setting"],
                        "slice": lift["slice"],
                        "comparison": lift["treatment"] + " vs " + lift["control"],
                        "seeds": lift["n"],
                        "ΔAUC": [
                            _ci(*r) for r in zip(lift["d_auc"], lift["d_auc_low"], lift["d_auc_high"], strict=True)
                        ],
                        "ΔLogLoss": [
                            _ci(*r)
                            for r in zip(lift["d_logloss"], lift["d_logloss_low"], lift["d_logloss_high"], strict=True)
                        ],
                        "verdict": lift["verdict"],
                    }
                )
            )
        )
    return "\n".join(parts) + "\n"
