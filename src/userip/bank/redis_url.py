"""Redis bank URLs: ``redis://[user:password@]host[:port][/db][?name=bank&connect_timeout=s&timeout=s]``.

redis-py's ``parse_url`` reads host, port, credentials and db; what is ours is the bank ``name`` (a key prefix,
so several banks share one database) and two timeouts. Every error names the URL, password masked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from userip.errors import UseripError

__all__ = ["RedisLocation", "parse_redis_url"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_DEFAULT_PORT = 6379
_DEFAULT_NAME = "default"
_DEFAULT_CONNECT_TIMEOUT = 1.0
_DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class RedisLocation:
    """A parsed bank URL: where to connect, and the bank's name there."""

    host: str
    port: int
    db: int
    name: str
    username: str | None = None
    password: str | None = None
    connect_timeout: float = _DEFAULT_CONNECT_TIMEOUT
    timeout: float = _DEFAULT_TIMEOUT

    @property
    def url(self) -> str:
        """The location as a URL, password masked (safe for logs and error messages)."""
        auth = ""
        if self.username or self.password:
            auth = quote(self.username or "", safe="") + (":***" if self.password else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{auth}{host}:{self.port}/{self.db}?name={self.name}"


#: The query parameters of a bank URL and their defaults (timeouts in seconds).
_PARAMS = {"name": _DEFAULT_NAME, "connect_timeout": _DEFAULT_CONNECT_TIMEOUT, "timeout": _DEFAULT_TIMEOUT}


def parse_redis_url(url: str) -> RedisLocation:
    """Parse a Redis bank URL. redis-py lets some mistakes through silently (a path ``/zero`` or ``/0/x`` is db
    0, a blank or repeated parameter is dropped, an unknown one becomes a connection argument), so the path
    and the query are checked here before it reads the rest."""
    from redis.connection import parse_url

    parts = urlsplit(url)
    shown = url.replace(f":{parts.password}@", ":***@", 1) if parts.password else url

    def bad(why: str) -> UseripError:
        return UseripError(f"bad Redis bank URL {shown!r}: {why}")

    if parts.scheme.lower() != "redis":
        raise bad("expected the redis:// scheme")
    path = parts.path.strip("/")
    if path and not (path.isdigit() and len(path) <= 5):
        raise bad("the path must be a database number, e.g. /0")
    if parts.fragment:
        raise bad(f"unexpected '#{parts.fragment}'")
    params: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in params:
            raise bad(f"'{key}' given twice")
        params[key] = value
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise bad(f"unknown parameter(s) {unknown}; known: {', '.join(_PARAMS)}")
    params = {**_PARAMS, **params}
    if not _NAME_RE.match(params["name"]):
        raise bad(f"bank name {params['name']!r} must be 1-128 of A-Z a-z 0-9 _ . -")
    for key in ("connect_timeout", "timeout"):
        value = params[key]
        try:
            params[key] = float(value)
        except ValueError:
            params[key] = float("nan")
        if not (0 < params[key] <= 3600):
            raise bad(f"{key} must be seconds in (0, 3600], got {value!r}")
    try:
        conn = parse_url(parts._replace(query="", fragment="").geturl())
    except ValueError:
        raise bad("port must be a number in 1..65535") from None
    return RedisLocation(
        host=conn.get("host", "localhost"),
        port=conn.get("port") or _DEFAULT_PORT,
        db=conn.get("db", 0),
        username=conn.get("username"),
        password=conn.get("password"),
        **params,
    )
