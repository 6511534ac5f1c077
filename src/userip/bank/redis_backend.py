"""Redis feature bank: ``redis://host:port/db?name=bank``, for CTR servers that share one bank over the network.

Layout (``{name}`` is a literal Redis-Cluster hash tag, so every key of one bank lives in one slot)::

    userip:{name}:current      STRING  version number n of the live build (the pointer readers follow)
    userip:{name}:seq          STRING  INCR counter handing out version numbers
    userip:{name}:v<n>:meta    HASH    format, meta, names, code_counts (JSON each)
    userip:{name}:v<n>:ids     HASH    user_id (UTF-8) -> m little-endian int64 IDs packed in 8*m bytes

Consistency model. A build never touches a live version: it takes a fresh ``n`` from ``seq``, writes
``v<n>:*`` (with a TTL while it is pending, so a crashed build cleans up after itself), then in one
MULTI/EXEC removes the TTL and swaps ``current`` to ``n``, reading the old value in the same transaction, and
finally UNLINKs the old version's keys. A ``get`` is a single MULTI/EXEC too (one round trip): it reads
``current``, checks the version it decodes with still exists, and HMGETs from that version. Because the
transaction runs atomically on the server, one call is answered from exactly one build: if the pointer moved,
the reader loads the new version's meta and asks again (a bounded number of times).

Unlike a SQLite file, an old build does not survive its replacement (its keys are deleted), so a handle
opened with ``reload=False`` raises a clear error once its build is gone instead of serving it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from userip.bank.base import BankBase
from userip.bank.protocol import BANK_FORMAT_VERSION, write_parquet
from userip.bank.redis_url import parse_redis_url
from userip.errors import UseripError

__all__ = ["RedisBank"]

_FORMAT = "userip.bank.redis"
_ROW_DTYPE = "<i8"
#: Fields per HMGET; a batch larger than this is still one transaction, hence one round trip.
_HMGET_CHUNK = 8192
#: Users per HSET while building (one pipeline round trip each).
_WRITE_CHUNK = 10000
#: Entries asked per HSCAN call when reading the whole bank.
_SCAN_COUNT = 10000
#: A pending build's keys expire after this long without progress (a crashed build leaves nothing behind).
_PENDING_TTL_S = 3600
#: Retries when a rebuild lands between reading the pointer and reading the data.
_MAX_ATTEMPTS = 20


class _Keys:
    def __init__(self, name: str) -> None:
        self.base = f"userip:{{{name}}}"
        self.current = f"{self.base}:current"
        self.seq = f"{self.base}:seq"

    def meta(self, version: int) -> str:
        return f"{self.base}:v{version}:meta"

    def ids(self, version: int) -> str:
        return f"{self.base}:v{version}:ids"


@dataclass(frozen=True)
class _Snapshot:
    """One build's meta, swapped as a unit when the pointer moves."""

    version: int
    meta: dict[str, Any]
    names: list[str]
    code_counts: dict[str, dict[int, int]]


def _encode(uid: str) -> bytes:
    return uid.encode("utf-8", "surrogatepass")


