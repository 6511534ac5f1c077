"""The CTR table's statistics and text, pure: variant algebra, bootstrap AUC, paired lifts, winners, markdown.

No training: predictions are synthetic, built so that the right answer is known.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from userip.ctr import TestPredictions, lift_frame, results_markdown, summary_sentences, winners
from userip.ctr import variants as V
from userip.ctr.stats import draw_replicates, paired_difference, seed_metrics, weighted_auc, weighted_logloss
from userip.ctr.table import headline_tables, need_backbones


# ------------------------------------------------------------------ variant algebra
def test_variant_names_twins_references_and_controls():
    assert V.parts("base") == () and V.parts("+ids+label-rate") == ("ids", "label-rate")
    assert [V.role(v) for v in ("base", "+activity", "+ids", "+ids-permuted", "+ids+label-rate")] == [
        "base", "control", "source", "twin", "source"]
    assert V.twin("+theta") == "+theta-permuted" and V.twin("+ids+label-rate") == "+ids-permuted+label-rate"
    assert V.twin("+activity") is None and V.twin("+ids-permuted") is None
    assert V.reference("+hist-ids") == "base" and V.reference("+ids+label-rate") == "+label-rate"
    run = ["base", "+ids", "+ids-permuted", "+activity", "+label-rate", "+ids+label-rate"]
    assert V.controls_for("+ids", run) == ["base", "+activity", "+label-rate", "+ids-permuted"]
    # the combination: its reference first; its twin was not run, so it is not among its controls
    assert V.controls_for("+ids+label-rate", run) == ["+label-rate", "base", "+activity"]
    assert V.controls_for("+ids-permuted", run) == ["base"] and V.controls_for("+activity", run) == ["base"]
    assert V.controls_for("base", run) == []
    lists = V.variant_lists(["+ids", "+theta", "+text-ids", "+hist-ids"])
    assert lists["default"] == [*run, "+hist-ids", "+hist-ids-permuted"]  # hist-ids: the first built competitor
    both = V.variant_lists(["+ids", "+hist-ids", "+hist-dense", "+content-ids"])
    assert both["default"][-2:] == ["+hist-dense", "+hist-dense-permuted"]  # the strongest measured one first
    assert {"+theta-permuted", "+text-ids-permuted", "+ids-permuted+label-rate"} <= set(lists["all"])
    assert all(V.twin(v) in lists["all"] for v in lists["all"] if V.role(v) == "source")  # every source: twin


# ------------------------------------------------------------------ weighted metrics
def test_weighted_auc_and_logloss_match_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300).astype(float)
    p = np.clip(np.round(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, 300), 1), 0.05, 0.95)  # many ties
    w = rng.integers(0, 4, size=(5, 300)).astype(float)
    got = weighted_auc(y, p, w)
    want = [roc_auc_score(y, p, sample_weight=row) for row in w]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    smooth = p + rng.normal(0, 1e-3, 300)  # no ties: the one-gather path
    np.testing.assert_allclose(weighted_auc(y, smooth, w), [roc_auc_score(y, smooth, sample_weight=r) for r in w],
                               rtol=1e-6)
    np.testing.assert_allclose(weighted_logloss(y, p, w), [log_loss(y, p, sample_weight=row) for row in w],
                               rtol=1e-9)
    assert math.isnan(weighted_auc(np.ones(4), np.arange(4.0), np.ones((1, 4)))[0])  # one class: undefined


# ------------------------------------------------------------------ the bootstrap
def _world(n_users=150, rows=12, seed=0):
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(1, n_users + 1), rows)
    signal = rng.normal(size=len(user))
    y = (rng.random(len(user)) < 1 / (1 + np.exp(-2 * signal))).astype(np.float32)
    return rng, user, signal, y


def _predictions(y, user, fits: dict[tuple[str, str, str, int], np.ndarray]) -> TestPredictions:
    tp = TestPredictions(y, user, {"all": np.ones(len(y), dtype=bool), "cold": user <= 40})
    for k, p in fits.items():
        tp.add(*k, p)
    return tp


def _sig(x):
    return 1 / (1 + np.exp(-x))


def test_a_real_lift_is_found_and_a_twin_of_equal_quality_is_not():
    rng, user, signal, y = _world()
    fits = {}
    for seed in range(3):
        noise = rng.normal(size=(3, len(y)))
        fits[("dcn", "no_user_id", "base", seed)] = _sig(0.3 * signal + noise[0])
        fits[("dcn", "no_user_id", "+ids", seed)] = _sig(signal + 0.3 * noise[1])
        fits[("dcn", "no_user_id", "+ids-permuted", seed)] = _sig(0.3 * signal + noise[2])
    lifts = lift_frame(_predictions(y, user, fits), n_boot=300, seed=1)
    v = lifts[lifts["slice"] == "all"].set_index(["variant", "control"])
    assert v.loc[("+ids", "base"), "verdict"] == "lift" and v.loc[("+ids", "+ids-permuted"), "verdict"] == "lift"
    assert v.loc[("+ids-permuted", "base"), "verdict"] == "no lift"
    r = v.loc[("+ids", "base")]
    assert r["d_auc_low"] < r["d_auc"] < r["d_auc_high"] and r["seeds"] == 3 and r["users"] == 150
    assert r["d_logloss"] < 0 < r["d_auc"]  # the better model: lower loss, higher AUC
    assert set(lifts["slice"]) == {"all", "cold"} and lifts.loc[lifts["slice"] == "cold", "users"].max() == 40
    again = lift_frame(_predictions(y, user, fits), n_boot=300, seed=1)
    pd.testing.assert_frame_equal(lifts, again)  # reproducible with the seed
    other = lift_frame(_predictions(y, user, fits), n_boot=300, seed=2)
    assert not np.allclose(other["d_auc_low"], lifts["d_auc_low"])
    np.testing.assert_allclose(other["d_auc"], lifts["d_auc"])  # the point estimate does not resample


def test_interval_includes_the_test_users_noise_not_only_the_seeds():
    """Identical predictions for every seed: a t-interval over seeds would have width 0; resampling the test
    users keeps the test set's own noise in the interval."""
    rng, user, signal, y = _world()
    a = _sig(signal + rng.normal(size=len(y)))
    b = _sig(signal + rng.normal(size=len(y)))
    fits = {("dcn", "no_user_id", v, s): p for s in range(3) for v, p in (("+ids", a), ("+ids-permuted", b))}
    r = lift_frame(_predictions(y, user, fits), n_boot=300).set_index(["slice", "variant", "control"])
    row = r.loc[("all", "+ids", "+ids-permuted")]
    assert row["d_auc_high"] - row["d_auc_low"] > 0.02


