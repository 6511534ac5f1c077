"""Baselines: competing user features for the CTR harness, built "the other way round".

- ``text_profile_baseline``: the frozen LLM writes a profile from the behaviour (KAR-style); MiniLM embeds
  it (dense feature) and k-means quantises it into IDs of the same cardinalities as the profile IDs.
- ``content_kmeans_baseline``: no LLM; mean MiniLM embedding of the user's rendered train interactions + k-means.
- ``history_baseline``: the frozen LLM reads the user's train windows; its pooled hidden state (dense) and
  its k-means IDs: the profiles' strongest no-training competitor.

Each reads the same rendered behaviour as the profiles (pass their ``behaviour`` / ``title_year``; the history
baseline takes their whole ``ProfileConfig``), only the train split, and returns a :class:`BaselineFeatures`
(its ``meta["reads"]`` says what it read); ``save_baseline`` writes it in the PROFILES layout so
``userip bank build --profiles`` takes it, and ``userip ctr train --baseline DIR`` adds its sources.
"""

from userip.baselines.content import content_kmeans_baseline, mean_title_embeddings
from userip.baselines.encoder import ENCODER_NAME, ENCODER_PIP, SentenceEncoder, encode, encoder_dir
from userip.baselines.features import (
    BaselineFeatures,
    describe_behaviour,
    load_baseline,
    quantize,
    rendered_behaviour,
    save_baseline,
)
from userip.baselines.history import history_baseline, history_states
from userip.baselines.text_profile import (
    DEFAULT_PROMPT,
    RATED_PROMPT,
    generate,
    generate_profiles,
    render_prompt,
    text_profile_baseline,
    train_behaviour,
    train_titles,
)

__all__ = [
    "DEFAULT_PROMPT",
    "RATED_PROMPT",
    "ENCODER_NAME",
    "ENCODER_PIP",
    "BaselineFeatures",
    "SentenceEncoder",
    "content_kmeans_baseline",
    "describe_behaviour",
    "encode",
    "encoder_dir",
    "generate",
    "generate_profiles",
    "history_baseline",
    "history_states",
    "load_baseline",
    "mean_title_embeddings",
    "quantize",
    "render_prompt",
    "rendered_behaviour",
    "save_baseline",
    "text_profile_baseline",
    "train_behaviour",
    "train_titles",
]
