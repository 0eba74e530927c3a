"""Listing benchmark: how long listing N objects takes, the old way (``fs.find``, one sequential listing) against
:func:`srbatch.io.storage.list_images` and :func:`srbatch.io.storage.list_files`, on a local S3 server and on a
local folder.

    python jobs/benchmark.py listing --objects 100000
    python jobs/benchmark.py listing --objects 20000 --per-folder 500 --storage s3 --concurrency 1 4 16 32 --json

N empty ``.png`` objects under ``in/`` in folders of ``--per-folder`` (``in/d00000/f0000000.png`` ...). S3: a moto
server in its own process on 127.0.0.1 (in the benchmark's process it would share one interpreter lock with the
client being measured, which no real deployment does), objects created by concurrent HTTP PUTs. Local: a temporary
folder. Every listing is checked: the same N paths as ``fs.find``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["build_parser", "main"]

BUCKET = "srbatch-listing"
PUT_THREADS = 4  # moto's server handles one request at a time in effect (one interpreter): more threads only queue


def build_parser(prog: str = "jobs/benchmark.py listing") -> argparse.ArgumentParser:
    """The listing benchmark's argument parser."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Measure the listing of N objects: fs.find (the old, sequential listing) against srbatch's "
        "list_images and list_files (a scandir walk locally, S3 prefixes listed in parallel), on a local S3 server "
        "(moto, in its own process) and on a local folder.",
        epilog="Exit codes: 0 done, 1 a listing did not return the objects made, 2 bad arguments or setup.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--objects", "-n", type=int, default=100_000, help="number of objects (N)")
    p.add_argument("--per-folder", type=int, default=1000, help="objects per folder")
    p.add_argument("--storage", choices=["both", "s3", "local"], default="both", help="where to list")
    p.add_argument("--concurrency", type=int, nargs="+", default=None,
                   help="S3 only: also list with these numbers of requests in flight (srbatch.io.listing.s3_walk, "
                   "on a client whose connection pool holds that many); list_images and list_files are measured "
                   "with the library's default in any case")  # fmt: skip
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="S3 only: also measure with this delay added before every list request (an asyncio sleep in "
                   "the client, the same for every method), to model a remote endpoint's round trip; loopback has "
                   "none. 0: no such rows")  # fmt: skip
    p.add_argument("--json", action="store_true", help="also print the results as one JSON object (last line)")
    return p


