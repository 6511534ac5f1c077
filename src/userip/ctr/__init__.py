"""CTR stage: do the profile IDs lift a CTR model, against every control that could prove the lift wrong?

``run_ctr_table`` trains every backbone x variant x setting (``with_user_id`` / ``no_user_id``) x seed on one
split; a variant adds sources to ``base`` (``+ids``, ``+theta``, baselines such as ``+hist-ids``), each learned
source beside its permuted twin, and the controls ``+activity`` and ``+label-rate`` (names and comparisons:
:mod:`userip.ctr.variants`). ``lift_frame`` turns the kept test predictions into paired lifts with bootstrap
intervals over test users and seeds, ``results_markdown`` into the headline. ``train_ctr`` does it from a
prepared data dir and a feature bank. Backbones (FuxiCTR style) are in the registry:
``build_model(name, spec, **hparams)``.

Modules, in reading order: ``inputs`` (examples -> base fields), ``sources`` (profile IDs, vectors, their
permuted twins, the controls), ``variants`` (variant names and what each is compared with), ``run`` (the
experiment loop), ``trainer`` (one fit, and the training defaults ``TRAIN``), ``models`` / ``layers`` (backbones,
model files), ``table`` / ``stats`` (paired lifts, the headline), ``results`` (the result files), ``train``
(``train_ctr`` from files, and how a bank is read).
"""

from userip.ctr.layers import MLP, EmbeddingLayer, TargetAttention
from userip.ctr.models import (
    build_model,
    get_backbone,
    known_backbones,
    load_model,
    model_hparams,
    register,
    save_model,
)
from userip.ctr.run import SETTINGS, SLICES, run_ctr_table
from userip.ctr.sources import activity_buckets, cold_users, label_rate, permute_ids, quantile_buckets
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
from userip.ctr.train import DEFAULT_BACKBONES, baseline_sources, read_bank_ids, train_ctr, user_label_rates
from userip.ctr.trainer import TRAIN, FitResult, RowLookup, TrainSettings, fit, metrics, predict
from userip.ctr.variants import VARIANT_LISTS

__all__ = [
    "DEFAULT_BACKBONES",
    "MLP",
    "SETTINGS",
    "SLICES",
    "TRAIN",
    "VARIANT_LISTS",
    "EmbeddingLayer",
    "FeatureSpec",
    "Field",
    "FitResult",
    "RowLookup",
    "TargetAttention",
    "TestPredictions",
    "TrainSettings",
    "activity_buckets",
    "baseline_sources",
    "build_model",
    "cold_users",
    "fit",
    "get_backbone",
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
    "read_bank_ids",
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
