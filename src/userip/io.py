"""Atomic file and directory writes, and ownership of output directories.

A reader (or a killed run) never sees a half-written file. Output directories carry a marker
(``.userip.json``: kind, complete, format_version) written when a command starts and marked complete when it
ends. The rule it enforces: **userip never deletes a file it did not write**. A non-empty directory without
the marker (or with another kind's) is refused; a finished output of the same kind is replaced only with
``overwrite=True`` (CLI ``--overwrite``), and then only the files that kind writes are removed; an unfinished
one is resumed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from userip.errors import UseripError

MARKER = ".userip.json"
OUTPUT_FORMAT_VERSION = 1

# What each kind of output directory holds: the only paths userip removes when it replaces one (fnmatch
# patterns relative to the directory; a leftover ``.NAME.*.tmp`` of an atomic write counts as NAME's).
OUTPUT_FILES: dict[str, tuple[str, ...]] = {
    "data": ("interactions.parquet", "items.parquet", "users.parquet", "id_maps.json", "split.json",
             "stats.json", "config.yaml"),
    "profiles": ("profiles.safetensors", "codebooks.safetensors", "profile_ids.parquet", "config.yaml",
                 "metrics.json", "explanations.json", "checkpoints/epoch*.safetensors", "checkpoints/last.json"),
    "baseline": ("profile_ids.parquet", "profiles.safetensors", "codebooks.safetensors", "config.yaml",
                 "meta.json", "texts.parquet"),
    "ctr": ("results.json", "results.md", "predictions.npz", "models/*.safetensors", "models/*.json"),
    # `userip export fuxictr`: FuxiCTR's own outputs beside them (fuxictr_data/, checkpoints/) are never removed
    "fuxictr": ("train.csv", "valid.csv", "test.csv", "dataset_config.yaml", "model_config.yaml", "export.json"),
    "run": ("run.json", "config.yaml", "bank.sqlite", "explanations.json", "probe.json", "probe.md",
            "report.md", "report.html", "plots/*.png", "baselines/cache/text_profiles.parquet",
            ".bank.sqlite.*.building", ".bank.sqlite.*.building-journal"),
}
# Sub-directories that are outputs of their own (with their own marker), by parent kind: path -> kind.
OUTPUT_NESTED: dict[str, dict[str, str]] = {
    "run": {"data": "data", "profiles": "profiles", "ctr": "ctr", "baselines/content-kmeans": "baseline",
            "baselines/text-profile": "baseline", "baselines/history": "baseline"},
}
# Kinds whose commands continue a finished output instead of replacing it (stages skipped by key).
INCREMENTAL = frozenset({"run"})
# Kinds whose commands resume an unmarked directory (written before markers existed) holding this file;
# resuming removes nothing, and files userip did not write stay where they are.
RESUMABLE = {"run": "run.json", "profiles": "checkpoints/last.json"}


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable read is a set-and-restore
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode a plain ``open()`` would give a new file (0666 less the umask)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode a plain ``mkdir`` would give a new directory (0777 less the umask)."""
    return 0o777 & ~current_umask()


