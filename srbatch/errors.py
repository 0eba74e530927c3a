"""Typed errors. Every message says what was expected, what was found and what to do."""

from __future__ import annotations


class SrbatchError(Exception):
    """Base class of every error srbatch raises on purpose."""


class ConfigError(SrbatchError, ValueError):
    """A configuration value or command-line argument is invalid."""


class WeightsError(SrbatchError):
    """A checkpoint could not be read, recognised or trusted."""


class UnsafeCheckpointError(WeightsError):
    """A checkpoint needs arbitrary code to unpickle; it was refused and nothing from it ran."""


class ChecksumMismatchError(WeightsError):
    """A checkpoint's sha256 differs from the one that was asked for."""


class UnknownArchitectureError(WeightsError):
    """No registered architecture (nor spandrel) recognises a state dict."""


class ImageDecodeError(SrbatchError):
    """Image bytes could not be decoded (truncated, not an image, unsupported format, too large)."""


class ImageTooLargeError(ImageDecodeError):
    """An image declares more pixels than the decompression-bomb limit allows."""


class StorageError(SrbatchError):
    """Object storage could not be listed, read or written."""


class InferenceError(SrbatchError):
    """The model failed on an input in a way that retrying cannot fix."""
