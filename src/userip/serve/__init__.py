"""Serving: CTR scores for a user's items from a trained ``+ids`` model and the feature bank, no LLM call.

``CTRScorer`` holds the model, the feature tables and the bank (usable without HTTP); ``create_app`` wraps it
in a FastAPI app and ``serve`` runs that with uvicorn (``userip serve --bank BANK --ctr CTR``).
"""

from userip.serve.app import create_app, serve
from userip.serve.bank_reader import Unavailable
from userip.serve.scorer import HISTORY_MODES, CTRScorer, ScoreResult

__all__ = ["HISTORY_MODES", "CTRScorer", "ScoreResult", "Unavailable", "create_app", "serve"]
