"""`--noise-sigma`: seeded Gaussian noise on the LR, measured against the clean image (the CNN-vs-VAE denoising
comparison runs it at scale 1, where `bicubic` is the noisy input itself). The noise is re-created here with numpy from
the documented seed rule; PSNR is recomputed here with numpy; a second model is run by hand on the re-created input."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from srbatch.errors import ConfigError
from srbatch.evaluate import evaluate, reference_pair
from srbatch.io.images import DecodedImage

NAMES = ("baby", "bird", "grey_butterfly")


def _noisy(clean: np.ndarray, sigma: float, key: str) -> np.ndarray:
    """The documented rule: seed = first 8 bytes of sha256(key) little-endian; default_rng(seed).standard_normal of
    the image's shape, x sigma (0..255 units; x 257 for 16-bit), rounded half to even, clipped."""
    seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    peak = np.iinfo(clean.dtype).max
    z = np.random.default_rng(seed).standard_normal(clean.shape)
    return np.clip(np.rint(clean.astype(np.float64) + sigma * peak / 255.0 * z), 0, peak).astype(clean.dtype)


def _y(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., k].astype(np.float64) for k in range(3))
    return np.floor(16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0 + 0.5)


def _expected_psnr(clean: np.ndarray, sigma: float, border: int = 1) -> tuple[float, float]:
    """PSNR that noise of ``sigma`` is expected to give on ``clean`` (uint8), clipping and rounding included, from the
    normal distribution (``math.erf``): E[(clip(round(x + sigma z)) - x)^2] for each level x, averaged over the
    measured pixels; and the tolerance: 4 standard deviations of the sample MSE (~ sqrt(2 / n)), in dB."""
    k = np.arange(256, dtype=np.float64)
    cdf = np.vectorize(lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2))))
    per_level = np.empty(256)
    for x in range(256):  # P(result = k) for the rounded, clipped value
        lo = np.concatenate([[-np.inf], (k[1:] - 0.5 - x) / sigma])
        hi = np.concatenate([(k[:-1] + 0.5 - x) / sigma, [np.inf]])
        p = cdf(hi) - cdf(lo)
        per_level[x] = np.sum(p * (k - x) ** 2)
    inner = clean[border:-border, border:-border]
    mse = per_level[inner].mean()
    return 10 * math.log10(255.0**2 / mse), 4 * 10 / math.log(10) * math.sqrt(2 / inner.size)


def _psnr(a: np.ndarray, b: np.ndarray, border: int = 1) -> float:
    d = a.astype(np.float64)[border:-border, border:-border] - b.astype(np.float64)[border:-border, border:-border]
    return 10 * math.log10(255.0**2 / np.mean(d**2))


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory, refs):
    """Three 96 x 96 crops of Set5 HR images (two colour, one greyed), as PNG; returns (folder, {name: pixels})."""
    src = refs / "sets" / "Set5" / "image_SRF_4"
    d = tmp_path_factory.mktemp("noiseset")
    px = {}
    for name, i, box in (("baby", 1, (200, 160)), ("bird", 2, (96, 96)), ("grey_butterfly", 3, (80, 80))):
        im = Image.open(src / f"img_00{i}_SRF_4_HR.png").convert("RGB").crop((*box, box[0] + 96, box[1] + 96))
        a = np.asarray(im)
        if name.startswith("grey"):
            a = np.floor(a.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) + 0.5).astype(np.uint8)
        Image.fromarray(a).save(d / f"{name}.png")
        px[name] = a
    return d, px


def test_noisy_input_is_the_documented_recreation():
    rng = np.random.default_rng(1)
    hr = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    img = DecodedImage(pixels=hr.copy(), mode="RGB")
    lr, hr_px = reference_pair(img, None, 1, name="photo_7", noise_sigma=25)
    np.testing.assert_array_equal(lr.pixels, _noisy(hr, 25, "photo_7"))
    np.testing.assert_array_equal(hr_px, hr)  # the reference stays clean
    assert np.abs(lr.pixels.astype(int) - hr).mean() > 10  # noise there (sigma 25: mean |n| ~ 20 before clipping)
    again, _ = reference_pair(DecodedImage(pixels=hr.copy(), mode="RGB"), None, 1, name="photo_7", noise_sigma=25)
    np.testing.assert_array_equal(again.pixels, lr.pixels)  # reruns identical
    other, _ = reference_pair(DecodedImage(pixels=hr.copy(), mode="RGB"), None, 1, name="photo_8", noise_sigma=25)
    assert (other.pixels != lr.pixels).mean() > 0.5  # another image key, other noise
    clean, _ = reference_pair(DecodedImage(pixels=hr.copy(), mode="RGB"), None, 1, name="photo_7")
    np.testing.assert_array_equal(clean.pixels, hr)
    # a given LR at x4 gets the noise; 16-bit images get sigma x 257 (0..255 units)
    lr4 = rng.integers(0, 256, (6, 5, 1), dtype=np.uint8)
    got, hr4 = reference_pair(DecodedImage(pixels=np.zeros((24, 20, 1), np.uint8), mode="L"),
                              DecodedImage(pixels=lr4.copy(), mode="L"), 4, name="g", noise_sigma=5)  # fmt: skip
    np.testing.assert_array_equal(got.pixels, _noisy(lr4, 5, "g")) and np.testing.assert_array_equal(hr4, 0)
    wide = rng.integers(0, 65536, (8, 8, 3), dtype=np.uint16)
    got16, _ = reference_pair(DecodedImage(pixels=wide.copy(), mode="RGB"), None, 1, name="w", noise_sigma=3)
    np.testing.assert_array_equal(got16.pixels, _noisy(wide, 3, "w"))
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="noise_sigma"):
            reference_pair(DecodedImage(pixels=hr.copy()), None, 1, name="x", noise_sigma=bad)


