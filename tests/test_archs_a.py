"""Classic native architectures: bicubic, SRCNN, FSRCNN, ESPCN, VDSR.

Smoke (shape, finiteness), safetensors round trip through ``detect``, refusal of foreign layouts, and loading of the
upstream checkpoints in the shared reference folder (the ``refs`` fixture of conftest.py).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from srbatch.errors import ConfigError
from srbatch.metrics.resize import imresize
from srbatch.models.archs import bicubic, espcn, fsrcnn, srcnn, vdsr

ARCHS: tuple[ModuleType, ...] = (srcnn, fsrcnn, espcn, vdsr)

# (module, hparams) with small widths so CPU runs stay quick; scale always given.
CASES: list[tuple[ModuleType, dict[str, Any]]] = [
    (srcnn, {**srcnn.ARCH.variants["srcnn-915"], "scale": 2, "n1": 8, "n2": 4}),
    (srcnn, {**srcnn.ARCH.variants["srcnn-935"], "scale": 3, "n1": 8, "n2": 4}),
    (srcnn, {**srcnn.ARCH.variants["srcnn-955"], "scale": 4, "n1": 8, "n2": 4, "channels": 1}),
    (fsrcnn, {"scale": 2, "d": 8, "s": 4, "m": 2}),
    (fsrcnn, {"scale": 3, "d": 8, "s": 4, "m": 1, "channels": 1}),
    (fsrcnn, {**fsrcnn.ARCH.variants["fsrcnn"], "scale": 4}),
    (fsrcnn, {**fsrcnn.ARCH.variants["fsrcnn-s"], "scale": 2}),
    (espcn, {"scale": 2, "n1": 8, "n2": 4}),
    (espcn, {"scale": 3, "n1": 8, "n2": 4, "channels": 1}),
    (espcn, {"scale": 4}),
    (vdsr, {"scale": 2, "num_features": 8, "num_layers": 5}),
    (vdsr, {"scale": 3, "num_features": 4, "num_layers": 3, "channels": 3}),
]
IDS = [f"{m.ARCH.name}-{i}" for i, (m, _) in enumerate(CASES)]


def _input(channels: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, channels, size, size, generator=g)


def _perturb(model: torch.nn.Module) -> None:
    """Give every parameter distinct random values (PReLU slopes start constant)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize(("mod", "hp"), CASES, ids=IDS)
