"""``codebooks.safetensors``: one ``codebook.<profile name>`` [K, D] fp32 tensor per profile.

The file is written byte-for-byte deterministically (tensors sorted by key, metadata sorted by key,
compact JSON header) so :func:`codebook_hash` identifies the codebooks: a later stage can record the hash
and detect profile IDs that came from a different codebook. ``safetensors.torch.save_file`` cannot be
used for that, because it serialises the metadata from a hash map whose order changes from run to run.
The layout is the standard safetensors format, so any safetensors reader loads it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from userip.errors import InputError
from userip.io import atomic_path

__all__ = ["KEY_PREFIX", "codebook_hash", "load_codebooks", "read_codebook_metadata", "save_codebooks"]

KEY_PREFIX = "codebook."


def _write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    blobs: list[bytes] = []
    offset = 0
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key].detach().to("cpu", torch.float32).numpy(), dtype="<f4")
        data = arr.tobytes()
        header[key] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)  # safetensors aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for data in blobs:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_codebooks(
    path: str | os.PathLike, codebooks: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write ``{profile name: [K, D] tensor}`` atomically; a crashed run never leaves a half-written file."""
    tensors: dict[str, Tensor] = {}
    for name, t in codebooks.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"codebook names must be non-empty strings, got {name!r}")
        if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[0] < 1:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"codebook {name!r} must be a [K, D] tensor with K >= 1, got {shape}")
        if not torch.isfinite(t).all():
            raise ValueError(f"codebook {name!r} contains NaN or Inf")
        tensors[KEY_PREFIX + name] = t
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"metadata must map str to str, got {k!r}: {v!r}")
    path = Path(path)
    with atomic_path(path) as tmp:
        _write_safetensors(tmp, tensors, meta)
    return path


def load_codebooks(path: str | os.PathLike) -> dict[str, Tensor]:
    """``{profile name: [K, D] fp32 tensor}`` from ``codebook.<name>`` keys; other keys are ignored so the
    file can grow extra entries without breaking older readers."""
    out: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if key.startswith(KEY_PREFIX):
                    out[key[len(KEY_PREFIX) :]] = f.get_tensor(key).to(torch.float32)
    except (SafetensorError, OSError) as e:
        if isinstance(e, FileNotFoundError) or not Path(path).exists():
            raise InputError(path, "codebook file not found") from e
        raise InputError(path, f"not a readable safetensors file ({e})") from e
    if not out:
        raise InputError(path, f"no '{KEY_PREFIX}<name>' tensors found")
    return out


def read_codebook_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored with the codebooks (empty dict if none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise InputError(path, f"not a readable safetensors file ({e})") from e


def codebook_hash(path: str | os.PathLike) -> str:
    """sha256 hex digest of the file bytes: stable across runs because the writer is deterministic."""
    from userip.io import sha256_file

    return sha256_file(path)
