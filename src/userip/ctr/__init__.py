"""CTR stage: do the profile IDs lift a CTR model, against every control that could prove the lift wrong?

``run_ctr_table`` trains every backbone x variant x setting (``with_user_id`` / ``no_user_id``) x seed on one
split; a variant adds sources to ``base`` (``+ids``, ``+theta``, baselines such as ``+hist-ids``), each learned
source beside its permuted twin, and the controls ``+activity`` and ``+label-rate`` (names and comparisons:
:mod:`userip.ctr.variants`). ``lift_frame`` turns the kept test predictions into paired lifts with bootstrap
intervals over test users and seeds, ``results_markdown`` into the headline. ``train_ctr`` does it from a
prepared data dir and a feature bank. Backbones (FuxiCTR style) are in the registry:
``build_model(name, spec, **hparams)``.
"""

from userip.ctr.layers import MLP, EmbeddingLayer, TargetAttention
from userip.ctr.models import build_model, known_backbones, model_hparams, register
from userip.ctr.run import (
    DEFAULT_BACKBONES,
    SETTINGS,
    SLICES,
    VARIANT_LISTS,
    activity_buckets,
    baseline_sources,
    cold_users,
    label_rate,
    load_model,
    permute_ids,
    quantile_buckets,
    run_ctr_table,
    save_model,
    train_ctr,
    user_label_rates,
)
from userip.ctr.spec import FeatureSpec, Field
from userip.ctr.table import (
    TestPredictions,
    headline_tables,
    lift_frame,
    results_markdown,
    summary_frame,
    summary_sentences,
    verdict,
    winners,
)
from userip.ctr.trainer import FitResult, RowLookup, fit, metrics, predict

__all__ = [
    "DEFAULT_BACKBONES",
    "MLP",
    "SETTINGS",
    "SLICES",
    "VARIANT_LISTS",
    "EmbeddingLayer",
    "FeatureSpec",
    "Field",
    "FitResult",
    "RowLookup",
    "TargetAttention",
    "TestPredictions",
    "activity_buckets",
    "baseline_sources",
    "build_model",
    "cold_users",
    "fit",
    "headline_tables",
    "known_backbones",
    "label_rate",
    "lift_frame",
    "load_model",
    "metrics",
    "model_hparams",
    "permute_ids",
    "predict",
    "quantile_buckets",
    "register",
    "results_markdown",
    "run_ctr_table",
    "save_model",
    "summary_frame",
    "summary_sentences",
    "train_ctr",
    "user_label_rates",
    "verdict",
    "winners",
]
