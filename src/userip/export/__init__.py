"""Exports of a run's CTR rows and profile IDs to other recommender toolkits (FuxiCTR)."""

from userip.export.fuxictr import FUXICTR_MODELS, export_fuxictr

__all__ = ["FUXICTR_MODELS", "export_fuxictr"]
