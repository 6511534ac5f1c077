"""userip never deletes (or overwrites) a file it did not write: every command's --out is checked.

A non-empty directory without userip's marker is refused with the files intact; a finished output is
replaced only with --overwrite, which removes only what userip wrote; an unfinished one (a killed command)
is resumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from test_bank import write_profiles_dir
from test_ctr import fake_stages, learnable  # noqa: F401  (fixtures)
from userip.cli import app
from userip.errors import UseripError
from userip.io import (
    MARKER,
    atomic_dir,
    check_output_dir,
    claim_output_dir,
    read_marker,
    remove_output_files,
)


def _user_files(d: Path) -> dict[str, str]:
    """A user's folder: input CSVs and a notes file."""
    d.mkdir(parents=True, exist_ok=True)
    files = {"interactions.csv": "u,i\n1,2\n", "notes.txt": "my notes\n"}
    for name, text in files.items():
        (d / name).write_text(text)
    return files


def _intact(d: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        assert (d / name).read_text() == text, name


def _text(r) -> str:
    return " ".join(r.output.split())


def _incomplete(d: Path) -> None:
    """What a command killed after it started leaves: its marker, not marked complete."""
    m = read_marker(d)
    m["complete"] = False
    (d / MARKER).write_text(json.dumps(m))


# ---------------------------------------------------------------------------------------------- io helpers
def test_claim_states_and_refusals(tmp_path: Path) -> None:
    d = tmp_path / "o"
    assert check_output_dir(d, "ctr") == "new"
    out = claim_output_dir(d, "ctr")
    m = read_marker(d)
    assert m["kind"] == "ctr" and m["complete"] is False and m["format_version"] == 1
    assert check_output_dir(d, "ctr") == "resume"  # unfinished: resumed
    (d / "results.json").write_text("{}")
    out.complete()
    assert read_marker(d)["complete"] is True and read_marker(d)["files"] == ["results.json"]
    with pytest.raises(UseripError, match="already holds a finished ctr output; pass --overwrite"):
        check_output_dir(d, "ctr")
    assert check_output_dir(d, "ctr", overwrite=True) == "replace"
    with pytest.raises(UseripError, match="holds a userip ctr output"):
        check_output_dir(d, "data", overwrite=True)  # another kind: never, not even with overwrite
    (d / MARKER).write_text(json.dumps({**read_marker(d), "format_version": 99}))
    with pytest.raises(UseripError, match="format_version 99"):
        check_output_dir(d, "ctr", overwrite=True)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UseripError, match="not a directory"):
        check_output_dir(f, "ctr")


def test_overwrite_removes_only_what_userip_wrote(tmp_path: Path) -> None:
    d = tmp_path / "o"
    out = claim_output_dir(d, "ctr")
    (d / "models").mkdir()
    for f in ("results.json", "results.md", "models/dcn.safetensors", "models/dcn.json"):
        (d / f).write_text("ours")
    out.complete()
    (d / "notes.txt").write_text("mine")  # added by the user after the run
    (d / "models" / "README").write_text("mine too")
    (d / "mine").mkdir()
    (d / "mine" / "results.json").write_text("also mine")  # our name, but not in a folder userip writes
    claim_output_dir(d, "ctr", overwrite=True)
    left = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
    assert left == [MARKER, "mine/results.json", "models/README", "notes.txt"]