def main(argv: list[str] | None = None, *, prog: str = "jobs/benchmark.py listing") -> int:
    """Run the listing benchmark; returns the exit code (0 done, 1 a wrong listing, 2 bad arguments or setup)."""
    p = build_parser(prog)
    a = p.parse_args(argv)
    if a.objects < 1 or a.per_folder < 1:
        p.error("--objects and --per-folder must be at least 1")
    if a.latency_ms < 0:
        p.error("--latency-ms must be 0 or more")
    if a.concurrency and min(a.concurrency) < 1:
        p.error("--concurrency values must be at least 1")
    from srbatch.benchmark.report import machine_info

    load = os.getloadavg()
    machine = machine_info("cpu")
    keys = [f"in/d{i // a.per_folder:05d}/f{i:07d}.png" for i in range(a.objects)]
    rows: list[dict[str, Any]] = []
    setup: dict[str, float] = {}
    wrong: list[str] = []
    if a.storage in ("both", "s3"):
        try:
            server = _MotoProcess()
        except RuntimeError as e:
            print(f"benchmark listing: {e}", file=sys.stderr)
            return 2
        try:
            t = time.perf_counter()
            server.put_empty(keys)
            setup["s3_put_s"] = time.perf_counter() - t
            rows += _measure_s3(server.endpoint, a.objects, a.concurrency or [], 0.0, wrong)
            if a.latency_ms:
                rows += _measure_s3(server.endpoint, a.objects, a.concurrency or [], a.latency_ms / 1000, wrong)
        finally:
            server.close()
    if a.storage in ("both", "local"):
        tmp = tempfile.mkdtemp(prefix="srbatch-listing-")
        try:
            t = time.perf_counter()
            _make_local(tmp, keys)
            setup["local_make_s"] = time.perf_counter() - t
            rows += _measure_local(tmp, a.objects, wrong)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {"objects": a.objects, "per_folder": a.per_folder, "folders": -(-a.objects // a.per_folder),
              "load_avg_at_start": list(load), "machine": machine, "setup": setup, "rows": rows}  # fmt: skip
    print(_render(result))
    for w in wrong:
        print(f"benchmark listing: WRONG: {w}", file=sys.stderr)
    if a.json:
        print(json.dumps(result, default=str))
    return 1 if wrong else 0


# ---------------------------------------------------------------------------------------------------------- storage


class _MotoProcess:
    """moto's S3 server in a child process on 127.0.0.1, with a bucket."""

    def __init__(self) -> None:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise RuntimeError("the S3 listing needs moto's server: `pip install 'moto[server]'`, or --storage local")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        code = ("import logging, sys; logging.getLogger('werkzeug').setLevel(logging.ERROR); "
                "from moto.server import main; main(['-H', '127.0.0.1', '-p', sys.argv[1]])")  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"moto's S3 server did not start on port {self.port}") from None
                time.sleep(0.1)
        self._local = threading.local()
        self._put(f"/{BUCKET}")

    def _put(self, path: str) -> None:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        c.request("PUT", path, body=b"", headers={"Content-Length": "0"})
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"PUT {path}: HTTP {r.status} {body[:200]!r}")

    def put_empty(self, keys: list[str]) -> None:
        """Empty objects at ``keys``, by concurrent plain HTTP PUTs (moto does not check signatures)."""
        from urllib.parse import quote

        with ThreadPoolExecutor(PUT_THREADS) as ex:
            for _ in ex.map(lambda k: self._put(f"/{BUCKET}/{quote(k)}"), keys, chunksize=256):
                pass

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _make_local(root: str, keys: list[str]) -> None:
    made = set()
    for k in keys:
        folder = os.path.join(root, os.path.dirname(k))
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        with open(os.path.join(root, k), "wb"):
            pass


# ------------------------------------------------------------------------------------------------------ measurement


