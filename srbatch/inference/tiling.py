"""Tile planning and blend weights for :class:`srbatch.inference.Upscaler`.

The scheme (per axis; the 2-D plan is the product of the two axis plans):

- the (padded) model input of length ``L`` is cut into ``n = ceil(L / tile)`` *cores* of equal size ``t`` (a multiple
  of the model's ``size_multiple``); the cores partition ``[0, L)``;
- every core is run inside a *window* of fixed size ``t + 2 * margin`` with ``margin = overlap + ceil(blend / 2)``
  (rounded up to ``size_multiple``). Windows at the image edges are shifted inwards instead of padded, so every
  window lies inside the image, all windows have the same size (they batch without padding) and the network sees the
  true image border exactly where the untiled network sees it;
- output pixels are weighted by a linear cross-fade ``blend`` input pixels wide centred on each seam between two
  cores (weight 1 inside a core, 0 outside the core and its ramps); weights are accumulated and normalised.

Every output pixel with non-zero weight therefore has at least ``overlap`` input pixels of real context on each side
(or the real image border). When ``overlap`` covers the network's receptive field, each tile computes exactly what
the untiled network computes at that pixel and the tiled result equals the untiled one up to float rounding; the
cross-fade only matters (and hides seams) when the receptive field is larger than ``overlap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AxisTile", "TilingConfig", "axis_weights", "plan_axis", "run_tiled"]


class TilingConfig(BaseModel):
    """How :class:`~srbatch.inference.Upscaler` splits an image into tiles. All sizes are in model-input pixels.

    Attributes:
        tile: core size of a tile (the part of each tile that is kept). None: the model's ``tile_hint``, or the whole
            image when the model has none. 0: never tile (the whole image in one forward; out-of-memory then only
            reduces the batch).
        overlap: context pixels every kept pixel has on each side. None: the model's ``receptive_halo``. Tiled
            output equals untiled output when this covers the receptive field.
        batch_size: tiles (or whole images) per forward pass.
        blend: width of the linear cross-fade across each seam between tiles; windows carry ``ceil(blend / 2)``
            extra context pixels so that ``overlap`` still holds inside the ramp. 0: hard seams.
        min_tile: smallest core size out-of-memory splitting may reach before giving up.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tile: int | None = Field(default=None, ge=0)
    overlap: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=4, ge=1)
    blend: int = Field(default=8, ge=0)
    min_tile: int = Field(default=32, ge=1)


@dataclass(frozen=True)
class AxisTile:
    """One tile along one axis: kept core ``[core_start, core_end)`` inside window ``[win_start, win_start + size)``."""

    core_start: int
    core_end: int
    win_start: int


