"""The probe reads the dataset's own user side features (issue 13), configurable by probe.targets."""

import numpy as np
import pandas as pd
import pytest

from userip.errors import UseripError
from userip.explain.probe import PROBE_COLUMNS, probe, probe_markdown, probe_targets
from userip.run import check_sections


def _users(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"user_idx": np.arange(1, n + 1), "user_id": [f"u{i}" for i in range(n)],
                         "age": rng.integers(16, 70, n), "segment": ["a", "b"] * (n // 2),
                         "zip_code": [f"{10000 + i}" for i in range(n)], "country": ["x"] * n})


def test_targets_are_the_datasets_side_features() -> None:
    targets, skipped = probe_targets(_users())
    assert targets == ["age_bucket", "segment"]  # age bucketed; the near-unique zip and constant country skipped
    assert set(skipped) == {"zip_code", "country"}
    # configured side features restrict them (zip code is kept in users.parquet but not a feature)
    assert probe_targets(_users(), side_features=["segment"])[0] == ["segment"]


def test_targets_from_config_and_clear_error_for_a_missing_one() -> None:
    assert probe_targets(_users(), targets=["segment"]) == (["segment"], {})
    assert probe_targets(_users(), targets=[]) == ([], {})
    with pytest.raises(UseripError, match=r"probe.targets: users table has no column\(s\) \['gender'\]"):
        probe_targets(_users(), targets=["gender"])


def test_no_side_features_means_nothing_to_probe() -> None:
    bare = _users()[["user_idx", "user_id"]]
    assert probe_targets(bare) == ([], {})
    md = probe_markdown(pd.DataFrame(columns=PROBE_COLUMNS))
    assert md.startswith("Nothing to probe")


def test_probe_on_a_custom_target() -> None:
    users = _users()
    ids = pd.DataFrame({"user_idx": users["user_idx"], "hobby": np.where(users["segment"] == "a", 1, 2)})
    df = probe({"profile IDs": ids}, users, ["segment"])
    assert df.loc[0, "nmi"] == pytest.approx(1.0)


def test_unknown_probe_key_is_a_clear_error() -> None:
    check_sections({"probe": {"targets": ["segment"]}})
    with pytest.raises(UseripError, match=r"unknown keys \['target'\] in the 'probe:' section"):
        check_sections({"probe": {"target": ["segment"]}})
