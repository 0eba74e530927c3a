"""Object storage through fsspec: listing with globs, reading and writing bytes. Local paths, s3://, memory://..."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from srbatch.errors import StorageError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm", ".pnm", ".jfif", ".avif",
     ".heic", ".heif"}
)

__all__ = ["IMAGE_EXTENSIONS", "list_images", "list_files", "read_bytes", "write_bytes", "join_uri", "filesystem"]


def filesystem(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    try:
        return url_to_fs(uri, **dict(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open {uri!r}: {e}; install the fsspec backend for its protocol") from e


def _unstrip(fs: fsspec.AbstractFileSystem, uri: str, path: str) -> str:
    """Turn a filesystem path back into a URI of the same protocol as ``uri``."""
    if "://" in uri:
        proto = uri.split("://", 1)[0]
        return f"{proto}://{path.lstrip('/') if proto not in ('file', 'local') else path}"
    return path


def _hidden(part: str) -> bool:
    # "." and "..", and names with backslashes ("..\\x.png"), are not hidden names but path tricks: they are listed,
    # and the jobs refuse them with a row each
    return part.startswith(".") and part not in (".", "..") and "\\" not in part


def _is_image(path: str, extensions: frozenset[str]) -> bool:
    return posixpath.splitext(path)[1].lower() in extensions


def list_images(
    spec: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
) -> list[str]:
    """Sorted URIs of the image files named by ``spec``: a file, a folder/prefix (recursive), or a glob.

    Globs follow fsspec (``**`` crosses folders). Hidden files and folders (``.`` prefix) and ``_manifest`` are skipped
    when listing a folder; ``.`` and ``..`` path parts are kept (the jobs refuse those keys, one row each). An empty
    result is an error that names the spec.
    """
    fs, path = filesystem(spec, storage_options)
    try:
        fs.invalidate_cache()  # fsspec instances are shared: never list from a stale cache
        if any(ch in path for ch in "*?["):
            found = [p for p in fs.glob(path) if not fs.isdir(p)]
        elif fs.isfile(path):
            found = [path]
        elif fs.isdir(path):
            found = [p for p in fs.find(path) if _is_image(p, extensions)]
            base = path.rstrip("/")
            found = [
                p
                for p in found
                if not any(_hidden(part) or part == "_manifest" for part in p[len(base) :].split("/"))
            ]
        else:
            raise StorageError(f"{spec!r} does not exist (no file, folder/prefix or glob match); check the path")
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"could not list {spec!r}: {type(e).__name__}: {e}") from e
    out = sorted(_unstrip(fs, spec, p) for p in found)
    if not out:
        raise StorageError(f"no images found under {spec!r} (extensions: {', '.join(sorted(extensions))})")
    return out


def list_files(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    skip_top: tuple[str, ...] = ("_manifest", "_srbatch"),
) -> list[str]:
    """Every file under the prefix ``uri`` as filesystem paths (no protocol), sorted, hidden files included, the
    top-level folders ``skip_top`` left out. An absent prefix gives an empty list."""
    fs, path = filesystem(uri, storage_options)
    base = path.rstrip("/")
    try:
        fs.invalidate_cache()
        if not fs.exists(base):
            return []
        skip = tuple(f"{base}/{d}/" for d in skip_top)
        return sorted(p.rstrip("/") for p in fs.find(base) if not p.startswith(skip))
    except Exception as e:
        raise StorageError(f"could not list {uri!r}: {type(e).__name__}: {e}") from e


def read_bytes(uri: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """All bytes of ``uri``; :class:`StorageError` naming it on failure."""
    try:
        with fsspec.open(uri, "rb", **dict(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"not found: {uri}") from None
    except Exception as e:
        raise StorageError(f"could not read {uri}: {type(e).__name__}: {e}") from e


def write_bytes(
    uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None, *, content_type: str | None = None
) -> None:
    """Write ``data`` to ``uri``, creating parent folders for local paths. ``content_type`` is stored with S3 objects
    (so that a browser renders an HTML report served from the bucket instead of downloading it)."""
    try:
        fs, path = filesystem(uri, storage_options)
        parent = posixpath.dirname(path)
        if parent and not fs.exists(parent):
            fs.makedirs(parent, exist_ok=True)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        extra = {"ContentType": content_type} if content_type and protocol in ("s3", "s3a") else {}
        with fs.open(path, "wb", **extra) as f:
            f.write(data)
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"could not write {uri}: {type(e).__name__}: {e}") from e


def join_uri(base: str, *parts: str) -> str:
    """``base`` joined with ``parts`` by ``/`` (no normalisation of ``..``: callers validate relative keys)."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.lstrip('/')}"
    return out
