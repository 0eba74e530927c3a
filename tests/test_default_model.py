"""The shipped default models: addressable as `--model default` with --scale 2 or 4, trained by the training job (the
model card says how), and better than bicubic on Set5 in the paper convention (needs ../shared/refs)."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from srbatch.errors import ConfigError
from srbatch.models.loader import load_model


@pytest.mark.parametrize("scale", [2, 4])
def test_default_loads_by_name_with_its_card(scale):
    desc = load_model("default", scale=scale)
    assert desc.scale == scale and desc.name == f"default-x{scale}"
    folder = resources.files("srbatch") / "data" / "models" / f"default-x{scale}"
    card = json.loads((folder / "model_card.json").read_text())
    assert card["sha256"] == desc.sha256 and card["architecture"] == desc.architecture
    val = card["validation"]
    assert card["training"]["steps"] > 0 and val["final"]["psnr_y"] > val["bicubic"]["psnr_y"] > val["initial"]["psnr_y"]
    assert (folder / "model.safetensors").stat().st_size < 5_000_000  # "a few MB at most"


def test_default_needs_a_shipped_scale():
    with pytest.raises(ConfigError, match="--scale 2 or 4"):
        load_model("default", scale=3)
    with pytest.raises(ConfigError, match="needs a scale"):
        load_model("default")


@pytest.mark.refs
@pytest.mark.parametrize(("scale", "bicubic"), [(2, 33.64), (4, 28.42)])
def test_default_beats_bicubic_on_set5(refs, scale, bicubic):
    from srbatch.evaluate import evaluate

    d = refs / "sets" / "Set5" / f"image_SRF_{scale}"
    res = evaluate("default", scale=scale, hr=str(d / "*_HR.png"), lr=str(d / "*_LR.png"))
    b = evaluate("bicubic", scale=scale, hr=str(d / "*_HR.png"), lr=str(d / "*_LR.png"))
    assert abs(b.psnr_y - bicubic) < 0.01  # the published bicubic figure: the convention is the papers'
    assert res.psnr_y > b.psnr_y + 0.5, f"default x{scale}: {res.psnr_y:.2f} dB vs bicubic {b.psnr_y:.2f} dB"
