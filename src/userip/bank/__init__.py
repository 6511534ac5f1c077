"""Feature bank: user id -> one small int per profile, read online by the CTR model without an LLM call.

``protocol`` holds the backend-neutral contract and checks, ``api`` the entry points and URL dispatch,
``base`` what the backends share (lifecycle, ``get``'s argument, the start of ``build``), ``sqlite`` the
default backend (a file), ``redis_backend`` the shared one (``redis://host:port/db?name=bank``, parsed by
``redis_url``; imported only when such a URL is opened). Nothing here imports torch, so serving a bank stays light.
"""

from userip.bank.api import build_bank, delete_users, forget_users, import_parquet, open_bank, read_profiles_dir
from userip.bank.protocol import BANK_FORMAT_VERSION, FeatureBank, check_compatible

__all__ = [
    "BANK_FORMAT_VERSION",
    "FeatureBank",
    "build_bank",
    "check_compatible",
    "delete_users",
    "forget_users",
    "import_parquet",
    "open_bank",
    "read_profiles_dir",
]
