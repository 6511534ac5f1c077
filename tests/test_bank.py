"""Feature bank: build/get round trip, meta, Parquet round trip, validation, atomic rebuilds, CLI.

Backend-specific details stay behind the ``bank_factory`` fixture, parametrised over SQLite and Redis (a real
``redis-server`` on a free loopback port, started once per session by ``redis_server.py``); tests named
``test_sqlite_*`` / ``test_redis_*`` cover what only one backend has.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.numpy import save_file
from typer.testing import CliRunner

from redis_server import closed_port, redis_session, require_redis_server
from userip.bank import (
    BANK_FORMAT_VERSION,
    FeatureBank,
    build_bank,
    check_compatible,
    import_parquet,
    open_bank,
)
from userip.bank.redis_url import parse_redis_url
from userip.cli import app
from userip.errors import InputError, UseripError

PROFILES = [("hobby", 8), ("background", 4)]
FINGERPRINT = "fp-aaaa"


def write_profiles_dir(
    root: Path,
    ids: dict[str, list[int]] | None = None,
    *,
    profiles: list[tuple[str, int]] = PROFILES,
    fingerprint: str = FINGERPRINT,
    n_users: int = 6,
    seed: int = 0,
) -> Path:
    """A PROFILES dir as the profile stage writes it (ids: profile name -> IDs per user u1..un)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if ids is None:
        ids = {name: rng.integers(1, k + 1, size=n_users).tolist() for name, k in profiles}
    n = len(next(iter(ids.values())))
    table = pd.DataFrame({"user_id": [f"u{i}" for i in range(1, n + 1)], "user_idx": np.arange(1, n + 1)})
    for name, _ in profiles:
        table[name] = np.asarray(ids[name], dtype=np.int64)
    table.to_parquet(root / "profile_ids.parquet", index=False)
    config = {
        "model": "tiny-lm",
        "template": "The user likes {hobby}.",
        "profiles": [{"name": name, "n_tokens": 2, "codebook_size": k} for name, k in profiles],
        "data_fingerprint": fingerprint,
        "seed": 0,
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    save_file(
        {f"codebook.{name}": rng.standard_normal((k, 6)).astype(np.float32) for name, k in profiles},
        str(root / "codebooks.safetensors"),
    )
    return root


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL ``redis://127.0.0.1:P/0`` of a real server (ours, or ``USERIP_REDIS_URL``) for the session."""
    yield from redis_session(tmp_path_factory.mktemp("redis-server"))


def _redis_client(url: str):
    import redis

    loc = parse_redis_url(url)
    return redis.Redis(host=loc.host, port=loc.port, db=loc.db, socket_connect_timeout=2, socket_timeout=10)


def _redis_keys(url: str) -> set[str]:
    """Keys of the bank named in ``url`` (test servers are small: a bounded SCAN)."""
    name = parse_redis_url(url).name
    with _redis_client(url) as client:
        return {k.decode() for k in client.scan_iter(match=f"userip:{{{name}}}:*", count=1000)}


def _redis_leftovers(url: str) -> list[str]:
    """Keys of the bank other than the pointer, the counter and the live build's."""
    name = parse_redis_url(url).name
    keys = _redis_keys(url)
    with _redis_client(url) as client:
        live = client.get(f"userip:{{{name}}}:current")
    expected = {f"userip:{{{name}}}:{k}" for k in ("current", "seq")}
    if live is not None:
        expected |= {f"userip:{{{name}}}:v{live.decode()}:{k}" for k in ("meta", "ids")}
    return sorted(keys - expected)


@pytest.fixture(params=["sqlite", "redis"])
def bank_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Returns ``name -> bank location`` for the backend under test (a fresh location per name).

    Also ``.backend``, ``.exists(loc)`` (anything stored there?) and ``.leftovers(loc)`` (what a finished
    build should not have left beside the live bank: temp files, or keys of other versions).
    """
    backend = request.param
    token = f"t{uuid.uuid4().hex[:12]}"
    base = request.getfixturevalue("redis_url") if backend == "redis" else ""

    def make(name: str = "bank") -> str:
        if backend == "sqlite":
            return str(tmp_path / "banks" / f"{name}.sqlite")
        return f"{base}?name={token}-{name}"

    def exists(loc: str) -> bool:
        return os.path.exists(loc) if backend == "sqlite" else bool(_redis_keys(loc))

    def leftovers(loc: str) -> list[str]:
        if backend == "sqlite":
            return sorted(p.name for p in Path(loc).parent.iterdir() if p.name != Path(loc).name)
        return _redis_leftovers(loc)

    make.backend = backend  # type: ignore[attr-defined]
    make.exists = exists  # type: ignore[attr-defined]
    make.leftovers = leftovers  # type: ignore[attr-defined]
    yield make
    if backend == "redis":
        with _redis_client(base) as client:
            stale = list(client.scan_iter(match=f"userip:{{{token}-*", count=1000))
            if stale:
                client.delete(*stale)


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    return write_profiles_dir(tmp_path / "profiles")


def _expected(profiles_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(profiles_dir / "profile_ids.parquet").set_index("user_id")


# ---------------------------------------------------------------- round trip
def test_build_get_round_trip(profiles_dir: Path, bank_factory) -> None:
    exp = _expected(profiles_dir)
    with build_bank(profiles_dir, bank_factory()) as bank:
        assert isinstance(bank, FeatureBank)
        assert bank.profile_names == ["hobby", "background"]
        query = ["u3", "u1", "nobody", "u3", "u6", "", "u1"]
        got = bank.get(query)
        assert got.dtype == np.int64 and got.shape == (len(query), 2)
        for row, uid in zip(got, query, strict=True):
            want = exp.loc[uid, ["hobby", "background"]].to_numpy() if uid in exp.index else [0, 0]
            assert row.tolist() == list(want), uid
        assert bank.get([]).shape == (0, 2)
        assert bank.get(["ghost"] * 3).tolist() == [[0, 0]] * 3
        # tuples, numpy arrays and Series work; None is just unknown
        assert (
            bank.get(("u1",)).tolist()
            == bank.get(np.array(["u1"])).tolist()
            == bank.get(pd.Series(["u1"])).tolist()
        )
        assert bank.get([None, "u1"])[0].tolist() == [0, 0]
        with pytest.raises(TypeError, match="single string"):
            bank.get("u1")


def test_get_matches_a_fresh_open_and_large_batches(profiles_dir: Path, bank_factory) -> None:
    loc = bank_factory()
    build_bank(profiles_dir, loc).close()
    exp = _expected(profiles_dir)
    rng = np.random.default_rng(1)
    query = [f"u{i}" for i in rng.integers(0, 9, size=5000)]  # u0, u7, u8 unknown
    want = np.array(
        [exp.loc[u, ["hobby", "background"]].tolist() if u in exp.index else [0, 0] for u in query]
    )
    with open_bank(loc) as bank:
        np.testing.assert_array_equal(bank.get(query), want)


def test_sqlite_in_fallback_matches_json_path(profiles_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Older SQLite builds lack json_each; the IN (...) path must give identical answers."""
    import userip.bank.sqlite as sq

    bank = build_bank(profiles_dir, tmp_path / "b.sqlite")
    query = ["u2", "x", "u2", "u5", None, "u1"] + [f"u{i % 9}" for i in range(700)]
    fast = bank.get(query)
    monkeypatch.setattr(sq, "_HAS_JSON", False)
    np.testing.assert_array_equal(bank.get(query), fast)
    assert bank.get(["x"]).tolist() == [[0, 0]]
    bank.close()


def test_odd_user_ids(tmp_path: Path, bank_factory) -> None:
    """Ids are opaque strings: quotes, unicode, whitespace and numeric-looking ids must round trip exactly."""
    uids = ['a"b', "it's", "ünï", "😀", "line\nbreak", " 7 ", "7", "007", "x,y", "[1]"]
    table = pd.DataFrame(
        {"user_id": uids, "hobby": np.arange(1, 11) % 8 + 1, "background": np.arange(10) % 4 + 1}
    )
    meta = {"profiles": [{"name": n, "size": k} for n, k in PROFILES], "data_fingerprint": FINGERPRINT}
    with open_bank(bank_factory(), create=True) as bank:
        bank.build(table, meta)
        got = bank.get(uids + ["07", 7])
        np.testing.assert_array_equal(got[:10], table[["hobby", "background"]].to_numpy())
        assert got[10].tolist() == [0, 0]
        assert got[11].tolist() == got[uids.index("7")].tolist()  # non-str ids are compared as str


def test_meta_fields(profiles_dir: Path, bank_factory) -> None:
    import hashlib

    with build_bank(profiles_dir, bank_factory()) as bank:
        meta = bank.meta()
    assert meta["model"] == "tiny-lm"
    assert meta["template"] == "The user likes {hobby}."
    assert (
        meta["codebook_hash"]
        == hashlib.sha256((profiles_dir / "codebooks.safetensors").read_bytes()).hexdigest()
    )
    assert meta["profiles"] == [{"name": "hobby", "size": 8}, {"name": "background", "size": 4}]
    assert meta["data_fingerprint"] == FINGERPRINT
    assert meta["n_users"] == 6
    assert meta["backend"] == bank_factory.backend
    assert meta["version"] == BANK_FORMAT_VERSION
    created = pd.Timestamp(meta["created"])
    assert created.tzinfo is not None and created.utcoffset().total_seconds() == 0
    meta["model"] = "mutated"  # meta() hands out a copy
    with open_bank(bank_factory()) as bank:
        assert bank.meta()["model"] == "tiny-lm"
        counts = bank.code_counts()
    exp = _expected(profiles_dir)
    for name, _ in PROFILES:
        assert counts[name] == {int(k): int(v) for k, v in exp[name].value_counts().sort_index().items()}


def test_export_import_parquet_round_trip(profiles_dir: Path, tmp_path: Path, bank_factory) -> None:
    src = build_bank(profiles_dir, bank_factory("src"))
    export = tmp_path / "export" / "bank.parquet"
    src.export_parquet(export)
    frame = pd.read_parquet(export)
    assert list(frame.columns) == ["user_id", "hobby", "background"]
    assert frame["user_id"].tolist() == sorted(frame["user_id"])
    with import_parquet(export, bank_factory("copy")) as copy:
        query = ["u4", "u1", "zz", "u4"]
        np.testing.assert_array_equal(copy.get(query), src.get(query))
        pd.testing.assert_frame_equal(copy.to_frame(), src.to_frame())
        m_src, m_copy = src.meta(), copy.meta()
        for key in ("model", "template", "codebook_hash", "profiles", "data_fingerprint", "n_users"):
            assert m_copy[key] == m_src[key], key
    # an explicit meta overrides the stored one; a file without stored meta needs one
    plain = tmp_path / "plain.parquet"
    frame.to_parquet(plain, index=False)
    with pytest.raises(InputError, match=r"plain\.parquet.*userip\.bank\.meta"):
        import_parquet(plain, bank_factory("x"))
    meta = {**src.meta(), "model": "other-lm"}
    with import_parquet(plain, bank_factory("y"), meta) as bank:
        assert bank.meta()["model"] == "other-lm"
        np.testing.assert_array_equal(bank.get(["u2"]), src.get(["u2"]))
    src.close()


# ---------------------------------------------------------------- validation
def _drop(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def _edit_table(fn: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        path = d / "profile_ids.parquet"
        fn(pd.read_parquet(path)).to_parquet(path, index=False)

    return edit


def _edit_config(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        fn(cfg)
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))

    return edit


def _set(df: pd.DataFrame, col: str, row: int, value) -> pd.DataFrame:
    df.loc[row, col] = value
    return df


def _codebooks(**shapes: tuple[int, int]) -> Callable[[Path], None]:
    def write(d: Path) -> None:
        tensors = {f"codebook.{k}": np.zeros(v, np.float32) for k, v in shapes.items()}
        save_file(tensors, str(d / "codebooks.safetensors"))

    return write


def _junk(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(b"junk")


IDS, CFG, CB = r"profile_ids\.parquet", r"config\.yaml", r"codebooks\.safetensors"
INVALID_CASES = {
    "no-ids": (_drop("profile_ids.parquet"), IDS + ": file missing"),
    "no-config": (_drop("config.yaml"), CFG + ": file missing"),
    "no-codebooks": (_drop("codebooks.safetensors"), CB + ": file missing"),
    "no-column": (_edit_table(lambda df: df.drop(columns=["background"])), IDS + ", field 'background'"),
    "no-user-id": (_edit_table(lambda df: df.drop(columns=["user_id"])), IDS + ", field 'user_id'"),
    "id-above-K": (
        _edit_table(lambda df: _set(df, "hobby", 2, 9)),
        IDS + r", row 2, field 'hobby': ID 9 outside 0\.\.8",
    ),
    "id-negative": (
        _edit_table(lambda df: _set(df, "background", 0, -1)),
        r"row 0, field 'background': ID -1",
    ),
    "duplicate-user": (
        _edit_table(lambda df: _set(df, "user_id", 4, "u2")),
        IDS + r", field 'user_id': 1 duplicate.*u2",
    ),
    "int-user-ids": (
        _edit_table(lambda df: df.assign(user_id=np.arange(len(df)))),
        r"field 'user_id': user ids must be strings",
    ),
    "float-ids": (
        _edit_table(lambda df: df.assign(hobby=df["hobby"] + 0.5)),
        r"field 'hobby': profile IDs must be integers",
    ),
    "no-fingerprint": (_edit_config(lambda c: c.pop("data_fingerprint")), CFG + ", field 'data_fingerprint'"),
    "no-model": (_edit_config(lambda c: c.pop("model")), CFG + ", field 'model': missing"),
    "no-K": (_edit_config(lambda c: c["profiles"][1].pop("codebook_size")), CFG + ".*codebook_size"),
    "extra-profile": (
        _edit_config(lambda c: c["profiles"].append({"name": "job", "codebook_size": 3})),
        CB + r", field 'codebook\.job'",
    ),
    "config-list": (
        lambda d: (d / "config.yaml").write_text("- just\n- a list\n"),
        CFG + ": expected a mapping",
    ),
    "missing-codebook": (_codebooks(hobby=(8, 2)), CB + r", field 'codebook\.background': missing tensor"),
    "codebook-K": (
        _codebooks(hobby=(5, 2), background=(4, 2)),
        r"field 'codebook\.hobby': has shape \[5, 2\].*codebook_size 8",
    ),
    "junk-codebooks": (_junk("codebooks.safetensors"), CB + ": not a readable"),
    "junk-parquet": (_junk("profile_ids.parquet"), IDS + ": cannot read Parquet"),
}


@pytest.mark.parametrize(("mutate", "pattern"), list(INVALID_CASES.values()), ids=list(INVALID_CASES))
def test_invalid_profiles_dir(profiles_dir: Path, bank_factory, mutate, pattern: str) -> None:
    mutate(profiles_dir)
    with pytest.raises(UseripError, match=pattern):
        build_bank(profiles_dir, bank_factory())
    assert not bank_factory.exists(bank_factory())  # nothing half-built left behind


def test_invalid_build_arguments(bank_factory) -> None:
    table = pd.DataFrame({"user_id": ["a", "b"], "hobby": [1, 2]})
    good = {"profiles": [{"name": "hobby", "size": 2}], "data_fingerprint": "fp"}
    with open_bank(bank_factory(), create=True) as bank:
        with pytest.raises(UseripError, match="has not been built"):
            bank.get(["a"])
        with pytest.raises(InputError, match="field 'data_fingerprint'"):
            bank.build(table, {"profiles": good["profiles"]})
        with pytest.raises(InputError, match="field 'profiles'"):
            bank.build(table, {**good, "profiles": []})
        with pytest.raises(InputError, match="'hobby' appears twice"):
            bank.build(table, {**good, "profiles": good["profiles"] * 2})
        with pytest.raises(InputError, match="row 1, field 'user_id'"):
            bank.build(table.assign(user_id=["a", None]), good)
        bank.build(table, good)
        # a failed rebuild leaves the previous bank in place
        with pytest.raises(InputError, match="ID 3 outside 0..2"):
            bank.build(table.assign(hobby=[1, 3]), good)
        assert bank.get(["b"]).tolist() == [[2]]
    assert bank_factory.exists(bank_factory())
    assert bank_factory.leftovers(bank_factory()) == []


def test_open_bank_locations(tmp_path: Path, profiles_dir: Path) -> None:
    build_bank(profiles_dir, tmp_path / "b.sqlite").close()
    with open_bank(f"sqlite:///{tmp_path}/b.sqlite") as bank:  # sqlite:////abs/path
        assert bank.get(["u1"]).shape == (1, 2)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with open_bank("sqlite:///b.sqlite") as bank:
            assert bank.profile_names == ["hobby", "background"]
    finally:
        os.chdir(cwd)
    with pytest.raises(UseripError, match="unknown feature-bank scheme 'ftp://'"):
        open_bank("ftp://host/bank")
    with pytest.raises(UseripError, match="no feature bank here"):
        open_bank(tmp_path / "missing.sqlite")
    with pytest.raises(UseripError, match="is a directory"):
        open_bank(tmp_path)
    (tmp_path / "junk.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(UseripError, match="not a userip feature bank"):
        open_bank(tmp_path / "junk.sqlite")
    bank = open_bank(tmp_path / "b.sqlite")
    bank.close()
    with pytest.raises(UseripError, match="closed"):
        bank.get(["u1"])


def test_build_refuses_to_overwrite_a_non_bank(profiles_dir: Path) -> None:
    """A mistyped --out (e.g. the profiles Parquet) must not be replaced by a bank."""
    target = profiles_dir / "profile_ids.parquet"
    before = target.read_bytes()
    with pytest.raises(UseripError, match="not a userip feature bank"):
        build_bank(profiles_dir, target)
    assert target.read_bytes() == before


def test_bank_import_stays_light() -> None:
    """Serving reads the bank without torch/transformers; importing the stage must not pull them in."""
    import subprocess
    import sys

    code = "import sys, userip.bank; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_check_compatible(profiles_dir: Path, bank_factory) -> None:
    with build_bank(profiles_dir, bank_factory()) as bank:
        check_compatible(bank.meta(), FINGERPRINT)
        with pytest.raises(UseripError, match=r"other data: data fingerprint fp-aaaa != fp-bbbb.*rebuild"):
            check_compatible(bank.meta(), "fp-bbbb")


# ---------------------------------------------------------------- atomic rebuilds
def _versioned(v: int, users: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"user_id": users, "hobby": [v] * len(users), "background": [v] * len(users)})


def test_rebuild_is_atomic_for_concurrent_readers(bank_factory) -> None:
    """Readers see one whole build per call, never a mix; old handles stay consistent, new opens see new."""
    loc = bank_factory()
    users = [f"u{i}" for i in range(3000)]
    meta = {
        "profiles": [{"name": "hobby", "size": 9}, {"name": "background", "size": 9}],
        "data_fingerprint": "fp",
    }
    writer = open_bank(loc, create=True)
    writer.build(_versioned(1, users), meta)
    pinned = open_bank(loc, reload=False)  # keeps the build it opened

    query = users[::7] + ["unknown"] + users[::-7]
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    progressed = threading.Condition()

    shared = open_bank(loc)  # one object used by two threads, re-opening on rebuilds

    def reader(fresh_open: bool) -> None:
        try:
            while not stop.is_set():
                if fresh_open:
                    with open_bank(loc) as b:
                        got = b.get(query)
                else:
                    got = shared.get(query)
                known = np.delete(got, len(users[::7]), axis=0)
                versions = np.unique(known)
                assert len(versions) == 1, f"mixed versions in one read: {versions}"
                assert got[len(users[::7])].tolist() == [0, 0]
                with progressed:
                    seen.append(int(versions[0]))
                    progressed.notify_all()
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(f,)) for f in (False, False, True)]
    for t in threads:
        t.start()
    try:
        for v in range(2, 7):
            writer.build(_versioned(v, users), meta)
            deadline = time.monotonic() + 10
            with progressed:  # make sure readers actually read this version before the next rebuild
                while seen.count(v) < 3 and not errors and time.monotonic() < deadline:
                    progressed.wait(0.05)
            assert not errors, errors
            assert seen.count(v) >= 3, f"readers never saw version {v}"
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors
    assert set(seen) <= set(range(1, 7))
    if bank_factory.backend == "sqlite":
        assert pinned.get(users[:3]).tolist() == [[1, 1]] * 3  # old handle: old build, whole
    else:  # Redis deletes a replaced build's keys: a pinned handle says so instead of serving zeros
        with pytest.raises(UseripError, match=r"v\d+ that this handle was opened on has been replaced and deleted"):
            pinned.get(users[:3])
    with open_bank(loc) as fresh:
        assert fresh.get(users[:3]).tolist() == [[6, 6]] * 3
        assert fresh.meta()["n_users"] == len(users)
    for b in (pinned, writer, shared):
        b.close()
    assert bank_factory.leftovers(loc) == []


def test_reload_picks_up_changed_profiles(tmp_path: Path, bank_factory) -> None:
    loc = bank_factory()
    build_bank(write_profiles_dir(tmp_path / "p1"), loc).close()
    reader = open_bank(loc)
    assert reader.profile_names == ["hobby", "background"]
    build_bank(write_profiles_dir(tmp_path / "p2", profiles=[("job", 3)], fingerprint="fp-2"), loc).close()
    assert reader.get(["u1", "nope"]).shape == (2, 1)
    assert reader.profile_names == ["job"] and reader.meta()["data_fingerprint"] == "fp-2"
    reader.close()


def test_sqlite_bank_file_permissions(profiles_dir: Path, tmp_path: Path) -> None:
    """mkstemp creates 0600 files; a bank must stay readable by a server running as another user."""
    path = tmp_path / "b.sqlite"
    build_bank(profiles_dir, path).close()
    assert path.stat().st_mode & 0o044 == 0o044
    os.chmod(path, 0o640)
    build_bank(profiles_dir, path).close()
    assert path.stat().st_mode & 0o777 == 0o640


# ---------------------------------------------------------------- CLI
def test_cli_build_get_info(profiles_dir: Path, bank_factory) -> None:
    runner = CliRunner()
    loc = bank_factory()
    res = runner.invoke(app, ["bank", "build", "--profiles", str(profiles_dir), "--out", loc])
    assert res.exit_code == 0, res.output
    assert "6 users" in res.output

    res = runner.invoke(app, ["bank", "get", "--bank", loc, "u2", "ghost", "u2"])
    assert res.exit_code == 0, res.output
    exp = _expected(profiles_dir)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert "hobby" in res.output and "background" in res.output
    u2 = [ln for ln in lines if " u2 " in ln]
    assert len(u2) == 2
    assert u2[0].split()[-4:-1:2] == [str(exp.loc["u2", "hobby"]), str(exp.loc["u2", "background"])]
    ghost = next(ln for ln in lines if "ghost" in ln)
    assert ghost.split()[-4:-1:2] == ["0", "0"]

    res = runner.invoke(app, ["bank", "info", "--bank", loc])
    assert res.exit_code == 0, res.output
    for text in ("tiny-lm", FINGERPRINT, "n_users", "codebook_hash", "hobby", "background"):
        assert text in res.output


def test_cli_errors_are_friendly(tmp_path: Path, profiles_dir: Path) -> None:
    runner = CliRunner()
    (profiles_dir / "config.yaml").unlink()
    res = runner.invoke(
        app, ["bank", "build", "--profiles", str(profiles_dir), "--out", str(tmp_path / "b.sqlite")]
    )
    assert res.exit_code == 2
    assert "config.yaml" in res.output and "Traceback" not in res.output
    port = closed_port()
    res = runner.invoke(app, ["bank", "get", "--bank", f"redis://127.0.0.1:{port}/0", "u1"])
    assert res.exit_code == 2 and "cannot reach the Redis server" in res.output, res.output
    assert f"127.0.0.1:{port}" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["bank", "info", "--bank", str(tmp_path / "none.sqlite")])
    assert res.exit_code == 2 and "no feature bank" in res.output


