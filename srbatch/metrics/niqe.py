"""NIQE, the Natural Image Quality Evaluator (Mittal, Soundararajan, Bovik 2013), computed as MATLAB does.

A no-reference score: the distance between a multivariate Gaussian (MVG) fitted to 36 natural-scene statistics of
the image's sharp 96x96 blocks and the MVG of a set of pristine images. Lower is better (more natural).

Conventions (those of LIVE's ``computequality.m`` and of BasicSR's ``calculate_niqe``):

- Channel: the Y of MATLAB ``rgb2ycbcr`` (BT.601 studio range, rounded to integers as MATLAB does for uint8) for
  colour images; a 2-D array is taken as grey/Y in 0..255. 16-bit images are scaled to 0..255 first.
- The image is cropped to whole 96x96 blocks from the top-left (``crop_border`` pixels are removed from every edge
  first). It must be at least 192x192 after that crop (2x2 blocks; 1x1 leaves the image's own covariance
  undefined): :class:`NiqeError` otherwise.
- MSCN coefficients with the 7x7 Gaussian window (sigma 7/6, normalised) and ``replicate`` borders, C = 1; where
  the 7x7 neighbourhood is constant the coefficient is exactly 0 (see :func:`_mscn`: implementations that sum the 49
  products in floating point get rounding noise there instead, so their scores on images with flat areas differ).
- 18 AGGD moment-matching features per block (shape by the grid 0.2:0.001:10, as ``estimateaggdparam.m``), at two
  scales: the second is MATLAB bicubic ``imresize(im, 0.5)`` (antialiased), with 48x48 blocks.
- Score ``sqrt((mu_p - mu_d)' pinv((cov_p + cov_d) / 2) (mu_p - mu_d))`` with the block features' nan-mean and
  the covariance of the blocks without NaN (MATLAB ``nanmean``/``nancov``). A flat block gives NaN features (as in
  exact arithmetic); an image with fewer than 2 usable blocks (flat, black) raises :class:`NiqeError`. The jobs
  record null for such images (and for images under 192x192) instead of failing them.

Pristine model: srbatch ships parameters it **fitted itself** (``srbatch/data/niqe/srbatch_pristine.npz``) with
MATLAB's ``estimatemodelparam``/``fitniqe`` procedure (blocks whose mean local deviation exceeds 0.75 of the image's
sharpest block) on 16 CC0/public-domain photos listed in ``srbatch/data/niqe/PROVENANCE.md``; refit with
``python -m srbatch.metrics.niqe fit IMAGES... -o params.npz``. Scores with these parameters are NOT comparable with
MATLAB's published NIQE figures (LIVE's ``modelparameters.mat``, fitted on 125 pristine images, is not shipped here:
LIVE's notice grants "this code (the source files) and its documentation" and lists the .mat as a separate
dependency; see PROVENANCE.md). Any ``.npz`` with ``mu`` (36,) and ``cov`` (36, 36) can
be passed as ``params``.

Cost: about 0.35 s per megapixel on one CPU core (float64; measured 0.34 s/MP on a 2.2 MP and 0.36 s/MP on a
5.4 MP photo with one torch thread, on a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from srbatch.errors import ConfigError, SrbatchError
from srbatch.metrics.color import rgb_to_y
from srbatch.metrics.resize import imresize_fast

__all__ = ["NiqeError", "NiqeParams", "BLOCK", "MIN_SIZE", "DEFAULT_PARAMS", "load_params", "niqe", "niqe_features",
           "fit_params", "to_niqe_input"]  # fmt: skip

BLOCK = 96
MIN_SIZE = 2 * BLOCK
DEFAULT_PARAMS = Path(__file__).resolve().parent.parent / "data" / "niqe" / "srbatch_pristine.npz"
_N_FEAT = 36


class NiqeError(SrbatchError, ValueError):
    """NIQE is undefined for this image (too small, or too few blocks with structure)."""


@dataclass(frozen=True)
class NiqeParams:
    """The pristine MVG: ``mu`` (36,) and ``cov`` (36, 36), float64."""

    mu: np.ndarray
    cov: np.ndarray

    def save(self, path: str | Path, **meta: str) -> None:
        np.savez(path, mu=self.mu, cov=self.cov, **{k: np.array(v) for k, v in meta.items()})


def load_params(path: str | Path | None = None) -> NiqeParams:
    """Read a pristine model ``.npz`` (``mu``, ``cov``); ``None`` -> the parameters srbatch ships."""
    return _load_params(str(Path(path).resolve()) if path is not None else str(DEFAULT_PARAMS))


@lru_cache(maxsize=8)
def _load_params(path: str) -> NiqeParams:
    try:
        with np.load(path) as z:
            mu, cov = np.asarray(z["mu"], np.float64).ravel(), np.asarray(z["cov"], np.float64)
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"NIQE params {path!r}: expected an .npz with arrays 'mu' (36,) and 'cov' (36, 36) "
                          f"(make one with `python -m srbatch.metrics.niqe fit IMAGES -o params.npz`); {e}") from e
    finite = bool(np.isfinite(mu).all() and np.isfinite(cov).all())
    if mu.shape != (_N_FEAT,) or cov.shape != (_N_FEAT, _N_FEAT) or not finite:
        raise ConfigError(f"NIQE params {path!r}: expected finite 'mu' (36,) and 'cov' (36, 36); "
                          f"found {mu.shape} and {cov.shape}")  # fmt: skip
    return NiqeParams(mu=mu, cov=cov)


# ------------------------------------------------------------------------------------------------ input handling


def to_niqe_input(img: np.ndarray) -> np.ndarray:
    """The float64 grey/Y plane in 0..255 that NIQE measures (see the module docstring for the convention).

    ``(H, W, 3|4)`` uint8/uint16 RGB(A) -> rounded Y of MATLAB ``rgb2ycbcr`` (alpha dropped); ``(H, W)`` or
    ``(H, W, 1)`` -> the plane itself (uint16 scaled by 255/65535); float input is taken as already in 0..255.
    """
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[2] in (3, 4):
        rgb = a[..., :3]
        if rgb.dtype == np.uint16:
            rgb = rgb.astype(np.float64) * (255.0 / 65535.0)
        return rgb_to_y(rgb, round_output=True)
    if a.ndim != 2:
        raise ConfigError(f"NIQE takes a grey (H, W) or RGB (H, W, 3) image; got shape {a.shape}")
    if a.dtype == np.uint16:
        return a.astype(np.float64) * (255.0 / 65535.0)
    return a.astype(np.float64)


# --------------------------------------------------------------------------------------------------- features


def _window() -> torch.Tensor:
    """MATLAB ``fspecial('gaussian', 7, 7/6)`` normalised to sum 1, as its separable 1-D factor (7,)."""
    x = torch.arange(-3, 4, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2 * (7 / 6) ** 2))
    return g / g.sum()  # outer(g, g) is the 2-D window: exp(-(x^2+y^2)/2s^2) / its sum


def _filter(x: torch.Tensor) -> torch.Tensor:
    """MATLAB ``imfilter(x, window, 'replicate')`` (correlation; the window is symmetric), as two 1-D passes."""
    g = _window().tolist()
    h, w = x.shape
    xp = F.pad(x[None, None], (3, 3, 3, 3), mode="replicate")[0, 0]
    rows = xp[0:h, :] * g[0]
    for k in range(1, 7):
        rows.add_(xp[k : k + h, :], alpha=g[k])
    out = rows[:, 0:w] * g[0]
    for k in range(1, 7):
        out.add_(rows[:, k : k + w], alpha=g[k])
    return out


def _flat(x: torch.Tensor) -> torch.Tensor:
    """True where the 7x7 neighbourhood (replicate borders) is constant: its max equals its min (separable)."""
    h, w = x.shape
    p = F.pad(x[None, None], (3, 3, 3, 3), mode="replicate")[0, 0]
    mx, mn = p[0:h].clone(), p[0:h].clone()
    for k in range(1, 7):
        torch.maximum(mx, p[k : k + h], out=mx)
        torch.minimum(mn, p[k : k + h], out=mn)
    mx2, mn2 = mx[:, 0:w].clone(), mn[:, 0:w].clone()
    for k in range(1, 7):
        torch.maximum(mx2, mx[:, k : k + w], out=mx2)
        torch.minimum(mn2, mn[:, k : k + w], out=mn2)
    return mx2 == mn2


def _mscn(im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MSCN coefficients ``(im - mu) / (sigma + 1)`` and the local deviation ``sigma``.

    Where the 7x7 neighbourhood is constant, ``mu`` is the pixel and ``sigma`` 0 exactly (MSCN 0), as in exact
    arithmetic: a weighted sum of 49 equal values is otherwise off by an ulp in an order-dependent way, which would
    give flat blocks features of rounding noise (that differ between MATLAB, SciPy and here) instead of NaN."""
    mu = _filter(im)
    sigma = torch.sqrt(torch.abs(_filter(im * im) - mu * mu))
    flat = _flat(im)
    mu = torch.where(flat, im, mu)
    sigma = torch.where(flat, torch.zeros_like(sigma), sigma)
    return (im - mu) / (sigma + 1), sigma


