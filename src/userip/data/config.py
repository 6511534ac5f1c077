"""`DataConfig`: every knob of the data stage in one validated dataclass, loadable from YAML.

Why one validated object: the same config decides labels, the split and the column mapping, and every later
stage reads it back from the DATA dir (``config.yaml``). A typo in a key or a fraction out of range must fail
at load time with a message naming the key, not silently fall back to a default halfway through a run.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from userip.errors import UseripError

KNOWN_DATASETS = ("ml-100k",)

# MovieLens-1M style age groups (<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+): 7 bins. Exact ages would make
# a sparse 61-value vocabulary of which many values have a handful of users.
ML100K_AGE_BINS = [18.0, 25.0, 35.0, 45.0, 50.0, 56.0]


class ConfigError(UseripError):
    """A config value is missing, misspelt or out of range."""


@dataclass
class InteractionColumns:
    """Column names in the user's interactions file. ``None`` = the column is absent."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    rating: str | None = "rating"  # optional when ``label`` is given
    label: str | None = None  # a given 0/1 label column (then ``label_threshold`` is not used)
    timestamp: str = "timestamp"
    text: str | None = None  # e.g. review text, kept as ``text``


@dataclass
class ItemColumns:
    item_id: str = "item_id"
    title: str = "title"
    genres: str | None = "genres"  # list column or a delimited string (``genre_sep``); used if present
    year: str | None = None  # appended to the title as "Title (1995)" unless the title already ends so
    text: str | None = None  # description / item text, kept as ``text``


@dataclass
class UserColumns:
    user_id: str = "user_id"
    features: list[str] | None = None  # side-feature columns to keep; None = every other column


@dataclass
class Columns:
    interactions: InteractionColumns = field(default_factory=InteractionColumns)
    items: ItemColumns = field(default_factory=ItemColumns)
    users: UserColumns = field(default_factory=UserColumns)


@dataclass
class SplitConfig:
    """How interactions are split. Every stage uses the same split, so nothing leaks between them.

    ``per_user`` (default): per user in time order, the last ``test_frac`` (at least 1) -> test, the
    ``val_frac`` before it (at least 1 when the user has >= 3 interactions) -> val, the rest -> train.
    ``time``: one global cut; ``timestamp >= test_cut`` -> test, ``val_cut <= timestamp < test_cut`` -> val.
    A cut in (0, 1) is a quantile of all timestamps, otherwise an absolute timestamp.
    """

    mode: str = "per_user"
    val_frac: float = 0.1
    test_frac: float = 0.1
    val_cut: float | None = None
    test_cut: float | None = None


