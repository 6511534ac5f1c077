"""Validity probe: do profile IDs carry information about user attributes the profiler never saw?

ML-100K's age, gender and occupation are not in the behaviour text. The targets are the dataset's own user side
features (`probe_targets`: the configured ``side_features``, numeric ages bucketed, near-unique columns such as
zip codes skipped), or a list given in the run config's ``probe: {targets: [...]}``; a dataset without user side
features gets a probe that says there was nothing to probe (`nothing_to_probe_markdown`).

For each ID source (profile IDs, and the controls: the same ID tuples permuted across users, and activity
buckets of at most the same cardinality, as the CTR table's ``+activity``) and each target, the probe reports the
normalised (and chance-adjusted) mutual information between the joint ID tuple and the target, and the 5-fold
stratified cross-validated accuracy of a logistic regression on one-hot IDs, next to the majority-class accuracy
on the same folds. IDs that beat their
permuted control carry signal; IDs that do no better than activity buckets may only be encoding how much a user
watches.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from userip.errors import UseripError

AGE_LABELS = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
DEFAULT_TARGETS = ("age_bucket", "gender", "occupation")
# A target with more classes than this (or one class per user) cannot be probed from a few IDs: a zip code
# or a free-text column would only measure how unique users are.
MAX_TARGET_CLASSES = 50
_NOT_CODES = ("user_idx", "user_id")


def age_bucket(age: Any) -> pd.Series:
    """ML-1M age groups: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+ (missing ages stay missing)."""
    from userip.data.config import ML100K_AGE_BINS

    a = pd.to_numeric(pd.Series(age), errors="coerce").astype("float64")
    idx = np.searchsorted(np.asarray(ML100K_AGE_BINS), a.to_numpy(), side="right")
    labels = np.array(AGE_LABELS, dtype=object)[np.minimum(idx, len(AGE_LABELS) - 1)]
    return pd.Series(np.where(a.isna(), None, labels), index=a.index, dtype=object)


def code_columns(ids: pd.DataFrame) -> list[str]:
    cols = [c for c in ids.columns if c not in _NOT_CODES]
    if "user_idx" not in ids.columns or not cols:
        raise UseripError("an ID table needs a user_idx column and at least one code column")
    bad = [c for c in cols if not pd.api.types.is_integer_dtype(ids[c])]
    if bad:
        raise UseripError(f"ID columns must be integer codes; not: {bad}")
    return cols


def joint_ids(ids: pd.DataFrame) -> np.ndarray:
    """One integer per distinct ID tuple (0..T-1), in row order."""
    cols = code_columns(ids)
    return pd.MultiIndex.from_frame(ids[cols]).factorize()[0] if len(cols) > 1 else ids[cols[0]].factorize()[0]


def id_space_size(ids: pd.DataFrame) -> int:
    """Size of the ID tuple space: the product over code columns of the codes seen in each column."""
    return int(np.prod([ids[c].nunique() for c in code_columns(ids)]))


def permuted_ids(ids: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The same ID tuples, permuted jointly across users (label-blind control: same code marginals)."""
    cols = code_columns(ids)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ids))
    out = ids.copy()
    out[cols] = ids[cols].to_numpy()[perm]
    return out


def activity_frame(data, n_buckets: int, users: Sequence[int] | None = None) -> pd.DataFrame:
    """Activity buckets of train interaction counts as a frame (user_idx, activity), by the one definition the
    CTR control uses (:func:`userip.ctr.sources.activity_buckets`): quantile buckets ``1..k`` with
    ``k = min(n_buckets, distinct counts)``, equal counts in one bucket.

    ``data`` is a PreparedData or an interactions frame (user_idx, split). ``users`` restricts (and orders)
    the users, e.g. the fitted ones; users without train interactions count 0.
    """
    from userip.ctr.sources import activity_buckets as quantile_activity_buckets

    if n_buckets < 1:
        raise UseripError(f"n_buckets must be >= 1, got {n_buckets}")
    inter = getattr(data, "interactions", data)
    if "split" in inter.columns:
        inter = inter[inter["split"] == "train"]
    counts = inter.groupby("user_idx").size()
    if users is None:
        users = counts.index.to_numpy()
    users = np.asarray(users, dtype=np.int64)
    act = counts.reindex(users).fillna(0).to_numpy()
    bucket, _ = quantile_activity_buckets(np.r_[0, act], n_buckets)  # row 0: the per-user tables' unknown row
    return pd.DataFrame({"user_idx": users, "activity": bucket[1:]})


