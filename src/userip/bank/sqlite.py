"""SQLite feature bank (the default backend): one file, stdlib ``sqlite3``, no server to run.

Layout: ``profile_ids(user_id TEXT PRIMARY KEY, p_<name> INTEGER, ...) WITHOUT ROWID`` (the ids are the
clustered key, so a lookup is one B-tree descent) and ``meta(key TEXT PRIMARY KEY, value TEXT)`` holding the
bank meta and the profile-name -> column mapping as JSON.

Consistency model. A bank file is written once and never modified in place: ``build`` writes a new file next
to the target, fsyncs it and ``os.replace``-s it over the old one. Readers open the file with
``immutable=1`` (no locks, no ``-wal``/``-shm`` sidecars, no change checks): that is exact for a write-once
file, and it is what makes the rename safe. An open connection keeps the old inode, so a reader mid-query
sees the old bank whole; the next ``get`` notices (one ``os.stat``) that the path now names another file and
re-opens, so every call is answered from exactly one build, never a mix.

Why the finished file is not in WAL mode: WAL state lives in ``<path>-wal``/``<path>-shm`` files named after
the *path*, not the inode, so after a rename a new opener would attach to the old file's sidecars (SQLite's
"how to corrupt" guide warns against renaming open databases for this reason), and readers of a WAL file
need write access to the directory. WAL buys concurrent in-place writers, which this design never has.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from userip.bank.base import BankBase
from userip.bank.protocol import BANK_FORMAT_VERSION, write_parquet
from userip.errors import UseripError

__all__ = ["SQLiteBank"]

log = logging.getLogger(__name__)

_FORMAT = "userip.bank.sqlite"
#: Ids per ``json_each`` query; bounds the memory of one fetch, large batches still take few queries.
_JSON_CHUNK = 32768
#: Ids per ``IN (...)`` query in the fallback path (well under SQLite's old 999-parameter limit).
_IN_CHUNK = 512
_HAS_JSON: bool | None = None


def _json_supported(con: sqlite3.Connection) -> bool:
    """Whether this SQLite has ``json_each`` (built in since 3.38; an extension before)."""
    global _HAS_JSON
    if _HAS_JSON is None:
        try:
            con.execute("SELECT count(*) FROM json_each('[]')").fetchone()
            _HAS_JSON = True
        except sqlite3.OperationalError:
            _HAS_JSON = False
    return _HAS_JSON


def _column_names(names: Sequence[str]) -> list[str]:
    """Safe SQL column names for profile names (SQLite identifiers are case-insensitive, hence lower())."""
    cols: list[str] = []
    used: set[str] = set()
    for name in names:
        base = "p_" + re.sub(r"[^0-9a-z_]", "_", name.lower())
        col, k = base, 1
        while col in used:
            k += 1
            col = f"{base}_{k}"
        used.add(col)
        cols.append(col)
    return cols


def _file_ident(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - e.g. directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


@dataclass
class _Snapshot:
    """One opened bank file: everything a call needs, swapped as a unit on reload."""

    con: sqlite3.Connection
    ident: tuple[int, int, int, int]
    meta: dict[str, Any]
    names: list[str]
    columns: list[str]
    json_sql: str
    cols_sql: str


class SQLiteBank(BankBase):
    """Feature bank stored in one SQLite file; safe to share across threads (one connection + a lock).

    ``reload=True`` (default) makes a long-lived reader (a server) pick up rebuilds on its next ``get``;
    with ``reload=False`` the object serves the file it opened until it is closed or rebuilt through it.
    """

    backend = "sqlite"

    def __init__(self, path: str | os.PathLike, *, create: bool = False, reload: bool = True) -> None:
        self._path = Path(path)
        super().__init__(str(self._path), reload=reload)
        self._snap: _Snapshot | None = None
        self._bad_ident: tuple[int, int, int, int] | None = None
        if self._path.is_dir():
            raise UseripError(f"{self._path}: is a directory, expected a feature bank file")
        if self._path.exists():
            self._snap = self._open()
        elif not create:
            raise UseripError(f"{self._path}: no feature bank here; build one with `userip bank build`")

    # ------------------------------------------------------------------ opening
    def _open(self) -> _Snapshot:
        """Open the file now at ``path``. Stat first: if a rebuild lands in between, we reopen once more."""
        ident = _file_ident(self._path)
        uri = self._path.resolve().as_uri() + "?mode=ro&immutable=1"
        con = sqlite3.connect(uri, uri=True, check_same_thread=False, cached_statements=64)
        try:
            rows = dict(con.execute("SELECT key, value FROM meta").fetchall())
            fmt = json.loads(rows["format"])
            meta = json.loads(rows["meta"])
            mapping = json.loads(rows["columns"])
        except (sqlite3.DatabaseError, KeyError, ValueError, TypeError) as e:
            con.close()
            raise UseripError(f"{self._path}: not a userip feature bank ({type(e).__name__}: {e})") from None
        if fmt.get("name") != _FORMAT or int(fmt.get("version", 0)) > BANK_FORMAT_VERSION:
            con.close()
            raise UseripError(
                f"{self._path}: bank format {fmt} is not readable by this userip "
                f"(reads {_FORMAT} up to version {BANK_FORMAT_VERSION})"
            )
        names = [m["name"] for m in mapping]
        columns = [m["column"] for m in mapping]
        cols_sql = ", ".join(f'p."{c}"' for c in columns)
        json_sql = (
            f"SELECT j.key, {cols_sql} FROM json_each(?) AS j "
            f"CROSS JOIN profile_ids AS p ON p.user_id = j.value"
        )
        return _Snapshot(con, ident, meta, names, columns, json_sql, cols_sql)

    def _current(self) -> _Snapshot:
        """The snapshot to answer from; re-opens when the path was replaced by a rebuild. Call under lock."""
        snap = self._built()
        if self._reload:
            try:
                ident = _file_ident(self._path)
            except OSError:  # file removed: keep serving what we have
                return snap
            if ident != snap.ident and ident != self._bad_ident:
                try:
                    new = self._open()
                except (UseripError, OSError) as e:
                    # Serving the last good build beats failing every request; say so once per file.
                    self._bad_ident = ident
                    log.warning(
                        "feature bank %s was replaced by an unreadable file, keeping the old one: %s",
                        self._path,
                        e,
                    )
                    return snap
                self._snap = new
                snap.con.close()
                snap = new
        return snap

    def _live(self) -> _Snapshot:
        with self._lock:
            return self._current()

    def _release(self, snap: _Snapshot | None) -> None:
        if snap is not None:
            snap.con.close()

    # ------------------------------------------------------------------ protocol
    @property
    def path(self) -> Path:
        return self._path

    def get(self, user_ids: Sequence[str]) -> np.ndarray:
        """int64 ``[n, m]`` in input order; unknown (or None) ids give a row of zeros, never an error.

        One query per batch: ids go in as one JSON array and come back joined with their input position,
        so duplicates and ordering are handled by SQLite and the scatter into the output is vectorised.
        """
        ids = self._user_ids(user_ids)
        with self._lock:
            snap = self._current()
            out = np.zeros((len(ids), len(snap.names)), dtype=np.int64)
            if not ids:
                return out
            if _json_supported(snap.con):
                self._get_json(snap, ids, out)
            else:
                self._get_in(snap, ids, out)
        return out

    @staticmethod
    def _get_json(snap: _Snapshot, ids: list[str | None], out: np.ndarray) -> None:
        for start in range(0, len(ids), _JSON_CHUNK):
            chunk = ids[start : start + _JSON_CHUNK]
            rows = snap.con.execute(snap.json_sql, (json.dumps(chunk, ensure_ascii=False),)).fetchall()
            if rows:
                arr = np.array(rows, dtype=np.int64)
                out[arr[:, 0] + start] = arr[:, 1:]

    @staticmethod
    def _get_in(snap: _Snapshot, ids: list[str | None], out: np.ndarray) -> None:
        """Fallback without JSON1: ``IN (...)`` chunks padded to powers of two so statements stay cached."""
        uniq = [u for u in dict.fromkeys(ids) if u is not None]
        found: dict[str, tuple[int, ...]] = {}
        for start in range(0, len(uniq), _IN_CHUNK):
            chunk = uniq[start : start + _IN_CHUNK]
            k = 1 << (len(chunk) - 1).bit_length()
            params = chunk + [chunk[-1]] * (k - len(chunk))
            marks = ",".join("?" * k)
            sql = f"SELECT p.user_id, {snap.cols_sql} FROM profile_ids AS p WHERE p.user_id IN ({marks})"
            for row in snap.con.execute(sql, params):
                found[row[0]] = row[1:]
        if found:
            pos = [i for i, u in enumerate(ids) if u in found]
            if pos:
                out[pos] = np.array([found[ids[i]] for i in pos], dtype=np.int64)

    def to_frame(self) -> pd.DataFrame:
        with self._lock:
            return self._frame(self._current())

    @staticmethod
    def _frame(snap: _Snapshot) -> pd.DataFrame:
        rows = snap.con.execute(f"SELECT p.user_id, {snap.cols_sql} FROM profile_ids AS p ORDER BY p.user_id")
        rows = rows.fetchall()
        user_ids = pd.Series([r[0] for r in rows], dtype="str", name="user_id")
        values = np.array([r[1:] for r in rows], dtype=np.int64).reshape(len(rows), len(snap.names))
        frame = pd.DataFrame({"user_id": user_ids})
        for j, name in enumerate(snap.names):
            frame[name] = values[:, j]
        return frame

    def code_counts(self) -> dict[str, dict[int, int]]:
        with self._lock:
            snap = self._current()
            counts: dict[str, dict[int, int]] = {}
            for name, col in zip(snap.names, snap.columns, strict=True):
                q = f'SELECT "{col}", count(*) FROM profile_ids GROUP BY "{col}" ORDER BY "{col}"'
                counts[name] = {int(code): int(n) for code, n in snap.con.execute(q)}
            return counts

    def export_parquet(self, path: str | os.PathLike) -> None:
        with self._lock:
            snap = self._current()
            frame, meta = self._frame(snap), snap.meta
        write_parquet(frame, meta, path)

    def build(self, ids_table: pd.DataFrame, meta: dict[str, Any], *, source: object = "ids_table") -> None:
        """Validate, write a new file next to the bank, fsync, and atomically rename it over the bank."""
        names, final = self._start_build(ids_table, meta, source)
        columns = _column_names(names)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{self._path.name}.", suffix=".building", dir=self._path.parent
        )
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            self._write(tmp, ids_table.sort_values("user_id"), names, columns, final)
            _fsync_path(tmp)
            try:  # mkstemp makes 0600 files; other processes (servers) read banks, so keep the old mode
                mode = stat.S_IMODE(os.stat(self._path).st_mode)
            except OSError:  # a new bank: what the umask gives a new file
                from userip.io import file_mode

                mode = file_mode()
            os.chmod(tmp, mode)
            os.replace(tmp, self._path)
            _fsync_path(self._path.parent, directory=True)
        finally:
            for leftover in (tmp, Path(f"{tmp}-journal")):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
        with self._lock:
            old, self._snap = self._snap, self._open()
            if old is not None:
                old.con.close()

    @staticmethod
    def _write(
        tmp: Path, table: pd.DataFrame, names: list[str], columns: list[str], meta: dict[str, Any]
    ) -> None:
        con = sqlite3.connect(tmp)
        try:
            # No journal: a failed build just deletes the temp file; durability comes from fsync + rename.
            con.execute("PRAGMA journal_mode=OFF")
            con.execute("PRAGMA synchronous=OFF")
            col_defs = ", ".join(f'"{c}" INTEGER NOT NULL' for c in columns)
            con.execute(
                f"CREATE TABLE profile_ids(user_id TEXT PRIMARY KEY NOT NULL, {col_defs}) WITHOUT ROWID"
            )
            con.execute("CREATE TABLE meta(key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)")
            mapping = [{"name": n, "column": c} for n, c in zip(names, columns, strict=True)]
            con.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                [
                    ("format", json.dumps({"name": _FORMAT, "version": BANK_FORMAT_VERSION})),
                    ("meta", json.dumps(meta)),
                    ("columns", json.dumps(mapping)),
                ],
            )
            values = [table[n].to_numpy(dtype=np.int64).tolist() for n in names]
            rows = zip(table["user_id"].tolist(), *values, strict=True)
            con.executemany(f"INSERT INTO profile_ids VALUES (?{', ?' * len(columns)})", rows)
            con.commit()
        finally:
            con.close()
