"""Soft user profiles fitted by EM on a frozen causal LM (UserIP-Tuning)."""

from userip.profile.api import fit_profiles, id_counts, infer_profiles, load_config, read_ids
from userip.profile.config import DEFAULT_TEMPLATE, ProfileConfig, ProfileSpec
from userip.profile.em import Corpus, ProfileFitter
from userip.profile.optim import RowAdam

__all__ = [
    "DEFAULT_TEMPLATE", "Corpus", "ProfileConfig", "ProfileFitter", "ProfileSpec", "RowAdam",
    "fit_profiles", "id_counts", "infer_profiles", "load_config", "read_ids",
]