def _targets(users: pd.DataFrame, targets: Sequence[str]) -> pd.DataFrame:
    u = users.copy()
    if "age_bucket" in targets and "age_bucket" not in u.columns and "age" in u.columns:
        u["age_bucket"] = age_bucket(u["age"]).to_numpy()
    missing = [t for t in targets if t not in u.columns]
    if missing:
        raise UseripError(f"users table has no column(s) {missing} (columns: {list(u.columns)})")
    return u[["user_idx", *targets]]


def probe_targets(users: pd.DataFrame, side_features: Sequence[str] | None = None,
                  targets: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(targets to probe, {column: why it is skipped}) for a users table.

    ``targets`` given (the run config's ``probe.targets``): exactly those; a name the users table lacks is a
    `UseripError` naming it and the columns there are. Otherwise the dataset's side features
    (``side_features``, else every user column but the ids): ``age`` becomes ``age_bucket``, and columns
    with a single class, more than `MAX_TARGET_CLASSES` classes, or one class per user are skipped with the
    reason. An empty list means there is nothing to probe (a log without user side features).
    """
    cols = [c for c in users.columns if c not in _NOT_CODES]
    derivable = set(cols) | ({"age_bucket"} if "age" in cols else set())
    if targets is not None:
        if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
            raise UseripError(f"probe.targets: expected a list of user column names, got {targets!r}")
        missing = [t for t in targets if t not in derivable]
        if missing:
            raise UseripError(f"probe.targets: users table has no column(s) {missing} (user columns: "
                              f"{cols or 'none'}); set probe.targets to some of them, or [] to skip the probe")
        return list(targets), {}
    feats = [c for c in (side_features if side_features is not None else cols) if c in cols]
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for c in feats:
        name = "age_bucket" if c == "age" and pd.api.types.is_numeric_dtype(users[c]) else c
        values = age_bucket(users[c]) if name == "age_bucket" else users[c]
        known = values.dropna()
        n = int(known.astype(str).nunique())
        if n < 2:
            skipped[c] = "a single value"
        elif n > MAX_TARGET_CLASSES or n >= len(known):
            skipped[c] = f"{n} distinct values for {len(known)} users (near-unique, nothing a few IDs could carry)"
        else:
            chosen.append(name)
    return chosen, skipped


def nothing_to_probe_markdown(skipped: dict[str, str] | None = None) -> str:
    """What the probe section says when the dataset has no usable user side features."""
    text = ("Nothing to probe: this dataset has no user side features (attributes such as age or gender that the "
            "profiler never reads), so there is nothing to check the profile IDs against. Give a users file "
            "(`data.users`) with such columns, or name them in `probe.targets`.")
    if skipped:
        text += " Skipped columns: " + "; ".join(f"`{c}` ({why})" for c, why in skipped.items()) + "."
    return text


def _cv_accuracy(X: pd.DataFrame, y: np.ndarray, seed: int, folds: int = 5) -> tuple[float, float, float]:
    """(mean accuracy, std across folds, majority-class accuracy on the same folds)."""
    from sklearn.dummy import DummyClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    n_classes = len(np.unique(y))
    if n_classes < 2:
        return 1.0, 0.0, 1.0
    k = int(min(folds, np.bincount(pd.factorize(y)[0]).max(), len(y)))
    if k < 2:
        return float("nan"), float("nan"), float("nan")
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    clf = make_pipeline(OneHotEncoder(handle_unknown="ignore"), LogisticRegression(max_iter=2000))
    with warnings.catch_warnings():  # rare classes (occupations) have fewer members than folds
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        acc = cross_val_score(clf, X, y, cv=cv, scoring="accuracy")
        maj = cross_val_score(DummyClassifier(strategy="most_frequent"), X, y, cv=cv, scoring="accuracy")
    return float(acc.mean()), float(acc.std()), float(maj.mean())


def probe(id_tables: dict[str, pd.DataFrame], users: pd.DataFrame, targets: Sequence[str] = DEFAULT_TARGETS,
          seed: int = 0) -> pd.DataFrame:
    """NMI / AMI between each source's joint ID tuple and each target, and CV accuracy from IDs alone.

    ``id_tables``: name -> frame of user_idx + integer code columns. ``users``: user_idx + target columns
    (``age_bucket`` is derived from ``age`` when absent). Users without the target are left out.
    Returns one row per (source, target).
    """
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    targets = list(targets)
    tgt = _targets(users, targets)
    rows = []
    for name, ids in id_tables.items():
        cols = code_columns(ids)
        df = ids[["user_idx", *cols]].merge(tgt, on="user_idx", how="inner")
        for t in targets:
            d = df[df[t].notna()]
            y = d[t].astype(str).to_numpy()
            if len(d) == 0:
                raise UseripError(f"probe: source '{name}' shares no users with a known '{t}'")
            z = joint_ids(d[["user_idx", *cols]])
            acc, acc_std, maj = _cv_accuracy(d[cols].astype(str), y, seed)
            rows.append({
                "source": name,
                "target": t,
                "users": len(d),
                "classes": int(len(np.unique(y))),
                "id_tuples": int(len(np.unique(z))),
                "nmi": float(normalized_mutual_info_score(y, z)),
                "ami": float(adjusted_mutual_info_score(y, z)),
                "accuracy": acc,
                "accuracy_std": acc_std,
                "majority": maj,
            })
    return pd.DataFrame(rows)


PROBE_COLUMNS = ["source", "target", "users", "classes", "id_tuples", "nmi", "ami", "accuracy", "accuracy_std",
                 "majority"]


def probe_markdown(df: pd.DataFrame) -> str:
    """Markdown table of :func:`probe` output (the nothing-to-probe note when it has no rows)."""
    if df.empty:
        return nothing_to_probe_markdown(df.attrs.get("skipped"))
    lines = [
        "| source | target | users | classes | ID tuples | NMI | AMI | accuracy | majority |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in df.itertuples(index=False):
        lines.append(
            f"| {r.source} | {r.target} | {r.users} | {r.classes} | {r.id_tuples} | {r.nmi:.3f} | {r.ami:.3f} | "
            f"{r.accuracy:.3f} ± {r.accuracy_std:.3f} | {r.majority:.3f} |"
        )
    return "\n".join(lines)


def probe_profiles(profiles_dir: str | Path, data_dir: str | Path | None = None,
                   targets: Sequence[str] | None = None, seed: int = 0) -> pd.DataFrame:
    """The probe on a PROFILES dir with its two controls: permuted IDs and activity buckets (same cardinality).

    ``targets`` None: the dataset's side features (`probe_targets`); a dataset without any gives an empty
    frame (callers say there was nothing to probe).
    """
    from userip.data import load_prepared
    from userip.io import read_yaml, require_complete
    from userip.profile.api import read_ids

    root = Path(profiles_dir)
    require_complete(root, "profiles to probe")
    if data_dir is None:
        data_dir = (read_yaml(root / "config.yaml") or {}).get("data_dir") or None
        if not data_dir or not Path(data_dir).exists():
            raise UseripError(f"{root}/config.yaml records no usable data_dir: pass the data directory")
    data = load_prepared(data_dir)
    ids = read_ids(root).drop(columns=["user_id"], errors="ignore")
    sources = {
        "profile IDs": ids,
        "permuted IDs": permuted_ids(ids, seed),
        "activity buckets": activity_frame(data, id_space_size(ids), users=ids["user_idx"]),
    }
    usable, skipped = probe_targets(data.users, data.config.side_features, targets)
    if not usable:
        out = pd.DataFrame(columns=PROBE_COLUMNS)
        out.attrs["skipped"] = skipped
        return out
    return probe(sources, data.users, usable, seed)
