"""Models and images over a real S3 endpoint (moto server on 127.0.0.1), through the same commands users run."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
from PIL import Image

from srbatch import build_model, load_model, save_model
from srbatch.errors import ChecksumMismatchError

SRBATCH = str(Path(sys.executable).parent / "srbatch")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_checkpoint_round_trip_over_s3(s3_bucket):
    torch.manual_seed(0)
    desc = build_model("edsr-baseline", scale=2, n_resblocks=2, n_feats=8)
    uri = f"s3://{s3_bucket}/models/tiny.safetensors"
    digest = save_model(desc, uri)
    back = load_model(uri, sha256=digest)
    assert back.architecture == "edsr" and back.hparams == desc.hparams and back.sha256 == digest
    x = torch.rand(1, 3, 9, 11)
    with torch.inference_mode():
        assert torch.equal(back.module(x), desc.module(x))
    with pytest.raises(ChecksumMismatchError):
        load_model(uri, sha256="0" * 64)


def test_evaluate_reads_s3_and_writes_parquet_to_s3(s3_bucket):
    fs = s3fs.S3FileSystem()
    rng = np.random.default_rng(3)
    for i in range(3):
        img = np.clip(np.cumsum(rng.normal(0, 4, (40, 36, 3)), axis=0) + 120, 0, 255).astype(np.uint8)
        fs.pipe(f"{s3_bucket}/set/img{i}_HR.png", _png(img))
    fs.invalidate_cache()
    proc = subprocess.run(
        [SRBATCH, "evaluate", "--model", "bicubic", "--scale", "2", "--hr", f"s3://{s3_bucket}/set/",
         "--output", f"s3://{s3_bucket}/reports/ev.parquet", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n_images"] == 3 and 20 < out["psnr_y"] < 80
    fs.invalidate_cache()
    import pyarrow.parquet as pq

    with fs.open(f"{s3_bucket}/reports/ev.parquet", "rb") as f:
        table = pq.read_table(f)
    assert table.num_rows == 3 and sorted(table.column("image").to_pylist()) == ["img0", "img1", "img2"]