def test_nested_outputs_of_a_run_are_removed_by_their_own_marker(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = claim_output_dir(run, "run")
    (run / "run.json").write_text("{}")
    data = claim_output_dir(run / "data", "data")
    (run / "data" / "stats.json").write_text("{}")
    (run / "data" / "keep.csv").write_text("mine")
    data.complete()
    r.complete()
    removed = remove_output_files(run, "run")
    assert sorted(p.relative_to(run).as_posix() for p in removed) == ["data/.userip.json", "data/stats.json",
                                                                      "run.json"]
    assert (run / "data" / "keep.csv").read_text() == "mine"


def test_atomic_dir_refuses_foreign_files_and_never_removes_a_stray_old_dir(tmp_path: Path) -> None:
    target = tmp_path / "cache"
    stray = tmp_path / ".cache.old"
    stray.mkdir()
    (stray / "precious").write_text("not userip's")
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with atomic_dir(target) as tmp:  # same files: ours, replaced
        (tmp / "a.txt").write_text("2")
    assert (target / "a.txt").read_text() == "2"
    assert (stray / "precious").read_text() == "not userip's"
    (target / "notes.txt").write_text("user")
    with pytest.raises(UseripError, match="notes.txt"), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("3")
    assert (target / "a.txt").read_text() == "2" and (target / "notes.txt").read_text() == "user"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- data prepare
def _prepare_args(ds, out: Path) -> list[str]:
    return ["data", "prepare", "--out", str(out), "--interactions", str(ds.interactions), "--items",
            str(ds.items), "--users", str(ds.users), "--config", str(ds.config)]


def test_data_prepare_refuses_a_user_folder(tmp_path: Path, csv_dataset, data_cache) -> None:
    mine = tmp_path / "mydata"
    files = _user_files(mine)
    r = CliRunner().invoke(app, _prepare_args(csv_dataset, mine))
    assert r.exit_code == 2
    text = _text(r)
    assert str(mine) in text and "interactions.csv" in text and "notes.txt" in text
    assert "did not write" in text and "Traceback" not in text
    _intact(mine, files)
    assert sorted(p.name for p in mine.iterdir()) == sorted(files)  # nothing added either
    r = CliRunner().invoke(app, [*_prepare_args(csv_dataset, mine), "--overwrite"])
    assert r.exit_code == 2 and "did not write" in _text(r)  # --overwrite never covers files we did not write
    _intact(mine, files)


def test_data_prepare_overwrite_and_resume(tmp_path: Path, csv_dataset, data_cache) -> None:
    from userip.data import load_prepared

    out = tmp_path / "data"
    args = _prepare_args(csv_dataset, out)
    assert CliRunner().invoke(app, args).exit_code == 0
    assert read_marker(out) | {"kind": "data", "complete": True} == read_marker(out)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "pass --overwrite" in _text(r)
    (out / "notes.txt").write_text("mine")
    r = CliRunner().invoke(app, [*args, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (out / "notes.txt").read_text() == "mine"
    load_prepared(out)
    _incomplete(out)  # killed while moving the files in
    with pytest.raises(UseripError, match="incomplete"):
        load_prepared(out)
    assert CliRunner().invoke(app, args).exit_code == 0  # resumed (rewritten) without --overwrite
    assert read_marker(out)["complete"] is True and load_prepared(out).n_users == 10


# ---------------------------------------------------------------------------------------------- profile fit
def test_profile_fit_refuses_overwrites_and_resumes(tmp_path: Path, prepared, tiny_model_dir) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"profile": {"batch_users": 4, "inner_steps": 2, "max_tokens": 32}}))
    mine = tmp_path / "mine"
    files = _user_files(mine)

    def fit(out: Path, *extra: str):
        return CliRunner().invoke(app, ["profile", "fit", "--data", str(prepared.path), "--out", str(out),
                                        "--model", str(tiny_model_dir), "--config", str(cfg), *extra])

    r = fit(mine, "--epochs", "1")
    assert r.exit_code == 2 and "notes.txt" in _text(r)
    _intact(mine, files)
    assert not (mine / "checkpoints").exists() and not (mine / MARKER).exists()

    out = tmp_path / "p"
    assert fit(out, "--epochs", "1").exit_code == 0
    assert read_marker(out)["complete"] is True
    _incomplete(out)  # killed after epoch 1's checkpoint
    r = fit(out, "--epochs", "2")
    assert r.exit_code == 0, r.output
    epochs = [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]]
    assert epochs == [1, 2]  # continued from the checkpoint, not refitted
    assert read_marker(out)["complete"] is True
    # finished, same config: more epochs continue; another config needs --overwrite
    assert fit(out, "--epochs", "3").exit_code == 0
    r = fit(out, "--epochs", "1", "--seed", "7")
    assert r.exit_code == 2 and "pass --overwrite" in _text(r)
    (out / "notes.txt").write_text("mine")
    r = fit(out, "--epochs", "1", "--seed", "7", "--overwrite")
    assert r.exit_code == 0, r.output
    epochs = [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]]
    assert epochs == [1] and (out / "notes.txt").read_text() == "mine"
    assert not (out / "checkpoints" / "epoch0003.rank0-of-1.safetensors").exists()


