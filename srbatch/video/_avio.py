"""Opening containers on local paths and fsspec URIs (s3://, memory://, ...).

PyAV reads any binary file object with ``read``/``seek``/``tell``; a seekable fsspec file (s3fs fetches byte ranges)
is handed to it as it is. Writers need a seekable output (the MP4 muxer goes back to write its index), which object
stores do not give, so remote outputs are written to a local temporary file and uploaded whole on close.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import av

from srbatch.io.storage import filesystem
from srbatch.video._types import VideoError


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


@contextlib.contextmanager
def open_input(uri: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[av.container.InputContainer]:
    """An open PyAV input container for ``uri``; :class:`VideoError` naming it when it cannot be opened."""
    with contextlib.ExitStack() as stack:
        try:
            if is_local(uri):
                src: Any = _local_path(uri)
            else:
                fs, path = filesystem(uri, storage_options)
                src = stack.enter_context(fs.open(path, "rb"))
            container = stack.enter_context(av.open(src, "r"))
        except FileNotFoundError:
            raise VideoError(f"{uri}: not found") from None
        except av.error.FFmpegError as e:
            raise VideoError(
                f"{uri}: not a readable video container ({e}); a truncated MP4 whose index (moov) is at the end "
                "cannot be opened at all: re-upload the file or remux it"
            ) from e
        if not container.streams.video:
            raise VideoError(f"{uri}: has no video stream (streams: {[s.type for s in container.streams]})")
        yield container


@contextlib.contextmanager
def local_output(uri: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[str]:
    """A local path to write ``uri`` to. The file appears at ``uri`` only when the block ends without an error:
    local URIs are written to a hidden ``.NAME.part.EXT`` beside it and renamed (atomic), remote ones to a temporary
    file that is then uploaded whole. So an existing output is always a complete one (what a resuming job checks)."""
    if is_local(uri):
        path = os.path.abspath(_local_path(uri))
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        stem, ext = os.path.splitext(name)
        tmp = os.path.join(folder, f".{stem}.part{ext}")
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return
    suffix = posixpath.splitext(uri)[1]
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="srbatch-video-")
    os.close(fd)
    try:
        yield tmp
        fs, path = filesystem(uri, storage_options)
        try:
            fs.put_file(tmp, path)
        except Exception as e:
            raise VideoError(f"could not upload {uri}: {type(e).__name__}: {e}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
