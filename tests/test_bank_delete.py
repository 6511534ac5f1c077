"""`userip bank delete`: a user's rows leave the bank (SQLite and Redis) and userip's pooled-state cache (#13)."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from test_bank import bank_factory, profiles_dir, redis_url  # noqa: F401 - fixtures (sqlite and redis backends)
from userip.bank import build_bank, delete_users, open_bank
from userip.cli import app


def test_delete_users_from_the_bank(profiles_dir: Path, bank_factory) -> None:  # noqa: F811
    loc = bank_factory()
    build_bank(profiles_dir, loc).close()
    with open_bank(loc) as b:
        before = b.to_frame()
        meta = b.meta()
    assert delete_users(loc, ["u2", "nobody", "u5", "u2"]) == ["u2", "u5"]
    with open_bank(loc) as b:
        assert b.get(["u2", "u5"]).tolist() == [[0, 0], [0, 0]]  # unknown now
        after = b.to_frame()
        assert b.meta()["n_users"] == meta["n_users"] - 2
        assert b.meta()["data_fingerprint"] == meta["data_fingerprint"]
    kept = before[~before["user_id"].isin(["u2", "u5"])].reset_index(drop=True)
    assert after.reset_index(drop=True).equals(kept)  # everyone else untouched
    assert delete_users(loc, ["u2"]) == []  # idempotent


def test_cli_bank_delete(profiles_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    loc = str(tmp_path / "bank.sqlite")
    build_bank(profiles_dir, loc).close()
    r = CliRunner().invoke(app, ["bank", "delete", "--bank", loc, "u1", "ghost"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # rich wraps long paths
    assert "deleted 1 user(s)" in text and "not in the bank: ghost" in text
    with open_bank(loc) as b:
        assert b.get(["u1"]).tolist() == [[0, 0]] and b.get(["u3"]).min() > 0


def test_delete_removes_the_users_pooled_states(tmp_path: Path, tiny_model_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from userip.bank import forget_users
    from userip.data import prepare
    from userip.data.synthetic import write_taste_world
    from userip.llm import load_llm
    from userip.profile import ProfileConfig
    from userip.profile.api import build_corpus
    from userip.profile.pooled import PooledStates, user_digest

    monkeypatch.setenv("USERIP_CACHE_DIR", str(tmp_path / "cache"))
    w = write_taste_world(tmp_path / "world", n_users=6, n_items=20)
    data = prepare(tmp_path / "data", interactions=w / "inter.csv", items=w / "items.csv", users=w / "users.csv")
    llm = load_llm(str(tiny_model_dir))
    cfg = ProfileConfig.from_dict({"max_tokens": 24})
    corpus = build_corpus(data, llm.tokenizer, cfg.replace(max_users=0))
    cap = cfg.history_windows
    windows = {u: (ws[-cap:] if cap else ws) for u, ws in corpus.train.items()}
    states = PooledStates(llm, cfg.pool, cfg.pool_batch)
    states.get(windows, marks={u: (m[-cap:] if cap else m) for u, m in corpus.train_marks.items()})  # as a fit does
    prof = tmp_path / "profiles"
    prof.mkdir()
    (prof / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_model_dir), "data_dir": str(data.path),
                                                      "profile": cfg.to_dict()}))
    u1 = int(data.user_index(["u1"])[0])
    assert forget_users(prof, ["u1"], llm=llm) == 1
    cached = states._load()
    assert user_digest(windows[u1]) not in cached
    assert all(user_digest(ws) in cached for u, ws in windows.items() if u != u1)  # the others stay
    np.testing.assert_array_equal(  # and still hold the same states
        cached[user_digest(windows[u1 + 1])].numpy(),
        PooledStates(llm, cfg.pool, cfg.pool_batch, cache=None).get({u1 + 1: windows[u1 + 1]},
                                                                    marks={u1 + 1: corpus.train_marks.get(u1 + 1)}
                                                                    if corpus.train_marks else None)[u1 + 1].numpy())
    assert forget_users(prof, ["u1"], llm=llm) == 0
