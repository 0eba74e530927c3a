"""The training job's configuration, presets, data sampling and export folder loading (fast, no Ray)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from srbatch.errors import ConfigError, WeightsError
from srbatch.train import PRESETS, TrainConfig, load_train_config
from srbatch.train.config import build_parser, train_config_from_args
from srbatch.train.data import CropSampler, build_val_set, split_images, to_channels
from srbatch.train.degrade import PRESET_DEGRADATIONS

ROOT = Path(__file__).resolve().parents[1]


def test_preset_fills_unset_fields_and_yaml_then_flags_win(tmp_path):
    cfg = load_train_config(None, {"data": "d/", "output": "o/", "preset": "dogs"})
    assert (cfg.model, cfg.scale, cfg.crop_size, cfg.batch_size, cfg.loss, cfg.degradation) == (
        "srresnet", 4, 96, 16, "mse", "bicubic")  # fmt: skip
    y = tmp_path / "t.yaml"
    y.write_text("preset: microscopy\ndata: s3://b/hr/\noutput: s3://b/m/\ncrop_size: 64\nsteps: 10\n")
    args = build_parser().parse_args(["--config", str(y), "--steps", "20", "--model-args", "{num_block: 4}"])
    cfg = train_config_from_args(args)
    assert cfg.crop_size == 64  # YAML over preset
    assert cfg.steps == 20  # flag over YAML
    assert cfg.degradation == "microscopy" and cfg.model_args == {"num_block": 4}
    assert cfg.run_storage() == "s3://b/m/_train"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"crop_size": 90, "scale": 4}, "crop_size"),
        ({"degradation": "blurry"}, "degradation"),
        ({"degradation": {"kind": "classic", "jpeg_quality": [90, 30]}}, "jpeg_quality"),
        ({"stage": "gan"}, "--init"),
        ({"channels": 2}, "channels"),
        ({"name": "../x"}, "name"),
        ({"lr_milestones": [0.8, 0.2]}, "lr_milestones"),
        ({"stpes": 3}, "unknown field"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(fields, needle):
    with pytest.raises(ConfigError, match=needle):
        load_train_config(None, {"data": "d/", "output": "o/", **fields})


def test_every_field_is_a_documented_flag():
    text = build_parser().format_help()
    for name in TrainConfig.model_fields:
        flag = "--storage-option" if name == "storage_options" else "--" + name.replace("_", "-")
        assert flag in text, name
    for preset in PRESETS:
        assert preset in text


def test_cli_config_error_exits_2_with_the_field_named():
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--data", "x/", "--output", "y/",
                        "--crop-size", "50", "--scale", "4"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert "crop_size" in p.stderr and "use 48" in p.stderr


def test_split_is_deterministic_and_stable_when_images_are_added():
    uris = [f"s3://b/hr/{i:03d}.png" for i in range(40)]
    train, val = split_images(uris, val_fraction=0.1, val_max=16, seed=0)
    assert len(val) == 4 and set(train) | set(val) == set(uris) and not set(train) & set(val)
    assert split_images(uris, val_fraction=0.1, val_max=16, seed=0) == (train, val)
    assert split_images(uris, val_fraction=0.1, val_max=16, seed=1)[1] != val
    # adding images never moves a training image into validation (new images may only push old ones out)
    more = uris + [f"s3://b/hr/new_{i}.png" for i in range(10)]
    _, val2 = split_images(more, val_fraction=0.1, val_max=4, seed=0)
    assert {u for u in val2 if u in uris} <= set(val)
    with pytest.raises(ConfigError, match="val-fraction"):
        split_images(uris[:1], val_fraction=0.1, val_max=16, seed=0)


def test_crop_sampler_shapes_range_and_bicubic_lr():
    from srbatch.metrics.resize import imresize

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)]
    s = CropSampler(imgs, scale=4, crop_size=32, degradation=PRESET_DEGRADATIONS["bicubic"], seed=0)
    assert len(s.hr) == 1  # the 20x20 image is smaller than the crop
    lr, hr = s.sample(3)
    assert lr.shape == (3, 3, 8, 8) and hr.shape == (3, 3, 32, 32)
    assert torch.allclose(lr, imresize(hr, 0.25).clamp(0, 1), atol=1e-6)
    # the same seed draws the same crops
    s2 = CropSampler(imgs, scale=4, crop_size=32, degradation=PRESET_DEGRADATIONS["bicubic"], seed=0)
    assert torch.equal(s2.sample(3)[1], hr)
    with pytest.raises(ConfigError, match="crop-size"):
        CropSampler(imgs[1:], scale=4, crop_size=32, degradation=PRESET_DEGRADATIONS["bicubic"], seed=0)


def test_paired_crops_stay_aligned():
    rng = np.random.default_rng(1)
    lr_img = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
    hr_img = np.repeat(np.repeat(lr_img, 2, 0), 2, 1)  # nearest x2: each LR pixel is a 2x2 HR block
    s = CropSampler([hr_img], scale=2, crop_size=8, degradation=None, seed=3, lr_images=[lr_img])
    for _ in range(5):
        lr, hr = s.sample(2)
        assert torch.equal(hr[:, :, ::2, ::2], lr)


def test_val_set_bicubic_is_the_paper_convention():
    from srbatch.metrics.resize import imresize_uint8

    rng = np.random.default_rng(2)
    px = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    (v,) = build_val_set([("a", px)], scale=4, degradation=PRESET_DEGRADATIONS["bicubic"], max_size=64, seed=0)
    assert v.hr.shape == (64, 64, 3)
    assert np.array_equal(v.lr, imresize_uint8(v.hr, 0.25))
    grey = to_channels(px, 1)
    assert grey.shape == (70, 90, 1) and grey.dtype == np.uint8


def test_export_folder_loads_as_a_model(tmp_path):
    from srbatch.models.loader import build_model, load_model, save_model

    desc = build_model("espcn", scale=2)
    (tmp_path / "exp").mkdir()
    save_model(desc, str(tmp_path / "exp" / "model.safetensors"))
    loaded = load_model(str(tmp_path / "exp"))
    assert loaded.architecture == "espcn" and loaded.scale == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_model(str(tmp_path / "empty"))
