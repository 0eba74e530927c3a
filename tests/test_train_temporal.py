"""Training video models on clips: windows cut at one place across consecutive frames, one set of degradation
parameters per window, the x264 round trip, clear errors for bad --data, and (slow) a real training run on synthetic
clips that lowers the loss, raises validation PSNR and exports a folder that loads as a temporal model."""

from __future__ import annotations

import importlib.util
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from srbatch.errors import ConfigError
from srbatch.metrics.resize import imresize
from srbatch.train import TrainConfig
from srbatch.train.clips import ClipSampler, degrade_window, list_clips, read_clip, x264_roundtrip
from srbatch.train.degrade import PRESET_DEGRADATIONS, DegradationConfig
from srbatch.train.runner import plan_data

BICUBIC = PRESET_DEGRADATIONS["bicubic"]


def _ramp_clip(frames: int = 6, size: int = 40, delta: float = 0.05, seed: int = 0) -> np.ndarray:
    """uint16 frames: a smooth random texture in [0.2, 0.6] plus t * delta (a brightness ramp over time)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.6, (size // 4, size // 4, 3))
    base = np.kron(base, np.ones((4, 4, 1)))
    f = np.stack([base + t * delta for t in range(frames)])
    return np.floor(f * 65535 + 0.5).astype(np.uint16)


def test_windows_are_consecutive_frames_cut_at_one_place():
    clip = _ramp_clip()
    s = ClipSampler([clip], radius=1, scale=2, crop_size=16, degradation=BICUBIC, seed=3)
    lr, hr = s.sample(8)
    assert lr.shape == (8, 3, 3, 8, 8) and hr.shape == (8, 3, 16, 16)
    d = 0.05 * 65535 / 65535
    for i in range(8):
        # bicubic keeps constants: neighbour - centre is +-delta everywhere (same crop, consecutive frames; the sign
        # flips with time reversal, but is the same on both sides)
        before, after = lr[i, 0] - lr[i, 1], lr[i, 2] - lr[i, 1]
        sign = float(torch.sign(after.mean()))
        torch.testing.assert_close(after, torch.full_like(after, sign * d), rtol=0, atol=2e-4)
        torch.testing.assert_close(before, torch.full_like(before, -sign * d), rtol=0, atol=2e-4)
        # the HR target is the centre frame of the window: its MATLAB bicubic downscale is the LR centre
        torch.testing.assert_close(imresize(hr[i].double(), 0.5).float(), lr[i, 1], rtol=0, atol=1e-5)
    # radius 0 (the per-frame baseline): plain (N, C, h, w) batches from the same clips
    lr0, hr0 = ClipSampler([clip], radius=0, scale=2, crop_size=16, degradation=BICUBIC, seed=3).sample(2)
    assert lr0.shape == (2, 3, 8, 8) and hr0.shape == (2, 3, 16, 16)


def test_one_set_of_degradation_parameters_per_window():
    cfg = DegradationConfig(kind="classic", blur_prob=1.0, noise_prob=1.0, jpeg_prob=1.0)
    frame = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    lr = degrade_window(torch.stack([frame, frame, frame]), 2, cfg, g)
    assert lr.shape == (3, 3, 16, 16)
    assert torch.equal(lr[0], lr[1]) and torch.equal(lr[1], lr[2])  # identical frames, identical draws
    # a different window draws different parameters (the generator moved on)
    assert not torch.equal(degrade_window(torch.stack([frame] * 3), 2, cfg, g)[0], lr[0])


def test_x264_roundtrip_is_close_but_lossy_and_keeps_odd_sizes():
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 256, (6, 7, 3)), np.ones((4, 4, 1))).astype(np.uint8)[:23, :27]
    frames = np.stack([np.roll(base, t, axis=1) for t in range(4)])
    from srbatch.metrics.color import rgb_to_y

    def mse_y(out: np.ndarray) -> float:  # luma: 4:2:0 chroma of random saturated blocks is lossy at any CRF
        return float(np.mean((rgb_to_y(out, round_output=False) - rgb_to_y(frames, round_output=False)) ** 2))

    out = x264_roundtrip(frames, 18)
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert 0 < mse_y(out) and 10 * math.log10(255**2 / mse_y(out)) > 35
    assert mse_y(x264_roundtrip(frames, 45)) > 10 * mse_y(out)


def _write_clips(root: Path, n: int, frames: int, size: int = 48, seed: int = 0) -> None:
    """Moving-pattern clips as lossless FFV1 (bgr0) videos, made with the video writer (independent of training)."""
    from srbatch.video import encode_segment

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        big = np.kron(rng.integers(0, 256, (size // 4 + 8, size // 4 + 8, 3)), np.ones((4, 4, 1))).astype(np.uint8)
        fr = [np.ascontiguousarray(big[t : t + size, 2 * t : 2 * t + size]) for t in range(frames)]
        encode_segment(((t, f) for t, f in enumerate(fr)), str(root / f"c{k}.mkv"), fps=Fraction(25),
                       time_base=Fraction(1, 25), codec="ffv1", pix_fmt="bgr0")  # fmt: skip


def test_clips_are_read_bit_exact_from_videos_and_frame_folders(tmp_path):
    from PIL import Image

    _write_clips(tmp_path / "v", 1, 4)
    clip = read_clip(list_clips(str(tmp_path / "v"))[0])
    assert clip.shape == (4, 48, 48, 3) and clip.dtype == np.uint8
    (tmp_path / "f" / "a").mkdir(parents=True)
    for t, f in enumerate(clip):
        Image.fromarray(f).save(tmp_path / "f" / "a" / f"{t:03d}.png")
    folders = list_clips(str(tmp_path / "f"))
    assert [Path(u).name for u in folders] == ["a"]
    assert np.array_equal(read_clip(folders[0]), clip)


def test_bad_data_gives_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    cfg = TrainConfig(data=str(tmp_path / "empty"), output=str(tmp_path / "o"), model="efvsr-r1", val_fraction=0)
    with pytest.raises(ConfigError, match="no video files"):
        plan_data(cfg)
    _write_clips(tmp_path / "short", 2, 2)
    cfg = TrainConfig(data=str(tmp_path / "short"), output=str(tmp_path / "o"), model="efvsr",
                      model_args={"radius": 2}, val_fraction=0)  # fmt: skip
    with pytest.raises(ConfigError, match=r"c0.mkv has 2 frame\(s\).*windows of 5 frames"):
        plan_data(cfg)
    with pytest.raises(ConfigError, match="needs 3"):
        ClipSampler([np.zeros((2, 16, 16, 3), np.uint8)], radius=1, scale=2, crop_size=8, degradation=BICUBIC, seed=0,
                    names=["s3://b/short.mp4"])  # fmt: skip
    with pytest.raises(ValueError, match="video_crf"):
        TrainConfig(data="x", output="y", video_crf=(30, 20))


@pytest.mark.slow
def test_training_on_clips_lowers_loss_raises_psnr_and_exports_a_temporal_model(ray_cluster, tmp_path):
    """Tiny EFVSR (r=1) on four 12-frame moving-pattern clips, validated on a fifth: 60 steps must lower the loss and
    raise validation PSNR_Y over the initial weights; the export loads with temporal_radius 1 and runs a window."""
    import pyarrow.parquet as pq

    from srbatch import load_model
    from srbatch.inference import Upscaler
    from srbatch.train import run_training

    _write_clips(tmp_path / "train", 4, 12)
    _write_clips(tmp_path / "val", 1, 6, seed=7)
    out = str(tmp_path / "export")
    cfg = TrainConfig(data=str(tmp_path / "train"), val_data=str(tmp_path / "val"), output=out, model="efvsr",
                      model_args={"radius": 1, "n_feats": 16, "n_blocks": 1}, scale=2, crop_size=24, batch_size=8,
                      steps=60, val_every=30, log_every=10, lr=2e-3, ema=0, torch_threads=1, video_crf=(20, 28))  # fmt: skip
    res = run_training(cfg)
    hist = pq.read_table(str(Path(out) / "history.parquet")).to_pylist()
    assert [h["step"] for h in hist] == [30, 60]
    v = res.card["validation"]
    assert v["final"]["psnr_y"] > v["initial"]["psnr_y"] + 0.3, v
    assert hist[-1]["loss"] < hist[0]["loss"], hist  # mean training loss of steps 31-60 below that of 1-30
    assert res.card["temporal_radius"] == 1 and res.card["data"]["clips"] is True
    desc = load_model(out)
    assert desc.architecture == "efvsr" and desc.info.temporal_radius == 1
    frames = [read_clip(list_clips(str(tmp_path / "val"))[0])[t, :16, :16] for t in range(3)]
    assert Upscaler(desc, device="cpu").upscale_frames(frames).shape == (32, 32, 3)


def test_make_clips_script_writes_lossless_moving_clips(tmp_path):
    from PIL import Image

    spec = importlib.util.spec_from_file_location("make_clips", Path(__file__).parents[1] / "scripts/make_clips.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    photo = np.kron(rng.integers(0, 256, (30, 30, 3)), np.ones((4, 4, 1))).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "p.png")
    recs = mod.make_clips(str(tmp_path / "p.png"), str(tmp_path / "out"), size=32, frames=5, per_image=1,
                          prescale=1.0, seed=0, speed=(1.0, 1.0), zoom=0.0, rotate=0.0, png=False)  # fmt: skip
    clip = read_clip(str(tmp_path / "out" / recs[0]["clip"]))
    assert clip.shape == (5, 32, 32, 3)
    # pure translation by 1 px/frame: frame t equals the PIL affine crop at start + t * velocity (lossless file)
    vx, vy = recs[0]["velocity_px_per_frame"]
    assert math.isclose(math.hypot(vx, vy), 1.0)
    want = mod.render(Image.fromarray(photo), size=32, frames=5, start=tuple(recs[0]["start"]), velocity=(vx, vy),
                      zoom=0.0, rotate_deg=0.0)  # fmt: skip
    assert all(np.array_equal(a, b) for a, b in zip(clip, want))
    assert not np.array_equal(clip[0], clip[1])


def test_flicker_is_the_temporal_difference_error_on_y():
    """Flat grey frames: Y = 16 + v * 219 / 255 (MATLAB rgb2ycbcr), so every figure is known by hand."""
    from srbatch.video.evaluate import flicker

    gt_v, sr_v = [10, 20, 40, 40], [10, 25, 30, 50]
    gt = [np.full((12, 12, 3), v, np.uint8) for v in gt_v]
    sr = [np.full((12, 12, 3), v, np.uint8) for v in sr_v]
    tde, mad_sr, mad_gt = flicker(sr, gt, border=2)
    k = 219 / 255
    assert np.allclose(tde, [5 * k, 15 * k, 20 * k])  # |(15)-(10)|, |(5)-(20)|, |(20)-(0)|
    assert np.allclose(mad_sr, [15 * k, 5 * k, 20 * k]) and np.allclose(mad_gt, [10 * k, 20 * k, 0])
    assert flicker(gt, gt, border=0)[0] == [0.0, 0.0, 0.0]


def test_evaluate_clips_table(tmp_path):
    from srbatch.metrics.quality import measure
    from srbatch.metrics.resize import imresize_uint8
    from srbatch.video.evaluate import evaluate_clips, format_table

    _write_clips(tmp_path / "v", 1, 3, size=32)
    torch.manual_seed(0)
    from srbatch import build_model, save_model

    save_model(build_model("efvsr", scale=2, radius=1, n_feats=8, n_blocks=1), str(tmp_path / "t.safetensors"))
    rows = evaluate_clips(["bicubic", str(tmp_path / "t.safetensors")], str(tmp_path / "v"), scale=2)
    assert [r.temporal_radius for r in rows] == [0, 1] and all(r.frames == 3 and r.clips == 1 for r in rows)
    hr = read_clip(str(tmp_path / "v" / "c0.mkv"))
    # the bicubic row: MATLAB imresize down then up, the paper-convention PSNR, averaged over the frames
    want = np.mean([measure(imresize_uint8(imresize_uint8(f, 0.5), 2), f, crop_border=2).psnr_y for f in hr])
    assert abs(rows[0].psnr_y - want) < 0.05
    assert rows[0].mad_gt == rows[1].mad_gt > 0
    assert "| bicubic | 0 | 1 | 3 |" in format_table(rows)