def ceil_to(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


def plan_axis(length: int, tile: int, margin: int, multiple: int = 1) -> tuple[int, list[AxisTile]]:
    """Window size and tiles covering ``[0, length)`` with cores of at most ``tile`` and ``margin`` context.

    ``length`` must be a multiple of ``multiple``. Returns ``(window, tiles)``; a single tile spanning the whole axis
    when tiling would not save anything (``tile + 2 * margin >= length``).
    """
    if length % multiple:
        raise ValueError(f"axis length {length} is not a multiple of {multiple}")
    tile = max(ceil_to(max(tile, 1), multiple), multiple)
    margin = ceil_to(margin, multiple)
    if tile >= length or tile + 2 * margin >= length:
        return length, [AxisTile(0, length, 0)]
    n = math.ceil(length / tile)
    core = ceil_to(math.ceil(length / n), multiple)  # balanced cores, never larger than `tile`
    window = min(core + 2 * margin, length)
    tiles: list[AxisTile] = []
    for i in range(n):
        start = i * core
        if start >= length:
            break
        end = min(start + core, length)
        win = min(max(start - margin, 0), length - window)
        tiles.append(AxisTile(start, end, win))
    return window, tiles


def axis_weights(
    length: int, window: int, tiles: list[AxisTile], scale: int, half_blend: int, *, dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    """Per-tile 1-D weights over each window's output pixels (``window * scale`` long).

    Weight is 1 inside the core and ramps linearly over ``[seam - half_blend, seam + half_blend)`` at every inner
    seam; the weights of two neighbours sum to 1 there. ``half_blend == 0`` gives the indicator of the core.
    """
    q = torch.arange(length * scale, dtype=torch.float64, device=device) + 0.5  # output pixel centres
    out: list[torch.Tensor] = []
    for t in tiles:
        a, b = t.core_start * scale, t.core_end * scale
        if half_blend == 0:
            w = ((q >= a) & (q < b)).to(torch.float64)
        else:
            hb = half_blend * scale
            w = torch.ones_like(q)
            if t.core_start > 0:
                w = w * ((q - (a - hb)) / (2 * hb)).clamp(0, 1)
            if t.core_end < length:
                w = w * (((b + hb) - q) / (2 * hb)).clamp(0, 1)
        lo = t.win_start * scale
        hi = lo + window * scale
        if bool(w[:lo].any()) or bool(w[hi:].any()):  # a weighted pixel outside the window: a planning bug
            raise AssertionError(f"tile {t} has weight outside its window of {window}")
        out.append(w[lo:hi].to(dtype))
    return out


def run_tiled(
    x: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor],
    *,
    tile: int | None,
    margin: int,
    half_blend: int,
    multiple: int,
    scale: int,
    batch: int,
    out_channels: int,
) -> torch.Tensor:
    """Apply ``forward`` to ``x`` (N, C, H, W; H and W multiples of ``multiple``) tile by tile and stitch the result.

    ``forward`` maps a batch ``(B, C, h, w)`` to float32 ``(B, out_channels, h * scale, w * scale)``. ``tile`` None
    runs whole images, ``batch`` at a time. Otherwise windows of equal size (see :func:`plan_axis`) are gathered
    from all images, run ``batch`` at a time and accumulated with :func:`axis_weights`; the weighted sum is
    normalised by the summed weights. The result is float32 on ``x``'s device.
    """
    n, _, hp, wp = (int(v) for v in x.shape)
    if tile is None:
        (wh, ys), (ww, xs) = plan_axis(hp, hp, 0, multiple), plan_axis(wp, wp, 0, multiple)
    else:
        (wh, ys), (ww, xs) = plan_axis(hp, tile, margin, multiple), plan_axis(wp, tile, margin, multiple)
    if len(ys) == 1 and len(xs) == 1:  # whole images, batched
        parts = [forward(x[i : i + batch]) for i in range(0, n, batch)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)  # one part: no copy of a large output
    s = scale
    wy = axis_weights(hp, wh, ys, s, half_blend, dtype=torch.float32, device=x.device)
    wx = axis_weights(wp, ww, xs, s, half_blend, dtype=torch.float32, device=x.device)
    acc = torch.zeros(n, out_channels, hp * s, wp * s, dtype=torch.float32, device=x.device)
    wsum = torch.zeros(hp * s, wp * s, dtype=torch.float32, device=x.device)
    for iy, ty in enumerate(ys):
        for ix, tx in enumerate(xs):
            oy, ox = ty.win_start * s, tx.win_start * s
            wsum[oy : oy + wh * s, ox : ox + ww * s] += wy[iy][:, None] * wx[ix][None, :]
    crops = [(i, iy, ix) for i in range(n) for iy in range(len(ys)) for ix in range(len(xs))]
    for start in range(0, len(crops), batch):
        chunk = crops[start : start + batch]
        inp = torch.stack(
            [x[i, :, ys[iy].win_start : ys[iy].win_start + wh, xs[ix].win_start : xs[ix].win_start + ww]
             for i, iy, ix in chunk]
        )  # fmt: skip
        out = forward(inp)
        for k, (i, iy, ix) in enumerate(chunk):
            oy, ox = ys[iy].win_start * s, xs[ix].win_start * s
            acc[i, :, oy : oy + wh * s, ox : ox + ww * s] += out[k] * (wy[iy][:, None] * wx[ix][None, :])
    return acc / wsum
