"""Load test of `userip serve`: the real server process on a free 127.0.0.1 port, an open-loop asyncio client,
one summary line on stdout (progress on stderr), and bench/results/serve.json.

    python bench/serve.py                         # builds a synthetic ML-100K-sized run first (clean checkout)
    python bench/serve.py --run RUN               # RUN/bank.sqlite, RUN/ctr, RUN/data
    python bench/serve.py --bank B --ctr C [--data D] [--backbone din]
    python bench/serve.py --smoke                 # tiny synthetic run, 2 s of load: checks that it works

Requests are due on a fixed schedule (``--rate`` per second, for ``--duration`` seconds or ``--requests``),
taken in order by ``--concurrency`` keep-alive connections. Each is a POST /v1/score for a random user
(``--unknown-users`` of them unknown) and ``--items`` random items, or with probability ``--profile-share``
a GET of the user's profile. Reported: the response time from the scheduled moment (so a server that falls
behind cannot hide it: no coordinated omission; the target applies to its p99), the send -> response latency,
throughput, errors (any non-2xx or failed request), and the server's CPU time per request, which unlike the
latency tail does not depend on what else runs on the machine. ``--client raw`` (default) is a minimal
HTTP/1.1 client (~0.1 ms of CPU a request); ``--client httpx`` uses httpx.AsyncClient (~0.7 ms, taken from
the server on a 2-core machine). Only loopback is ever contacted, and the run stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, log, machine_info, out_path, temp_dir, verdict, write_result  # noqa: E402

NAME = "serve"
HOST = "127.0.0.1"
TARGET_P99_MS = 5.0


# ---------------------------------------------------------------------------------------------- synthetic run
def build_synthetic_run(out: Path, *, n_users: int = 943, n_items: int = 1682, per_user: int = 60, seed: int = 0,
                        backbones: str = "dcn") -> Path:
    """A small but ML-100K-shaped run dir: data/, bank.sqlite, ctr/ (one +ids model), explanations.json.

    Hidden user groups decide which item category a user likes; the profile IDs are those groups, so the
    model has something to learn from them.
    """
    import pandas as pd

    from userip.bank import import_parquet
    from userip.ctr import train_ctr
    from userip.data import prepare

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw"
    raw.mkdir(exist_ok=True)
    genres = ["Action", "Comedy", "Drama", "Sci-Fi", "Romance", "Horror", "Children's", "Thriller"]
    items = pd.DataFrame({
        "item_id": [str(i) for i in range(1, n_items + 1)],
        "title": [f"Movie {i}" for i in range(1, n_items + 1)],
        "genres": ["|".join(rng.choice(genres, size=1 + i % 3, replace=False)) for i in range(n_items)],
    })
    cat = rng.integers(1, 5, n_items + 1)
    hobby = rng.integers(1, 5, n_users + 1)
    background = rng.integers(1, 4, n_users + 1)
    rows = []
    for u in range(1, n_users + 1):
        t = 880_000_000 + u * 10_000
        for i in rng.integers(1, n_items + 1, int(rng.integers(per_user // 3, per_user * 2))):
            t += int(rng.integers(1, 86_400))
            like = 0.75 if cat[i] == hobby[u] else 0.3 + 0.1 * background[u]
            rows.append((str(u), str(int(i)), 5.0 if rng.random() < like else 2.0, t))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    users = pd.DataFrame({
        "user_id": [str(u) for u in range(1, n_users + 1)],
        "age": rng.integers(15, 70, n_users),
        "gender": rng.choice(["M", "F"], n_users),
        "occupation": rng.choice(["student", "engineer", "artist", "other"], n_users),
    })
    inter.to_csv(raw / "interactions.csv", index=False)
    items.to_csv(raw / "items.csv", index=False)
    users.to_csv(raw / "users.csv", index=False)
    (raw / "config.yaml").write_text("data:\n  bins: {age: [18, 25, 35, 45, 50, 56]}\n")
    data = prepare(out / "data", interactions=raw / "interactions.csv", items=raw / "items.csv",
                   users=raw / "users.csv", config=raw / "config.yaml")

    ids = pd.DataFrame({"user_id": [str(u) for u in range(1, n_users + 1)],
                        "hobby": hobby[1:].astype("int64"), "background": background[1:].astype("int64")})
    ids.to_parquet(raw / "profile_ids.parquet", index=False)
    meta = {"model": "synthetic", "template": "synthetic", "codebook_hash": None,
            "profiles": [{"name": "hobby", "size": 4}, {"name": "background", "size": 3}],
            "data_fingerprint": data.fingerprint}
    import_parquet(raw / "profile_ids.parquet", out / "bank.sqlite", meta=meta).close()
    train_ctr(out / "data", out / "bank.sqlite", backbones=backbones, seeds=1, variants="+ids",
              settings="with_user_id", out=out / "ctr", max_epochs=3, progress=False)
    expl = {"profiles": {name: {"codebook_size": k, "codes": [
        {"code": c, "tokens": [f"{name}{c}", "synthetic"], "phrase": f"a synthetic {name} {c}", "genres": [],
         "titles": []} for c in range(1, k + 1)]} for name, k in (("hobby", 4), ("background", 3))}}
    (out / "explanations.json").write_text(json.dumps(expl))
    return out


# ---------------------------------------------------------------------------------------------- server process
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(args_: list[str], port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "userip.cli", "serve", *args_, "--host", HOST, "--port", str(port)]
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://{HOST}:{port}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not ready after {timeout:.0f}s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------- load
class RawConnection:
    """A minimal keep-alive HTTP/1.1 client connection (loopback only): a few microseconds of client CPU per
    request, where httpx spends ~0.7 ms, which on a 2-core box would be taken from the server under test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
            if "content-length" not in headers:
                raise ConnectionError(f"response without Content-Length: {lines[0]}")
            data = await self.reader.readexactly(int(headers["content-length"]))
            if headers.get("connection", "").lower() == "close":
                await self.close()
        except BaseException:
            await self.close()
            raise
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


