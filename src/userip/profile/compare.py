"""How much two fits' IDs agree: two LLMs, two seeds, a refit and its previous fit.

Code labels are arbitrary (code 2 of one fit has no reason to be code 2 of the other), so agreement is measured
by label-free scores: normalised mutual information (NMI) and its chance-adjusted form (AMI, 0 = chance). NMI is
not 0 by chance for small codebooks, so every NMI comes beside the NMI of the same IDs with one side's labels
permuted over users (the chance level), and a permutation p-value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from userip.errors import UseripError
from userip.io import read_yaml
from userip.profile.api import read_ids


def _profile_names(profiles_dir: Path) -> list[str]:
    conf_path = profiles_dir / "config.yaml"
    if not conf_path.exists():
        raise UseripError(f"{conf_path}: not found; expected a fitted PROFILES directory")
    return [str(p["name"]) for p in read_yaml(conf_path).get("profiles", [])]


def id_agreement(a: np.ndarray, b: np.ndarray, permutations: int = 1000, seed: int = 0) -> dict[str, Any]:
    """NMI / AMI of two labelings of the same users, with the NMI of ``b`` permuted as chance."""
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"id_agreement: expected two 1-D label arrays of one length, got {a.shape} and {b.shape}")
    nmi = float(normalized_mutual_info_score(a, b))
    g = np.random.default_rng(seed)
    chance = np.array([normalized_mutual_info_score(a, g.permutation(b)) for _ in range(permutations)])
    table = pd.crosstab(pd.Series(a, name="a"), pd.Series(b, name="b"))
    return {
        "users": int(a.size),
        "nmi": nmi,
        "ami": float(adjusted_mutual_info_score(a, b)),
        "nmi_permuted_mean": float(chance.mean()) if permutations else None,
        "nmi_permuted_p95": float(np.quantile(chance, 0.95)) if permutations else None,
        # the observed labeling counts as one of the permutations, so p is never 0
        "p_value": float((1 + (chance >= nmi).sum()) / (1 + permutations)) if permutations else None,
        "codes_a": int(np.unique(a).size),
        "codes_b": int(np.unique(b).size),
        "contingency": {str(int(i)): {str(int(j)): int(v) for j, v in row.items()} for i, row in table.iterrows()},
    }


def compare_ids(profiles_a: str | Path, profiles_b: str | Path, permutations: int = 1000,
                seed: int = 0) -> dict[str, Any]:
    """Per profile both fits have: NMI, AMI and chance NMI over the users both fits hold (joined by user_id)."""
    pa, pb = Path(profiles_a), Path(profiles_b)
    names_a, names_b = _profile_names(pa), _profile_names(pb)
    shared = [n for n in names_a if n in names_b]
    if not shared:
        raise UseripError(f"{pa} ({', '.join(names_a)}) and {pb} ({', '.join(names_b)}): no profile in common")
    ia, ib = read_ids(pa), read_ids(pb)
    for path, ids, names in ((pa, ia, names_a), (pb, ib, names_b)):
        missing = [c for c in ["user_id", *names] if c not in ids.columns]
        if missing:
            raise UseripError(f"{path / 'profile_ids.parquet'}: missing column(s) {', '.join(missing)}")
    both = ia.assign(user_id=ia["user_id"].astype(str)).merge(
        ib.assign(user_id=ib["user_id"].astype(str)), on="user_id", suffixes=("_a", "_b"))
    if both.empty:
        raise UseripError(f"{pa} and {pb}: no user in common (joined on user_id)")
    out: dict[str, Any] = {"a": str(pa), "b": str(pb), "users": int(len(both)),
                           "only_a": sorted(set(names_a) - set(shared)), "only_b": sorted(set(names_b) - set(shared)),
                           "profiles": {}}
    for k, name in enumerate(shared):
        out["profiles"][name] = id_agreement(both[f"{name}_a"].to_numpy(), both[f"{name}_b"].to_numpy(),
                                             permutations=permutations, seed=seed + k)
    return out
