"""What an upscale job should have written: the engine's own output for the same input, computed in the test process.

The job reads, decodes, upscales (in a Ray actor or another process), encodes and writes; the tests here decode the
same input bytes, call :meth:`srbatch.inference.Upscaler.upscale_image` directly and compare the decoded file the job
wrote with it, pixel by pixel (alpha included). A job that swaps colour channels, flips, writes another resampler's
output or the wrong model's output of the right size and mode fails this, where size and mode checks pass.

Tolerance: within 1 level (of the file's bit depth), and at most :data:`MAX_OFF_BY_ONE` of the samples off by one.
Not pixel-exact, because the job's actor runs torch with its own thread count (``--torch-threads``, one per CPU it
is given) in another process, and a float sum taken in another order can move a value that sits on a rounding
boundary (x.5 levels) to the neighbouring level. Measured (2026-11-29, CPU): the shipped default model (IMDN) run
with 1 and with 2 torch threads on 160 x 160 images differs by 1 level on about 0.001% of samples, never more;
bicubic does not differ. Every plausible wrong output differs by far more than 1 level on the textured images these
tests use (a channel swap or a flip by up to 255 levels, bilinear for bicubic by tens).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from srbatch.inference import TilingConfig, Upscaler
from srbatch.io.images import DecodedImage, decode_image
from srbatch.models.loader import load_model

__all__ = ["MAX_OFF_BY_ONE", "assert_as_engine", "engine_output"]

MAX_OFF_BY_ONE = 0.01
"""Largest fraction of samples allowed to differ by one level (rounding-boundary cases; measured: about 0.001%)."""


@functools.lru_cache(maxsize=4)
def _engine(model: str, scale: int, outscale: float | None) -> Upscaler:
    # Untiled (tile=0): the exact output of the network on the whole image. The models these tests run (bicubic and
    # the shipped default) have no tile hint, so the job runs them untiled too.
    desc = load_model(model, scale=scale)
    return Upscaler(desc, device="cpu", tiling=TilingConfig(tile=0), outscale=outscale)


def _bytes(x: bytes | str | Path) -> bytes:
    return x if isinstance(x, bytes) else Path(x).read_bytes()


def engine_output(source: bytes | str | Path, *, model: str, scale: int, outscale: float | None = None) -> DecodedImage:
    """The engine's upscaled image for the encoded input ``source`` (bytes or a local path)."""
    return _engine(model, scale, outscale).upscale_image(decode_image(_bytes(source)))


def assert_as_engine(
    written: bytes | str | Path,
    source: bytes | str | Path,
    *,
    model: str,
    scale: int,
    outscale: float | None = None,
    name: str = "",
) -> float:
    """Assert that the file a job wrote (``written``: bytes or a local path) holds the engine's output for ``source``,
    within 1 level and at most :data:`MAX_OFF_BY_ONE` of the samples off by one. Returns that fraction."""
    want = engine_output(source, model=model, scale=scale, outscale=outscale)
    got = decode_image(_bytes(written))
    label = name or "output"
    assert got.pixels.shape == want.pixels.shape and got.pixels.dtype == want.pixels.dtype, (
        f"{label}: wrote {got.pixels.shape} {got.pixels.dtype}, the engine gives {want.pixels.shape} "
        f"{want.pixels.dtype}"
    )
    planes = [(got.pixels, want.pixels, "pixels")]
    assert (got.alpha is None) == (want.alpha is None), f"{label}: alpha written {got.alpha is not None}"
    if want.alpha is not None:
        planes.append((got.alpha, want.alpha, "alpha"))
    off, total = 0, 0
    for g, w, what in planes:
        d = np.abs(g.astype(np.int64) - w.astype(np.int64))
        assert int(d.max(initial=0)) <= 1, (
            f"{label}: {what} differ from the engine's output by up to {int(d.max())} levels "
            f"(mean {d.mean():.2f}, {(d > 1).mean():.1%} of samples more than 1 level off)"
        )
        off, total = off + int((d > 0).sum()), total + d.size
    frac = off / max(total, 1)
    assert frac <= MAX_OFF_BY_ONE, f"{label}: {frac:.2%} of samples are one level off the engine's output"
    return frac
