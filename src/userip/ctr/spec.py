"""Feature specification shared by every CTR backbone (FuxiCTR style).

A model sees a dict ``{field name: tensor}``:

- ``categorical``: int64 ``[B]`` codes ``1..vocab-1``, 0 = unknown;
- ``bag``: int64 ``[B, L]`` multi-hot codes, mean-pooled over the non-zero entries (0 = padding);
- ``sequence``: int64 ``[B, H]`` (e.g. the user's item history, 0-padded, most recent last); with
  ``share="item"`` it uses the embedding table of the ``item`` field (DIN attends over it with the candidate);
- ``dense``: float32 ``[B, dim]`` (e.g. ``theta``), mapped to ``embedding_dim`` by a linear layer.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from userip.errors import UseripError

KINDS = ("categorical", "bag", "sequence", "dense")


def module_key(name: str) -> str:
    """A field name made safe for ``nn.ModuleDict`` keys (no dots)."""
    return re.sub(r"\W", "_", name) or "_"


@dataclass(frozen=True)
class Field:
    name: str
    kind: str
    vocab: int = 0  # embedding table size including index 0 (categorical / bag / sequence without share)
    dim: int = 0  # input size of a dense field
    share: str | None = None  # sequence: the categorical field whose embedding it shares (the DIN target)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UseripError(f"field '{self.name}': kind '{self.kind}' is not one of {', '.join(KINDS)}")
        if self.kind == "dense":
            if self.dim < 1:
                raise UseripError(f"dense field '{self.name}' needs dim >= 1, got {self.dim}")
        elif self.share is None and self.vocab < 2:
            raise UseripError(f"field '{self.name}' needs a vocab size >= 2 (index 0 is padding), got {self.vocab}")
        if self.share is not None and self.kind != "sequence":
            raise UseripError(f"field '{self.name}': only sequence fields can share an embedding")


@dataclass
class FeatureSpec:
    fields: list[Field] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fields = [f if isinstance(f, Field) else Field(**f) for f in self.fields]
        if not self.fields:
            raise UseripError("a FeatureSpec needs at least one field")
        names = [f.name for f in self.fields]
        keys = [module_key(n) for n in names]
        if len(set(keys)) != len(keys):
            raise UseripError(f"duplicate field names in feature spec: {names}")
        by_name = {f.name: f for f in self.fields}
        for f in self.fields:
            if f.share is not None:
                target = by_name.get(f.share)
                if target is None or target.kind != "categorical":
                    raise UseripError(
                        f"sequence field '{f.name}' shares '{f.share}', not a categorical field of the spec"
                    )

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.fields)

    def vocab_of(self, f: Field) -> int:
        return self[f.share].vocab if f.share else f.vocab

    def check_inputs(self, inputs: dict) -> None:
        missing = [n for n in self.names if n not in inputs]
        if missing:
            raise UseripError(f"model inputs lack field(s) {missing}; the spec has {self.names}")

    def to_dict(self) -> dict:
        return {"fields": [asdict(f) for f in self.fields]}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        try:
            return cls([Field(**f) for f in d["fields"]])
        except (KeyError, TypeError) as e:
            raise UseripError(f"not a feature spec: {e}") from None
