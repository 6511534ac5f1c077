"""Outputs get the mode the umask asks for (issue 13: temp-dir defaults made them 0700 / 0600)."""

import os
import stat
from pathlib import Path

import pytest

from conftest import CsvDataset
from userip.data import prepare
from userip.io import atomic_dir, atomic_path, current_umask, write_json, write_yaml


@pytest.fixture(params=[0o022, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_current_umask_reads_without_changing(umask) -> None:
    assert current_umask() == umask
    assert current_umask() == umask


def test_atomic_files_and_dirs_follow_umask(tmp_path: Path, umask: int) -> None:
    write_json(tmp_path / "a.json", {"x": 1})
    write_yaml(tmp_path / "a.yaml", {"x": 1})
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.unlink()  # a writer that replaces the file instead of writing into it
        tmp.write_bytes(b"1")
    for f in ("a.json", "a.yaml", "b.bin"):
        assert _mode(tmp_path / f) == 0o666 & ~umask, f
    with atomic_dir(tmp_path / "cache") as d:
        (d / "f.txt").write_text("x")
    assert _mode(tmp_path / "cache") == 0o777 & ~umask


def test_prepared_data_dir_follows_umask(tmp_path: Path, csv_dataset: CsvDataset, data_cache: Path,
                                         umask: int) -> None:
    out = tmp_path / "data"
    prepare(out, interactions=csv_dataset.interactions, items=csv_dataset.items, users=csv_dataset.users,
            config=csv_dataset.config)
    assert _mode(out) == 0o777 & ~umask
    for f in out.iterdir():
        assert _mode(f) == 0o666 & ~umask, f.name
