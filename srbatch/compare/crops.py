"""Where to look: automatic crop selection (highest detail, strongest disagreement between models) and user boxes.

All rectangles are in output (HR) pixels, aligned to the scale so that each crop maps to whole LR pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from srbatch.compare.config import Crop

__all__ = ["luma", "detail_map", "disagreement_map", "auto_crops", "fit_crops"]


def luma(img: np.ndarray) -> np.ndarray:
    """Float Y (BT.601 weights, the image's own range scaled to [0, 1]) of an HWC or HW integer image."""
    x = img.astype(np.float64) / (65535.0 if img.dtype == np.uint16 else 255.0)
    if x.ndim == 2:
        return x
    if x.shape[2] >= 3:
        return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    return x[..., 0]


def detail_map(y: np.ndarray) -> np.ndarray:
    """Local detail: absolute horizontal plus vertical gradient of ``y``."""
    g = np.zeros_like(y)
    g[:, 1:] += np.abs(np.diff(y, axis=1))
    g[1:, :] += np.abs(np.diff(y, axis=0))
    return g


def disagreement_map(outputs: Sequence[np.ndarray]) -> np.ndarray | None:
    """Per-pixel standard deviation of the models' Y planes (None with fewer than two outputs)."""
    if len(outputs) < 2:
        return None
    h = min(o.shape[0] for o in outputs)
    w = min(o.shape[1] for o in outputs)
    return np.std(np.stack([luma(o)[:h, :w] for o in outputs]), axis=0)


def _window_means(score: np.ndarray, size: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of ``score`` over every ``size`` x ``size`` window on a ``stride`` grid (integral image)."""
    ii = np.pad(score.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    ys = np.arange(0, score.shape[0] - size + 1, stride)
    xs = np.arange(0, score.shape[1] - size + 1, stride)
    y0, x0 = np.meshgrid(ys, xs, indexing="ij")
    sums = ii[y0 + size, x0 + size] - ii[y0, x0 + size] - ii[y0 + size, x0] + ii[y0, x0]
    return sums / (size * size), y0, x0


def _overlap(a: Crop, b: Crop) -> float:
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    return ix * iy / min(a.w * a.h, b.w * b.h)


def _best(score: np.ndarray, size: int, scale: int, taken: list[Crop], reason: str) -> Crop | None:
    stride = max(scale, (size // 4) // scale * scale)
    means, y0, x0 = _window_means(score, size, stride)
    for i in np.argsort(means, axis=None)[::-1]:
        c = Crop(x=int(x0.flat[i]), y=int(y0.flat[i]), w=size, h=size, reason=reason)
        if all(_overlap(c, t) < 0.25 for t in taken):
            return c
    return None


def auto_crops(
    reference: np.ndarray, outputs: Sequence[np.ndarray], *, scale: int, size: int, count: int
) -> list[Crop]:
    """``count`` square crops of ``size`` output pixels: the highest-detail region of ``reference`` (the HR, or in real
    mode the models' mean), then where the models' outputs disagree most, alternating, with little overlap."""
    h, w = reference.shape[:2]
    size = max(scale, min(size, h, w) // scale * scale)
    detail = detail_map(luma(reference))
    disagree = disagreement_map(outputs)
    crops: list[Crop] = []
    for k in range(count):
        use_disagreement = disagree is not None and k % 2 == 1
        score = disagree if use_disagreement else detail
        c = _best(score, size, scale, crops, "models disagree" if use_disagreement else "detail")  # type: ignore[arg-type]
        if c is None:
            break
        crops.append(c)
    return crops


def fit_crops(crops: Sequence[Crop], *, width: int, height: int, scale: int) -> list[Crop]:
    """User boxes clipped to a ``width`` x ``height`` output and aligned to the scale; boxes outside are dropped."""
    out = []
    for c in crops:
        x0 = min(max(0, c.x), width) // scale * scale
        y0 = min(max(0, c.y), height) // scale * scale
        x1 = min(width, c.x + c.w) // scale * scale
        y1 = min(height, c.y + c.h) // scale * scale
        if x1 - x0 >= scale and y1 - y0 >= scale:
            out.append(Crop(x=x0, y=y0, w=x1 - x0, h=y1 - y0, reason=c.reason))
    return out
