"""The user's commands, as typed: `python jobs/upscale.py` (the embedded default, its own local Ray cluster) and
`srbatch upscale` with broken inputs (failed rows, exit code by policy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from _expect import assert_as_engine

ROOT = Path(__file__).resolve().parents[1]
SRBATCH = str(Path(sys.executable).parent / "srbatch")


pytestmark = pytest.mark.slow


def test_embedded_default_job(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/upscale.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "srbatch-output" / "upscale"
    assert str(out) in proc.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["_manifest", "_srbatch", "astronaut.png", "camera.png", "chelsea.png", "coffee.png"]
    assert "4 ok, 0 failed, 0 skipped" in proc.stdout and "on cpu" in proc.stdout
    rows = pd.read_parquet(out / "_manifest")
    assert len(rows) == 4 and set(rows.status) == {"ok"} and set(rows.model) == {"default-x4"}
    assert set(rows.architecture) == {"imdn"}  # the shipped default model, not bicubic
    for name, src in [("chelsea.png", "chelsea.png"), ("camera.png", "camera.png")]:
        a = Image.open(ROOT / "srbatch/data/samples" / src)
        b = Image.open(out / name)
        assert b.size == (a.size[0] * 4, a.size[1] * 4) and b.mode == a.mode  # grey stays grey
    for src in ("astronaut.png", "camera.png", "chelsea.png", "coffee.jpg"):  # the default model's own pixels
        name = src.rsplit(".", 1)[0] + ".png"
        assert_as_engine(out / name, ROOT / "srbatch/data/samples" / src, model="default", scale=4, name=name)


def test_broken_inputs_fail_alone(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (10, 12, 4), dtype=np.uint8)
    rgba[..., 3] = np.arange(12, dtype=np.uint8)[None, :] * 20
    Image.fromarray(rgba, "RGBA").save(src / "sub" / "alpha.png")
    grey16 = np.full((9, 7), 100, np.uint16)
    grey16[::2, 1::3] = 60000  # texture: a flipped or resampled-otherwise output differs
    Image.fromarray(grey16).save(src / "grey16.png")
    (src / "empty.png").write_bytes(b"")
    (src / "notes.png").write_text("this is not an image")
    good = src / "good.jpg"
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(good)
    (src / "truncated.jpg").write_bytes(good.read_bytes()[:60])
    proc = subprocess.run([SRBATCH, "upscale", str(src), "-o", str(tmp_path / "out"), "--scale", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "6 inputs: 3 ok, 3 failed, 0 skipped" in proc.stdout
    assert "exit code 1" in proc.stdout
    for name in ("empty.png", "notes.png", "truncated.jpg"):
        line = next(l for l in proc.stdout.splitlines() if name in l)
        assert line.strip().startswith("failed:") and "ImageDecodeError" in line
    rows = pd.read_parquet(tmp_path / "out" / "_manifest").set_index("input_uri")
    assert len(rows) == 6 and (rows.status == "failed").sum() == 3
    assert rows.loc[str(src / "empty.png"), "error_message"].endswith("re-upload or remove it")
    alpha = Image.open(tmp_path / "out/sub/alpha.png")
    assert alpha.mode == "RGBA" and alpha.size == (24, 20)
    g16 = np.array(Image.open(tmp_path / "out/grey16.png"))
    assert g16.shape == (18, 14) and g16.dtype in (np.uint16, np.int32) and int(g16.max()) > 255  # still 16-bit
    for name in ("sub/alpha.png", "grey16.png", "good.jpg"):  # bicubic, the default model: colour and alpha planes
        written = tmp_path / "out" / (name.rsplit(".", 1)[0] + ".png")
        assert_as_engine(written, src / name, model="bicubic", scale=2, name=name)