def test_forward_shape_and_finite(mod: ModuleType, hp: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = mod.ARCH.build(**hp).eval()
    info = mod.info(hp)
    x = _input(info.in_channels)
    with torch.no_grad():
        y = model(x)
    factor = 1 if info.input_upsampled else info.scale
    assert y.shape == (1, info.out_channels, 24 * factor, 24 * factor)
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert info.scale == hp["scale"]
    channels = _defaults(mod).get("channels", 3) if "channels" not in hp else hp["channels"]
    if mod is vdsr:
        assert info.color_space == ("Y" if channels == 1 else "RGB")
    else:
        assert info.color_space == ("YCbCr" if channels == 3 else "Y")


@pytest.mark.parametrize(("mod", "hp"), CASES, ids=IDS)
def test_safetensors_round_trip(mod: ModuleType, hp: dict[str, Any], tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = mod.ARCH.build(**hp).eval()
    _perturb(model)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    sd = load_file(str(path))

    hits = [m for m in ARCHS if m.detect(sd) is not None]
    assert hits == [mod], f"expected only {mod.ARCH.name} to claim the state dict; got {[m.ARCH.name for m in hits]}"
    det = mod.detect(sd)
    assert det is not None
    hparams = dict(det.hparams)
    if hparams["scale"] is None:  # scale-agnostic weights: the loader fills it from --scale
        hparams["scale"] = hp["scale"]
    expected = {**_defaults(mod), **hp}
    assert hparams == expected

    rebuilt = mod.ARCH.build(**hparams).eval()
    rebuilt.load_state_dict(det.state_dict, strict=True)
    x = _input(mod.info(hparams).in_channels, seed=2)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def _defaults(mod: ModuleType) -> dict[str, Any]:
    """Builder defaults, so a partial ``hp`` can be compared with the detected (complete) hyper-parameters."""
    sig = inspect.signature(mod.ARCH.build)
    return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize(
    "foreign",
    [
        {},
        {"foo.weight": torch.zeros(3, 3, 3, 3)},
        {"conv_1.weight": "not a tensor"},
        {"patch_extraction.weight": torch.zeros(64, 3, 9, 9)},  # incomplete SRCNN
        {"conv_1.weight": torch.zeros(8, 3, 5, 5), "conv_1.bias": torch.zeros(8)},  # incomplete ESPCN
        {"input.weight": torch.zeros(8, 1, 3, 3), "output.weight": torch.zeros(1, 4, 3, 3)},  # VDSR, widths clash
        {"features.0.weight": torch.zeros(8, 3, 3, 3), "features.0.bias": torch.zeros(8)},  # VGG-like, has biases
        {"feature_extract.weight": torch.zeros(8, 3, 5, 5), "deconv.weight": torch.zeros(8, 3, 9, 9)},
    ],
    ids=["empty", "unknown", "non-tensor", "srcnn-partial", "espcn-partial", "vdsr-mismatch", "vgg", "fsrcnn-partial"],
)
def test_detect_refuses_foreign_layouts(foreign: dict[str, Any]) -> None:
    for mod in (*ARCHS, bicubic):
        assert mod.detect(foreign) is None, mod.ARCH.name


def test_vdsr_accepts_sequential_layout() -> None:
    torch.manual_seed(3)
    model = vdsr.VDSR(scale=2, num_features=8, num_layers=4).eval()
    _perturb(model)
    convs = [model.input.weight, *(b.conv.weight for b in model.residual_layer), model.output.weight]
    old = {f"features.{2 * i}.weight": w.detach().clone() for i, w in enumerate(convs)}
    det = vdsr.detect(old)
    assert det is not None and det.hparams["num_layers"] == 4 and det.hparams["num_features"] == 8
    rebuilt = vdsr.VDSR(**{**det.hparams, "scale": 2})
    rebuilt.load_state_dict(det.state_dict, strict=True)
    x = _input(1)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_scale_is_required_where_it_matters() -> None:
    with pytest.raises(ConfigError, match="--scale"):
        fsrcnn.FSRCNN(scale=None)
    for mod in ARCHS:
        with pytest.raises(ConfigError, match="--scale"):
            mod.info({"scale": None})
    srcnn.SRCNN(scale=None)  # scale-agnostic networks build without it
    vdsr.VDSR(scale=None)


def test_fsrcnn_deconv_gives_exact_scale() -> None:
    for scale in (1, 2, 3, 4):
        model = fsrcnn.FSRCNN(scale=scale, d=4, s=2, m=1).eval()
        with torch.no_grad():
            y = model(_input(3, size=7))
        assert y.shape[-2:] == (7 * scale, 7 * scale)


def test_srcnn_matches_valid_convolution_in_the_interior() -> None:
    """Reflection padding only changes the border: the interior equals the upstream valid-padding network."""
    torch.manual_seed(4)
    model = srcnn.SRCNN(scale=2, f2=3, n1=8, n2=4).eval()
    x = _input(3, size=30)
    with torch.no_grad():
        y = model(x)
        valid = model.recon(torch.relu(model.nonlinear_map(torch.relu(model.patch_extraction(x)))))
    h = model.halo
    assert torch.allclose(y[..., h:-h, h:-h], valid, atol=1e-6)
    with torch.no_grad():
        assert model(_input(3, size=5)).shape[-2:] == (5, 5)  # smaller than the halo: replicate padding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("scale", "channels"), [(2, 3), (3, 1), (4, 3)])
def test_bicubic_equals_imresize(scale: int, channels: int, dtype: torch.dtype) -> None:
    model = bicubic.Bicubic(scale=scale, channels=channels, exact=True)  # the fast default: test_resize_fast.py
    x = _input(channels).to(dtype)
    y = model(x)
    assert y.dtype == dtype
    assert y.shape == (1, channels, 24 * scale, 24 * scale)
    assert torch.equal(y, imresize(x, scale).to(dtype))
    assert len(model.state_dict()) == 0
    assert bicubic.ARCH.needs_weights is False
    info = bicubic.info({"scale": scale, "channels": channels})
    assert info.scale == scale and info.color_space == ("RGB" if channels == 3 else "L")
    assert bicubic.detect(model.state_dict()) is None


def test_bicubic_rejects_bad_scale() -> None:
    with pytest.raises(ConfigError):
        bicubic.Bicubic(scale=0)


def test_arch_records() -> None:
    for mod in (*ARCHS, bicubic):
        arch = mod.ARCH
        assert arch.paper and arch.detect is mod.detect and arch.info is mod.info
        assert arch.build.__module__ == mod.__name__ and issubclass(arch.build, torch.nn.Module)
        for vargs in arch.variants.values():
            arch.build(**{"scale": 2, **vargs})


@pytest.mark.parametrize(
    ("build", "args", "field"),
    [
        (srcnn.SRCNN, {"f1": 8}, "f1"),
        (srcnn.SRCNN, {"channels": 2}, "channels"),
        (srcnn.SRCNN, {"n2": 0}, "n2"),
        (fsrcnn.FSRCNN, {"scale": 2, "m": 0}, "m"),
        (espcn.ESPCN, {"scale": 2, "f3": 4}, "f3"),
        (espcn.ESPCN, {"scale": True}, "scale"),
        (vdsr.VDSR, {"num_layers": 1}, "num_layers"),
        (bicubic.Bicubic, {"scale": 2, "channels": 0}, "channels"),
    ],
)
def test_bad_arguments_name_the_field(build: type[torch.nn.Module], args: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        build(**args)


# --------------------------------------------------------------------------------------------------------------------
# Upstream checkpoints in ../shared/refs
# --------------------------------------------------------------------------------------------------------------------

# file -> (architecture, scale for the forward check, hyper-parameters detect must find)
_UPSTREAM: dict[str, tuple[ModuleType, int, dict[str, Any]]] = {
    **{f"SRCNN-9{k}5.pt": (srcnn, 3, {"scale": None, "f2": k, "channels": 3}) for k in (1, 3, 5)},
    **{f"FSRCNN-x{s}.pt": (fsrcnn, s, {"scale": None, "d": 56, "s": 12, "m": 4, "channels": 3}) for s in (2, 3, 4)},
    **{f"ESPCN-x{s}.pt": (espcn, s, {"scale": s, "channels": 3, "n1": 64, "n2": 32}) for s in (2, 3, 4)},
}


@pytest.mark.refs
@pytest.mark.parametrize("name", [*_UPSTREAM, "vdsr"])
def test_upstream_checkpoint_detected_and_loaded(refs: Path, name: str) -> None:
    if name == "vdsr":
        sd = load_file(str(refs / "weights" / "vdsr_twtygqyy" / "model_epoch_50.state_dict.safetensors"))
        mod, scale, expected = vdsr, 2, {"scale": None, "channels": 1, "num_features": 64, "num_layers": 20}
    else:
        sd = torch.load(refs / "weights" / "nhat_thanh" / name, weights_only=True, map_location="cpu")
        mod, scale, expected = _UPSTREAM[name]
    hits = [m.ARCH.name for m in ARCHS if m.detect(sd) is not None]
    assert hits == [mod.ARCH.name]
    det = mod.detect(sd)
    assert det is not None
    assert {k: det.hparams[k] for k in expected} == expected
    hparams = {**det.hparams, "scale": det.hparams["scale"] or scale}
    model = mod.ARCH.build(**hparams).eval()
    model.load_state_dict(det.state_dict, strict=True)
    info = mod.info(hparams)
    with torch.no_grad():
        y = model(_input(info.in_channels, size=12))
    factor = 1 if info.input_upsampled else scale
    assert y.shape == (1, info.out_channels, 12 * factor, 12 * factor)
    assert torch.isfinite(y).all()
