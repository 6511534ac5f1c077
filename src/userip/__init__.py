"""userip: UserIP-Tuning, LLM-inferred user-profile IDs for CTR models.

Pipeline (no stage imports a later one):
``data -> llm -> profile (EM) -> quantize -> bank -> ctr -> explain / report / serve``.
"""

__version__ = "0.1.0"