@dataclass
class DataConfig:
    """Everything the data stage needs besides the input files.

    ``label_threshold``: label = rating >= threshold (MovieLens convention: 4 and 5 stars are "liked"),
    unless ``columns.interactions.label`` names a given 0/1 column.
    ``side_features``: user columns turned into categorical CTR features (None = all kept user columns);
    ``bins``: numeric user columns bucketed by these edges (code = bucket + 1, 0 = unknown).
    ``interactions``/``items``/``users``: optional file paths (relative to the YAML file) so a config
    alone can describe a custom dataset; command-line paths win.
    """

    dataset: str | None = None
    label_threshold: float = 4.0
    columns: Columns = field(default_factory=Columns)
    genre_sep: str = "|"
    csv_sep: str | None = None  # None: "," for .csv, tab for .tsv/.inter/.item/.user
    timestamp_format: str = "unix"  # "unix" (numeric seconds) or "datetime" (ISO strings, parsed)
    split: SplitConfig = field(default_factory=SplitConfig)
    side_features: list[str] | None = None
    bins: dict[str, list[float]] = field(default_factory=dict)
    verify_checksums: bool = True  # ML-100K: refuse files whose sha256 differs from the known release
    interactions: str | None = None
    items: str | None = None
    users: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def preset(cls, dataset: str | None) -> DataConfig:
        """Defaults for a built-in dataset (ML-100K: age/gender/occupation side features, zip dropped)."""
        if dataset is None:
            return cls()
        if dataset == "ml-100k":
            return cls(
                dataset="ml-100k",
                side_features=["age", "gender", "occupation"],
                bins={"age": list(ML100K_AGE_BINS)},
            )
        raise ConfigError(f"unknown dataset '{dataset}'; known: {', '.join(KNOWN_DATASETS)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, *, base: DataConfig | None = None) -> DataConfig:
        """Apply ``d`` on top of ``base`` (default: the preset of ``d['dataset']``). Unknown keys are errors.

        A whole-pipeline YAML with a top-level ``data:`` section is accepted too (only that section is read).
        """
        d = dict(d or {})
        if "data" in d and isinstance(d["data"], dict):
            d = dict(d["data"])
        if base is None:
            base = cls.preset(d.get("dataset"))
        merged = _merge(dataclasses.asdict(base), d, cls, "")
        return _build(cls, merged, "data")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, *, base: DataConfig | None = None) -> DataConfig:
        """Load from a YAML file; relative file paths in it are resolved against the file's folder."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
        try:
            cfg = cls.from_dict(raw, base=base)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        for key in ("interactions", "items", "users"):
            value = getattr(cfg, key)
            if value is not None and not Path(value).is_absolute():
                setattr(cfg, key, str(path.parent / value))
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `ConfigError` naming the key for any out-of-range value."""
        if self.dataset is not None and self.dataset not in KNOWN_DATASETS:
            raise ConfigError(
                f"dataset: unknown dataset '{self.dataset}'; known: {', '.join(KNOWN_DATASETS)}"
            )
        if not _is_number(self.label_threshold):
            raise ConfigError(f"label_threshold: expected a number, got {self.label_threshold!r}")
        s = self.split
        if s.mode not in ("per_user", "time"):
            raise ConfigError(f"split.mode: expected 'per_user' or 'time', got {s.mode!r}")
        for name in ("val_frac", "test_frac"):
            v = getattr(s, name)
            if not _is_number(v) or not 0.0 <= v < 1.0:
                raise ConfigError(f"split.{name}: expected a fraction in [0, 1), got {v!r}")
        if s.val_frac + s.test_frac >= 1.0:
            raise ConfigError(
                f"split: val_frac + test_frac must be < 1 (got {s.val_frac} + {s.test_frac}): "
                "nothing would be left to train on"
            )
        for name in ("val_cut", "test_cut"):
            v = getattr(s, name)
            if v is not None and (not _is_number(v) or v <= 0):
                raise ConfigError(
                    f"split.{name}: expected a quantile in (0, 1) or a timestamp >= 1, got {v!r}"
                )
        if s.mode == "time":
            if s.test_cut is None:
                raise ConfigError("split.test_cut: required when split.mode is 'time'")
            if s.val_cut is not None and (s.val_cut < 1) != (s.test_cut < 1):
                raise ConfigError("split: val_cut and test_cut must both be quantiles or both be timestamps")
            if s.val_cut is not None and s.val_cut > s.test_cut:
                raise ConfigError(f"split: val_cut ({s.val_cut}) must be <= test_cut ({s.test_cut})")
        if not isinstance(self.genre_sep, str) or not self.genre_sep:
            raise ConfigError(f"genre_sep: expected a non-empty string, got {self.genre_sep!r}")
        if self.csv_sep is not None and (not isinstance(self.csv_sep, str) or not self.csv_sep):
            raise ConfigError(f"csv_sep: expected a non-empty string or null, got {self.csv_sep!r}")
        if self.timestamp_format not in ("unix", "datetime"):
            raise ConfigError(
                f"timestamp_format: expected 'unix' or 'datetime', got {self.timestamp_format!r}"
            )
        if self.side_features is not None and (
            not isinstance(self.side_features, list)
            or not all(isinstance(x, str) for x in self.side_features)
        ):
            raise ConfigError(f"side_features: expected a list of column names, got {self.side_features!r}")
        if not isinstance(self.bins, dict):
            raise ConfigError(f"bins: expected a mapping column -> list of edges, got {self.bins!r}")
        for col, edges in self.bins.items():
            if (
                not isinstance(edges, list)
                or not edges
                or not all(_is_number(e) for e in edges)
                or any(b <= a for a, b in zip(edges[:-1], edges[1:], strict=True))
            ):
                raise ConfigError(
                    f"bins.{col}: expected a non-empty increasing list of numbers, got {edges!r}"
                )
        ic = self.columns.interactions
        if ic.rating is None and ic.label is None:
            raise ConfigError("columns.interactions: need a 'rating' or a 'label' column (both are null)")
        for section, obj in (
            ("interactions", ic),
            ("items", self.columns.items),
            ("users", self.columns.users),
        ):
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if f.name == "features":
                    if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)):
                        raise ConfigError(
                            f"columns.users.features: expected a list of column names, got {v!r}"
                        )
                elif v is not None and (not isinstance(v, str) or not v):
                    raise ConfigError(f"columns.{section}.{f.name}: expected a column name, got {v!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _merge(base: dict[str, Any], d: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    """Recursively overlay ``d`` on ``base``; unknown keys raise a `ConfigError` listing the allowed ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = dict(base)
    for key, value in d.items():
        name = f"{where}.{key}" if where else key
        if cls is DataConfig and key == "windows":
            raise ConfigError("data.windows was removed (it was never read): behaviour text is set in the profile "
                              "section (profile.behaviour, profile.title_year, profile.max_items, profile.max_tokens)")
        if cls is DataConfig and key == "history_len":
            raise ConfigError("data.history_len was removed (it was never read): the CTR history length is "
                              "ctr.history_len")
        if key not in fields:
            raise ConfigError(f"unknown config key '{name}'; allowed here: {', '.join(fields)}")
        sub = _nested_type(cls, key)
        if sub is not None:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
            out[key] = _merge(base[key], value, sub, name)
        else:
            out[key] = value
    return out


_NESTED: dict[tuple[type, str], type] = {}


def _nested_type(cls: type, key: str) -> type | None:
    return _NESTED.get((cls, key))


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        sub = _nested_type(cls, f.name)
        kwargs[f.name] = _build(sub, d[f.name], f.name) if sub is not None else d[f.name]
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - keys are checked in _merge
        raise ConfigError(f"{where}: {e}") from None


_NESTED.update(
    {
        (DataConfig, "columns"): Columns,
        (DataConfig, "split"): SplitConfig,
        (Columns, "interactions"): InteractionColumns,
        (Columns, "items"): ItemColumns,
        (Columns, "users"): UserColumns,
    }
)
