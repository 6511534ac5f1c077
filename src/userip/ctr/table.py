"""Result tables: test predictions in, paired lifts and markdown out (no training, no file I/O but save/load).

Every comparison is paired: the same test rows and seeds for both variants, with a 95% interval from the
bootstrap over test users and seeds (:mod:`userip.ctr.stats`). The verdict follows the interval: "lift" when it
lies above 0, "worse" below, "no lift" when it contains 0. A source is a *winner* in a setting only when, on
all users, it beats every control it was run with (base, +activity, +label-rate, its reference and its permuted
twin) on at least 3 of 5 backbones (:data:`WIN_SHARE` of the backbones run).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from userip.ctr import stats
from userip.ctr import variants as V

KEYS = ["backbone", "setting", "slice"]
SETTINGS_ORDER = ["with_user_id", "no_user_id"]
SLICES_ORDER = ["all", "cold"]
WIN_SHARE = 0.6  # "at least 3 of 5 backbones"
BOOTSTRAP = 1000
DISPLAY_ORDER = V.variant_lists(["+ids", "+theta", *V.COMPETITORS])["all"]


@dataclass
class TestPredictions:
    """Every fit's test-set click probabilities, with the labels, users and slices they are scored on."""

    __test__ = False  # a data class, not a pytest test class (its name starts with "Test")

    label: np.ndarray  # [N] 0/1
    user: np.ndarray  # [N] user_idx of each test row (the bootstrap resamples users)
    slices: dict[str, np.ndarray]  # slice name -> bool mask [N]
    preds: dict[tuple[str, str, str, int], np.ndarray] = field(default_factory=dict)  # (backbone, setting,
    # variant, seed) -> [N]

    def add(self, backbone: str, setting: str, variant: str, seed: int, p: np.ndarray) -> None:
        p = np.asarray(p, dtype=np.float32).reshape(-1)
        if len(p) != len(self.label):
            raise ValueError(f"{len(p)} predictions for {len(self.label)} test rows")
        self.preds[(backbone, setting, variant, int(seed))] = p

    def save(self, path: str | Path) -> None:
        """One ``.npz``: labels, users, slice masks and a [fits, N] float32 matrix with its keys."""
        from userip.io import atomic_path

        keys = list(self.preds)
        mat = np.stack([self.preds[k] for k in keys]) if keys else np.zeros((0, len(self.label)), np.float32)
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(
                f, label=self.label, user=self.user, preds=mat,
                keys=np.array(["\t".join(map(str, k)) for k in keys], dtype=str),
                **{f"slice:{k}": v for k, v in self.slices.items()},
            )

    @classmethod
    def load(cls, path: str | Path) -> TestPredictions:
        with np.load(Path(path)) as z:
            slices = {k.removeprefix("slice:"): z[k] for k in z.files if k.startswith("slice:")}
            out = cls(z["label"], z["user"], slices)
            for key, p in zip(z["keys"].tolist(), z["preds"], strict=True):
                b, s, v, seed = key.split("\t")
                out.preds[(b, s, v, int(seed))] = p
        return out