def _timed(fn: Any) -> tuple[Any, tuple[float, float]]:
    """``fn()``, and the wall seconds and this process's CPU seconds (all threads: the client's, not the S3
    server's) it took."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - t, time.process_time() - c)


def _row(storage: str, method: str, s: tuple[float, float], n: int, **extra: Any) -> dict[str, Any]:
    return {"storage": storage, "method": method, "seconds": s[0], "client_cpu_s": s[1], "objects_per_s": n / s[0],
            **extra}  # fmt: skip


def _measure_s3(
    endpoint: str, n: int, concurrencies: list[int], latency: float, wrong: list[str]
) -> list[dict[str, Any]]:
    import s3fs

    from srbatch.io.listing import S3_CONCURRENCY, s3_walk
    from srbatch.io.storage import list_files, list_images

    so = {"key": "testing", "secret": "testing-secret", "client_kwargs": {"endpoint_url": endpoint,
                                                                          "region_name": "us-east-1"}}  # fmt: skip
    fs = s3fs.S3FileSystem(**so)
    fs.ls(BUCKET)  # the client is connected before anything is timed
    counter = _RequestCounter(fs, latency)
    where = f"s3+{latency * 1000:g}ms" if latency else "s3"
    path = f"{BUCKET}/in"
    fs.invalidate_cache()
    counter.n = 0
    ref, s = _timed(lambda: fs.find(path))
    rows = [_row(where, "s3fs fs.find (old: one sequential listing)", s, n, requests=counter.n)]
    ref = sorted(ref)
    if len(ref) != n:
        wrong.append(f"s3 fs.find listed {len(ref)} objects, expected {n}")
    counter.n = 0
    imgs, s = _timed(lambda: list_images(f"s3://{path}", so))
    rows.append(_row(where, f"list_images (new, {S3_CONCURRENCY} in flight)", s, n, requests=counter.n))
    if imgs != [f"s3://{p}" for p in ref]:
        wrong.append("s3 list_images differs from fs.find")
    counter.n = 0
    files, s = _timed(lambda: list_files(f"s3://{path}", so))
    rows.append(_row(where, f"list_files (new, {S3_CONCURRENCY} in flight)", s, n, requests=counter.n))
    if files != ref:
        wrong.append("s3 list_files differs from fs.find")
    if concurrencies:  # a client whose connection pool holds them all (botocore's default pool holds 10)
        big = s3fs.S3FileSystem(**so, config_kwargs={"max_pool_connections": max(concurrencies)})
        big.ls(BUCKET)
        counter = _RequestCounter(big, latency)
    for c in concurrencies:
        counter.n = 0
        big.invalidate_cache()
        got, s = _timed(lambda: s3_walk(big, path, lambda rel: False, concurrency=c))  # noqa: B023
        rows.append(_row(where, f"s3_walk, {c} in flight", s, n, requests=counter.n))
        if sorted(got) != ref:
            wrong.append(f"s3 s3_walk with concurrency {c} differs from fs.find")
    return rows


class _RequestCounter:
    """Counts the ListObjectsV2 requests of an s3fs filesystem's client and delays each by ``latency`` seconds (an
    aiobotocore event hook: awaited by the client before it sends the request)."""

    def __init__(self, fs: Any, latency: float) -> None:
        self.n = 0
        self.latency = latency
        fs.s3.meta.events.register("before-send.s3.ListObjectsV2", self._count)

    async def _count(self, **_: Any) -> None:
        self.n += 1
        if self.latency:
            import asyncio

            await asyncio.sleep(self.latency)


def _measure_local(root: str, n: int, wrong: list[str]) -> list[dict[str, Any]]:
    from fsspec.implementations.local import LocalFileSystem

    from srbatch.io.storage import list_files, list_images

    fs = LocalFileSystem()
    path = fs._strip_protocol(os.path.join(root, "in"))
    ref, s = _timed(lambda: fs.find(path))
    rows = [_row("local", "fsspec LocalFileSystem.find (old)", s, n)]
    if len(ref) != n:
        wrong.append(f"local find listed {len(ref)} files, expected {n}")
    imgs, s = _timed(lambda: list_images(path))
    rows.append(_row("local", "list_images (new: scandir walk)", s, n))
    if imgs != ref:
        wrong.append("local list_images differs from fs.find")
    files, s = _timed(lambda: list_files(path))
    rows.append(_row("local", "list_files (new: scandir walk)", s, n))
    if files != ref:
        wrong.append("local list_files differs from fs.find")
    return rows


def _render(r: dict[str, Any]) -> str:
    m = r["machine"]
    load = ", ".join(f"{x:.2f}" for x in r["load_avg_at_start"])
    lines = [
        f"srbatch listing benchmark: {r['objects']:,} objects in {r['folders']:,} folders of {r['per_folder']:,}",
        f"  machine  {m['cpu']}, {m['cpus']} CPUs, load average {load} (1, 5, 15 min) at start; Python {m['python']}",
        "  setup    " + ", ".join(f"{k} {v:.1f}" for k, v in r["setup"].items()),
        "",
        f"  {'storage':<10} {'method':<46} {'seconds':>9} {'objects/s':>11} {'client CPU s':>12} {'requests':>9}",
    ]
    for row in r["rows"]:
        req = row.get("requests")
        lines.append(f"  {row['storage']:<10} {row['method']:<46} {row['seconds']:>9.3f} {row['objects_per_s']:>11,.0f} "
                     f"{row['client_cpu_s']:>12.3f} {'' if req is None else req:>9}")  # fmt: skip
    if any(row["storage"].startswith("s3") for row in r["rows"]):
        lines.append("  s3: moto's server in its own process on 127.0.0.1 (no network latency; moto spends time "
                     "proportional to the bucket's size on each list request); s3+Xms: the same with X ms added "
                     "before each list request")  # fmt: skip
    return "\n".join(lines)
