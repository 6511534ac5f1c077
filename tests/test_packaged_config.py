"""The default run config is found when userip is installed as a wheel, not only editable (issue 13)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_is_the_repo_config() -> None:
    from userip.run import DEFAULT_CONFIG, load_run_config

    assert DEFAULT_CONFIG.read_text() == (ROOT / "configs" / "ml-100k.yaml").read_text()
    assert load_run_config()["data"]["dataset"] == "ml-100k"


def test_wheel_carries_the_default_config_and_finds_it(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    src = tmp_path / "src_tree"  # a copy: building in the checkout would leave build/ and egg-info behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "configs", src / "configs")
    shutil.copytree(ROOT / "src", src / "src", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                        "-w", str(tmp_path / "wheel")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("userip-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = zf.read("userip/configs/ml-100k.yaml").decode()
    assert shipped == (ROOT / "configs" / "ml-100k.yaml").read_text()  # the file itself, not a link
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)  # what `pip install` lays out (no editable path back to the repo)
    code = ("import userip.run as r, sys; print(r.DEFAULT_CONFIG); "
            "import yaml; print(yaml.safe_dump(r.load_run_config()['data']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    where, data = r.stdout.split("\n", 1)
    assert Path(where).is_relative_to(site)
    assert yaml.safe_load(data)["dataset"] == "ml-100k"