def verdict(low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return "n/a"
    if low <= 0 <= high:
        return "no lift"
    return "lift" if low > 0 else "worse"


def _order(values, preferred) -> list:
    vals = list(dict.fromkeys(values))
    return [v for v in preferred if v in vals] + [v for v in vals if v not in preferred]


# ------------------------------------------------------------------ paired lifts
def lift_frame(tp: TestPredictions, n_boot: int = BOOTSTRAP, seed: int = 0) -> pd.DataFrame:
    """Every comparison of :func:`userip.ctr.variants.controls_for` per backbone x setting x slice.

    Columns: backbone, setting, slice, variant, control, kind (reference | control | twin), role of the
    variant, seeds, users, d_auc (+ _low/_high), d_logloss (+ _low/_high), verdict (of ΔAUC).
    One set of replicates per slice (seeded by ``seed``) serves every comparison, so they are paired.
    """
    if n_boot < 10:
        raise ValueError(f"n_boot must be >= 10, got {n_boot}")
    groups: dict[tuple[str, str], dict[str, list[int]]] = {}
    for b, s, v, sd in tp.preds:
        groups.setdefault((b, s), {}).setdefault(v, []).append(sd)
    all_seeds = sorted({k[3] for k in tp.preds})
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    for sl in _order(tp.slices, SLICES_ORDER):
        mask = np.asarray(tp.slices[sl], dtype=bool)
        if not mask.any():  # e.g. no cold user among the test rows: nothing to compare on this slice
            continue
        reps = stats.draw_replicates(tp.user[mask], len(all_seeds), n_boot, rng)
        for (backbone, setting), by_variant in groups.items():
            group = _Group(tp, backbone, setting, mask, reps, all_seeds)
            for variant in by_variant:
                for control in V.controls_for(variant, by_variant):
                    seeds = sorted(set(by_variant[variant]) & set(by_variant[control]))
                    if not seeds:
                        continue
                    r = _subset(reps, [all_seeds.index(sd) for sd in seeds])
                    a, c = group.metrics(variant, seeds), group.metrics(control, seeds)
                    auc = stats.paired_difference(a[0], c[0], a[2], c[2], r)
                    ll = stats.paired_difference(a[1], c[1], a[3], c[3], r)
                    kind = ("twin" if control == V.twin(variant)
                            else "reference" if control == V.reference(variant) or V.role(variant) != "source"
                            else "control")
                    rows.append({
                        "backbone": backbone, "setting": setting, "slice": sl, "variant": variant,
                        "control": control, "kind": kind, "role": V.role(variant), "seeds": len(seeds),
                        "users": reps.n_users, "d_auc": auc[0], "d_auc_low": auc[1], "d_auc_high": auc[2],
                        "d_logloss": ll[0], "d_logloss_low": ll[1], "d_logloss_high": ll[2],
                        "verdict": verdict(auc[1], auc[2]),
                    })
    return pd.DataFrame(rows)


class _Group:
    """One backbone x setting on one slice: each variant's per-seed metrics, computed once, shared by every
    comparison it takes part in."""

    def __init__(self, tp: TestPredictions, backbone: str, setting: str, mask: np.ndarray,
                 reps: stats.Replicates, all_seeds: list[int]) -> None:
        self.tp, self.backbone, self.setting, self.mask, self.reps = tp, backbone, setting, mask, reps
        self.all_seeds = all_seeds
        self.cache: dict[str, tuple[list[int], stats.SeedMetrics]] = {}

    def metrics(self, variant: str, seeds: list[int]):
        """(auc [S], logloss [S], auc_boot [B, S], logloss_boot [B, S]) of ``variant`` on ``seeds``."""
        if variant not in self.cache:
            got = sorted(sd for (b, s, v, sd) in self.tp.preds
                         if (b, s, v) == (self.backbone, self.setting, variant))
            preds = np.stack([self.tp.preds[(self.backbone, self.setting, variant, sd)][self.mask] for sd in got])
            reps = _subset(self.reps, [self.all_seeds.index(sd) for sd in got])
            self.cache[variant] = (got, stats.seed_metrics(self.tp.label[self.mask], preds, reps))
        got, m = self.cache[variant]
        idx = [got.index(sd) for sd in seeds]
        return m.auc[idx], m.logloss[idx], m.auc_boot[:, idx], m.logloss_boot[:, idx]


def _subset(reps: stats.Replicates, cols: list[int]) -> stats.Replicates:
    """The replicates with the seed draws of ``cols`` only (a comparison over a subset of the seeds)."""
    w = reps.seed_weights[:, cols]
    if not w.any(axis=1).all():  # a replicate that drew none of these seeds: redraw among them, seeded by cols
        g = np.random.default_rng(len(cols) * 7919 + sum(cols))
        w = g.multinomial(len(cols), np.full(len(cols), 1.0 / len(cols)), size=len(w)).astype(np.float64)
    return stats.Replicates(reps.user_counts, reps.row_user, w)


# ------------------------------------------------------------------ headline
def need_backbones(n: int) -> int:
    """Backbones a source must win on: 3 of 5 (:data:`WIN_SHARE`), at least 1."""
    return max(1, math.ceil(WIN_SHARE * n - 1e-9))


def beats_every_control(lifts: pd.DataFrame) -> pd.DataFrame:
    """Per source x backbone x setting x slice: whether every control's interval lies above 0, and which not."""
    src = lifts[lifts["role"] == "source"]
    rows = []
    for key, g in src.groupby(["variant", *KEYS], sort=False):
        failed = g.loc[g["verdict"] != "lift", "control"].tolist()
        rows.append({**dict(zip(["variant", *KEYS], key, strict=True)), "beats_all": not failed,
                     "not_beaten": failed, "controls": g["control"].tolist(),
                     "undecided": bool((g["verdict"] == "n/a").any())})
    return pd.DataFrame(rows, columns=["variant", *KEYS, "beats_all", "not_beaten", "controls", "undecided"])


def winners(lifts: pd.DataFrame, slice_: str = "all") -> dict[str, dict]:
    """Per setting: backbones run, the number needed, and per source the backbones on which it beats every
    control (``wins``) and the controls it was held to; ``winners`` lists the sources with wins >= need."""
    out: dict[str, dict] = {}
    if lifts.empty:
        return out
    beat = beats_every_control(lifts)
    for setting in _order(lifts["setting"], SETTINGS_ORDER):
        n = lifts.loc[lifts["setting"] == setting, "backbone"].nunique()
        b = beat[(beat["setting"] == setting) & (beat["slice"] == slice_)]
        per = {}
        for variant, g in b.groupby("variant", sort=False):
            per[variant] = {"wins": int(g["beats_all"].sum()), "backbones": int(len(g)),
                            "controls": sorted({c for cs in g["controls"] for c in cs})}
        need = need_backbones(n)
        out[setting] = {"backbones": int(n), "need": need, "sources": per,
                        "winners": [v for v, p in per.items() if p["wins"] >= need]}
    return out


def summary_sentences(lifts: pd.DataFrame) -> list[str]:
    """The sentences under the headline: which source, if any, beats every control; do IDs add to label-rate."""
    lines = []
    for setting, w in winners(lifts).items():
        n, need = w["backbones"], w["need"]
        if not w["sources"]:
            lines.append(f"**{setting}**: no learned source with a control was run.")
            continue
        ranked = sorted(w["sources"].items(), key=lambda kv: -kv[1]["wins"])
        tally = ", ".join(f"{v} {p['wins']}/{n}" for v, p in ranked)
        if w["winners"]:
            lines.append(f"**{setting}: winner {', '.join(f'`{v}`' for v in w['winners'])}**: beats every control "
                         f"it was run with (base, +activity, +label-rate, its reference and its permuted twin, where "
                         f"run) on at least {need} of {n} backbones, all users ({tally}).")
        else:
            lines.append(f"**{setting}: no winner**: no source beats every control (base, +activity, +label-rate, "
                         f"its reference and its permuted twin, where run) on {need} of {n} backbones, all users "
                         f"({tally}).")
        sub = lifts[(lifts["setting"] == setting) & (lifts["slice"] == "all") & (lifts["variant"] == "+ids+label-rate")
                    & (lifts["control"] == "+label-rate")]
        if not sub.empty:
            k = int((sub["verdict"] == "lift").sum())
            plain = ("the profile IDs add something on top of how the user rates" if k >= need else
                     "the profile IDs add nothing measurable on top of how the user rates")
            lines.append(f"**{setting}**: `+ids+label-rate` vs `+label-rate`: lift on {k} of {len(sub)} "
                         f"backbones: {plain}.")
    return lines


# ------------------------------------------------------------------ markdown
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


def _cell(r: pd.Series | None) -> str:
    if r is None:
        return "not run"
    return f"{_ci(r['d_auc'], r['d_auc_low'], r['d_auc_high'])} {r['verdict']}"


def _sort_runs(runs: pd.DataFrame) -> pd.DataFrame:
    order = {
        "backbone": _order(runs["backbone"], []),
        "setting": _order(runs["setting"], SETTINGS_ORDER),
        "slice": _order(runs["slice"], SLICES_ORDER),
        "variant": _order(runs["variant"], DISPLAY_ORDER),
    }
    ranks = {f"_{k}": runs[k].map({v: i for i, v in enumerate(vals)}) for k, vals in order.items()}
    return runs.assign(**ranks).sort_values([*ranks, "seed"], kind="stable").drop(columns=list(ranks))


def _lookup(idx: pd.DataFrame, variant: str, control: str | None, backbone: str, setting: str, sl: str):
    k = (variant, control, backbone, setting, sl)
    return idx.loc[k] if control is not None and k in idx.index else None


def headline_tables(lifts: pd.DataFrame, backbones: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """Per setting: rows = source x backbone; ΔAUC over its reference (base) and over its permuted twin with
    95% intervals and verdicts, whether it beats every control, and the same two lifts on the cold slice.
    Sources without any control of their own (twin or reference) are left out; controls show their lift over
    base (the bar a source must clear)."""
    out: dict[str, pd.DataFrame] = {}
    if lifts.empty:
        return out
    beat = beats_every_control(lifts).set_index(["variant", *KEYS])
    idx = lifts.set_index(["variant", "control", *KEYS])
    backbones = list(backbones) if backbones is not None else _order(lifts["backbone"], [])
    for setting in _order(lifts["setting"], SETTINGS_ORDER):
        rows = []
        here = lifts[lifts["setting"] == setting]
        shown = [v for v in _order(here["variant"], DISPLAY_ORDER)
                 if V.role(v) in ("source", "control")]
        for variant in shown:
            ref, tw = V.reference(variant), V.twin(variant)
            if V.role(variant) == "control":
                ref = V.BASE
            for backbone in backbones:
                cells = {(c, sl): _lookup(idx, variant, c, backbone, setting, sl)
                         for c in (ref, tw) for sl in ("all", "cold")}
                if cells[(ref, "all")] is None and cells[(tw, "all")] is None:
                    continue
                control_row = V.role(variant) == "control"
                key = (variant, backbone, setting, "all")
                b = beat.loc[key] if key in beat.index else None
                every = ("–" if control_row or b is None else "yes" if b["beats_all"]
                         else "no: " + ", ".join(b["not_beaten"]))
                rows.append({
                    "source": variant, "backbone": backbone,
                    "over base¹": _cell(cells[(ref, "all")]),
                    "over permuted twin": "(a control)" if control_row else _cell(cells[(tw, "all")]),
                    "beats every control": every,
                    "cold: over base¹": _cell(cells[(ref, "cold")]),
                    "cold: over twin": "(a control)" if control_row else _cell(cells[(tw, "cold")]),
                })
        if rows:
            out[setting] = pd.DataFrame(rows)
    return out


def results_markdown(runs: pd.DataFrame, lifts: pd.DataFrame | None = None, title: str = "CTR results",
                     notes: list[str] | None = None, reads: Mapping[str, str] | None = None,
                     n_boot: int | None = None) -> str:
    """The results.md text: the headline per setting (lifts with paired intervals, the winner sentence), what
    each source read, then every AUC / LogLoss (mean ± std over seeds) and every paired comparison."""
    if runs.empty:
        return f"# {title}\n\nNo runs.\n"
    runs = _sort_runs(runs)
    lifts = lifts if lifts is not None else pd.DataFrame()
    seeds = sorted(runs["seed"].unique().tolist())
    backbones = _order(runs["backbone"], [])
    parts = [f"# {title}", ""]
    if not lifts.empty:
        n_cmp = len(lifts)
        boot = f"{n_boot} replicates" if n_boot else "replicates"
        parts += [
            f"ΔAUC of each source over base¹ and over its permuted twin (the same rows permuted across users), "
            f"mean over seeds {seeds} with a 95% paired bootstrap interval ({boot}: test users and seeds resampled "
            f"with replacement, the same draw for both sides); verdict \"lift\" / \"no lift\" / \"worse\" follows the "
            "interval. ¹ For a source on top of a control (`+ids+label-rate`), over that control (`+label-rate`).",
            "",
        ]
        for line in summary_sentences(lifts):
            parts += [f"- {line}"]
        parts += ["", f"These tables make **{n_cmp} paired comparisons**; each interval is 95% on its own (no "
                      f"multiplicity correction): if no source did anything, about {n_cmp / 20:.0f} of them would "
                      "still show \"lift\" or \"worse\" by chance, which is why a winner must beat every control on "
                      f"{need_backbones(len(backbones))} of {len(backbones)} backbones.", ""]
        for setting, table in headline_tables(lifts, backbones).items():
            parts += [f"## Headline: {setting}", "", _md(table), ""]
    if reads:
        parts += ["## What each source read", "", _md(pd.DataFrame({"source": list(reads),
                                                                        "read": list(reads.values())})), ""]
    for note in notes or []:
        parts += [note, ""]
    s = summary_frame(runs)
    table = pd.DataFrame({
        "backbone": s["backbone"], "setting": s["setting"], "slice": s["slice"], "variant": s["variant"],
        "seeds": s["n"],
        "AUC": [_pm(m, sd, n) for m, sd, n in zip(s["auc_mean"], s["auc_std"], s["n"], strict=True)],
        "LogLoss": [_pm(m, sd, n) for m, sd, n in zip(s["logloss_mean"], s["logloss_std"], s["n"], strict=True)],
    })
    if "epochs" in s:
        table["epochs"] = [f"{e:.1f}" for e in s["epochs"]]
    parts += ["## AUC / LogLoss", "", f"Seeds: {seeds}. AUC higher is better, LogLoss lower is better; "
              "mean ± sample std over seeds.", "", _md(table), ""]
    parts += ["## Every paired comparison", ""]
    if lifts.empty:
        parts.append("No paired comparisons (no variant ran beside one of its controls).")
    else:
        parts.append(_md(pd.DataFrame({
            "backbone": lifts["backbone"], "setting": lifts["setting"], "slice": lifts["slice"],
            "comparison": lifts["variant"] + " vs " + lifts["control"], "kind": lifts["kind"],
            "seeds": lifts["seeds"], "users": lifts["users"],
            "ΔAUC": [_ci(*r) for r in zip(lifts["d_auc"], lifts["d_auc_low"], lifts["d_auc_high"], strict=True)],
            "ΔLogLoss": [_ci(*r) for r in zip(lifts["d_logloss"], lifts["d_logloss_low"], lifts["d_logloss_high"],
                                               strict=True)],
            "verdict": lifts["verdict"],
        })))
    return "\n".join(parts).rstrip() + "\n"
