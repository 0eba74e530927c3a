"""Models and images over a real S3 endpoint (moto server on 127.0.0.1), through the same commands users run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs
import torch

from srbatch import build_model, load_model, save_model
from srbatch.errors import ChecksumMismatchError

SRBATCH = str(Path(sys.executable).parent / "srbatch")


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


@pytest.mark.refs
def test_evaluate_reads_s3_and_writes_parquet_to_s3(refs, s3_bucket):
    """Set5 x2 (HR and the benchmark's LR files) read from S3 reproduces the published bicubic figure, 33.64 dB
    (SelfExSR README, refs/EXPECTED.md), within 0.01 dB, as the same files do from a local folder (test_evaluate)."""
    fs = s3fs.S3FileSystem()
    for p in sorted((refs / "sets/Set5/image_SRF_2").glob("*.png")):
        fs.pipe(f"{s3_bucket}/set/{p.name}", p.read_bytes())
    fs.invalidate_cache()
    proc = subprocess.run(
        [SRBATCH, "evaluate", "--model", "bicubic", "--scale", "2", "--hr", f"s3://{s3_bucket}/set/",
         "--lr", f"s3://{s3_bucket}/set/", "--output", f"s3://{s3_bucket}/reports/ev.parquet", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n_images"] == 5 and out["psnr_y"] == pytest.approx(33.64, abs=0.01)
    fs.invalidate_cache()
    import pyarrow.parquet as pq

    with fs.open(f"{s3_bucket}/reports/ev.parquet", "rb") as f:
        table = pq.read_table(f)
    assert sorted(table.column("image").to_pylist()) == [f"img_00{i}_SRF_2" for i in range(1, 6)]
