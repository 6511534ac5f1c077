"""Every output directory records a format_version; a reader refuses one it cannot read, naming the version
(issue 13); directories from before markers or versions existed still load."""

import json
from pathlib import Path

import pytest

from conftest import CsvDataset
from userip.bank import build_bank
from userip.data import load_prepared, prepare
from userip.errors import UseripError
from userip.explain import probe_profiles
from userip.io import MARKER, OUTPUT_FORMAT_VERSION, check_format, claim_output_dir, read_marker


def _set_version(d: Path, version) -> None:
    m = read_marker(d)
    if version is None:
        m.pop("format_version", None)
    else:
        m["format_version"] = version
    (d / MARKER).write_text(json.dumps(m))


@pytest.fixture
def data_dir(tmp_path: Path, csv_dataset: CsvDataset, data_cache: Path) -> Path:
    prepare(tmp_path / "data", interactions=csv_dataset.interactions, items=csv_dataset.items,
            users=csv_dataset.users, config=csv_dataset.config)
    return tmp_path / "data"


def test_every_claimed_output_records_its_format(tmp_path: Path, data_dir: Path) -> None:
    assert read_marker(data_dir)["format_version"] == OUTPUT_FORMAT_VERSION  # kept when marked complete
    for kind in ("profiles", "ctr", "run", "baseline"):
        claim_output_dir(tmp_path / kind, kind).complete()
        assert read_marker(tmp_path / kind)["format_version"] == OUTPUT_FORMAT_VERSION, kind


def test_newer_data_format_is_refused_naming_the_version(data_dir: Path) -> None:
    _set_version(data_dir, OUTPUT_FORMAT_VERSION + 1)
    with pytest.raises(UseripError, match=rf"data output has format_version {OUTPUT_FORMAT_VERSION + 1}.*upgrade"):
        load_prepared(data_dir)
    _set_version(data_dir, "2.0")  # not an integer: also named, not a TypeError
    with pytest.raises(UseripError, match="format_version '2.0'"):
        load_prepared(data_dir)


def test_old_directories_still_load(data_dir: Path) -> None:
    _set_version(data_dir, None)  # a marker from before format_version existed
    assert load_prepared(data_dir).n_users == 10
    (data_dir / MARKER).unlink()  # a directory from before markers existed
    assert load_prepared(data_dir).n_users == 10
    assert check_format(data_dir, "prepared data") is None


def test_bank_build_and_probe_refuse_newer_profiles(tmp_path: Path) -> None:
    from test_bank import write_profiles_dir

    prof = write_profiles_dir(tmp_path / "profiles")
    claim_output_dir(prof, "profiles", overwrite=True, clear=False).complete()
    _set_version(prof, 7)
    with pytest.raises(UseripError, match="format_version 7"):
        build_bank(prof, tmp_path / "bank.sqlite")
    with pytest.raises(UseripError, match="format_version 7"):
        probe_profiles(prof, tmp_path)
    assert not (tmp_path / "bank.sqlite").exists()


def test_ctr_explain_and_infer_refuse_newer_profiles(tmp_path: Path) -> None:
    from test_bank import write_profiles_dir
    from userip.ctr.train import load_personal
    from userip.explain.codes import load_profile_codes
    from userip.profile import infer_profiles

    prof = write_profiles_dir(tmp_path / "profiles")
    claim_output_dir(prof, "profiles", overwrite=True, clear=False).complete()
    _set_version(prof, 9)
    with pytest.raises(UseripError, match="format_version 9"):
        load_personal(prof, 5, None)
    with pytest.raises(UseripError, match="format_version 9"):
        load_profile_codes(prof)
    with pytest.raises(UseripError, match="format_version 9"):
        infer_profiles(prof, tmp_path / "no-data", ["u1"])