# ---------------------------------------------------------------- Redis only
REDIS_ONLY = pytest.mark.parametrize("bank_factory", ["redis"], indirect=True)


def _redis_table(n: int = 6, v: int = 1) -> tuple[pd.DataFrame, dict]:
    table = pd.DataFrame({"user_id": [f"u{i}" for i in range(1, n + 1)], "hobby": [v] * n, "background": [v] * n})
    meta = {"profiles": [{"name": "hobby", "size": 8}, {"name": "background", "size": 4}], "data_fingerprint": "fp"}
    return table, meta


def test_redis_url_parsing() -> None:
    loc = parse_redis_url("redis://127.0.0.1:7000/3?name=ml100k")
    assert (loc.host, loc.port, loc.db, loc.name) == ("127.0.0.1", 7000, 3, "ml100k")
    loc = parse_redis_url("redis://localhost")
    assert (loc.host, loc.port, loc.db, loc.name, loc.connect_timeout) == ("localhost", 6379, 0, "default", 1.0)
    loc = parse_redis_url("redis://:s3cret@[::1]:7001/2?connect_timeout=0.25&timeout=5")
    assert (loc.host, loc.port, loc.password, loc.connect_timeout, loc.timeout) == ("::1", 7001, "s3cret", 0.25, 5)
    assert "s3cret" not in loc.url and loc.url == "redis://:***@[::1]:7001/2?name=default"
    loc = parse_redis_url("redis://u%40x:p%3Aw@h/1?name=b")  # credentials are percent-decoded (redis-py)
    assert (loc.username, loc.password, loc.url) == ("u@x", "p:w", "redis://u%40x:***@h:6379/1?name=b")
    bad = {
        "redis://h:99999/0": "port must be a number",
        "redis://h:1/zero": "database number",
        "redis://h:1/0/x": "database number",
        "redis://h:1/0?db=1": r"unknown parameter\(s\) \['db'\]",
        "redis://h:1/0?name=a:b": "bank name 'a:b'",
        "redis://h:1/0?name=": "bank name ''",
        "redis://h:1/0?name=a&name=b": "'name' given twice",
        "redis://h:1/0?timeout=-1": "timeout must be seconds",
        "redis://h:1/0#frag": "unexpected '#frag'",
        "redis://:pw@h:1/x": r"'redis://:\*\*\*@h:1/x'",
    }
    for url, pattern in bad.items():
        with pytest.raises(UseripError, match=pattern):
            open_bank(url)


