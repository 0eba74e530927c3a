"""Fast recursive listings for :mod:`srbatch.io.storage`: a scandir walk for local folders and a listing of S3
prefixes in parallel (s3fs's own client and event loop), both pruning folders before they are listed.

Both return the paths ``fs.find`` would return (local: absolute POSIX paths; S3: ``bucket/key``), unsorted. Other
fsspec backends go through ``fs.find`` in :mod:`srbatch.io.storage`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import fsspec

__all__ = ["S3_CONCURRENCY", "fast_kind", "local_walk", "s3_walk"]

log = logging.getLogger("srbatch.io")

S3_CONCURRENCY = 10
"""List requests in flight at once on S3 when the client's connection pool size is not set: botocore's default pool
(``max_pool_connections``) holds 10 connections, so more requests would only wait for one. Storage options
``{"config_kwargs": {"max_pool_connections": N}}`` raise both (see ``jobs/benchmark.py listing``)."""

_S3_FANOUT = 32  # split the prefix tree (one delimiter listing per level) until this many prefixes are in hand ...
_S3_SPLIT_LEVELS = 3  # ... or this many levels were split

# name of a folder (relative to the folder listed, "/"-separated, no trailing "/") -> True to never list it
Prune = Callable[[str], bool]


def fast_kind(fs: fsspec.AbstractFileSystem) -> str | None:
    """``"local"`` or ``"s3"`` when one of the fast walks applies to ``fs``, else None (use ``fs.find``)."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return "local"
    try:
        import s3fs
    except ImportError:
        return None
    if isinstance(fs, s3fs.S3FileSystem) and not fs.asynchronous and not fs.version_aware:
        return "s3"
    return None


def local_walk(root: str, prune: Prune) -> list[str]:
    """Every non-directory entry under the local folder ``root`` (an absolute POSIX path, as
    ``LocalFileSystem._strip_protocol`` gives), as ``LocalFileSystem.find`` lists them: symbolic links are entries,
    never followed; a folder that cannot be read is left out with a warning (fsspec leaves it out silently). One
    ``os.scandir`` per folder, no ``stat`` per file (the type comes from the directory entry)."""
    out: list[str] = []
    stack = [(root.rstrip("/"), "")]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder or "/") as it:
                for e in it:
                    sub = f"{rel}/{e.name}" if rel else e.name
                    try:
                        is_dir = e.is_dir(follow_symlinks=False)
                    except OSError:
                        is_dir = False
                    if is_dir:
                        if not prune(sub):
                            stack.append((f"{folder}/{e.name}", sub))
                    else:
                        out.append(f"{folder}/{e.name}")
        except OSError as err:
            if not rel:
                raise
            log.warning("could not list the folder %s (left out of the listing): %s", folder, err)
    return out


def s3_walk(fs: Any, path: str, prune: Prune, *, concurrency: int | None = None) -> list[str]:
    """Every object under the S3 prefix ``path`` (``bucket`` or ``bucket/key``, as ``fs._strip_protocol`` gives) as
    ``bucket/key``, the objects ``fs.find(path)`` returns (folder placeholder objects ``key/`` included).

    The prefix is split by delimiter listings (its top level first, then lower levels while there are few
    sub-prefixes), pruned sub-prefixes are never listed, and every sub-prefix left is listed recursively, up to
    ``concurrency`` list requests in flight (default: the client's connection pool size, else
    :data:`S3_CONCURRENCY`). Keys under the top level and sub-prefixes partition the prefix's keys, so
    nothing is listed twice or missed.
    """
    from fsspec.asyn import sync

    bucket, _, key = path.partition("/")
    prefix = f"{key.strip('/')}/" if key.strip("/") else ""
    if concurrency is None:
        concurrency = (getattr(fs, "config_kwargs", None) or {}).get("max_pool_connections") or S3_CONCURRENCY
    return sync(fs.loop, _s3_walk, fs, bucket, prefix, prune, max(1, int(concurrency)))


async def _s3_walk(fs: Any, bucket: str, prefix: str, prune: Prune, concurrency: int) -> list[str]:
    sem = asyncio.Semaphore(concurrency)

    async def pages(p: str, delimiter: str) -> tuple[list[str], list[str]]:
        keys: list[str] = []
        subs: list[str] = []
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": p, **fs.req_kw}
        if delimiter:
            kw["Delimiter"] = delimiter
        async with sem:
            while True:
                page = await fs._call_s3("list_objects_v2", **kw)  # s3fs retries each request as its own listings do
                keys.extend(c["Key"] for c in page.get("Contents", ()))
                subs.extend(c["Prefix"] for c in page.get("CommonPrefixes", ()))
                if not page.get("IsTruncated"):
                    return keys, subs
                kw["ContinuationToken"] = page["NextContinuationToken"]

    keys: list[str] = []
    frontier = [prefix]
    for level in range(_S3_SPLIT_LEVELS):
        if level and len(frontier) >= _S3_FANOUT:
            break
        found = await asyncio.gather(*(pages(p, "/") for p in frontier))
        frontier = []
        for level_keys, subs in found:
            keys.extend(level_keys)
            frontier.extend(s for s in subs if not prune(s[len(prefix) : -1]))
        if not frontier:
            break
    for sub_keys, _ in await asyncio.gather(*(pages(p, "") for p in frontier)):
        keys.extend(sub_keys)
    return [f"{bucket}/{k}" for k in keys]
