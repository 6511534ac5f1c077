"""Soft user profiles on a frozen causal LM (UserIP-Tuning): per-user EM or amortised inference."""

from userip.profile.api import (
    distil_profiles,
    fit_profiles,
    has_student,
    id_counts,
    infer_profiles,
    load_config,
    read_ids,
)
from userip.profile.config import DEFAULT_TEMPLATE, ProfileConfig, ProfileSpec
from userip.profile.corpus import Corpus
from userip.profile.em import ProfileFitter
from userip.profile.optim import RowAdam

__all__ = [
    "DEFAULT_TEMPLATE", "Corpus", "ProfileConfig", "ProfileFitter", "ProfileSpec", "RowAdam",
    "distil_profiles", "fit_profiles", "has_student", "id_counts", "infer_profiles", "load_config", "read_ids",
]
