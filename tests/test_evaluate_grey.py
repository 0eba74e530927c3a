"""Grey images measured both ways (`--grey-as-rgb`): as they are (the MATLAB benchmark tables) or converted to RGB
first (test scripts that read every image with OpenCV as 3-channel). Checked against an independent numpy path: the
Y formula of MATLAB ``rgb2ycbcr`` written out here, PSNR with ``scale`` border pixels shaved, SR pixels from MATLAB
bicubic (:func:`srbatch.metrics.resize.imresize_uint8`) or from the IMDN module run by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from srbatch.evaluate import evaluate
from srbatch.metrics.resize import imresize_uint8

SRBATCH = str(Path(sys.executable).parent / "srbatch")
SCALE = 4
AS_RGB_GAIN = 20 * math.log10(255 / 219)  # 1.3219 dB: grey RGB's Y is 16 + 219/255 * grey, so every error shrinks
COLOUR = ("img_001_SRF_4", "img_002_SRF_4")
GREY = "grey_003"


def _y_matlab(rgb: np.ndarray) -> np.ndarray:
    """Y of MATLAB ``rgb2ycbcr`` on uint8 RGB (its uint8 result: rounded half up), float64."""
    r, g, b = (rgb[..., k].astype(np.float64) for k in range(3))
    return np.floor(16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0 + 0.5)


def _psnr(a: np.ndarray, b: np.ndarray, border: int) -> float:
    d = a.astype(np.float64)[border:-border, border:-border] - b.astype(np.float64)[border:-border, border:-border]
    return 10 * math.log10(255.0**2 / np.mean(d**2))


def _grey_of(rgb: np.ndarray) -> np.ndarray:
    """A grey version of an RGB photo (ITU-R 601 luma, rounded), made here without srbatch."""
    return np.floor(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) + 0.5).astype(np.uint8)


@pytest.fixture(scope="module")
def grey_set(tmp_path_factory, refs) -> Path:
    """Set5 x4 images 1 and 2 (HR + official LR; the top-left 160 x 160 HR / 40 x 40 LR, to keep the test fast) and a
    grey image made from image 3 (its whole HR and LR greyed)."""
    src = refs / "sets" / "Set5" / "image_SRF_4"
    d = tmp_path_factory.mktemp("greyset")
    for name in COLOUR:
        for t, side in (("HR", 160), ("LR", 40)):
            Image.open(src / f"{name}_{t}.png").crop((0, 0, side, side)).save(d / f"{name}_{t}.png")
    for t in ("HR", "LR"):
        rgb = np.asarray(Image.open(src / f"img_003_SRF_4_{t}.png").convert("RGB"))
        Image.fromarray(_grey_of(rgb), mode="L").save(d / f"{GREY}_{t}.png")
    return d


def _read(d: Path, name: str, t: str) -> np.ndarray:
    return np.asarray(Image.open(d / f"{name}_{t}.png"))


def _rows(res) -> dict:
    return {r.image: r for r in res.rows}


def _check_both_ways(
    as_is, as_rgb, grey_sr_as_is: np.ndarray, grey_sr_as_rgb: np.ndarray, hr: np.ndarray, tol: float = 1e-9
) -> float:
    """The shared assertions (``tol``: dB between srbatch's grey-row PSNR_Y and the one computed here); returns the
    as-RGB gain of the grey image's PSNR_Y."""
    a, b = _rows(as_is), _rows(as_rgb)
    assert set(a) == set(b) == {*COLOUR, GREY}
    assert {k for k, r in a.items() if r.grey} == {k for k, r in b.items() if r.grey} == {GREY}
    assert as_is.grey_as_rgb is False and as_rgb.grey_as_rgb is True
    for name in COLOUR:  # the option changes nothing on colour images
        for k in ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"):
            assert getattr(a[name], k) == getattr(b[name], k), (name, k)
    # as is: Y is the grey plane itself; as RGB: Y of MATLAB rgb2ycbcr of the RGB SR output and of grey-RGB HR
    assert a[GREY].channels == 1 and b[GREY].channels == 3
    assert a[GREY].psnr_y == pytest.approx(_psnr(grey_sr_as_is, hr, SCALE), abs=tol)
    hr_rgb = np.repeat(hr[..., None], 3, axis=2)
    assert b[GREY].psnr_y == pytest.approx(_psnr(_y_matlab(grey_sr_as_rgb), _y_matlab(hr_rgb), SCALE), abs=tol)
    return b[GREY].psnr_y - a[GREY].psnr_y


def test_bicubic_grey_image_both_ways(grey_set):
    as_is = evaluate("bicubic", scale=SCALE, hr=str(grey_set), lr=str(grey_set))
    as_rgb = evaluate("bicubic", scale=SCALE, hr=str(grey_set), lr=str(grey_set), grey_as_rgb=True)
    hr, lr = _read(grey_set, GREY, "HR"), _read(grey_set, GREY, "LR")
    sr = imresize_uint8(lr, SCALE)  # MATLAB bicubic of the grey LR; of grey RGB it is the same plane three times
    gain = _check_both_ways(as_is, as_rgb, sr, np.repeat(sr[..., None], 3, axis=2), hr)
    # Bicubic of grey RGB is exactly grey, so Y = 16 + 219/255 * grey: the error shrinks by 219/255 and PSNR rises by
    # 20*log10(255/219) = 1.3219 dB, up to the rounding of Y to 8 bits (variance ~1/6 level^2 against an MSE of ~400
    # after the 219/255 scaling: ~0.002 dB). Tolerance 0.005 dB. Measured: 1.3214 dB.
    print(f"bicubic grey_003 x4: as is {_rows(as_is)[GREY].psnr_y:.4f} dB, as RGB {_rows(as_rgb)[GREY].psnr_y:.4f} "
          f"dB, gain {gain:.4f} dB (ideal {AS_RGB_GAIN:.4f})")  # fmt: skip
    assert gain == pytest.approx(AS_RGB_GAIN, abs=0.005)


def test_real_checkpoint_grey_image_both_ways(grey_set, refs):
    """The official IMDN x4 weights (an RGB model): on a grey image srbatch replicates it to RGB, runs the model and
    turns the output back into grey with the BT.601 luma; with --grey-as-rgb the RGB output is kept and measured on
    its Y. Both recomputed here by calling the module directly on the grey LR."""
    from srbatch.models.loader import load_model

    desc = load_model(str(refs / "weights" / "imdn_official" / "IMDN_x4.pth"), scale=SCALE)
    assert desc.color_space == "RGB" and desc.architecture == "imdn"
    as_is = evaluate(desc, scale=SCALE, hr=str(grey_set), lr=str(grey_set), device="cpu")
    as_rgb = evaluate(desc, scale=SCALE, hr=str(grey_set), lr=str(grey_set), device="cpu", grey_as_rgb=True)
    hr, lr = _read(grey_set, GREY, "HR"), _read(grey_set, GREY, "LR")
    x = torch.from_numpy(lr.astype(np.float32) / 255.0)[None, None].repeat(1, 3, 1, 1)
    with torch.no_grad():
        out = desc.module.eval()(x)[0].double()  # (3, H, W) in [0, 1], unclamped
    luma = (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2]).clamp(0, 1).numpy()
    sr_grey = np.floor(luma * 255.0 + 0.5).astype(np.uint8)
    sr_rgb = np.floor(out.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    # srbatch takes the luma in float32, this in float64: a pixel at a rounding boundary may land one level apart
    # (seen: 5e-7 dB); one level on one pixel of 248 x 248 moves PSNR by ~1e-4 dB at most here. Tolerance 1e-3 dB.
    gain = _check_both_ways(as_is, as_rgb, sr_grey, sr_rgb, hr, tol=1e-3)
    # The RGB model's output is not exactly grey and is rounded per channel before Y is taken, so the gain is not
    # exactly 1.3219 dB; the Y weights of rgb2ycbcr are 219/255 x the luma weights, so only the rounding differs (per
    # channel and of Y, ~0.2 level^2 against an MSE of ~110: ~0.008 dB). Tolerance 0.02 dB. Measured: 1.3172 dB.
    print(f"IMDN grey_003 x4: as is {_rows(as_is)[GREY].psnr_y:.4f} dB, as RGB {_rows(as_rgb)[GREY].psnr_y:.4f} dB, "
          f"gain {gain:.4f} dB (ideal {AS_RGB_GAIN:.4f})")  # fmt: skip
    assert gain == pytest.approx(AS_RGB_GAIN, abs=0.02)
    assert _rows(as_is)[GREY].psnr_y > 22.0  # a real model, far above bicubic's 20.8 dB here


def test_command_line_prints_and_records_the_convention(grey_set, tmp_path):
    base = [SRBATCH, "evaluate", "--model", "bicubic", "--scale", str(SCALE), "--hr", str(grey_set), "--lr",
            str(grey_set)]  # fmt: skip
    proc = subprocess.run([*base, "--grey-as-rgb", "--json", "--output", str(tmp_path / "ev")], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["grey_as_rgb"] is True and out["noise_sigma"] == 0 and out["n_grey"] == 1
    assert "grey images converted to RGB first" in out["convention"]
    assert {i["image"]: i["grey"] for i in out["images"]} == {GREY: True, COLOUR[0]: False, COLOUR[1]: False}
    table = pq.read_table(tmp_path / "ev" / "evaluation.parquet").to_pylist()
    assert {r["image"]: (r["grey"], r["grey_as_rgb"], r["noise_sigma"], r["channels"]) for r in table} == {
        GREY: (True, True, 0.0, 3), COLOUR[0]: (False, True, 0.0, 3), COLOUR[1]: (False, True, 0.0, 3)}
    grey_row = next(r for r in table if r["image"] == GREY)
    assert grey_row["psnr_y"] == pytest.approx(next(i["psnr_y"] for i in out["images"] if i["image"] == GREY))

    # the table the command prints without --json: the convention in its footer, the grey row marked
    text = evaluate("bicubic", scale=SCALE, hr=str(grey_set), lr=str(grey_set)).table()
    assert "grey_as_rgb=False" in text and "grey as is" in text
    assert "grey images: 1 of 3 (marked grey), measured as they are" in text
    assert [ln.split()[0] for ln in text.splitlines() if ln.rstrip().endswith("grey")] == [GREY]


def test_compare_job_grey_as_rgb(ray_cluster, grey_set, tmp_path):
    """The comparison job with --grey-as-rgb: the same figures as `srbatch evaluate --grey-as-rgb`, the grey row
    marked, the option in every Parquet row and in the report."""
    from srbatch.compare import CompareConfig, run_compare

    out = tmp_path / "cmp"
    res = run_compare(CompareConfig(images=str(grey_set), lr=str(grey_set), models="bicubic", scale=SCALE,
                                    grey_as_rgb=True, output=str(out), crop_size=32, crops_per_image=1,
                                    progress=False))  # fmt: skip
    assert res.exit_code == 0 and res.mode == "reference"
    rows = {r["image"]: r for r in pq.read_table(out / "comparison.parquet").to_pylist()}
    assert set(rows) == {*COLOUR, GREY}
    assert {k for k, r in rows.items() if r["grey"]} == {GREY}
    assert all(r["grey_as_rgb"] is True and r["noise_sigma"] == 0.0 for r in rows.values())
    hr, lr = _read(grey_set, GREY, "HR"), _read(grey_set, GREY, "LR")
    sr = np.repeat(imresize_uint8(lr, SCALE)[..., None], 3, axis=2)
    expected = _psnr(_y_matlab(sr), _y_matlab(np.repeat(hr[..., None], 3, axis=2)), SCALE)
    assert rows[GREY]["psnr_y"] == pytest.approx(expected, abs=1e-6)
    ev = _rows(evaluate("bicubic", scale=SCALE, hr=str(grey_set), lr=str(grey_set), grey_as_rgb=True))
    for name, r in rows.items():
        assert r["psnr_y"] == pytest.approx(ev[name].psnr_y, abs=1e-4), name
    # the grey image's output is RGB, as the test scripts that read it as 3-channel produce
    assert np.asarray(Image.open(rows[GREY]["output_uri"])).shape == (*hr.shape, 3)
    page = (out / "index.html").read_text()
    assert "grey_as_rgb=True" in page and "grey image (as RGB)" in page and "converted to RGB" in page
    assert "grey_as_rgb=True" in res.summary() and "grey images: 1 of 3" in res.summary()