def test_identity_at_scale_1_measures_the_noise(clean_set):
    folder, px = clean_set
    sigma = 10.0
    res = evaluate("bicubic", scale=1, hr=str(folder), noise_sigma=sigma)
    assert res.noise_sigma == sigma and "Gaussian noise of sigma 10" in res.convention
    assert "noise_sigma=10" in res.table()
    rows = {r.image: r for r in res.rows}
    assert set(rows) == set(NAMES) and res.crop_border == 1
    ideal = 20 * math.log10(255 / sigma)  # 28.13 dB: MSE = sigma^2 per sample
    for name, clean in px.items():
        noisy = _noisy(clean, sigma, name)
        r = rows[name]
        assert r.psnr_rgb == pytest.approx(_psnr(noisy, clean), abs=1e-9), name
        if clean.ndim == 3:
            assert r.psnr_y == pytest.approx(_psnr(_y(noisy), _y(clean)), abs=1e-9), name
        else:
            assert r.grey and r.psnr_y == pytest.approx(r.psnr_rgb, abs=1e-12)
        # Against theory: 20*log10(255/sigma) without clipping (rounding adds 1/12 level^2: -0.004 dB); with the
        # clipping at 0 and 255 (which only removes error) the expectation over this image's levels, computed from the
        # normal distribution; the sample MSE strays from it by ~sqrt(2/n): tolerance 4 of those (~0.15-0.26 dB).
        expected, tol = _expected_psnr(clean, sigma)
        print(f"{name}: PSNR {r.psnr_rgb:.3f} dB (expected {expected:.3f} +- {tol:.3f} with clipping; "
              f"{ideal:.3f} without), PSNR_Y {r.psnr_y:.3f} dB")  # fmt: skip
        assert r.psnr_rgb == pytest.approx(expected, abs=tol), name
        assert r.psnr_rgb > ideal - tol, name
        if clean.ndim == 3:  # Y mixes three independent channel noises: sigma_Y = sigma * |(65.481, 128.553, 24.966)|
            # / 255 = 0.574 sigma, 4.8 dB above PSNR_RGB before clipping and Y rounding
            gain = 20 * math.log10(255 / math.hypot(65.481, 128.553, 24.966))
            assert gain - 1.0 < r.psnr_y - r.psnr_rgb < gain + 0.5, (name, r.psnr_y - r.psnr_rgb, gain)


def _espcn_x1(path) -> str:
    """An ESPCN x1 checkpoint that is nearly the identity (each YCbCr channel through the centre taps at gain 0.1,
    in tanh's linear range, and back at gain 10) plus small random weights everywhere: a real second model whose
    output follows its input closely (an untrained one saturates)."""
    from srbatch.models.loader import build_model, save_model

    torch.manual_seed(0)
    desc = build_model("espcn", scale=1)
    m = desc.module
    with torch.no_grad():
        for conv, gain in ((m.conv_1, 0.1), (m.conv_2, 1.0), (m.conv_3, 10.0)):
            conv.weight.normal_(0, 1e-3)
            conv.bias.zero_()
            c = conv.weight.shape[-1] // 2
            for k in range(3):
                conv.weight[k, k, c, c] += gain
    save_model(desc, str(path))
    return str(path)


