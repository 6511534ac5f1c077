"""One seed fixes every RNG the pipeline draws from: Python's ``random``, NumPy's global RNG and torch's.

Not Python's string hashing (the order of a set of strings): ``PYTHONHASHSEED`` is read once, when the
interpreter starts, so setting it here would change nothing in this process (an earlier version did, to no
effect). userip is written not to rely on it: string sets are used for membership, or sorted where order matters.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed ``random``, NumPy's global RNG (the seed mod 2^32) and torch's (every device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def torch_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``, for draws that must not touch the global RNG."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g