def _gamma(x: np.ndarray) -> np.ndarray:
    return np.exp(np.vectorize(math.lgamma, otypes=[np.float64])(x))


_GAM = 0.2 + 0.001 * np.arange(9801)  # MATLAB 0.2:0.001:10
_R_GAM = _gamma(2 / _GAM) ** 2 / (_gamma(1 / _GAM) * _gamma(3 / _GAM))
assert np.all(np.diff(_R_GAM) > 0)  # monotonic: the argmin is one of the two neighbours of the insertion point


def _aggd(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``estimateaggdparam.m`` on each row of ``v`` (n_blocks, n): alpha, beta_l, beta_r (NaN where undefined)."""
    neg, pos = v < 0, v > 0
    sq = v * v
    with np.errstate(invalid="ignore", divide="ignore"):
        left = np.sqrt((sq * neg).sum(1) / neg.sum(1))
        right = np.sqrt((sq * pos).sum(1) / pos.sum(1))
        g = left / right
        rhat = np.abs(v).mean(1) ** 2 / sq.mean(1)
        rnorm = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    # [~, i] = min((r_gam - rnorm).^2): the nearest grid value, first on ties; index 1 when rnorm is NaN/inf.
    i = np.clip(np.searchsorted(_R_GAM, np.nan_to_num(rnorm, nan=0.0, posinf=0.0)), 1, len(_R_GAM) - 1)
    d_lo, d_hi = (_R_GAM[i - 1] - rnorm) ** 2, (_R_GAM[i] - rnorm) ** 2
    idx = np.where(d_lo <= d_hi, i - 1, i)
    idx = np.where(np.isfinite(rnorm), idx, 0)
    alpha = _GAM[idx]
    ratio = np.sqrt(_gamma(1 / alpha) / _gamma(3 / alpha))
    return alpha, left * ratio, right * ratio


def _block_features(mscn: np.ndarray, b: int) -> np.ndarray:
    """``computefeature.m`` on every ``b x b`` block of ``mscn`` (whole blocks): (n_blocks, 18)."""
    h, w = mscn.shape
    blocks = mscn.reshape(h // b, b, w // b, b).transpose(0, 2, 1, 3).reshape(-1, b, b)
    flat = blocks.reshape(len(blocks), -1)
    alpha, bl, br = _aggd(flat)
    cols = [alpha, (bl + br) / 2]
    for sh in ((0, 1), (1, 0), (1, 1), (-1, 1)):  # circshift within the block
        pair = (blocks * np.roll(blocks, sh, axis=(1, 2))).reshape(len(blocks), -1)
        alpha, bl, br = _aggd(pair)
        mean = (br - bl) * (_gamma(2 / alpha) / _gamma(1 / alpha))
        cols += [alpha, mean, bl, br]
    return np.stack(cols, axis=1)


def _crop(y: np.ndarray, crop_border: int) -> np.ndarray:
    if crop_border < 0:
        raise ConfigError(f"NIQE crop_border must be >= 0; got {crop_border}")
    if crop_border:
        y = y[crop_border:-crop_border, crop_border:-crop_border]
    return y


def niqe_features(y: np.ndarray, *, with_sharpness: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The (n_blocks, 36) features of a grey/Y float plane in 0..255 (cropped to whole 96x96 blocks).

    ``with_sharpness=True`` also returns each block's mean local deviation (``fitniqe``'s sharpness) at scale 1.
    """
    h, w = y.shape
    if h < BLOCK or w < BLOCK:
        raise NiqeError(f"NIQE needs at least one {BLOCK}x{BLOCK} block; got a {w}x{h} image")
    nh, nw = h // BLOCK, w // BLOCK
    im = torch.from_numpy(np.ascontiguousarray(y[: nh * BLOCK, : nw * BLOCK], dtype=np.float64))
    feats, sharp = [], None
    for scale in (1, 2):
        mscn, sigma = _mscn(im)
        feats.append(_block_features(mscn.numpy(), BLOCK // scale))
        if scale == 1:
            s = sigma.numpy()
            sharp = s.reshape(nh, BLOCK, nw, BLOCK).mean(axis=(1, 3)).ravel()
            im = imresize_fast(im, 0.5)  # float64 in, float64 out: MATLAB's weights, a few taps per pixel
    out = np.concatenate(feats, axis=1)
    return (out, sharp) if with_sharpness else out


def niqe(img: np.ndarray, *, params: NiqeParams | str | Path | None = None, crop_border: int = 0) -> float:
    """NIQE of an image (lower = more natural); see the module docstring for the exact convention.

    ``img``: RGB ``(H, W, 3)`` uint8/uint16 (measured on rounded MATLAB Y) or a grey/Y plane ``(H, W)`` in 0..255.
    ``params``: a :class:`NiqeParams`, a path to an ``.npz``, or ``None`` for srbatch's fitted pristine model.
    Raises :class:`NiqeError` when the image is smaller than 192x192 after ``crop_border`` or has fewer than two
    blocks with structure (a flat or black image).
    """
    p = params if isinstance(params, NiqeParams) else load_params(params)
    y = _crop(to_niqe_input(img), crop_border)
    h, w = y.shape
    if h < MIN_SIZE or w < MIN_SIZE:
        raise NiqeError(f"NIQE needs an image of at least {MIN_SIZE}x{MIN_SIZE} pixels (2x2 blocks of {BLOCK}) "
                        f"after crop_border={crop_border}; got {w}x{h}. Measure a larger image (e.g. the SR "
                        "output)")  # fmt: skip
    feat = niqe_features(y)
    return _distance(feat, p)


def _distance(feat: np.ndarray, p: NiqeParams) -> float:
    complete = feat[~np.isnan(feat).any(axis=1)]
    if len(complete) < 2:
        raise NiqeError(f"NIQE is undefined: only {len(complete)} of {len(feat)} blocks have structure (a flat or "
                        f"black image has none); nothing to compare with the pristine model")  # fmt: skip
    mu = np.nanmean(feat, axis=0)
    cov = np.cov(complete, rowvar=False)
    d = p.mu - mu
    return float(np.sqrt(d @ np.linalg.pinv((p.cov + cov) / 2) @ d))


# --------------------------------------------------------------------------------------------------- fitting


def fit_params(images: Sequence[np.ndarray], *, sharpness_threshold: float = 0.75) -> NiqeParams:
    """MATLAB ``estimatemodelparam``/``fitniqe``: the pristine MVG of the sharp blocks of ``images``.

    Each image (any size >= 96x96; converted as :func:`to_niqe_input`) contributes the blocks whose mean local
    deviation exceeds ``sharpness_threshold`` times that of its sharpest block. Rows with NaN/inf are left out of
    the covariance (``nancov``) and of each column's mean (``nanmean``).
    """
    if not 0 <= sharpness_threshold < 1:
        raise ConfigError(f"sharpness_threshold must be in [0, 1); got {sharpness_threshold}")
    rows = []
    for img in images:
        feat, sharp = niqe_features(to_niqe_input(img), with_sharpness=True)
        rows.append(feat[sharp > sharpness_threshold * sharp.max()])
    pris = np.concatenate(rows) if rows else np.empty((0, _N_FEAT))
    pris[~np.isfinite(pris)] = np.nan
    complete = pris[~np.isnan(pris).any(axis=1)]
    if len(complete) <= _N_FEAT:
        raise NiqeError(f"fitting NIQE needs more than {_N_FEAT} sharp blocks; got {len(complete)}: add images")
    return NiqeParams(mu=np.nanmean(pris, axis=0), cov=np.cov(complete, rowvar=False))


def _read(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(im).astype(np.uint16)
        return np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m srbatch.metrics.niqe", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    fit = sub.add_parser("fit", help="fit a pristine model (MATLAB fitniqe procedure) from local image files")
    fit.add_argument("images", nargs="+")
    fit.add_argument("-o", "--output", required=True, help="the .npz to write (mu, cov, files, sha256)")
    fit.add_argument("--sharpness-threshold", type=float, default=0.75)
    score = sub.add_parser("score", help="print the NIQE of local image files")
    score.add_argument("images", nargs="+")
    score.add_argument("--params", default=None)
    score.add_argument("--crop-border", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "fit":
        p = fit_params([_read(f) for f in a.images], sharpness_threshold=a.sharpness_threshold)
        names = [Path(f).name for f in a.images]
        digests = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in a.images]
        p.save(a.output, files="\n".join(names), sha256="\n".join(digests),
               sharpness_threshold=str(a.sharpness_threshold))  # fmt: skip
        print(f"wrote {a.output}: {len(names)} images")
        return 0
    rc = 0
    for f in a.images:
        try:
            print(f"{niqe(_read(f), params=a.params, crop_border=a.crop_border):.6f}\t{f}")
        except NiqeError as e:
            print(f"-\t{f}\t{e}")
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
