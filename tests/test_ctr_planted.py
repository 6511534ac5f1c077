"""The table's "Done when": where a hidden user group truly drives clicks, every variant family shows "lift" for
the source that holds the group and "no lift" for its permuted twin.

A tiny random LLM cannot produce features that carry the group, so the planted features are injected where
each family delivers them: the profile IDs and soft tokens as ``ids`` / ``theta``, and the baselines as saved
baseline directories (history, text profile, content k-means), read back through ``baseline_sources`` as the
main job and ``userip ctr train --baseline`` read them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ctr_world import make_examples
from userip.baselines import BaselineFeatures, save_baseline
from userip.ctr import baseline_sources, run_ctr_table, winners

SOURCES = ["+ids", "+theta", "+hist-ids", "+hist-dense", "+text-ids", "+text-dense", "+content-ids",
           "+ids+label-rate"]


@pytest.fixture(autouse=True, scope="module")  # module scope: set before the module-scoped table is trained
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _planted_vectors(group: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy vector per user whose direction encodes the group (what a useful dense source looks like)."""
    centres = rng.normal(size=(5, dim))
    x = centres[group] + 0.3 * rng.normal(size=(len(group), dim))
    x[0] = 0
    return x.astype(np.float32)


def _baseline(name: str, group: np.ndarray, dense: np.ndarray) -> BaselineFeatures:
    users = np.arange(1, len(group))
    ids = pd.DataFrame({"user_idx": users, "user_id": [f"u{u}" for u in users], "hobby": group[1:]})
    return BaselineFeatures(name=name, ids=ids, dense=dense,
                            meta={"cardinalities": {"hobby": 4}, "reads": f"planted ({name})"})


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    (tr, va, te), group, activity = make_examples(n_users=300, rows_per_user=30, planted=True, seed=1,
                                                  rating_bias=0.8)
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("planted")
    dirs = [save_baseline(_baseline(n, group, _planted_vectors(group, 8, rng)), d / n)
            for n in ("history", "text-profile", "content-kmeans")]
    extra_ids, extra_dense, reads = baseline_sources(dirs, len(group))
    assert set(extra_ids) == {"+hist-ids", "+text-ids", "+content-ids"}
    assert set(extra_dense) == {"+hist-dense", "+text-dense"}  # content: IDs only, as in the table
    theta = _planted_vectors(group, 6, rng)
    df = run_ctr_table(tr, va, te, ids=group[:, None], id_sizes=[4], activity=activity, theta=theta,
                       backbones=["dcn"], seeds=[0, 1], variants="all", settings=["no_user_id"], batch_size=256,
                       lr=1e-2, max_epochs=20, patience=3, progress=False, extra_ids=extra_ids, extra_dense=extra_dense,
                       reads=reads, bootstrap=300, out=d / "ctr")
    return df, d / "ctr"


def test_every_family_lifts_and_its_permuted_twin_does_not(table):
    df, _ = table
    lifts = df.attrs["lifts"]
    v = lifts[lifts["slice"] == "all"].set_index(["variant", "control"])["verdict"]
    from userip.ctr import variants as V

    for source in SOURCES:
        twin, ref = V.twin(source), V.reference(source)
        assert v[(source, ref)] == "lift", (source, ref)
        assert v[(source, twin)] == "lift", (source, twin)
        assert v[(twin, ref)] == "no lift", (twin, ref)


def test_label_rate_is_a_real_control_and_ids_add_to_it(table):
    """The planted rating level makes +label-rate lift over base (a control every source must beat); the group
    still adds on top of it, and its twin does not."""
    df, _ = table
    v = df.attrs["lifts"].query("slice == 'all'").set_index(["variant", "control"])["verdict"]
    assert v[("+label-rate", "base")] == "lift"
    assert v[("+ids+label-rate", "+label-rate")] == "lift"
    assert v[("+ids-permuted+label-rate", "+label-rate")] == "no lift"
    assert v[("+activity", "base")] == "no lift"


def test_winners_and_report_name_what_each_source_read(table):
    df, out = table
    w = winners(df.attrs["lifts"])["no_user_id"]
    assert set(w["winners"]) == set(SOURCES)
    md = (out / "results.md").read_text()
    assert "**no_user_id: winner" in md and "| +hist-ids | planted (history); k-means IDs (4) |" in md
    assert "| +label-rate | train label rate per user, 4 quantile buckets |" in md