def test_users_are_resampled_as_units():
    """When a difference lives in a few users' rows, resampling users (not rows) gives the wider interval."""
    rng = np.random.default_rng(3)
    user = np.repeat(np.arange(1, 31), 40)
    y = (rng.random(len(user)) < 0.5).astype(np.float32)
    noise = rng.normal(size=len(y))
    good = np.where(user <= 3, y * 2 - 1, 0) + noise  # better only for users 1..3
    a, b = _sig(good), _sig(noise)
    widths = {}
    for name, units in (("users", user), ("rows", np.arange(len(user)))):
        reps = draw_replicates(units, 1, 400, np.random.default_rng(0))
        ma, mb = seed_metrics(y, a[None], reps), seed_metrics(y, b[None], reps)
        _, lo, hi = paired_difference(ma.auc, mb.auc, ma.auc_boot, mb.auc_boot, reps)
        widths[name] = hi - lo
    assert widths["users"] > 1.5 * widths["rows"], widths


# ------------------------------------------------------------------ winners and the headline
def _lifts(wins: dict[str, list[tuple[str, str]]], backbones=("dcn", "deepfm", "dcnv2", "autoint", "din")):
    """A hand-made lifts frame: ``wins[variant]`` = per backbone (verdict vs each control, verdict vs twin)."""
    rows = []
    for variant, per_backbone in wins.items():
        for b, (vs_controls, vs_twin) in zip(backbones, per_backbone, strict=True):
            for control in ("base", "+activity", "+label-rate", V.twin(variant)):
                verdict = vs_twin if control == V.twin(variant) else vs_controls
                d = {"lift": 0.02, "no lift": 0.001, "worse": -0.02}[verdict]
                rows.append({"backbone": b, "setting": "no_user_id", "slice": "all", "variant": variant,
                             "control": control, "kind": "twin" if control == V.twin(variant) else "control",
                             "role": "source", "seeds": 5, "users": 900, "d_auc": d, "d_auc_low": d - 0.01,
                             "d_auc_high": d + 0.01, "d_logloss": -d, "d_logloss_low": -d - 0.01,
                             "d_logloss_high": -d + 0.01, "verdict": verdict})
    return pd.DataFrame(rows)