class RedisBank(BankBase):
    """Feature bank in a Redis database; safe to share across threads (redis-py pools connections).

    ``reload=True`` (default) follows rebuilds: every call is answered from the build ``current`` names at
    that moment. ``reload=False`` keeps the build it opened, and raises once a rebuild has deleted it.
    """

    backend = "redis"

    def __init__(self, url: str, *, create: bool = False, reload: bool = True) -> None:
        self._loc = parse_redis_url(url)
        self._url = self._loc.url
        super().__init__(self._url, reload=reload)
        self._keys = _Keys(self._loc.name)
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis = redis
        self._client = redis.Redis(
            host=self._loc.host,
            port=self._loc.port,
            db=self._loc.db,
            username=self._loc.username,
            password=self._loc.password,
            socket_connect_timeout=self._loc.connect_timeout,
            socket_timeout=self._loc.timeout,
            # one immediate retry covers a pooled connection the server closed; no multi-second backoff
            retry=Retry(NoBackoff(), 1),
            decode_responses=False,
        )
        try:
            with self._errors("connecting"):
                self._client.ping()
            self._snap: _Snapshot | None = self._load_current()
            if self._snap is None and not create:
                raise UseripError(
                    f"{self._url}: no feature bank named '{self._loc.name}' in this Redis database; "
                    "build one with `userip bank build`"
                )
        except BaseException:
            self._client.close()
            raise

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Turn redis-py exceptions into a UseripError naming the URL."""
        r = self._redis
        try:
            yield
        except (r.ConnectionError, r.TimeoutError) as e:
            raise UseripError(
                f"{self._url}: cannot reach the Redis server while {doing} "
                f"({type(e).__name__}: {e}; connect timeout {self._loc.connect_timeout:g}s)"
            ) from None
        except r.ResponseError as e:
            if str(e).startswith("WRONGTYPE"):
                raise UseripError(
                    f"{self._url}: not a userip feature bank (key of another type under {self._keys.base})"
                ) from None
            raise UseripError(f"{self._url}: Redis error while {doing} ({e})") from None
        except r.RedisError as e:
            raise UseripError(f"{self._url}: Redis error while {doing} ({type(e).__name__}: {e})") from None

    def _parse_version(self, raw: bytes) -> int:
        if not raw.isdigit() or len(raw) > 18:
            raise UseripError(f"{self._url}: not a userip feature bank ({self._keys.current} = {raw[:40]!r})")
        return int(raw)

    def _load_version(self, version: int) -> _Snapshot | None:
        """The snapshot of build ``version``; None if its keys are gone (replaced meanwhile)."""
        with self._errors("reading the bank meta"):
            fields = self._client.hgetall(self._keys.meta(version))
        if not fields:
            return None
        try:
            fmt = json.loads(fields[b"format"])
            meta = json.loads(fields[b"meta"])
            names = json.loads(fields[b"names"])
            counts = json.loads(fields[b"code_counts"])
            code_counts = {name: {int(c): int(k) for c, k in counts[name]} for name in names}
        except (KeyError, ValueError, TypeError) as e:
            raise UseripError(
                f"{self._url}: not a userip feature bank ({self._keys.meta(version)}: {type(e).__name__}: {e})"
            ) from None
        if not isinstance(fmt, dict) or fmt.get("name") != _FORMAT or int(fmt.get("version", 0)) > BANK_FORMAT_VERSION:
            raise UseripError(
                f"{self._url}: bank format {fmt} is not readable by this userip "
                f"(reads {_FORMAT} up to version {BANK_FORMAT_VERSION})"
            )
        return _Snapshot(version, meta, list(names), code_counts)

    def _load_current(self) -> _Snapshot | None:
        """Follow ``current``; None when no bank was built under this name."""
        for _ in range(_MAX_ATTEMPTS):
            with self._errors("reading the bank pointer"):
                raw = self._client.get(self._keys.current)
            if raw is None:
                return None
            snap = self._load_version(self._parse_version(raw))
            if snap is not None:
                return snap
        raise UseripError(f"{self._url}: the bank was rebuilt {_MAX_ATTEMPTS} times while opening it; try again")

    def _adopt(self, version: int) -> _Snapshot | None:
        """Switch this handle to build ``version`` (the pointer moved); None if that build is gone too."""
        new = self._load_version(version)
        if new is not None:
            with self._lock:
                if not self._closed:
                    self._snap = new
        return new

    def _live(self) -> _Snapshot:
        """The snapshot to answer meta-level calls from; with reload, first follows the pointer."""
        snap = self._built()
        if not self._reload:
            return snap
        for _ in range(_MAX_ATTEMPTS):
            with self._errors("reading the bank pointer"):
                raw = self._client.get(self._keys.current)
            if raw is None or self._parse_version(raw) == snap.version:
                return snap
            new = self._adopt(self._parse_version(raw))
            if new is not None:
                return new
        raise UseripError(f"{self._url}: the bank was rebuilt {_MAX_ATTEMPTS} times during one call; try again")

    def _gone(self, snap: _Snapshot, current: int | None) -> UseripError:
        if self._reload and current is None:
            return UseripError(f"{self._url}: the feature bank was deleted from Redis")
        return UseripError(
            f"{self._url}: build v{snap.version} that this handle was opened on has been replaced and deleted; "
            "open the bank again (reload=True follows rebuilds)"
        )

    # ------------------------------------------------------------------ protocol
    def _release(self, snap: _Snapshot | None) -> None:
        self._client.close()

    @property
    def url(self) -> str:
        return self._url

    def code_counts(self) -> dict[str, dict[int, int]]:
        snap = self._live()
        return {name: dict(snap.code_counts[name]) for name in snap.names}

    def get(self, user_ids: Sequence[str]) -> np.ndarray:
        """int64 ``[n, m]`` in input order; unknown (or None) ids give a row of zeros, never an error.

        One MULTI/EXEC per call, so one network round trip however large the batch, and one build answers it.
        """
        ids = self._user_ids(user_ids)
        pos = None if None not in ids else np.array([i for i, u in enumerate(ids) if u is not None], dtype=np.int64)
        fields = [_encode(u) for u in ids if u is not None]
        snap = self._built()
        keys = self._keys
        for _ in range(_MAX_ATTEMPTS):
            with self._errors("reading user IDs"):
                pipe = self._client.pipeline(transaction=True)
                pipe.get(keys.current)
                pipe.exists(keys.meta(snap.version))
                ids_key = keys.ids(snap.version)
                for start in range(0, len(fields), _HMGET_CHUNK):
                    pipe.hmget(ids_key, fields[start : start + _HMGET_CHUNK])
                res = pipe.execute()
            current = None if res[0] is None else self._parse_version(res[0])
            if self._reload and current is not None and current != snap.version:
                snap = self._adopt(current) or snap
                continue
            if not res[1]:
                if self._closed:
                    raise UseripError(f"{self._url}: feature bank is closed")
                raise self._gone(snap, current)
            return self._decode(snap, len(ids), pos, res[2:])
        raise UseripError(f"{self._url}: the bank was rebuilt {_MAX_ATTEMPTS} times during one call; try again")

    def _decode(self, snap: _Snapshot, n: int, pos: np.ndarray | None, chunks: list[list[bytes | None]]) -> np.ndarray:
        m = len(snap.names)
        out = np.zeros((n, m), dtype=np.int64)
        values = [v for chunk in chunks for v in chunk]
        hit = [j for j, v in enumerate(values) if v is not None]
        if not hit:
            return out
        buf = b"".join([values[j] for j in hit])
        if len(buf) != 8 * m * len(hit):
            raise UseripError(f"{self._url}: corrupt entry in {self._keys.ids(snap.version)} (expected {8 * m} bytes)")
        rows = np.frombuffer(buf, dtype=_ROW_DTYPE).reshape(len(hit), m)
        idx = np.asarray(hit, dtype=np.int64)
        out[idx if pos is None else pos[idx]] = rows
        return out

    def to_frame(self) -> pd.DataFrame:
        return self._frame()[0]

    def _frame(self) -> tuple[pd.DataFrame, _Snapshot]:
        """The whole build (HSCAN, so Redis is never blocked on one huge reply), checked complete."""
        for _ in range(_MAX_ATTEMPTS):
            snap = self._live()
            n_users = int(snap.meta.get("n_users", 0))
            key = self._keys.ids(snap.version)
            entries: dict[bytes, bytes] = {}
            cursor = 0
            max_calls = 10 * (n_users // _SCAN_COUNT + 1) + 1000  # SCAN always terminates; this bounds it anyway
            with self._errors("reading the whole bank"):
                for _ in range(max_calls):
                    cursor, part = self._client.hscan(key, cursor, count=_SCAN_COUNT)
                    entries.update(part)  # SCAN may repeat entries; the dict drops repeats
                    if cursor == 0:
                        break
                else:
                    raise UseripError(f"{self._url}: HSCAN of {key} did not finish in {max_calls} calls")
                still_there = self._client.exists(self._keys.meta(snap.version))
            if still_there:
                if len(entries) != n_users:
                    raise UseripError(f"{self._url}: {key} holds {len(entries)} users, its meta says {n_users}")
                break
            if not self._reload:
                raise self._gone(snap, None)
        else:
            raise UseripError(f"{self._url}: the bank was rebuilt {_MAX_ATTEMPTS} times during one call; try again")
        m = len(snap.names)
        uids = sorted(entries)
        user_ids = [u.decode("utf-8", "surrogatepass") for u in uids]
        values = np.frombuffer(b"".join([entries[u] for u in uids]), dtype=_ROW_DTYPE).reshape(len(uids), m)
        # byte order of UTF-8 == code point order, so this matches SQLite's BINARY collation and Python's sort
        frame = pd.DataFrame({"user_id": pd.Series(user_ids, dtype="str", name="user_id")})
        for j, name in enumerate(snap.names):
            frame[name] = values[:, j].astype(np.int64)
        return frame, snap

    def export_parquet(self, path: str | os.PathLike) -> None:
        frame, snap = self._frame()
        write_parquet(frame, snap.meta, path)

    def build(self, ids_table: pd.DataFrame, meta: dict[str, Any], *, source: object = "ids_table") -> None:
        """Validate, write a new version beside the live one, switch the pointer atomically, drop the old."""
        names, final = self._start_build(ids_table, meta, source)
        values = np.ascontiguousarray(
            np.stack([ids_table[n].to_numpy(dtype=np.int64) for n in names], axis=1).astype(_ROW_DTYPE)
        )
        counts = {}
        for j, name in enumerate(names):
            codes, k = np.unique(values[:, j], return_counts=True)
            counts[name] = [[int(c), int(x)] for c, x in zip(codes, k, strict=True)]
        blob, width = values.tobytes(), 8 * len(names)
        uids = [_encode(u) for u in ids_table["user_id"].tolist()]
        keys = self._keys
        version: int | None = None
        switched = False
        try:
            with self._errors("building the bank"):
                version = int(self._client.incr(keys.seq))
                mk, ik = keys.meta(version), keys.ids(version)
                pipe = self._client.pipeline(transaction=False)
                pipe.hset(
                    mk,
                    mapping={
                        "format": json.dumps({"name": _FORMAT, "version": BANK_FORMAT_VERSION}),
                        "meta": json.dumps(final),
                        "names": json.dumps(names),
                        "code_counts": json.dumps(counts),
                    },
                )
                pipe.expire(mk, _PENDING_TTL_S)
                pipe.execute()
                for start in range(0, len(uids), _WRITE_CHUNK):
                    stop = min(start + _WRITE_CHUNK, len(uids))
                    rows = {uids[i]: blob[i * width : (i + 1) * width] for i in range(start, stop)}
                    pipe.hset(ik, mapping=rows)
                    pipe.expire(ik, _PENDING_TTL_S)
                    pipe.expire(mk, _PENDING_TTL_S)
                    pipe.execute()
                old = self._switch(version)
                switched = True
                if old is not None and old != version:
                    self._client.unlink(keys.meta(old), keys.ids(old))
        except BaseException:
            if version is not None and not switched:
                # Best effort (the pending TTL removes them anyway); never delete a build the pointer names.
                try:
                    if self._client.get(keys.current) != str(version).encode():
                        self._client.unlink(keys.meta(version), keys.ids(version))
                except self._redis.RedisError:
                    pass
            raise
        snap = self._load_version(version) or self._load_current()
        with self._lock:
            self._snap = snap

    def _switch(self, version: int) -> int | None:
        """Make ``version`` live in one MULTI/EXEC; returns the version it replaced."""
        keys = self._keys
        mk, ik = keys.meta(version), keys.ids(version)
        with self._client.pipeline(transaction=True) as pipe:
            pipe.watch(mk)  # the pending TTL must not have fired: never point readers at a missing build
            if not pipe.exists(mk):
                raise UseripError(f"{self._url}: pending build v{version} expired before it was switched in")
            pipe.multi()
            pipe.persist(mk)
            pipe.persist(ik)
            pipe.get(keys.current)
            pipe.set(keys.current, str(version))
            try:
                res = pipe.execute()
            except self._redis.WatchError:
                raise UseripError(f"{self._url}: pending build v{version} changed before it was switched in") from None
        old = res[2]
        return None if old is None or not old.isdigit() else int(old)
