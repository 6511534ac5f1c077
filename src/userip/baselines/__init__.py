"""Baselines: competing user features for the CTR harness, built "the other way round".

- ``text_profile_baseline``: the frozen LLM writes a profile from the behaviour (KAR-style); MiniLM embeds
  it (dense feature) and k-means quantises it into IDs of the same cardinalities as the profile IDs.
- ``content_kmeans_baseline``: no LLM; mean MiniLM embedding of the user's train item titles + k-means.

Both read only the train split and return a :class:`BaselineFeatures`; ``save_baseline`` writes it in the
PROFILES layout so ``userip bank build --profiles`` and ``userip ctr train --profiles`` accept it.
"""

from userip.baselines.content import content_kmeans_baseline, mean_title_embeddings
from userip.baselines.encoder import ENCODER_NAME, ENCODER_PIP, SentenceEncoder, encode, encoder_dir
from userip.baselines.features import BaselineFeatures, load_baseline, quantize, save_baseline
from userip.baselines.text_profile import (
    DEFAULT_PROMPT,
    generate,
    generate_profiles,
    render_prompt,
    text_profile_baseline,
    train_titles,
)

__all__ = [
    "DEFAULT_PROMPT",
    "ENCODER_NAME",
    "ENCODER_PIP",
    "BaselineFeatures",
    "SentenceEncoder",
    "content_kmeans_baseline",
    "encode",
    "encoder_dir",
    "generate",
    "generate_profiles",
    "load_baseline",
    "mean_title_embeddings",
    "quantize",
    "render_prompt",
    "save_baseline",
    "text_profile_baseline",
    "train_titles",
]