def _espcn_by_hand(ckpt: str, rgb: np.ndarray, grey: bool = False) -> np.ndarray:
    """The ESPCN x1 checkpoint run here: MATLAB rgb2ycbcr (float64) -> module (float32) -> inverse -> clamp -> round;
    ``grey``: the BT.601 luma of the unclamped RGB output, then clamp and round (srbatch's way back to grey)."""
    from srbatch.models.loader import load_model

    m = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]]) / 255.0
    off = np.array([16.0, 128.0, 128.0]) / 255.0
    ycc = rgb.astype(np.float64) / 255.0 @ m.T + off
    module = load_model(ckpt, scale=1).module.eval()
    with torch.no_grad():
        y = module(torch.from_numpy(ycc).permute(2, 0, 1)[None].float())[0].permute(1, 2, 0).double().numpy()
    back = (y - off) @ np.linalg.inv(m).T
    if grey:
        back = back @ np.array([0.299, 0.587, 0.114])
    return np.floor(np.clip(back, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def test_compare_job_scale_1_two_models_same_noise(ray_cluster, clean_set, tmp_path):
    from srbatch.compare import CompareConfig, run_compare

    folder, px = clean_set
    espcn = _espcn_x1(tmp_path / "espcn_x1.safetensors")
    out = tmp_path / "cmp"
    res = run_compare(CompareConfig(images=str(folder / "*.png"), models=f"bicubic,{espcn}", scale=1, noise_sigma=25,
                                    output=str(out), crop_size=32, crops_per_image=1, progress=False))  # fmt: skip
    assert res.exit_code == 0 and res.mode == "reference"  # auto: the noise makes it a reference run
    rows = pq.read_table(out / "comparison.parquet").to_pylist()
    assert len(rows) == 2 * len(NAMES) and {r["noise_sigma"] for r in rows} == {25.0}
    assert {r["image"] for r in rows if r["grey"]} == {"grey_butterfly"}
    by = {(r["image"], r["model"]): r for r in rows}
    for name, clean in px.items():
        noisy = _noisy(clean, 25, name)
        # bicubic at x1 is the identity: its output is the noisy input, pixel for pixel
        b = by[(name, "bicubic")]
        got = np.asarray(Image.open(b["output_uri"]))
        np.testing.assert_array_equal(got, noisy)
        assert b["psnr_rgb"] == pytest.approx(_psnr(noisy, clean), abs=1e-9)
        # the second model got the same noisy input: its output is the module run here on the re-created noisy image
        e = by[(name, "espcn_x1")]
        rgb_in = noisy if noisy.ndim == 3 else np.repeat(noisy[..., None], 3, axis=2)
        mine = _espcn_by_hand(espcn, rgb_in, grey=noisy.ndim == 2)
        theirs = np.asarray(Image.open(e["output_uri"]))
        # float32 in srbatch vs float64 here: a few pixels one level apart at most
        diff = np.abs(theirs.astype(int) - mine.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (name, diff.max(), (diff > 0).mean())
        assert e["psnr_rgb"] == pytest.approx(_psnr(mine, clean), abs=0.01)
        # ... and not the clean one (this untrained ESPCN smooths a lot, but far more than 1 % of its pixels move)
        from_clean = _espcn_by_hand(espcn, np.repeat(clean[..., None], 3, axis=2) if clean.ndim == 2 else clean,
                                    grey=clean.ndim == 2)  # fmt: skip
        assert (theirs != from_clean).mean() > 0.1, (name, (theirs != from_clean).mean())
    page = (out / "index.html").read_text()
    assert "noise_sigma=25" in page and "sigma 25" in page and "noise_sigma=25" in res.summary()


def test_noise_option_rules(tmp_path):
    from pydantic import ValidationError

    from srbatch.cli import build_parser
    from srbatch.compare.config import CompareConfig
    from srbatch.compare.runner import choose_mode

    base = {"images": "x/", "models": "bicubic", "output": "o/"}
    for bad in (-1, float("nan")):
        with pytest.raises(ValidationError, match="noise_sigma"):
            CompareConfig(**base, noise_sigma=bad)
    with pytest.raises(ValidationError, match="noise-sigma needs the clean images"):
        CompareConfig(**base, noise_sigma=5, mode="real")
    assert choose_mode(CompareConfig(**base, noise_sigma=5), [])[0] == "reference"
    assert choose_mode(CompareConfig(**base), [])[0] == "real"  # nothing readable: real, unless noise asks otherwise
    args = build_parser().parse_args(["evaluate", "--model", "bicubic", "--scale", "1", "--hr", "x", "--noise-sigma",
                                      "7.5", "--grey-as-rgb"])  # fmt: skip
    assert args.noise_sigma == 7.5 and args.grey_as_rgb is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--model", "bicubic", "--scale", "1", "--hr", "x", "--noise-sigma",
                                   "-2"])  # fmt: skip
    with pytest.raises(ConfigError, match="noise_sigma"):
        evaluate("bicubic", scale=1, hr=str(tmp_path), noise_sigma=-1)
