"""Every public checkpoint in the shared reference folder loads through `load_model` (or is refused: the pickled
module). The TensorFlow graphs load through the .pb importer (checked against OpenCV in tests/test_tf_import.py)."""

from __future__ import annotations

import pytest
import torch

from srbatch import load_model
from srbatch.errors import UnsafeCheckpointError

EXPECTED_ARCH = {
    "imdn_official/IMDN_x4.pth": ("imdn", 4),
    "srgan_leftthomas/netG_epoch_2_100.pth": ("srresnet", 2),
    "srgan_leftthomas/netG_epoch_4_100.pth": ("srresnet", 4),
    "vdsr_twtygqyy/model_epoch_50.state_dict.safetensors": ("vdsr", None),
    "nhat_thanh/SRCNN-915.pt": ("srcnn", None),
    "nhat_thanh/SRCNN-935.pt": ("srcnn", None),
    "nhat_thanh/SRCNN-955.pt": ("srcnn", None),
    "nhat_thanh/FSRCNN-x2.pt": ("fsrcnn", None),
    "nhat_thanh/FSRCNN-x3.pt": ("fsrcnn", None),
    "nhat_thanh/FSRCNN-x4.pt": ("fsrcnn", None),
    "nhat_thanh/ESPCN-x2.pt": ("espcn", 2),
    "nhat_thanh/ESPCN-x3.pt": ("espcn", 3),
    "nhat_thanh/ESPCN-x4.pt": ("espcn", 4),
}


# Frozen TensorFlow GraphDefs (the OpenCV dnn_superres models of EXPECTED.md): imported by srbatch.models.tf_import.
TENSORFLOW = {
    *(f"tf_espcn_fannymonori/ESPCN_x{s}.pb" for s in (2, 3, 4)),
    *(f"tf_fsrcnn_saafke/FSRCNN{v}_x{s}.pb" for v in ("", "-small") for s in (2, 3, 4)),
}
LICENCES = {"tf_espcn_fannymonori/LICENSE", "tf_fsrcnn_saafke/LICENSE"}


@pytest.mark.refs
def test_every_reference_checkpoint_is_covered(refs):
    files = {str(p.relative_to(refs / "weights")) for p in (refs / "weights").rglob("*") if p.is_file()}
    assert files == set(EXPECTED_ARCH) | {"vdsr_twtygqyy/model_epoch_50.pth"} | TENSORFLOW | LICENCES


@pytest.mark.refs
@pytest.mark.parametrize("rel", sorted(TENSORFLOW))
def test_tensorflow_graph_loads(refs, rel):
    desc = load_model(str(refs / "weights" / rel), scale=int(rel[-4]))
    assert desc.architecture == "tfgraph" and desc.scale == int(rel[-4]) and desc.color_space == "Y-OpenCV"
    with torch.inference_mode():
        y = desc.module(torch.rand(1, 1, 12, 10))
    assert y.shape == (1, 1, 12 * desc.scale, 10 * desc.scale) and torch.isfinite(y).all()


@pytest.mark.refs
@pytest.mark.parametrize("rel", sorted(EXPECTED_ARCH))
def test_reference_checkpoint_loads(refs, rel):
    arch, fixed_scale = EXPECTED_ARCH[rel]
    scale = fixed_scale or 3
    if rel.startswith("nhat_thanh/FSRCNN"):
        scale = int(rel[-4])
    desc = load_model(str(refs / "weights" / rel), scale=scale)
    assert desc.architecture == arch and desc.scale == scale
    assert len(desc.sha256) == 64 and desc.source.endswith(rel)
    x = torch.rand(1, desc.in_channels, 12, 12)
    if desc.input_upsampled:
        x = torch.rand(1, desc.in_channels, 12 * scale, 12 * scale)
    with torch.inference_mode():
        y = desc.module(x)
    assert y.shape[-2:] == (12 * scale, 12 * scale) and torch.isfinite(y).all()


@pytest.mark.refs
def test_whole_pickled_vdsr_module_is_refused_clearly(refs):
    with pytest.raises(UnsafeCheckpointError) as ei:
        load_model(str(refs / "weights/vdsr_twtygqyy/model_epoch_50.pth"), scale=2)
    msg = str(ei.value)
    assert "vdsr.Net" in msg and "arbitrary code" in msg and "state_dict" in msg and "model_epoch_50.pth" in msg


def test_scale_agnostic_weights_need_a_scale(tmp_path):
    from srbatch import build_model, save_model
    from srbatch.errors import ConfigError

    desc = build_model("vdsr", scale=2, num_layers=3, num_features=8)
    path = str(tmp_path / "v.safetensors")
    save_model(desc, path)
    assert load_model(path).scale == 2  # srbatch metadata carries the scale
    with pytest.raises(ConfigError, match="x2 model"):
        load_model(path, scale=4)
