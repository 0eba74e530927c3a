"""NIQE in the jobs, through the user's command: ``srbatch upscale --quality-metric niqe`` (manifest column ``niqe``)
and ``srbatch compare`` in real mode (Parquet columns ``niqe``/``input_niqe``, report table), on the local S3 server
and Ray cluster. Every figure is checked against :func:`niqe` of the file the job wrote, re-read from S3."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from srbatch.cli import main as cli
from srbatch.metrics.niqe import NiqeError, niqe
from srbatch.upscale import read_manifest
from srbatch.upscale.manifest import SCHEMA, cast_to_schema


def _photo(name: str, size: tuple[int, int]) -> np.ndarray:
    """A CC0 photo bundled with scikit-image, resized (Pillow Lanczos) to ``size`` (w, h)."""
    import skimage.data

    a = getattr(skimage.data, name)()
    return np.asarray(Image.fromarray(a).convert("RGB").resize(size, Image.Resampling.LANCZOS))


def _png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


def _niqe_or_none(data: bytes) -> float | None:
    try:
        return niqe(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    except NiqeError:
        return None


def test_manifests_without_the_column_still_read(tmp_path):
    """A part written before ``niqe`` existed reads (and casts) with the column null; new parts keep theirs."""
    from srbatch.upscale.manifest import empty_row, to_table

    old = to_table([empty_row(run_id="r0", input_uri="a.png", status="ok")]).drop_columns(["niqe"])
    new = to_table([empty_row(run_id="r1", input_uri="b.png", status="ok", niqe=4.5)])
    for run, t in (("r0", old), ("r1", new)):
        (tmp_path / "_manifest" / f"run={run}").mkdir(parents=True)
        pq.write_table(t, tmp_path / "_manifest" / f"run={run}" / "part-0.parquet")
    m = read_manifest(str(tmp_path)).to_pylist()
    assert {r["input_uri"]: r["niqe"] for r in m} == {"a.png": None, "b.png": 4.5}
    assert cast_to_schema(old).schema == SCHEMA and cast_to_schema(old).column("niqe").null_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_upscale_job_writes_niqe_of_each_output(ray_cluster, s3_bucket, fmt):
    import s3fs

    fs = s3fs.S3FileSystem()
    inputs = {"cat.png": _png(_photo("chelsea", (150, 100))), "coffee.png": _png(_photo("coffee", (120, 110))),
              "tiny.png": _png(_photo("astronaut", (40, 40))),  # output 80x80: NIQE undefined -> null
              "flat.png": _png(np.full((100, 100, 3), 90, np.uint8))}  # no structure: null  # fmt: skip
    for k, v in inputs.items():
        fs.pipe_file(f"{s3_bucket}/in/{k}", v)
    out = f"s3://{s3_bucket}/out"
    common = [f"s3://{s3_bucket}/in/", "--output", out, "--model", "bicubic", "--scale", "2", "--no-progress",
              "--format", fmt]  # fmt: skip
    # run 1 without the metric; its parts then lose the column, as a manifest written before it existed
    assert cli(["upscale", *common, "--run-id", "r1"]) == 0
    for part in fs.glob(f"{s3_bucket}/out/_manifest/run=r1/*.parquet"):
        t = pq.read_table(io.BytesIO(fs.cat_file(part))).drop_columns(["niqe"])
        buf = io.BytesIO()
        pq.write_table(t, buf)
        fs.pipe_file(part, buf.getvalue())
    # run 2 with it: a different fingerprint, so every input is redone and measured
    assert cli(["upscale", *common, "--run-id", "r2", "--quality-metric", "niqe"]) == 0
    fs.invalidate_cache()
    m = read_manifest(out).to_pylist()
    assert len(m) == 8 and {r["status"] for r in m} == {"ok"}
    assert all(r["niqe"] is None for r in m if r["run_id"] == "r1")
    got = {r["input_uri"].rsplit("/", 1)[1]: r for r in m if r["run_id"] == "r2"}
    for k, r in got.items():
        written = fs.cat_file(r["output_uri"].removeprefix("s3://"))
        assert Image.open(io.BytesIO(written)).format == fmt
        expect = _niqe_or_none(written)  # of the file as written (decoded JPEG for JPEG outputs)
        if expect is None:
            assert r["niqe"] is None, k
        else:
            assert r["niqe"] == pytest.approx(expect, abs=1e-9, rel=0), k
    assert got["cat.png"]["niqe"] is not None and got["coffee.png"]["niqe"] is not None
    assert got["tiny.png"]["niqe"] is None and got["flat.png"]["niqe"] is None


@pytest.mark.slow
def test_compare_real_mode_niqe_in_parquet_and_report(ray_cluster, s3_bucket, capsys):
    import s3fs

    fs = s3fs.S3FileSystem()
    imgs = {"cat.png": _photo("chelsea", (226, 200)), "coffee.png": _photo("coffee", (200, 196)),
            "small.png": _photo("astronaut", (120, 110))}  # input under 192: no input NIQE; its x2 output has one
    for k, a in imgs.items():
        fs.pipe_file(f"{s3_bucket}/in/{k}", _png(a))
    out = f"s3://{s3_bucket}/cmp"
    code = cli(["compare", "--images", f"s3://{s3_bucket}/in/", "--models", "bicubic", "--scale", "2", "--mode",
                "real", "--output", out, "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    fs.invalidate_cache()
    rows = pq.read_table(io.BytesIO(fs.cat_file(f"{s3_bucket}/cmp/comparison.parquet"))).to_pylist()
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"} and {r["mode"] for r in rows} == {"real"}
    for r in rows:
        written = fs.cat_file(r["output_uri"].removeprefix("s3://"))
        assert r["niqe"] == pytest.approx(_niqe_or_none(written), abs=1e-9, rel=0), r["image"]
        source = fs.cat_file(r["image_uri"].removeprefix("s3://"))
        expect_in = _niqe_or_none(source)
        if expect_in is None:
            assert r["input_niqe"] is None
        else:
            assert r["input_niqe"] == pytest.approx(expect_in, abs=1e-9, rel=0), r["image"]
    by = {r["image"].split(".")[0]: r for r in rows}
    assert by["small"]["input_niqe"] is None and by["small"]["niqe"] is not None
    assert by["cat"]["input_niqe"] is not None
    page = fs.cat_file(f"{s3_bucket}/cmp/index.html").decode()
    mean = np.mean([r["niqe"] for r in rows])
    base = np.mean([r["input_niqe"] for r in rows if r["input_niqe"] is not None])
    assert "NIQE&nbsp;↓" in page and f"{mean:.3f}" in page and 'id="niqe-input"' in page and f"{base:.3f}" in page
    assert f"NIQE {by['cat']['niqe']:.3f}" in page  # per image, beside each model
    assert "NIQE" in printed and "input (no upscaling)" in printed and f"{mean:.3f}" in printed
