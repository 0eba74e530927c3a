"""Registry-driven: every registered architecture and variant, as registered, builds, runs on CPU and round-trips
through a self-describing safetensors file and `load_model`."""

from __future__ import annotations

import pytest
import torch

from srbatch import build_model, load_model, save_model
from srbatch.models.registry import architectures, variants

NAMES = sorted(set(architectures()) | set(variants()))


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_model(name, tmp_path):
    torch.manual_seed(0)
    desc = build_model(name, scale=2)
    assert desc.scale == 2
    n = 12
    x = torch.rand(1, desc.in_channels, n, n)
    if desc.input_upsampled:
        x = torch.rand(1, desc.in_channels, n * 2, n * 2)
    with torch.inference_mode():
        y = desc.module(x)
    assert y.shape == (1, desc.out_channels, n * 2, n * 2) and torch.isfinite(y).all()
    if not architectures()[desc.architecture].needs_weights:
        return
    path = str(tmp_path / f"{name}.safetensors")
    save_model(desc, path)
    back = load_model(path, scale=2)
    assert back.architecture == desc.architecture and back.hparams == desc.hparams
    with torch.inference_mode():
        assert torch.equal(back.module(x), y)