def test_redis_unreachable_server_names_the_url(tmp_path: Path, profiles_dir: Path) -> None:
    """A closed loopback port fails fast (connect timeout, no retry backoff) with the URL in the message."""
    url = f"redis://127.0.0.1:{closed_port()}/0?name=x"
    for call in (lambda: open_bank(url), lambda: open_bank(url, create=True), lambda: build_bank(profiles_dir, url)):
        t0 = time.monotonic()
        with pytest.raises(UseripError, match=r"redis://127\.0\.0\.1:\d+/0\?name=x: cannot reach the Redis server"):
            call()
        assert time.monotonic() - t0 < 5


def test_redis_key_layout_and_versions(redis_url: str) -> None:
    """Each build is a new version prefix; the pointer moves in one step; the old version's keys are deleted."""
    url = f"{redis_url}?name=t{uuid.uuid4().hex[:12]}"
    name = parse_redis_url(url).name
    table, meta = _redis_table()
    client = _redis_client(url)
    try:
        with open_bank(url, create=True) as bank:
            bank.build(table, meta)
            v1 = int(client.get(f"userip:{{{name}}}:current"))
            live = ("current", "seq", f"v{v1}:meta", f"v{v1}:ids")
            assert _redis_keys(url) == {f"userip:{{{name}}}:{k}" for k in live}
            bank.build(table.assign(hobby=2), meta)
            v2 = int(client.get(f"userip:{{{name}}}:current"))
            assert v2 > v1
            live = ("current", "seq", f"v{v2}:meta", f"v{v2}:ids")
            assert _redis_keys(url) == {f"userip:{{{name}}}:{k}" for k in live}
            for suffix in ("meta", "ids"):
                assert client.ttl(f"userip:{{{name}}}:v{v2}:{suffix}") == -1  # live keys never expire
            fields = client.hgetall(f"userip:{{{name}}}:v{v2}:meta")
            assert set(fields) == {b"format", b"meta", b"names", b"code_counts"}
            assert client.hlen(f"userip:{{{name}}}:v{v2}:ids") == len(table)
            assert bank.get(["u1"]).tolist() == [[2, 1]]
    finally:
        stale = list(client.scan_iter(match=f"userip:{{{name}}}:*"))
        if stale:
            client.delete(*stale)
        client.close()


