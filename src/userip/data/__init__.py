"""Data stage: load interaction logs (MovieLens-100K or your own CSV/Parquet), re-index ids, split, describe.

Output is a DATA dir (see docs/internals.md) that every later stage reads through `load_prepared`.
"""

from userip.data.build import prepare
from userip.data.config import ConfigError, DataConfig
from userip.data.ctr import CTRExamples, ctr_examples
from userip.data.datadir import load_prepared
from userip.data.prepared import PreparedData
from userip.data.stats import format_stats, load_stats
from userip.data.text import behaviour_windows, recent_history, user_histories

__all__ = [
    "CTRExamples",
    "ConfigError",
    "DataConfig",
    "PreparedData",
    "behaviour_windows",
    "recent_history",
    "ctr_examples",
    "format_stats",
    "load_prepared",
    "load_stats",
    "prepare",
    "user_histories",
]
