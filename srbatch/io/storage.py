"""Object storage through fsspec: listing with globs, reading and writing bytes. Local paths, s3://, memory://..."""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Collection, Mapping
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from srbatch.errors import StorageError
from srbatch.io.listing import fast_kind, local_walk, s3_walk

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm", ".pnm", ".jfif", ".avif",
     ".heic", ".heif"}
)

VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".mov", ".webm"})
"""Extensions the jobs treat as videos (decoded with PyAV; see :mod:`srbatch.video`)."""

__all__ = ["IMAGE_EXTENSIONS", "SKIP_FOLDERS", "VIDEO_EXTENSIONS", "is_video", "filesystem", "join_uri", "list_files", "list_images", "read_bytes",
           "write_bytes"]  # fmt: skip


def is_video(uri: str) -> bool:
    """True when ``uri`` has a video extension (:data:`VIDEO_EXTENSIONS`, case-insensitive)."""
    return posixpath.splitext(uri)[1].lower() in VIDEO_EXTENSIONS


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


SKIP_FOLDERS = ("_manifest", "_srbatch")
"""Folders of the jobs' own records under an output prefix: never listed as inputs or outputs."""


def _walk(fs: fsspec.AbstractFileSystem, path: str, prune: Callable[[str], bool]) -> list[str]:
    """Every file under the folder/prefix ``path`` as ``fs.find`` names them, unsorted, without listing the folders
    ``prune`` (given a folder's path relative to ``path``) refuses: a scandir walk locally, S3 prefixes in parallel,
    ``fs.find`` then a filter for other backends."""
    kind = fast_kind(fs)
    if kind == "local":
        return local_walk(path, prune)
    if kind == "s3":
        return s3_walk(fs, path, prune)
    base = path.rstrip("/")
    out = []
    for p in fs.find(path):
        rel = p[len(base) :].strip("/").split("/")[:-1]
        if not any(prune("/".join(rel[: i + 1])) for i in range(len(rel))):
            out.append(p)
    return out


def list_images(
    spec: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
) -> list[str]:
    """Sorted URIs of the image files named by ``spec``: a file, a folder/prefix (recursive), or a glob.

    Globs follow fsspec (``**`` crosses folders). Hidden files and folders (``.`` prefix), ``_manifest`` and
    ``_srbatch`` are skipped when listing a folder; ``.`` and ``..`` path parts are kept (the jobs refuse those keys,
    one row each). An empty result is an error that names the spec. Local folders and S3 prefixes are listed fast
    (:mod:`srbatch.io.listing`), other backends with ``fs.find``.
    """
    fs, path = filesystem(spec, storage_options)
    try:
        fs.invalidate_cache()  # fsspec instances are shared: never list from a stale cache
        if any(ch in path for ch in "*?["):
            found = [p for p in fs.glob(path) if not fs.isdir(p)]
        elif fs.isfile(path):
            found = [path]
        elif fs.isdir(path):
            base = path.rstrip("/")
            found = [p for p in _walk(fs, path, _skipped_folder) if _is_image(p, extensions) and _kept(p[len(base) :])]
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


def _kept(rel: str) -> bool:
    """False when a part of ``rel`` ("/"-separated, from "/") is hidden or a skipped folder's name."""
    if "/." not in rel and not any(f"/{name}" in rel for name in SKIP_FOLDERS):
        return True  # no part can be hidden (starts with ".") or named as a skipped folder: the common case, fast
    return not any(_skipped_part(part) for part in rel.split("/"))


def _skipped_part(part: str) -> bool:
    return _hidden(part) or part in SKIP_FOLDERS


def _skipped_folder(rel: str) -> bool:
    return any(_skipped_part(part) for part in rel.split("/"))


def list_files(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    skip_top: Collection[str] = SKIP_FOLDERS,
) -> list[str]:
    """Every file under the folder/prefix ``uri``, sorted, as the filesystem paths ``fs.find`` returns (no protocol:
    ``bucket/key`` on S3, absolute paths locally), hidden files included. The top-level folders named in ``skip_top``
    are never listed. An absent prefix gives ``[]``. Local folders and S3 prefixes are listed fast
    (:mod:`srbatch.io.listing`), other backends with ``fs.find``."""
    fs, path = filesystem(uri, storage_options)
    skip = frozenset(skip_top)
    try:
        fs.invalidate_cache()  # actors wrote here; the cached listings are stale
        if fast_kind(fs) == "local" and not fs.isdir(path):
            return [path] if fs.isfile(path) else []
        try:
            found = _walk(fs, path, lambda rel: rel in skip)
        except FileNotFoundError:  # an S3 bucket that does not exist: nothing under it
            found = []
        if not found and fast_kind(fs) == "s3" and path.strip("/").count("/") and fs.isfile(path):
            found = [path]  # a single object, as fs.find gives it
        return sorted(found)
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