@REDIS_ONLY
def test_redis_failed_build_leaves_live_bank(bank_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that dies before the switch deletes its pending keys (they also carry a TTL meanwhile)."""
    from userip.bank.redis_backend import RedisBank

    loc = bank_factory()
    table, meta = _redis_table()
    bank = open_bank(loc, create=True)
    bank.build(table, meta)
    ttls: list[int] = []

    def crash(self, version: int) -> int | None:
        ttls.append(self._client.ttl(self._keys.meta(version)))
        ttls.append(self._client.ttl(self._keys.ids(version)))
        raise RuntimeError("crash before the switch")

    monkeypatch.setattr(RedisBank, "_switch", crash)
    with pytest.raises(RuntimeError, match="crash before the switch"):
        bank.build(table.assign(hobby=5), meta)
    assert len(ttls) == 2 and all(t > 0 for t in ttls), ttls
    assert bank_factory.leftovers(loc) == []
    assert bank.get(["u1"]).tolist() == [[1, 1]]
    bank.close()


@REDIS_ONLY
def test_redis_get_is_one_round_trip(bank_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    from redis.connection import AbstractConnection

    loc = bank_factory()
    table, meta = _redis_table(n=20)
    bank = open_bank(loc, create=True)
    bank.build(table, meta)
    sent = []
    original = AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sent.append(1)
        return original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    for n in (1, 512, 20000):  # 20000 > one HMGET chunk: still one MULTI/EXEC
        sent.clear()
        got = bank.get([f"u{i % 25}" for i in range(n)])
        assert len(sent) == 1, (n, len(sent))
        assert got.shape == (n, 2) and got[0].tolist() == [0, 0]
    bank.close()


@REDIS_ONLY
def test_redis_pinned_handle_and_names_are_separate(bank_factory) -> None:
    """reload=False serves its build until a rebuild deletes it; two names in one db never see each other."""
    table, meta = _redis_table()
    a, b = bank_factory("a"), bank_factory("b")
    with open_bank(a, create=True) as bank_a, open_bank(b, create=True) as bank_b:
        bank_a.build(table, meta)
        bank_b.build(table.assign(hobby=7), meta)
        pinned = open_bank(a, reload=False)
        assert pinned.get(["u1"]).tolist() == [[1, 1]]
        assert bank_b.get(["u1"]).tolist() == [[7, 1]]
        bank_a.build(table.assign(hobby=3), meta)
        with pytest.raises(UseripError, match="replaced and deleted; open the bank again"):
            pinned.get(["u1"])
        assert pinned.meta()["n_users"] == 6  # the meta it opened stays readable
        pinned.close()
        assert bank_b.get(["u1"]).tolist() == [[7, 1]]
        with open_bank(a) as fresh:
            assert fresh.get(["u1"]).tolist() == [[3, 1]]
    with pytest.raises(UseripError, match="no feature bank named .*-c' in this Redis database"):
        open_bank(bank_factory("c"))


@REDIS_ONLY
def test_redis_refuses_keys_that_are_not_a_bank(bank_factory, profiles_dir: Path) -> None:
    """A name whose pointer holds something else is not overwritten by a build."""
    loc = bank_factory()
    name = parse_redis_url(loc).name
    with _redis_client(loc) as client:
        client.set(f"userip:{{{name}}}:current", "not-a-version")
        with pytest.raises(UseripError, match="not a userip feature bank"):
            build_bank(profiles_dir, loc)
        assert client.get(f"userip:{{{name}}}:current") == b"not-a-version"
        client.delete(f"userip:{{{name}}}:current")
        client.hset(f"userip:{{{name}}}:current", "x", "1")
        with pytest.raises(UseripError, match="not a userip feature bank"):
            open_bank(loc)


def test_redis_server_missing_fails_in_ci_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="redis-server not found"):
        require_redis_server()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="redis-server not found"):
        require_redis_server()
