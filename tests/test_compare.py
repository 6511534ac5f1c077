"""`userip profile compare`: agreement of two fits' IDs, label-free and against a permutation chance level."""

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from userip.cli import app
from userip.errors import UseripError
from userip.io import read_json, write_yaml
from userip.profile.compare import compare_ids, id_agreement


def _profiles_dir(path, ids: dict[str, np.ndarray], users: list[str]):
    path.mkdir(parents=True)
    write_yaml(path / "config.yaml", {"profiles": [{"name": n, "codebook_size": int(v.max())} for n, v in ids.items()]})
    pd.DataFrame({"user_id": users, "user_idx": range(1, len(users) + 1), **ids}).to_parquet(
        path / "profile_ids.parquet")
    return path


def test_a_relabelled_copy_agrees_fully_and_independent_ids_sit_at_chance():
    g = np.random.default_rng(0)
    a = g.integers(1, 5, 400)
    relabel = np.array([0, 3, 1, 4, 2])[a]  # codes renamed: the same partition
    same = id_agreement(a, relabel, permutations=200)
    assert same["nmi"] == pytest.approx(1.0) and same["ami"] == pytest.approx(1.0)
    assert same["p_value"] == pytest.approx(1 / 201) and same["nmi_permuted_p95"] < 0.05
    indep = id_agreement(a, g.integers(1, 4, 400), permutations=200)
    assert indep["nmi"] < 0.05 and abs(indep["ami"]) < 0.02 and indep["p_value"] > 0.05
    assert sum(sum(r.values()) for r in indep["contingency"].values()) == 400


def test_compare_joins_on_user_id_and_keeps_shared_profiles(tmp_path):
    g = np.random.default_rng(1)
    users = [str(u) for u in range(300)]
    hobby = g.integers(1, 4, 300)
    a = _profiles_dir(tmp_path / "a", {"hobby": hobby, "background": g.integers(1, 3, 300)}, users)
    # b holds the same hobby partition for a shuffled, partly different set of users, and another profile
    order = g.permutation(300)[:250]
    b = _profiles_dir(tmp_path / "b", {"hobby": 4 - hobby[order], "style": g.integers(1, 3, 250)},
                      [users[i] for i in order])
    res = compare_ids(a, b, permutations=100)
    assert res["users"] == 250 and list(res["profiles"]) == ["hobby"]
    assert res["only_a"] == ["background"] and res["only_b"] == ["style"]
    assert res["profiles"]["hobby"]["nmi"] == pytest.approx(1.0)


def test_compare_errors_name_the_file(tmp_path):
    users = ["1", "2", "3"]
    a = _profiles_dir(tmp_path / "a", {"hobby": np.array([1, 2, 1])}, users)
    b = _profiles_dir(tmp_path / "b", {"style": np.array([1, 2, 1])}, users)
    with pytest.raises(UseripError, match="no profile in common"):
        compare_ids(a, b)
    c = _profiles_dir(tmp_path / "c", {"hobby": np.array([1, 2, 1])}, ["7", "8", "9"])
    with pytest.raises(UseripError, match="no user in common"):
        compare_ids(a, c)
    pd.DataFrame({"user_id": users}).to_parquet(b / "profile_ids.parquet")
    write_yaml(b / "config.yaml", {"profiles": [{"name": "hobby", "codebook_size": 2}]})
    with pytest.raises(UseripError, match=r"b/profile_ids.parquet: missing column\(s\) hobby"):
        compare_ids(a, b)
    with pytest.raises(UseripError, match="config.yaml: not found"):
        compare_ids(a, tmp_path / "nowhere")


def test_cli_prints_the_table_and_writes_json(tmp_path):
    g = np.random.default_rng(2)
    users = [str(u) for u in range(200)]
    h = g.integers(1, 4, 200)
    a = _profiles_dir(tmp_path / "a", {"hobby": h}, users)
    b = _profiles_dir(tmp_path / "b", {"hobby": h}, users)
    r = CliRunner().invoke(app, ["profile", "compare", str(a), str(b), "--permutations", "50",
                                 "--json", str(tmp_path / "cmp.json")])
    assert r.exit_code == 0, r.output
    assert "hobby" in r.output and "1.000" in r.output
    assert read_json(tmp_path / "cmp.json")["profiles"]["hobby"]["nmi"] == pytest.approx(1.0)
