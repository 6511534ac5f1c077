"""Per-profile codebooks that turn users' personal soft-token vectors into small integer profile IDs.

IDs are 1..K (0 = unknown user). Codebooks are fitted by k-means inside the profile EM loop; the M-step
pieces (:func:`code_sums` / :func:`update_from_sums`) are split so a distributed run can all-reduce the
sufficient statistics in between. This stage imports nothing from later stages.
"""

from __future__ import annotations

from userip.quantize.align import CodeMatch, apply_relabel, contingency, match_codes
from userip.quantize.kmeans import (
    Codebook,
    MStepStats,
    assign,
    code_sums,
    kmeans_pp_init,
    prepare_for_codes,
    reseed_dead,
    update_from_sums,
)
from userip.quantize.metrics import dead_codes, perplexity, usage
from userip.quantize.storage import (
    KEY_PREFIX,
    codebook_hash,
    load_codebooks,
    read_codebook_metadata,
    save_codebooks,
)

__all__ = [
    "KEY_PREFIX",
    "CodeMatch",
    "Codebook",
    "MStepStats",
    "apply_relabel",
    "assign",
    "code_sums",
    "codebook_hash",
    "contingency",
    "dead_codes",
    "kmeans_pp_init",
    "load_codebooks",
    "match_codes",
    "perplexity",
    "prepare_for_codes",
    "read_codebook_metadata",
    "reseed_dead",
    "save_codebooks",
    "update_from_sums",
    "usage",
]
