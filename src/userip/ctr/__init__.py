"""CTR stage: do the profile IDs lift a CTR model?

``run_ctr_table`` trains every backbone x variant (``base`` / ``+ids`` / ``+ids-permuted`` / ``+activity`` /
``+theta``) x setting (``with_user_id`` / ``no_user_id``) x seed on one split, and ``results_markdown``
turns the runs into mean ± std and paired-lift tables. ``train_ctr`` does it from a prepared data dir and a
feature bank. Backbones (FuxiCTR style) are in the registry: ``build_model(name, spec, **hparams)``.
"""

from userip.ctr.layers import MLP, EmbeddingLayer, TargetAttention
from userip.ctr.models import build_model, known_backbones, model_hparams, register
from userip.ctr.run import (
    DEFAULT_BACKBONES,
    SETTINGS,
    SLICES,
    VARIANTS,
    activity_buckets,
    cold_users,
    load_model,
    permute_ids,
    run_ctr_table,
    save_model,
    train_ctr,
)
from userip.ctr.spec import FeatureSpec, Field
from userip.ctr.table import lift_frame, paired_interval, results_markdown, summary_frame
from userip.ctr.trainer import FitResult, RowLookup, fit, metrics, predict

__all__ = [
    "DEFAULT_BACKBONES",
    "MLP",
    "SETTINGS",
    "SLICES",
    "VARIANTS",
    "EmbeddingLayer",
    "FeatureSpec",
    "Field",
    "FitResult",
    "RowLookup",
    "TargetAttention",
    "activity_buckets",
    "build_model",
    "cold_users",
    "fit",
    "known_backbones",
    "lift_frame",
    "load_model",
    "metrics",
    "model_hparams",
    "paired_interval",
    "permute_ids",
    "predict",
    "register",
    "results_markdown",
    "run_ctr_table",
    "save_model",
    "summary_frame",
    "train_ctr",
]