def test_a_winner_beats_every_control_on_three_of_five_backbones():
    L, N = ("lift", "lift"), ("lift", "no lift")  # N: beats base and the controls, not its twin
    lifts = _lifts({"+ids": [L, L, L, N, N], "+hist-ids": [L, L, N, N, N], "+theta": [N, N, N, N, N]})
    w = winners(lifts)["no_user_id"]
    assert w["need"] == 3 == need_backbones(5) and w["backbones"] == 5
    assert w["winners"] == ["+ids"]
    assert w["sources"]["+hist-ids"]["wins"] == 2 and w["sources"]["+theta"]["wins"] == 0
    text = " ".join(summary_sentences(lifts))
    assert "winner `+ids`" in text and "+hist-ids 2/5" in text
    none = summary_sentences(_lifts({"+ids": [L, L, N, N, N]}))
    assert "no winner" in none[0] and "+ids 2/5" in none[0]
    # beating base on all five but not +label-rate anywhere is not a win
    only_base = _lifts({"+ids": [("lift", "lift")] * 5})
    only_base.loc[only_base["control"] == "+label-rate", "verdict"] = "no lift"
    assert winners(only_base)["no_user_id"]["winners"] == []
    assert need_backbones(2) == 2 and need_backbones(1) == 1


def test_results_markdown_opens_with_the_headline_per_setting():
    rng, user, signal, y = _world()
    fits, runs = {}, []
    for setting in ("with_user_id", "no_user_id"):
        for backbone in ("dcn", "deepfm"):
            for seed in range(2):
                for variant, strength in (("base", 0.2), ("+ids", 1.0), ("+ids-permuted", 0.2), ("+activity", 0.2),
                                          ("+label-rate", 0.5), ("+ids+label-rate", 1.0)):
                    p = _sig(strength * signal + rng.normal(size=len(y)))
                    fits[(backbone, setting, variant, seed)] = p
                    for sl in ("all", "cold"):
                        runs.append({"backbone": backbone, "variant": variant, "setting": setting, "seed": seed,
                                     "slice": sl, "auc": roc_auc_score(y, p), "logloss": 0.6, "epochs": 3})
    lifts = lift_frame(_predictions(y, user, fits), n_boot=100)
    md = results_markdown(pd.DataFrame(runs), lifts, reads={"+ids": "rated text"}, n_boot=100)
    first = md.index("## Headline: with_user_id")
    assert first < md.index("## Headline: no_user_id") < md.index("## AUC / LogLoss")
    assert md.index("paired comparisons") < first and f"**{len(lifts)} paired comparisons**" in md
    assert "| source | backbone | over base¹ | over permuted twin | beats every control | cold: over base¹ |" in md
    assert "`+ids+label-rate` vs `+label-rate`" in md and "| +ids | rated text |" in md
    tables = headline_tables(lifts)
    t = tables["no_user_id"]
    assert list(t["source"].unique()) == ["+ids", "+activity", "+label-rate", "+ids+label-rate"]
    assert t.loc[t["source"] == "+ids+label-rate", "over permuted twin"].eq("not run").all()
    assert t.loc[t["source"] == "+activity", "over permuted twin"].eq("(a control)").all()
    before = lifts.copy()
    assert results_markdown(pd.DataFrame(runs), lifts, n_boot=100) == results_markdown(pd.DataFrame(runs), lifts,
                                                                                        n_boot=100)
    assert lifts.equals(before)  # pure


def test_predictions_roundtrip(tmp_path):
    rng, user, signal, y = _world(n_users=10, rows=3)
    tp = _predictions(y, user, {("dcn", "no_user_id", "+ids", 4): _sig(signal)})
    tp.save(tmp_path / "p.npz")
    back = TestPredictions.load(tmp_path / "p.npz")
    assert list(back.preds) == [("dcn", "no_user_id", "+ids", 4)]
    np.testing.assert_array_equal(back.preds[("dcn", "no_user_id", "+ids", 4)],
                                  tp.preds[("dcn", "no_user_id", "+ids", 4)])
    np.testing.assert_array_equal(back.slices["cold"], tp.slices["cold"])
    with pytest.raises(ValueError, match="3 predictions for 30 test rows"):
        tp.add("dcn", "no_user_id", "base", 0, np.zeros(3))


def test_an_empty_slice_is_skipped_not_reported_as_noise():
    rng, user, signal, y = _world(n_users=20, rows=5)
    tp = TestPredictions(y, user, {"all": np.ones(len(y), dtype=bool), "cold": np.zeros(len(y), dtype=bool)})
    for v in ("base", "+ids"):
        tp.add("dcn", "no_user_id", v, 0, _sig(signal + rng.normal(size=len(y))))
    lifts = lift_frame(tp, n_boot=50)
    assert list(lifts["slice"]) == ["all"] and list(lifts["control"]) == ["base"]
