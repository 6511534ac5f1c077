"""docs/config.md names every key of every config section (issue 13): derived from the code, kept in step."""

import dataclasses
import inspect
import re
from pathlib import Path

from userip.data.config import DataConfig
from userip.profile import ProfileConfig
from userip.run import check_sections

DOC = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()


def _documented() -> set[str]:
    keys = set()
    for cell in re.findall(r"^\| (`[^|]+`) \|", DOC, flags=re.M):
        keys |= set(re.findall(r"`([^`]+)`", cell))
    return keys


def _fields(cls: type, prefix: str) -> set[str]:
    out = set()
    for f in dataclasses.fields(cls):
        sub = {"columns", "split", "interactions", "items", "users"} if cls is not ProfileConfig else set()
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name in sub and dataclasses.is_dataclass(default):
            out |= _fields(type(default), f"{prefix}{f.name}.")
        else:
            out.add(f"{prefix}{f.name}")
    return out


def test_every_data_and_profile_key_is_documented() -> None:
    doc = _documented()
    data_keys = {k.removeprefix("data.") for k in _fields(DataConfig, "data.")}
    assert not data_keys - doc, sorted(data_keys - doc)
    profile_keys = {f.name for f in dataclasses.fields(ProfileConfig)}
    assert not profile_keys - doc, sorted(profile_keys - doc)


def test_every_ctr_baselines_explain_key_is_documented() -> None:
    from userip.baselines import text_profile_baseline
    from userip.ctr import run_ctr_table, train_ctr
    from userip.explain import explain

    src = inspect.getsource(check_sections)
    fixed = set(re.findall(r'"([a-z_]+)"', src.split("known =")[0]))
    doc = _documented()
    for fn in (train_ctr, run_ctr_table, text_profile_baseline, explain):
        params = {n for n, p in inspect.signature(fn).parameters.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - fixed - {"profiles_dir"}
        assert not params - doc, (fn.__name__, sorted(params - doc))
    assert {"targets", "history", "text_profile", "content_kmeans"} <= doc


def test_prepare_help_points_at_the_reference() -> None:
    from typer.testing import CliRunner

    from userip.cli import app

    r = CliRunner().invoke(app, ["data", "prepare", "--help"])
    assert "docs/config.md" in " ".join(r.output.split())