# ---------------------------------------------------------------------------------------------- bank build
def test_bank_build_refuses_a_non_bank_file_and_an_unfinished_fit(tmp_path: Path) -> None:
    profiles = write_profiles_dir(tmp_path / "profiles")
    user_file = tmp_path / "users.csv"
    user_file.write_text("u,i\n1,2\n")
    r = CliRunner().invoke(app, ["bank", "build", "--profiles", str(profiles), "--out", str(user_file)])
    assert r.exit_code == 2 and "not a userip feature bank" in _text(r)
    assert user_file.read_text() == "u,i\n1,2\n"
    r = CliRunner().invoke(app, ["bank", "build", "--profiles", str(profiles), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "is a directory" in _text(r)
    bank = tmp_path / "b.sqlite"
    r = CliRunner().invoke(app, ["bank", "build", "--profiles", str(profiles), "--out", str(bank)])
    assert r.exit_code == 0, r.output
    claim_output_dir(profiles, "profiles", overwrite=True, clear=False)  # a fit started, never finished
    r = CliRunner().invoke(app, ["bank", "build", "--profiles", str(profiles), "--out", str(bank)])
    assert r.exit_code == 2 and "incomplete" in _text(r)


# ---------------------------------------------------------------------------------------------- ctr train
def test_ctr_train_refuses_and_overwrites_only_its_files(fake_stages, tmp_path: Path) -> None:  # noqa: F811
    mine = tmp_path / "mine"
    files = _user_files(mine)
    args = ["ctr", "train", "--data", "D", "--bank", "B", "--backbones", "dcn", "--seeds", "1",
            "--variants", "base,+ids", "--settings", "no_user_id", "--max-epochs", "1", "--out"]
    r = CliRunner().invoke(app, [*args, str(mine)])
    assert r.exit_code == 2 and "notes.txt" in _text(r)
    _intact(mine, files)
    assert not (mine / "results.json").exists()

    out = tmp_path / "ctr"
    assert CliRunner().invoke(app, [*args, str(out)]).exit_code == 0
    assert read_marker(out)["complete"] is True and (out / "models" / "dcn.safetensors").exists()
    r = CliRunner().invoke(app, [*args, str(out)])
    assert r.exit_code == 2 and "pass --overwrite" in _text(r)
    (out / "notes.txt").write_text("mine")
    (out / "models" / "din.safetensors").write_text("stale, ours")  # an earlier run's model
    r = CliRunner().invoke(app, [*args, str(out), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (out / "notes.txt").read_text() == "mine" and not (out / "models" / "din.safetensors").exists()
    _incomplete(out)  # killed mid-training: rerun without --overwrite
    assert CliRunner().invoke(app, [*args, str(out)]).exit_code == 0
    assert read_marker(out)["complete"] is True


# ---------------------------------------------------------------------------------------------- baselines
def test_save_baseline_refuses_a_user_folder(tmp_path: Path) -> None:
    from userip.baselines import BaselineFeatures, load_baseline, save_baseline

    ids = pd.DataFrame({"user_idx": [1, 2], "user_id": ["a", "b"], "hobby": [1, 2]})
    f = BaselineFeatures(name="t", ids=ids, dense=np.eye(3, dtype=np.float32), meta={"cardinalities": {"hobby": 2}})
    mine = tmp_path / "mine"
    files = _user_files(mine)
    with pytest.raises(UseripError, match="notes.txt"):
        save_baseline(f, mine)
    _intact(mine, files)
    out = save_baseline(f, tmp_path / "b")
    with pytest.raises(UseripError, match="pass --overwrite"):
        save_baseline(f, out)
    (out / "notes.txt").write_text("mine")
    save_baseline(f, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and load_baseline(out).name == "t"


# ---------------------------------------------------------------------------------------------- run
@pytest.fixture
def data_only_run(tmp_path: Path) -> Path:
    from userip.data.synthetic import write_taste_world

    w = write_taste_world(tmp_path / "world")
    cfg = {"seed": 0, "data": {"interactions": str(w / "inter.csv"), "items": str(w / "items.csv"),
                               "users": str(w / "users.csv")}}
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_run_refuses_a_user_folder(tmp_path: Path, data_only_run: Path, data_cache) -> None:
    mine = tmp_path / "mine"
    files = _user_files(mine)
    r = CliRunner().invoke(app, ["run", "--config", str(data_only_run), "--out", str(mine)])
    assert r.exit_code == 2 and "notes.txt" in _text(r) and str(mine) in _text(r)
    _intact(mine, files)
    assert sorted(p.name for p in mine.iterdir()) == sorted(files)


def test_run_resumes_after_a_kill_and_overwrite_keeps_user_files(tmp_path: Path, data_only_run: Path,
                                                                 data_cache) -> None:
    from userip.run import run

    out = tmp_path / "run"
    run(data_only_run, out, stages=("data",), progress=False)  # then "killed": later stages never ran
    assert read_marker(out)["complete"] is False and read_marker(out / "data")["complete"] is True
    (out / "notes.txt").write_text("mine")
    rec = run(data_only_run, out, stages=("data",), progress=False)  # resumes: data is up to date
    assert rec["stages"]["data"]["status"] == "done"
    stamp = (out / "data" / "stats.json").stat().st_mtime_ns
    run(data_only_run, out, stages=("data",), progress=False)
    assert (out / "data" / "stats.json").stat().st_mtime_ns == stamp  # skipped, not rewritten
    run(data_only_run, out, stages=("data",), progress=False, overwrite=True)  # afresh: data rewritten
    assert (out / "data" / "stats.json").stat().st_mtime_ns != stamp
    assert (out / "notes.txt").read_text() == "mine"
    # a data dir changed by the config is replaced by the run (it owns it) without --overwrite
    cfg = yaml.safe_load(data_only_run.read_text())
    cfg["users"] = 10
    data_only_run.write_text(yaml.safe_dump(cfg))
    run(data_only_run, out, stages=("data",), progress=False)
    assert json.loads((out / "data" / "stats.json").read_text())["n_users"] == 10
