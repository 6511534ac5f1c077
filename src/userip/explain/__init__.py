"""Explanations of profile codes and the validity probe (do IDs know what the profiler never saw?)."""

from userip.explain.codes import ProfileCodes, load_profile_codes
from userip.explain.explain import (
    DEFAULT_SUFFIX,
    PhraseDecoder,
    TokenIndex,
    code_lifts,
    explain,
    explanations_markdown,
    generation_template,
    lift,
    phrase_prompt,
    word_like,
)
from userip.explain.probe import (
    AGE_LABELS,
    activity_frame,
    age_bucket,
    id_space_size,
    permuted_ids,
    probe,
    probe_markdown,
    probe_profiles,
)

__all__ = [
    "AGE_LABELS", "DEFAULT_SUFFIX", "PhraseDecoder", "ProfileCodes", "TokenIndex", "activity_frame",
    "age_bucket", "code_lifts", "explain", "explanations_markdown", "generation_template", "id_space_size",
    "lift", "load_profile_codes", "permuted_ids", "phrase_prompt", "probe", "probe_markdown", "probe_profiles",
    "word_like",
]
