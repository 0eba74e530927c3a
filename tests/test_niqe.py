"""NIQE: agreement with BasicSR's MATLAB-checked implementation, behaviour on distorted photos, errors, fitting."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from _niqe_reference import basicsr_niqe as ref
from srbatch.errors import ConfigError
from srbatch.metrics import niqe as N
from srbatch.metrics.resize import imresize

SET5 = [f"sets/Set5/image_SRF_2/img_00{i}_SRF_2_HR.png" for i in range(1, 6)]
DOMAIN = ["domain/faces/max_facial_recognizer/Luciano.png", "domain/faces/max_sr_samples/original/face_paint.png"]


def _rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _ref_niqe(y: np.ndarray, params: N.NiqeParams) -> float:
    # BasicSR's niqe with its own window argument: fspecial('gaussian', 7, 7/6) normalised, built here with numpy.
    x = np.arange(-3, 4, dtype=np.float64)
    g = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * (7 / 6) ** 2))
    return ref.niqe(y, params.mu[None], params.cov, g / g.sum())


def _f64_resize(img, scale, antialiasing=True):
    return imresize(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float64)), scale).numpy()


def _dithered_y(path) -> np.ndarray:
    """The image's rounded MATLAB Y with a fixed +-1 dither, so that no 7x7 neighbourhood is constant.

    In constant neighbourhoods srbatch's MSCN is exactly 0 (flat blocks: NaN features), while BasicSR (like MATLAB)
    sums 49 equal products in floating point and gets rounding noise there; see test_flat_blocks_are_nan. Everywhere
    else both compute the same function, which is what these tests compare."""
    y = N.to_niqe_input(_rgb(path))
    d = np.random.default_rng(7).integers(-1, 2, y.shape)
    y = np.clip(y + d, 0, 255)
    assert not N._flat(torch.from_numpy(y)).any()
    return y


@pytest.mark.refs
@pytest.mark.parametrize("rel", SET5 + DOMAIN)
def test_matches_basicsr_with_the_same_resize(refs, rel, monkeypatch):
    """Every step but the resize (MSCN, blocks, AGGD grid search, shifts, nanmean/nancov, pinv distance) vs BasicSR.

    BasicSR's imresize runs in float32 (MATLAB's in float64), so here both use srbatch's float64 MATLAB imresize; the
    resize itself is checked against BasicSR's below. Same grey input and the same parameters."""
    y = _dithered_y(refs / rel)
    monkeypatch.setattr(ref, "imresize", _f64_resize)
    assert N.niqe(y) == pytest.approx(_ref_niqe(y, N.load_params()), abs=1e-9, rel=0)


