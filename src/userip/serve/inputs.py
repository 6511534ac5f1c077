"""A served model's input tensors, gathered from the same feature tables training used
(``userip.data.ctr.feature_tables``), field by field as the model declares them:

- ``user`` / ``item``: dense indices from the data's id maps (0 = unknown);
- ``genres``: the item's genre codes; ``side:<name>``: the user's side-feature code;
- ``history``: the user's ``history_len`` most recent items, most recent last (``latest_history``). Training
  used every event before the one scored (any split); at serving time that is the user's whole logged
  history, or only its train split (``history_split="train"``);
- ``profile:<name>``: the bank ID (0 = unknown user).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from userip.errors import UseripError

_BUILT = ("user", "item", "genres", "history", "side:<name>", "profile:<name>")


class ModelInputs:
    """``inputs(users, profile_ids, items)`` -> the model's input dict, for rows of (user_idx, bank IDs
    [n, m] in ``profile_fields`` order, item_idx).

    Checks at load time that every field can be built and has the embedding rows the data needs (a model
    trained on other data fails here, not with a wrong score).
    """

    def __init__(self, model: Any, model_path: Path, data: Any, data_dir: Path, *, history_len: int,
                 history_split: str | None) -> None:
        from userip.data.ctr import feature_tables, latest_history

        self.tables = feature_tables(data)
        self.history = latest_history(data, history_len, split=history_split)
        vocab = self.tables.vocab
        extra = getattr(model, "ctr_extra", {})
        sizes = dict(zip(extra.get("profile_fields") or [], extra.get("id_sizes") or [], strict=False))
        self.fields: list[str] = []
        self.profile_fields: list[tuple[str, str, int]] = []  # (field, profile name, codebook size)
        for f in model.ctr_spec.fields:
            name = f.name
            if name in ("user", "item"):
                want = vocab[name]
            elif name == "genres":
                want = vocab["genre"]
            elif name == "history":
                want = None  # shares the item table
            elif name.startswith("side:") and name[len("side:") :] in self.tables.side:
                want = vocab[name[len("side:") :]]
            elif name.startswith("profile:"):
                size = int(sizes.get(name, f.vocab - 1))
                want = size + 1
                self.profile_fields.append((name, name[len("profile:") :], size))
            else:
                raise UseripError(
                    f"{model_path}: field '{name}' cannot be built at serving time (serving builds "
                    f"{', '.join(_BUILT)} fields)"
                )
            if want is not None and f.kind != "sequence" and f.vocab != want:
                raise UseripError(
                    f"{model_path}: field '{name}' has {f.vocab} embedding rows, but {data_dir} needs "
                    f"{want}: the model was trained on other data"
                )
            self.fields.append(name)

    def __call__(self, users: np.ndarray, profile_ids: np.ndarray, items: np.ndarray) -> dict[str, torch.Tensor]:
        users = np.ascontiguousarray(users, dtype=np.int64)
        items = np.ascontiguousarray(items, dtype=np.int64)
        genres, side = self.tables.rows(users, items)
        cols = {"user": users, "item": items, "genres": genres, "history": self.history[users]}
        cols.update({f"side:{k}": v for k, v in side.items()})
        cols.update({f: profile_ids[:, j] for j, (f, _, _) in enumerate(self.profile_fields)})
        return {name: torch.from_numpy(np.ascontiguousarray(cols[name], dtype=np.int64)) for name in self.fields}