class HttpxConnection:
    def __init__(self, client) -> None:
        self.client = client

    async def request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        headers = {"content-type": "application/json"} if body is not None else None
        r = await self.client.request(method, path, content=body, headers=headers)
        return r.status_code, await r.aread()

    async def close(self) -> None:
        pass


def make_plan(n: int, users: list[str], items: list[str], args) -> list[tuple[str, str, bytes | None]]:
    """Every request encoded up front, so client-side JSON encoding is not on the clock."""
    rng = random.Random(args.seed)
    plan = []
    for k in range(n):
        user = f"unknown-{k}" if rng.random() < args.unknown_users else rng.choice(users)
        if rng.random() < args.profile_share:
            plan.append(("GET", f"/v1/users/{user}/profile", None))
        else:
            body = {"user_id": user, "item_ids": rng.sample(items, args.items)}
            plan.append(("POST", "/v1/score", json.dumps(body).encode()))
    return plan


def _cpu_s(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


async def load(port: int, users: list[str], items: list[str], args, server_pid: int) -> dict:
    """Open loop: request k is due at t0 + k / rate; ``--concurrency`` connections take due requests in order.

    ``latency`` = send -> full response; ``response_time`` = scheduled time -> full response (includes any
    wait for a free connection, so a server that falls behind cannot hide it: no coordinated omission).
    """
    n = min(args.requests, int(args.rate * args.duration)) if args.requests else int(args.rate * args.duration)
    plan = make_plan(n + args.warmup, users, items, args)
    httpx_client = None
    if args.client == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        httpx_client = httpx.AsyncClient(base_url=f"http://{HOST}:{port}", limits=limits, timeout=10.0)
        conns = [HttpxConnection(httpx_client) for _ in range(args.concurrency)]
    else:
        conns = [RawConnection(port) for _ in range(args.concurrency)]
    lat = np.full(n, np.nan)
    resp = np.full(n, np.nan)
    status = np.zeros(n, dtype=np.int64)
    errors: list[str] = []
    queue: asyncio.Queue = asyncio.Queue()

    async def worker(conn) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            k, due = item
            method, path, body = plan[args.warmup + k]
            t = time.perf_counter()
            try:
                code, data = await asyncio.wait_for(conn.request(method, path, body), timeout=10.0)
            except (OSError, asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError) as e:
                code, data = -1, repr(e).encode()
            end = time.perf_counter()
            lat[k], resp[k], status[k] = end - t, end - due, code
            if not 200 <= code < 300 and len(errors) < 20:
                errors.append(f"{method} {path}: {code} {data[:200]!r}")

    try:
        for k in range(args.warmup):  # open the connections and warm the code paths; not recorded
            await conns[k % len(conns)].request(*plan[k])
        workers = [asyncio.create_task(worker(c)) for c in conns]
        server, client = psutil.Process(server_pid), psutil.Process()
        cpu0, load0 = (_cpu_s(server), _cpu_s(client)), os.getloadavg()[0]
        t0 = time.perf_counter()
        for k in range(n):
            due = t0 + k / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait((k, due))
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
        wall = time.perf_counter() - t0
        cpu1, load1 = (_cpu_s(server), _cpu_s(client)), os.getloadavg()[0]
    finally:
        for c in conns:
            await c.close()
        if httpx_client is not None:
            await httpx_client.aclose()

    def pct(a: np.ndarray) -> dict:
        ms = a * 1e3
        out = {f"p{q:g}": round(float(np.nanpercentile(ms, q)), 3) for q in (50, 90, 99, 99.9)}
        return {**out, "mean": round(float(np.nanmean(ms)), 3), "max": round(float(np.nanmax(ms)), 3)}

    ok = (status >= 200) & (status < 300)
    return {
        "requests": n,
        "wall_s": round(wall, 3),
        "throughput_rps": round(n / wall, 1),
        "latency_ms": pct(lat),
        "response_time_ms": pct(resp),
        "errors": int((~ok).sum()),
        "error_examples": errors[:5],
        # CPU time per request does not depend on what else runs on the machine; latency tails do.
        "server_cpu_ms_per_request": round((cpu1[0] - cpu0[0]) / n * 1e3, 3),
        "client_cpu_ms_per_request": round((cpu1[1] - cpu0[1]) / n * 1e3, 3),
        "load_avg_1m": {"start": round(load0, 2), "end": round(load1, 2)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="Run dir with bank.sqlite, ctr/ and data/.")
    p.add_argument("--bank")
    p.add_argument("--ctr", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--backbone")
    p.add_argument("--synthetic-backbones", default="dcn", help="Backbones trained for the synthetic run.")
    p.add_argument("--duration", type=float, default=30.0, help="Seconds of load (at most).")
    p.add_argument("--requests", type=int, default=0, help="Cap on measured requests (0: rate x duration).")
    p.add_argument("--rate", type=float, default=500.0, help="Requests per second sent.")
    p.add_argument("--concurrency", type=int, default=32, help="Most requests in flight.")
    p.add_argument("--items", type=int, default=50, help="Items per score request.")
    p.add_argument("--profile-share", type=float, default=0.1)
    p.add_argument("--unknown-users", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="raw: minimal asyncio HTTP/1.1 client (default, least client CPU); httpx: httpx.AsyncClient.")
    p.add_argument("--smoke", action="store_true", help="Tiny synthetic run, 2 s at 100 req/s: checks it works.")
    p.add_argument("--out", help=f"Result JSON (default {RESULTS / NAME}.json).")
    args = p.parse_args(argv)
    if args.smoke:
        args.duration, args.rate, args.warmup, args.items = min(args.duration, 2.0), min(args.rate, 100.0), 20, 10
    if args.duration <= 0 or args.rate <= 0 or args.duration > 600:
        p.error("--duration must be in (0, 600] and --rate > 0")

    from userip.data import load_prepared

    if args.run is not None:
        bank, ctr, data, source = str(args.run / "bank.sqlite"), args.run / "ctr", args.data, str(args.run)
    elif args.bank and args.ctr:
        bank, ctr, data, source = args.bank, args.ctr, args.data, f"{args.bank} + {args.ctr}"
    else:
        t = time.perf_counter()
        sizes = {"n_users": 60, "n_items": 120, "per_user": 20} if args.smoke else {}
        run = build_synthetic_run(temp_dir("serve") / "run", backbones=args.synthetic_backbones, seed=args.seed,
                                  **sizes)
        log(f"built a synthetic run in {time.perf_counter() - t:.1f}s: {run}")
        bank, ctr, data, source = str(run / "bank.sqlite"), run / "ctr", None, "synthetic"
    server_args = ["--bank", bank, "--ctr", str(ctr)]
    if data is not None:
        server_args += ["--data", str(data)]
    if args.backbone:
        server_args += ["--backbone", args.backbone]

    log_path = temp_dir("serve-log") / "server.log"
    port = free_port()
    proc = start_server(server_args, port, log_path)
    try:
        t = time.perf_counter()
        wait_ready(proc, port, 180.0, log_path)
        startup = time.perf_counter() - t
        import httpx

        meta = httpx.get(f"http://{HOST}:{port}/v1/meta", timeout=5.0).json()
        prepared = load_prepared(meta["data"]["path"])
        users = [str(u) for u in prepared.users["user_id"]]
        items = [str(i) for i in prepared.items["item_id"]]
        args.items = min(args.items, len(items))
        log(f"server ready in {startup:.1f}s on port {port}: {meta['backbone']} ({meta['variant']}); "
            f"{args.rate:g} req/s for up to {args.duration:g}s")
        try:
            import uvloop

            res = uvloop.run(load(port, users, items, args, proc.pid))
        except ImportError:
            res = asyncio.run(load(port, users, items, args, proc.pid))
    finally:
        stop_server(proc)

    lm, rt = res["latency_ms"], res["response_time_ms"]
    met = rt["p99"] <= TARGET_P99_MS and res["errors"] == 0
    result = {
        "name": NAME,
        "source": source,
        "model": {"backbone": meta["backbone"], "variant": meta["variant"], "fields": meta["model"]["fields"]},
        "n_users": meta["n_users"],
        "n_items": meta["n_items"],
        "startup_s": round(startup, 2),
        "p50_ms": rt["p50"],
        "p99_ms": rt["p99"],
        **res,
        "targets": {"p99_ms": TARGET_P99_MS, "errors": 0, "met": met},
        "client": f"{args.client} asyncio client on the same machine (client and server share the cores)",
        "machine": machine_info("cpu"),
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
    }
    path = write_result(out_path(NAME, args.out), result)
    print(
        f"{NAME}: {meta['backbone']} ({source}) {res['requests']} requests in {res['wall_s']:.1f}s = "
        f"{res['throughput_rps']:.0f} req/s (sent at {args.rate:g}/s, {args.items} items/score), "
        f"p50 {rt['p50']:.2f} ms, p99 {rt['p99']:.2f} ms (target <= {TARGET_P99_MS:g}: {verdict(met)}), "
        f"max {rt['max']:.1f} ms [send->response p50 {lm['p50']:.2f} p99 {lm['p99']:.2f}], errors {res['errors']}, "
        f"server CPU {res['server_cpu_ms_per_request']:.2f} ms/req, load avg {res['load_avg_1m']['start']:g} on "
        f"{os.cpu_count()} cores | {path}",
        flush=True,
    )
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
