"""LPIPS through the commands: `srbatch evaluate --lpips-weights` and the comparison job's reference mode. Every
figure is recomputed here with the reference ``lpips`` package on the same SR pixels (the PNGs the job wrote; for
evaluate, the engine's output, tied to the command's rows by their PSNR_RGB recomputed here with numpy)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from _lpips_ref import ref_distance, reference, write_weights
from srbatch.cli import main

pytest.importorskip("lpips")
NAMES = ("img_002_SRF_4", "img_003_SRF_4")  # bird 288x288, butterfly 256x256


@pytest.fixture(scope="module")
def pairs(refs, tmp_path_factory):
    """Two Set5 x4 HR/LR pairs copied into HR and LR folders."""
    root = tmp_path_factory.mktemp("set5")
    for sub in ("hr", "lr"):
        (root / sub).mkdir()
    for n in NAMES:
        for tag, sub in (("HR", "hr"), ("LR", "lr")):
            shutil.copy(refs / "sets" / "Set5" / "image_SRF_4" / f"{n}_{tag}.png", root / sub / f"{n}_{tag}.png")
    return root


@pytest.fixture(scope="module")
def alex(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lpips")
    ref = reference("alex", tmp)
    return ref, write_weights(ref, "alex", tmp)


def _rgb_psnr(a: np.ndarray, b: np.ndarray, border: int) -> float:
    """PSNR of two uint8 RGB images, ``border`` shaved (numpy, float64)."""
    d = (a.astype(np.float64) - b.astype(np.float64))[border:-border, border:-border]
    return 10 * math.log10(255.0**2 / np.mean(d**2))


@pytest.mark.refs
def test_evaluate_lpips_rows_equal_the_reference_package(pairs, alex, tmp_path, capsys):
    from srbatch.evaluate import paper_model
    from srbatch.inference import Upscaler
    from srbatch.io.images import DecodedImage
    from srbatch.models.loader import load_model

    ref, weights = alex
    out = tmp_path / "ev.parquet"
    rc = main(["evaluate", "--model", "bicubic", "--scale", "4", "--hr", str(pairs / "hr"), "--lr", str(pairs / "lr"),
               "--lpips-weights", str(weights), "--output", str(out), "--json"])  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    rows = {r["image"]: r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == set(NAMES) and {r["lpips_net"] for r in rows.values()} == {"alex"}
    assert "LPIPS v0.1 (alex)" in summary["convention"] and summary["lpips_net"] == "alex"
    up = Upscaler(paper_model(load_model("bicubic", scale=4)), device="cpu")
    want = {}
    for n in NAMES:
        hr = np.asarray(Image.open(pairs / "hr" / f"{n}_HR.png").convert("RGB"))
        lr = np.asarray(Image.open(pairs / "lr" / f"{n}_LR.png").convert("RGB"))
        sr = up.upscale_image(DecodedImage(pixels=lr.copy(), mode="RGB")).pixels
        assert rows[n]["psnr_rgb"] == pytest.approx(_rgb_psnr(sr, hr, 4), abs=1e-9)  # the SR the command measured
        crop = (slice(4, -4), slice(4, -4))  # the border shaved as for PSNR (crop_border = scale)
        want[n] = ref_distance(ref, sr[crop], hr[crop])
        assert rows[n]["lpips"] == pytest.approx(want[n], abs=1e-5), n
        assert abs(rows[n]["lpips"] - ref_distance(ref, sr, hr)) > 1e-6  # and the border was shaved
    assert summary["lpips"] == pytest.approx(np.mean(list(want.values())), abs=1e-5)
    assert {i["image"]: i["lpips"] for i in summary["images"]} == pytest.approx(want, abs=1e-5)
    # the printed table has the column and the mean
    assert main(["evaluate", "--model", "bicubic", "--scale", "4", "--hr", str(pairs / "hr"), "--lr",
                 str(pairs / "lr"), "--lpips-weights", str(weights)]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "LPIPS" in table.splitlines()[1] and f"{np.mean(list(want.values())):.4f}" in table
    # a missing weights file: exit 2 with the way to make one
    assert main(["evaluate", "--model", "bicubic", "--scale", "4", "--hr", str(pairs / "hr"),
                 "--lpips-weights", str(tmp_path / "none.safetensors")]) == 2  # fmt: skip
    assert "python -m srbatch.metrics.lpips make" in capsys.readouterr().err


def test_compare_config_rules(tmp_path):
    from pydantic import ValidationError

    from srbatch.compare.config import CompareConfig
    from srbatch.compare.runner import choose_mode

    with pytest.raises(ValidationError, match="lpips-weights"):
        CompareConfig(images=str(tmp_path), models="bicubic", output=str(tmp_path / "o"), mode="real",
                      lpips_weights="w.safetensors")  # fmt: skip
    cfg = CompareConfig(images=str(tmp_path), models="bicubic", output=str(tmp_path / "o"), lpips_weights="w")
    assert choose_mode(cfg, [])[0] == "reference"


@pytest.mark.slow
@pytest.mark.refs
def test_compare_job_lpips_column_and_report(pairs, alex, ray_cluster, s3_bucket, tmp_path, capsys):
    """The job through the CLI, the weights read from S3: each row's lpips is the reference package's distance of the
    PNG the job wrote and the HR (border shaved); the report's table shows LPIPS, lower is better, and offers it as
    the plot's axis."""
    import fsspec

    ref, weights = alex
    uri = f"s3://{s3_bucket}/lpips-alex.safetensors"
    with fsspec.open(uri, "wb") as f:
        f.write(weights.read_bytes())
    out = tmp_path / "cmp"
    rc = main(["compare", "-i", str(pairs / "hr"), "--lr", str(pairs / "lr"), "-m", "bicubic,nearest", "--scale", "4",
               "-o", str(out), "--lpips-weights", uri, "--crop-size", "32", "--crops-per-image", "1",
               "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = pq.read_table(out / "comparison.parquet").to_pylist()
    assert len(rows) == 4
    for r in rows:
        hr = np.asarray(Image.open(pairs / "hr" / f"{r['image']}_HR.png").convert("RGB"))
        sr = np.asarray(Image.open(r["output_uri"]).convert("RGB"))
        crop = (slice(4, -4), slice(4, -4))
        assert r["lpips"] == pytest.approx(ref_distance(ref, sr[crop], hr[crop]), abs=1e-5), (r["image"], r["model"])
    mean = {m: np.mean([r["lpips"] for r in rows if r["model"] == m]) for m in ("bicubic", "nearest")}
    assert mean["bicubic"] < mean["nearest"]  # pixel replication looks further from the original
    page = (out / "index.html").read_text()
    assert 'title="lower is better">LPIPS&nbsp;↓' in page and f'<td class="best">{mean["bicubic"]:.4f}</td>' in page
    assert 'id="axis-lpips"' in page and 'id="plot-lpips"' in page and "LPIPS v0.1 (alex)" in page
    assert "<script" not in page
    assert "LPIPS" in printed and f"{mean['nearest']:.4f}" in printed


def test_report_metric_columns_lower_is_better():
    """The report's metric list: LPIPS appears only when measured, its best is the LOWEST mean, each image's line
    shows it, and the plot offers PSNR_Y and LPIPS as the vertical axis (CSS only, no script)."""
    from srbatch.compare.report import ImagePanel, build_html, plot_svg

    def rows(lp):
        return [{"image": "cat", "model": m, "status": "ok", "psnr_y": p, "ssim_y": 0.9, "psnr_rgb": p,
                 "ssim_rgb": 0.9, "runtime_s": t, "architecture": "x", "params": 10, "device": "cpu",
                 "error_type": None, "error_message": None, **({"lpips": v} if lp else {})}
                for m, p, t, v in (("a", 28.0, 0.01, 0.25), ("b", 30.5, 0.2, 0.125))]  # fmt: skip

    panel = ImagePanel(image="cat", width=8, height=8, thumb="t.png", crops=[], lr_files=[], hr_files=[])
    kw = dict(models=["a", "b"], panels=[panel], scale=4, mode="reference", mode_text="m", n_images=1, max_images=40,
              convention="c", created="now")  # fmt: skip
    page = build_html(title="t", rows=rows(True), **kw)
    assert '<th title="lower is better">LPIPS&nbsp;↓</th>' in page
    assert '<th title="higher is better">PSNR_Y&nbsp;↑</th>' in page
    assert '<td class="best">0.1250</td>' in page and "<td>0.2500</td>" in page
    assert "b: 30.50 dB, LPIPS 0.1250" in page
    assert 'id="axis-psnr_y" checked' in page and 'id="axis-lpips"' in page and page.count("<svg") == 2
    assert "#axis-lpips:checked ~ #plot-lpips" in page and "<script" not in page
    svg = plot_svg([{"model": "a", "runtime_s": 0.01, "lpips": 0.25}, {"model": "b", "runtime_s": 0.2, "lpips": 0.125}],
                   metric="lpips")  # fmt: skip
    assert "LPIPS, lower is better" in svg and svg.count("<circle") == 2 and "0.1250" in svg
    plain = build_html(title="t", rows=rows(False), **kw)
    assert "LPIPS" not in plain and 'name="plot-axis"' not in plain and plain.count("<svg") == 1
