"""Region planning for large images under a memory budget (used by :class:`srbatch.inference.Upscaler`).

An image whose working set does not fit the budget is cut into *regions*: cores that partition the input, each run
through the whole pipeline (colour conversion, the network with its own tiling, colour back, quantisation) inside a
window that adds ``halo`` input pixels of real context on every side (less at the image border). Only the core's
output is kept, quantised to the output dtype, so no whole-image float array ever exists.

Full-width bands are preferred (seams in one direction only, output produced in row order for streamed writers);
square regions are used when even a thin band does not fit. Cores are multiples of the model's ``size_multiple`` and
windows start on such a multiple, so the padding the network sees at the right and bottom border is the one it sees
untiled. For models whose receptive field is covered by the halo (every local convolutional network) a tiled output
equals the untiled one up to float rounding; models that pool over the whole image (IMDN's channel attention) see
their statistics per region instead, which is why the manifest records the tile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from srbatch.errors import InferenceError
from srbatch.inference.memory import format_bytes
from srbatch.inference.tiling import ceil_to

__all__ = ["RegionPlan", "plan_regions"]


@dataclass(frozen=True)
class RegionPlan:
    """How one image is cut. Sizes of cores and windows are in input pixels; ``out_rows``/``out_cols`` are the
    output ranges each core produces (they partition the output)."""

    height: int
    width: int
    out_height: int
    out_width: int
    halo: int
    multiple: int
    rows: tuple[tuple[int, int], ...]
    cols: tuple[tuple[int, int], ...]
    out_rows: tuple[tuple[int, int], ...]
    out_cols: tuple[tuple[int, int], ...]
    budget: int | None = None
    """Bytes the plan had to fit in (None: no budget, the whole image in one region)."""
    estimate: int | None = None
    """Estimated peak bytes of the largest region (working set, band and held arrays included)."""

    @property
    def tiled(self) -> bool:
        """True when the image is run in more than one region."""
        return len(self.rows) > 1 or len(self.cols) > 1

    @property
    def regions(self) -> int:
        return len(self.rows) * len(self.cols)

    @property
    def tile(self) -> tuple[int, int] | None:
        """``(height, width)`` of the largest core in input pixels, None when untiled."""
        if not self.tiled:
            return None
        return max(b - a for a, b in self.rows), max(b - a for a, b in self.cols)

    def window(self, lo: int, hi: int, length: int, need: tuple[int, int] | None = None) -> tuple[int, int]:
        """Window ``[start, end)`` around the core ``[lo, hi)`` of an axis of ``length`` input pixels: ``halo``
        pixels of context (plus the input range ``need`` when given), start rounded down to ``multiple``."""
        a, b = (lo, hi) if need is None else (min(lo, need[0]), max(hi, need[1]))
        start = max(a - self.halo, 0) // self.multiple * self.multiple
        return start, min(b + self.halo, length)


def _cuts(length: int, core: int, multiple: int) -> list[tuple[int, int]]:
    """``[0, length)`` cut into balanced cores of at most ``core`` (multiples of ``multiple`` but the last)."""
    if core >= length:
        return [(0, length)]
    n = math.ceil(length / core)
    size = min(ceil_to(math.ceil(length / n), multiple), core)
    n = math.ceil(length / size)
    return [(i * size, min((i + 1) * size, length)) for i in range(n)]


def _out_cuts(cuts: list[tuple[int, int]], length: int, out_length: int, scale: int | None) -> list[tuple[int, int]]:
    """Output ranges of input cuts: ``x scale`` exactly for an integer scale, else boundaries rounded half up."""
    def at(v: int) -> int:
        if v >= length:
            return out_length
        return v * scale if scale is not None else int(math.floor(v * out_length / length + 0.5))

    return [(at(a), at(b)) for a, b in cuts]


def plan_regions(
    *,
    height: int,
    width: int,
    out_height: int,
    out_width: int,
    halo: int,
    multiple: int,
    integer_scale: int | None,
    fits: Callable[[int, int], int | None],
    budget: int | None,
    min_core: int = 16,
    advice: str = "raise --max-memory (max_memory=...)",
) -> RegionPlan:
    """The plan with the largest regions for which ``fits(core_h, core_w)`` returns an estimate (None: too big).

    Tried in order: the whole image; full-width bands as tall as fit (kept when at least ``max(2 * halo, 32)`` rows,
    thinner bands waste most of their compute on context); squares as large as fit. ``fits`` must be monotone.
    Raises :class:`InferenceError` when not even a ``min_core`` square fits.
    """
    m = max(int(multiple), 1)

    def largest(lo: int, hi: int, probe: Callable[[int], int | None]) -> int | None:
        """Largest multiple of m in [lo, hi] (hi itself allowed when not a multiple) with probe() not None."""
        if probe(lo) is None:
            return None
        best = lo
        a, b = lo // m, -(-hi // m)
        while a < b:  # invariant: a*m fits
            mid = (a + b + 1) // 2
            if probe(min(mid * m, hi)) is not None:
                a = mid
            else:
                b = mid - 1
        best = min(a * m, hi)
        return best

    def make(core_h: int, core_w: int, estimate: int | None) -> RegionPlan:
        rows, cols = _cuts(height, core_h, m), _cuts(width, core_w, m)
        return RegionPlan(
            height=height, width=width, out_height=out_height, out_width=out_width, halo=halo, multiple=m,
            rows=tuple(rows), cols=tuple(cols),
            out_rows=tuple(_out_cuts(rows, height, out_height, integer_scale)),
            out_cols=tuple(_out_cuts(cols, width, out_width, integer_scale)),
            budget=budget, estimate=estimate,
        )  # fmt: skip

    whole = fits(height, width)
    if whole is not None or budget is None:
        return make(height, width, whole)
    band_min = min(max(2 * halo, 32, m), height)
    rows = largest(band_min, height, lambda r: fits(r, width))
    if rows is not None:
        return make(rows, width, fits(rows, width))
    side_min = ceil_to(max(min_core, m), m)
    side = largest(side_min, max(height, width), lambda t: fits(min(t, height), min(t, width)))
    if side is None:
        raise InferenceError(
            f"a {width}x{height} image needs more memory than the budget of {format_bytes(budget)} even in "
            f"{side_min}x{side_min} regions (its held arrays and buffers included); {advice}"
        )
    return make(min(side, height), min(side, width), fits(min(side, height), min(side, width)))