# tempfile makes 0600 files and 0700 directories (private by design); an output renamed from one would keep
# that mode, so other users or a server process sharing the group could not read it. Outputs get the mode
# the user's umask asks for, as if written in place.
def _mkstemp_path(target: Path, suffix: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    return Path(tmp)


def _mkdtemp_path(target: Path, suffix: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent))
    os.chmod(tmp, dir_mode())
    return tmp


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``target``; on success rename it over ``target`` (same filesystem).

    The result has the mode of a file written in place under the umask, whatever the writer did.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _mkstemp_path(target, ".tmp")
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp directory; on success it replaces ``target`` (for userip's own caches).

    An existing ``target`` is replaced only when everything in it is something this write produces too (or
    its marker says userip wrote it); otherwise it is refused with a `UseripError` and left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdtemp_path(target, ".tmp")
    try:
        yield tmp
        if target.exists() or target.is_symlink():
            if not target.is_dir() or target.is_symlink():
                raise UseripError(f"{target}: exists and is not a directory; refusing to replace it")
            marker = read_marker(target)
            owns = tuple(marker.get("owns", ())) if marker else tuple(
                p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()
            )
            _, unknown = _classify(target, owns, {})
            if unknown:
                raise UseripError(_not_ours(target, "this", unknown))
            # a unique name: never remove a `.NAME.old` someone else left there
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "d")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- output dirs
def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``.userip.json`` marker of an output directory, or None when there is none."""
    f = Path(path) / MARKER
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UseripError(f"{f}: unreadable userip output marker ({e}); remove it only if you know the "
                          "directory's contents") from None
    if not isinstance(m, dict) or not isinstance(m.get("kind"), str):
        raise UseripError(f"{f}: not a userip output marker (expected a JSON object with 'kind')")
    return m


def _temp_name(pattern: str) -> str:
    head, _, name = pattern.rpartition("/")
    return f"{head}/.{name}.*.tmp" if head else f".{name}.*.tmp"


def _classify(root: Path, owns: Sequence[str], nested: Mapping[str, str]) -> tuple[list[Path], list[Path]]:
    """(files userip wrote, other entries) under ``root``; the top-level marker is in neither list.

    A nested output (``nested``: relative path -> kind) is judged by its own marker, or by its kind's files.
    """
    pats = [*owns, *(_temp_name(p) for p in owns)]
    owned_dirs = {p.rsplit("/", 1)[0] for p in owns if "/" in p}
    owned_dirs |= {"/".join(d.split("/")[:i]) for d in [*owned_dirs, *nested] for i in range(1, d.count("/") + 1)}
    owned: list[Path] = []
    unknown: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        rel_d = d.relative_to(root).as_posix()
        prefix = "" if rel_d == "." else rel_d + "/"
        for dn in list(dirnames):
            rel, sub = prefix + dn, d / dn
            if rel in nested and not sub.is_symlink():
                dirnames.remove(dn)
                kind = nested[rel]
                m = read_marker(sub)
                sub_owns = tuple(m.get("owns", ())) if m and m.get("kind") == kind else OUTPUT_FILES[kind]
                o, u = _classify(sub, sub_owns, OUTPUT_NESTED.get(kind, {}))
                owned += o + ([sub / MARKER] if m else [])
                unknown += u
            elif sub.is_symlink() or (rel not in owned_dirs and not any(p.startswith(rel + "/") for p in pats)):
                dirnames.remove(dn)  # not a folder userip writes: everything in it is someone else's
                unknown.append(sub)
        for fn in filenames:
            rel = prefix + fn
            if rel == MARKER:
                continue
            (owned if any(fnmatch.fnmatchcase(rel, p) for p in pats) else unknown).append(d / fn)
    return owned, unknown


def _not_ours(path: Path, kind: str, unknown: Sequence[Path]) -> str:
    names = sorted(p.relative_to(path).as_posix() for p in unknown)
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return (f"refusing to write {kind} output into {path}: it holds files userip did not write ({shown}). "
            "userip never deletes or overwrites files it did not write: choose a new or empty directory")


def check_output_dir(path: str | os.PathLike, kind: str, *, overwrite: bool = False) -> str:
    """Whether ``kind`` output may be written to ``path``, without touching it; raises `UseripError` if not.

    Returns "new" (missing or empty), "replace" (an output of this kind and ``overwrite=True``), or "resume"
    (an unfinished output of this kind, or a finished one of an incremental kind such as a run).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return "new"
    if not path.is_dir():
        raise UseripError(f"{path}: exists and is not a directory; {kind} output needs a directory (--out)")
    m = read_marker(path)
    if m is None:
        if not any(path.iterdir()):
            return "new"
        if kind in RESUMABLE and (path / RESUMABLE[kind]).is_file():
            return "resume"  # written before markers existed; continuing it deletes nothing
        owned, unknown = _classify(path, OUTPUT_FILES[kind], OUTPUT_NESTED.get(kind, {}))
        if unknown:
            raise UseripError(_not_ours(path, kind, unknown))
        # only files this kind writes, from before markers existed: treat as this kind's finished output
        m = {"kind": kind, "complete": True}
    if m["kind"] != kind:
        raise UseripError(f"refusing to write {kind} output into {path}: it holds a userip {m['kind']} "
                          "output; choose another directory")
    version = m.get("format_version", 1)  # markers from before format_version existed are version 1
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= OUTPUT_FORMAT_VERSION:
        raise UseripError(f"{path}: {kind} output of format_version {version!r}, which this userip cannot read "
                          f"(it reads 1..{OUTPUT_FORMAT_VERSION}); upgrade userip or choose another directory")
    if overwrite:
        return "replace"
    if not m.get("complete"):
        return "resume"
    if kind in INCREMENTAL:
        return "resume"
    raise UseripError(f"{path} already holds a finished {kind} output; pass --overwrite (overwrite=True) to "
                      "replace it (only the files userip wrote there are removed)")