@pytest.mark.refs
@pytest.mark.parametrize("rel", [SET5[0], *DOMAIN])
def test_matches_basicsr_end_to_end(refs, rel):
    """BasicSR unmodified (its float32 imresize) on images with >= 16 blocks: the float32 rounding moves a few AGGD
    shape estimates by one grid step (0.001), which moves the score by < 1e-3 here (measured 6e-5 .. 4e-4)."""
    y = _dithered_y(refs / rel)
    assert N.niqe(y) == pytest.approx(_ref_niqe(y, N.load_params()), abs=1e-3, rel=0)
    h, w = (y.shape[0] // 96) * 96, (y.shape[1] // 96) * 96
    theirs = ref.imresize(y[:h, :w] / 255.0, scale=0.5) * 255.0
    ours = imresize(torch.from_numpy(np.ascontiguousarray(y[:h, :w])), 0.5).numpy()
    assert np.abs(ours - theirs).max() < 1e-3  # float32 rounding only


def test_flat_blocks_are_nan():
    """A block whose every 7x7 neighbourhood is constant has MSCN 0: its AGGD features are NaN (alpha 0.2, MATLAB's
    first grid value for an all-NaN argmin), as in exact arithmetic; the rest of the image is measured as usual."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 256, (288, 288)).astype(np.float64)
    y[:102, :102] = 100.0  # 100: a value whose 49-term weighted sum is off by an ulp in floating point
    feat = N.niqe_features(y)
    assert np.all(feat[0, [0, 2, 6, 10, 14]] == 0.2) and np.isnan(feat[0, [1, 3, 4, 5, 7, 11, 15]]).all()
    assert np.isfinite(feat[1:]).all()
    assert np.isfinite(N.niqe(y))


def _distortions(im: Image.Image, kind: str) -> list[np.ndarray]:
    a = np.asarray(im)
    if kind == "blur":
        return [np.asarray(im.filter(ImageFilter.GaussianBlur(s))) for s in (1, 2, 3)]
    if kind == "noise":
        rng = np.random.default_rng(0)
        return [np.clip(a + rng.normal(0, s, a.shape), 0, 255).round().astype(np.uint8) for s in (5, 15, 30)]
    out = []
    for q in (30, 15, 5):
        b = io.BytesIO()
        im.save(b, "JPEG", quality=q)
        out.append(np.asarray(Image.open(b).convert("RGB")))
    return out


@pytest.mark.refs
@pytest.mark.parametrize("rel", ["sets/Set5/image_SRF_2/img_001_SRF_2_HR.png",
                                 "domain/faces/max_sr_samples/original/face.png"])  # fmt: skip
@pytest.mark.parametrize("kind", ["blur", "noise", "jpeg"])
def test_rises_with_distortion(refs, rel, kind):
    """With the shipped parameters, NIQE increases with each level of blur, noise and JPEG compression."""
    im = Image.open(refs / rel).convert("RGB")
    if im.width > 600:
        im = im.resize((im.width // 2, im.height // 2), Image.BICUBIC)
    base = N.niqe(np.asarray(im))
    scores = [N.niqe(d) for d in _distortions(im, kind)]
    assert all(b > a for a, b in zip(scores, scores[1:])), (base, scores)
    assert scores[-1] > base + 2, (base, scores)
    if kind != "jpeg":  # mild JPEG can score below the original (a known NIQE trait); blur and noise never do here
        assert scores[0] > base, (base, scores)


def test_errors_small_flat_and_bad_params(tmp_path):
    rng = np.random.default_rng(1)
    with pytest.raises(N.NiqeError, match="192x192"):
        N.niqe(rng.integers(0, 256, (191, 400, 3), dtype=np.uint8))
    with pytest.raises(N.NiqeError, match="crop_border=4"):
        N.niqe(rng.integers(0, 256, (196, 400), dtype=np.uint8).astype(np.float64), crop_border=4)
    for flat in (np.zeros((256, 256, 3), np.uint8), np.full((300, 300), 128.0)):
        with pytest.raises(N.NiqeError, match="flat or black"):
            N.niqe(flat)
    bad = tmp_path / "p.npz"
    np.savez(bad, mu=np.zeros(18), cov=np.eye(18))
    with pytest.raises(ConfigError, match="'mu' \\(36,\\)"):
        N.niqe(rng.integers(0, 256, (200, 200), dtype=np.uint8), params=bad)
    with pytest.raises(ConfigError, match="make one with"):
        N.load_params(tmp_path / "missing.npz")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "small.png")
    assert N.main(["score", str(tmp_path / "small.png")]) == 1  # a line with the reason, exit 1, no traceback


def test_channel_convention():
    """RGB is measured on the rounded Y of MATLAB rgb2ycbcr: the same score as that plane passed as grey."""
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (200, 210, 3), dtype=np.uint8)
    y = np.floor(16 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255 + 0.5)
    assert N.niqe(rgb) == N.niqe(y)
    assert N.niqe(rgb) != N.niqe(rgb[..., ::-1])  # channel order matters (BGR would be a bug)


def _ref_fit(images, threshold=0.75):
    """A float64 loop transcription of LIVE's estimatemodelparam.m, with BasicSR's compute_feature per block."""
    from scipy.ndimage import convolve

    x = np.arange(-3, 4, dtype=np.float64)
    g = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * (7 / 6) ** 2))
    g /= g.sum()
    rows = []
    for img in images:
        im = N.to_niqe_input(img)
        h, w = (im.shape[0] // 96) * 96, (im.shape[1] // 96) * 96
        im = im[:h, :w]
        feats, sharp = [], []
        for scale in (1, 2):
            mu = convolve(im, g, mode="nearest")
            sigma = np.sqrt(np.abs(convolve(im * im, g, mode="nearest") - mu * mu))
            s = (im - mu) / (sigma + 1)
            b = 96 // scale
            f = []
            for i in range(h // 96):
                for j in range(w // 96):
                    f.append(ref.compute_feature(s[i * b:(i + 1) * b, j * b:(j + 1) * b]))
                    if scale == 1:
                        sharp.append(sigma[i * 96:(i + 1) * 96, j * 96:(j + 1) * 96].mean())
            feats.append(np.array(f))
            im = _f64_resize(im, 0.5)
        feat = np.concatenate(feats, axis=1)
        sharp = np.array(sharp)
        rows.append(feat[sharp > threshold * sharp.max()])
    pris = np.concatenate(rows)
    return np.nanmean(pris, axis=0), np.cov(pris[~np.isnan(pris).any(axis=1)], rowvar=False)


@pytest.mark.refs
def test_fit_matches_loop_transcription_and_cli(refs, tmp_path):
    paths = [refs / SET5[0], *(refs / d for d in DOMAIN), refs / "domain/faces/max_sr_samples/original/face.png"]
    imgs = [_dithered_y(p) for p in paths]  # no constant neighbourhoods (see _dithered_y)
    mu, cov = _ref_fit(imgs, 0.5)  # 57 of 193 blocks (0.75 keeps 15: too few for a 36-d covariance)
    p = N.fit_params(imgs, sharpness_threshold=0.5)
    np.testing.assert_allclose(p.mu, mu, rtol=0, atol=1e-10)
    np.testing.assert_allclose(p.cov, cov, rtol=0, atol=1e-10)
    files = []
    for p, y in zip(paths, imgs):  # the command reads files: the dithered planes as 8-bit grey PNGs
        files.append(tmp_path / f"{p.stem}.png")
        Image.fromarray(y.astype(np.uint8)).save(files[-1])
    out = tmp_path / "fit.npz"
    assert N.main(["fit", *map(str, files), "-o", str(out), "--sharpness-threshold", "0.5"]) == 0
    q = N.load_params(out)
    np.testing.assert_allclose(q.mu, mu, rtol=0, atol=1e-10)
    np.testing.assert_allclose(q.cov, cov, rtol=0, atol=1e-10)
    with np.load(out) as z:
        assert str(z["files"]).split("\n") == [f.name for f in files]


def test_shipped_params_are_the_documented_file():
    import hashlib

    text = (N.DEFAULT_PARAMS.parent / "PROVENANCE.md").read_text()
    assert hashlib.sha256(N.DEFAULT_PARAMS.read_bytes()).hexdigest() in text
    with np.load(N.DEFAULT_PARAMS) as z:
        for sha in str(z["sha256"]).split("\n"):
            assert sha in text
    p = N.load_params()
    assert np.all(np.linalg.eigvalsh(p.cov) > 0)
