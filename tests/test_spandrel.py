"""Community checkpoints that spandrel detects load through the same `load_model` and run in the same engine."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from srbatch import TilingConfig, Upscaler, load_model
from srbatch.errors import ConfigError


def _checkpoints():
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(0)
    yield "Compact", 2, Compact(num_feat=8, num_conv=2, upscale=2)
    yield "SwinIR", 2, SwinIR(
        img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2, upsampler="pixelshuffledirect"
    )


@pytest.mark.parametrize("name,scale,net", list(_checkpoints()), ids=lambda v: v if isinstance(v, str) else "")
def test_spandrel_checkpoint_loads_and_runs(tmp_path, name, scale, net):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    desc = load_model(str(path))
    assert desc.architecture.startswith("spandrel:") and desc.scale == scale
    assert desc.in_channels == 3 and len(desc.sha256) == 64
    x = torch.rand(1, 3, 13, 10)
    out = Upscaler(desc, tiling=TilingConfig(tile=0)).upscale_tensor(x)
    assert out.shape == (1, 3, 13 * scale, 10 * scale) and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match=f"x{scale} model"):
        load_model(str(path), scale=scale + 1)