@dataclass
class OutputDir:
    """A claimed output directory: ``state`` is what `check_output_dir` found ("new", "resume", "replace")."""

    path: Path
    kind: str
    state: str

    def complete(self, **info: Any) -> None:
        """Mark the output finished (the last write of the command)."""
        m = read_marker(self.path) or {}
        owned, _ = _classify(self.path, m.get("owns", OUTPUT_FILES[self.kind]), OUTPUT_NESTED.get(self.kind, {}))
        m.update(complete=True, completed=_now(), files=sorted(p.relative_to(self.path).as_posix() for p in owned),
                 **info)
        write_json(self.path / MARKER, m)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def claim_output_dir(path: str | os.PathLike, kind: str, *, overwrite: bool = False,
                     clear: bool = True) -> OutputDir:
    """Check ``path`` (see `check_output_dir`), then mark it as an unfinished ``kind`` output.

    Replacing an output (``overwrite=True``) removes the files that kind writes first, unless
    ``clear=False`` (the command rewrites them itself, e.g. to continue from checkpoints); files userip
    did not write are never removed.
    """
    from userip import __version__

    path = Path(path)
    state = check_output_dir(path, kind, overwrite=overwrite)
    path.mkdir(parents=True, exist_ok=True)
    old = read_marker(path) or {}
    marker = {"kind": kind, "complete": False, "format_version": OUTPUT_FORMAT_VERSION,
              "userip_version": __version__, "created": old.get("created") or _now(), "started": _now(),
              "owns": list(OUTPUT_FILES[kind])}
    write_json(path / MARKER, marker)
    if state == "replace" and clear:
        remove_output_files(path, kind)
    return OutputDir(path, kind, state)


def remove_output_files(path: str | os.PathLike, kind: str) -> list[Path]:
    """Remove the files a ``kind`` output wrote under ``path`` (and folders left empty); keep all else."""
    path = Path(path)
    m = read_marker(path) or {}
    owned, _ = _classify(path, m.get("owns", OUTPUT_FILES[kind]), OUTPUT_NESTED.get(kind, {}))
    for f in owned:
        f.unlink(missing_ok=True)
    for dirpath, _, _ in sorted(os.walk(path), key=lambda t: -len(t[0])):
        if Path(dirpath) != path and not Path(dirpath).is_symlink():
            with contextlib.suppress(OSError):
                Path(dirpath).rmdir()  # only empty ones go
    return owned


def check_format(path: str | os.PathLike, what: str) -> dict[str, Any] | None:
    """The marker of an output about to be read, after checking this userip can read its ``format_version``.

    A directory without a marker, or a marker without ``format_version`` (written before either existed), is
    format 1 and loads as before. A newer (or malformed) version is a `UseripError` naming it, instead of a
    KeyError or a silent misreading somewhere inside.
    """
    from userip import __version__

    m = read_marker(path)
    if m is None:
        return None
    version = m.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= OUTPUT_FORMAT_VERSION:
        raise UseripError(
            f"{path}: this {m['kind']} output has format_version {version!r}, which userip {__version__} cannot "
            f"read as {what} (it reads format_version 1..{OUTPUT_FORMAT_VERSION}); it was written by a newer "
            "userip: upgrade userip, or rebuild it with this one")
    return m


def require_complete(path: str | os.PathLike, what: str) -> None:
    """Refuse to read an output whose command was interrupted (its marker says not complete), or whose
    format this userip cannot read (`check_format`)."""
    m = check_format(path, what)
    if m is not None and not m.get("complete"):
        raise UseripError(f"{path}: this {m['kind']} output is incomplete (the command writing it was "
                          f"interrupted or is still running); rerun it to finish before using it as {what}")


@contextlib.contextmanager
def output_dir(target: str | os.PathLike, kind: str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory; once the block succeeds its files are moved into ``target`` as a finished
    ``kind`` output. ``target`` is checked first and left untouched if the block fails.
    """
    target = Path(target)
    check_output_dir(target, kind, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdtemp_path(target, ".tmp")  # its sub-folders are moved into target: they keep its mode
    try:
        yield tmp
        out = claim_output_dir(target, kind, overwrite=overwrite)
        if out.state == "resume":  # an unfinished earlier write: its files are replaced below
            remove_output_files(target, kind)
        for entry in sorted(tmp.iterdir()):
            os.replace(entry, target / entry.name)
        out.complete()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks (checksums, codebook identity)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def read_yaml(path: str | os.PathLike) -> Any:
    return yaml.safe_load(Path(path).read_text())


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
