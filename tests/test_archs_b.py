"""EDSR, MDSR, SRResNet, RRDBNet and IMDN: forward, round trip, alternative layouts, real checkpoints, tiling.

Tiny configurations on CPU; the real checkpoints and Set5 come from the shared reference folder (the ``refs`` fixture).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from srbatch.models.archs import edsr, imdn, mdsr, rrdbnet, srresnet
from srbatch.models.loader import build_model
from srbatch.models.registry import architectures

MINE: tuple[ModuleType, ...] = (edsr, mdsr, srresnet, rrdbnet, imdn)

# (module, full hparams exactly as detect must return them)
CASES: list[tuple[ModuleType, dict[str, Any]]] = [
    (edsr, {"scale": 2, "n_resblocks": 2, "n_feats": 8, "res_scale": 1.0, "rgb_range": 255.0}),
    (edsr, {"scale": 3, "n_resblocks": 1, "n_feats": 8, "res_scale": 1.0, "rgb_range": 255.0}),
    (edsr, {"scale": 4, "n_resblocks": 1, "n_feats": 8, "res_scale": 1.0, "rgb_range": 255.0}),
    (mdsr, {"scales": [2, 3, 4], "scale": 4, "n_resblocks": 1, "n_feats": 8, "rgb_range": 255.0}),
    (mdsr, {"scales": [2, 3], "scale": 3, "n_resblocks": 1, "n_feats": 8, "rgb_range": 255.0}),
    *[
        (srresnet, {"scale": s, "num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 2, "body_end": e,
                    "output_act": "none"})
        for s, e in ((1, "bn"), (2, "bn"), (4, "prelu"))
    ],
    *[
        (rrdbnet, {"scale": s, "num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 1, "num_grow_ch": 4,
                   "num_upsample": n})
        for s, n in ((4, 2), (2, 2), (1, 2), (2, 1))  # BasicSR x4/x2/x1 (pixel unshuffle), original-ESRGAN-style x2
    ],
    (imdn, {"scale": 2, "in_nc": 3, "out_nc": 3, "nf": 16, "num_modules": 2}),
    (imdn, {"scale": 4, "in_nc": 3, "out_nc": 3, "nf": 16, "num_modules": 1}),
]
IDS = [f"{m.ARCH.name}-" + "-".join(f"{v}" for v in hp.values() if not isinstance(v, list)) for m, hp in CASES]


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb the BN statistics and PReLU slopes (left at their constant defaults by init); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.weight.add_(torch.randn(mod.num_features, generator=g) * 0.1)
                mod.bias.add_(torch.randn(mod.num_features, generator=g) * 0.1)
            elif isinstance(mod, torch.nn.PReLU):
                mod.weight.add_(torch.rand(mod.weight.shape, generator=g) * 0.1)
    return model.eval()


def _make(module: ModuleType, hparams: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _randomize(module.ARCH.build(**hparams), seed)


def _run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _input(size: int = 16, channels: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _detect_and_load(module: ModuleType, sd: dict[str, torch.Tensor]) -> tuple[dict[str, Any], torch.nn.Module]:
    det = module.detect(sd)
    assert det is not None, f"{module.ARCH.name} did not recognise its own layout"
    model = module.ARCH.build(**det.hparams)
    model.load_state_dict(det.state_dict, strict=True)
    return det.hparams, model.eval()


@pytest.mark.parametrize(("module", "hparams"), CASES, ids=IDS)
def test_forward_shape_and_info(module: ModuleType, hparams: dict[str, Any]) -> None:
    model = _make(module, hparams)
    out = _run(model, _input(16))
    info = module.ARCH.info(hparams)
    assert info.scale == hparams["scale"]
    assert out.shape == (1, info.out_channels, 16 * info.scale, 16 * info.scale)
    assert torch.isfinite(out).all()
    assert info.receptive_halo > 0 and 16 % info.size_multiple == 0


@pytest.mark.parametrize(("module", "hparams"), CASES, ids=IDS)
def test_safetensors_round_trip(module: ModuleType, hparams: dict[str, Any], tmp_path: Path) -> None:
    model = _make(module, hparams)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    got, loaded = _detect_and_load(module, load_file(str(path)))
    assert got == hparams
    x = _input(16)
    assert torch.equal(_run(loaded, x), _run(model, x))


@pytest.mark.parametrize(("module", "hparams"), CASES, ids=IDS)
def test_only_own_architecture_claims(module: ModuleType, hparams: dict[str, Any]) -> None:
    sd = _make(module, hparams).state_dict()
    claims = [m.ARCH.name for m in MINE if m.detect(sd) is not None]
    assert claims == [module.ARCH.name]


@pytest.mark.parametrize(("module", "hparams"), CASES, ids=IDS)
def test_halo_makes_tiles_match(module: ModuleType, hparams: dict[str, Any]) -> None:
    """A window computed from a crop padded by ``receptive_halo`` equals the same window of the full output."""
    if module is imdn:
        pytest.skip("IMDN's channel attention pools over the whole image: tiles cannot match exactly")
    model = _make(module, hparams)
    info = module.ARCH.info(hparams)
    m, s = info.size_multiple, info.scale
    pad = math.ceil(info.receptive_halo / m) * m
    start, win = pad + m, 4 * m
    x = _input(2 * start + win, seed=3)
    full = _run(model, x)[..., start * s : (start + win) * s, start * s : (start + win) * s]
    crop = x[..., start - pad : start + win + pad, start - pad : start + win + pad]
    tile = _run(model, crop)[..., pad * s : (pad + win) * s, pad * s : (pad + win) * s]
    torch.testing.assert_close(tile, full, rtol=1e-4, atol=1e-4)


def test_detect_rejects_foreign_and_garbage() -> None:
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.RCAN import RCAN

    foreign = [
        RCAN(scale=2, n_resgroups=1, n_resblocks=1, n_feats=16, reduction=4).state_dict(),  # head/body/tail like EDSR
        Compact(num_feat=8, num_conv=2, upscale=2).state_dict(),
        {},
        {"head.0.weight": torch.zeros(3)},
        {"head.0.weight": "not a tensor", "body.0.body.0.weight": torch.zeros(1)},
        {"conv_first.weight": torch.zeros(8, 3, 3, 3), "body.0.rdb1.conv1.weight": torch.zeros(2)},
        {"model.0.weight": torch.zeros(8, 3, 3, 3), "model.1.sub.0.RDB1.conv1.0.weight": torch.zeros(1), "x": 1},
        {"block1.0.weight": torch.zeros(8, 3, 9, 9), "blockX": torch.zeros(1)},
        {"fea_conv.weight": torch.zeros(16, 3, 3, 3), "upsampler.0.weight": torch.zeros(5, 16, 3, 3)},
    ]
    for sd in foreign:
        for m in MINE:
            assert m.detect(sd) is None, (m.ARCH.name, list(sd)[:3])
    # damaged copies of our own dicts (a value replaced by a non-tensor or a scalar) are refused, never raised on
    for module, hparams in CASES:
        good = _make(module, hparams).state_dict()
        keys = list(good)
        for key in (keys[0], keys[len(keys) // 2], keys[-1]):
            for bad in ("x", torch.tensor(1.0), torch.zeros(0)):
                for m in MINE:
                    assert m.detect({**good, key: bad}) is None, (m.ARCH.name, key, bad)
    # a checkpoint missing one tensor is not claimed either
    sd = _make(*CASES[0]).state_dict()
    del sd["body.0.body.2.bias"]
    assert edsr.detect(sd) is None


def test_edsr_meanshift_missing_or_other_range() -> None:
    hp = CASES[0][1]
    model = _make(edsr, hp)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("sub_mean", "add_mean"))}
    got, loaded = _detect_and_load(edsr, sd)
    assert got == hp
    x = _input(16)
    assert torch.equal(_run(loaded, x), _run(model, x))
    unit = _make(edsr, {**hp, "rgb_range": 1.0})
    got, loaded = _detect_and_load(edsr, unit.state_dict())
    assert got["rgb_range"] == 1.0
    assert torch.equal(_run(loaded, x), _run(unit, x))
    assert edsr.default_res_scale(256) == 0.1 and edsr.default_res_scale(64) == 1.0


def test_mdsr_scale_override_and_meanshift_missing() -> None:
    hp = CASES[3][1]
    model = _make(mdsr, hp)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("sub_mean", "add_mean"))}
    det = mdsr.detect(sd)
    assert det is not None and det.hparams == hp
    x = _input(8)
    for s in (2, 3, 4):
        other = mdsr.ARCH.build(**{**det.hparams, "scale": s}).eval()
        other.load_state_dict(det.state_dict, strict=True)
        out = _run(other, x)
        assert out.shape[-1] == 8 * s and mdsr.ARCH.info({**det.hparams, "scale": s}).scale == s
        model.scale_idx = hp["scales"].index(s)
        assert torch.equal(out, _run(model, x))


def _to_leftthomas(sd: dict[str, torch.Tensor], num_block: int) -> dict[str, torch.Tensor]:
    """Our SRResNet keys -> leftthomas/SRGAN ``block1..block{n+3}`` keys (without BN counters, like its files)."""
    end, ups = num_block + 2, num_block + 3
    n_up = len({k.split(".")[1] for k in sd if k.startswith("upsample.")})
    rules = [
        (r"conv_first\.(.+)", r"block1.0.\1"), (r"prelu_first\.(.+)", r"block1.1.\1"),
        (r"conv_body\.(.+)", rf"block{end}.0.\1"), (r"(?:bn|prelu)_body\.(.+)", rf"block{end}.1.\1"),
        (r"upsample\.(\d+)\.(.+)", rf"block{ups}.\1.\2"), (r"conv_last\.(.+)", rf"block{ups}.{n_up}.\1"),
    ]
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        if m := re.fullmatch(r"body\.(\d+)\.(.+)", k):
            out[f"block{int(m.group(1)) + 2}.{m.group(2)}"] = v
            continue
        out[next(re.sub(p, r, k) for p, r in rules if re.fullmatch(p, k))] = v
    return out


@pytest.mark.parametrize("body_end", ["bn", "prelu"])
def test_srresnet_leftthomas_layout(body_end: str) -> None:
    hp = {"scale": 4, "num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 3, "body_end": body_end,
          "output_act": "tanh"}
    model = _make(srresnet, hp)
    got, loaded = _detect_and_load(srresnet, _to_leftthomas(model.state_dict(), 3))
    assert got == hp
    x = _input(16)
    out = _run(loaded, x)
    assert torch.equal(out, _run(model, x))
    assert out.min() >= 0 and out.max() <= 1


def _to_rrdb_new_arch(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our RRDBNet keys -> ESRGAN new-arch / BSRGAN keys."""
    rules = [(r"body\.(\d+)\.rdb(\d)\.", r"RRDB_trunk.\1.RDB\2."), (r"conv_body\.", "trunk_conv."),
             (r"conv_up(\d+)\.", r"upconv\1."), (r"conv_hr\.", "HRconv.")]
    out = {}
    for k, v in sd.items():
        for p, r in rules:
            k = re.sub(f"^{p}", r, k)
        out[k] = v
    return out


RRDB_CASES = [(hp, i) for (m, hp), i in zip(CASES, IDS) if m is rrdbnet]


@pytest.mark.parametrize("hparams", [hp for hp, _ in RRDB_CASES], ids=[i for _, i in RRDB_CASES])
def test_rrdbnet_old_layouts_and_spandrel(hparams: dict[str, Any]) -> None:
    from spandrel import ModelLoader

    hparams = {**hparams, "num_grow_ch": 32}  # spandrel's ESRGAN hard-codes the growth channels
    model = _make(rrdbnet, hparams)
    sd = model.state_dict()
    old = rrdbnet.to_old_esrgan(sd)
    assert "model.0.weight" in old and f"model.1.sub.{hparams['num_block']}.weight" in old
    x = _input(16)
    want = _run(model, x)
    for alt in (old, _to_rrdb_new_arch(sd)):
        got, loaded = _detect_and_load(rrdbnet, alt)
        assert got == hparams
        assert torch.equal(_run(loaded, x), want)
    # an independent implementation of the same network agrees
    desc = ModelLoader().load_from_state_dict(old)
    assert desc.scale == hparams["scale"]
    torch.testing.assert_close(_run(desc.model.eval(), x), want, rtol=1e-5, atol=1e-5)


def test_variants_match_published_sizes() -> None:
    """Variant builders (on the meta device) give the parameter counts the papers report."""
    expected = {  # trainable parameters; EDSR/MDSR MeanShift constants excluded, as the papers do
        "edsr": (lambda: edsr.edsr(scale=4), 43.1e6), "edsr-baseline": (lambda: edsr.edsr_baseline(scale=4), 1.52e6),
        "mdsr": (mdsr.mdsr, 7.95e6), "srresnet": (lambda: srresnet.srresnet(scale=4), 1.55e6),
        "esrgan": (lambda: rrdbnet.esrgan(scale=4), 16.70e6), "imdn": (lambda: imdn.imdn(scale=4), 0.715e6),
    }
    for name, (builder, count) in expected.items():
        with torch.device("meta"):
            n = sum(p.numel() for p in builder().parameters() if p.requires_grad)
        assert abs(n - count) / count < 0.01, (name, n)
    variants = {v for m in MINE for v in m.ARCH.variants}
    assert variants == {"edsr", "edsr-baseline", "mdsr", "mdsr-baseline", "srresnet", "srgan", "rrdbnet", "esrgan",
                        "imdn"}
    desc = build_model("edsr-baseline", scale=2, n_resblocks=1)
    assert desc.scale == 2 and desc.info.receptive_halo > 0
    assert all(m.ARCH.paper for m in MINE)


# ---------------------------------------------------------------- real checkpoints (the shared reference folder)


def _load_ref(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, weights_only=True, map_location="cpu")
    return {k.removeprefix("module."): v for k, v in sd.items()}


@pytest.mark.refs
@pytest.mark.parametrize(
    ("rel", "arch", "scale"),
    [
        ("weights/imdn_official/IMDN_x4.pth", "imdn", 4),
        ("weights/srgan_leftthomas/netG_epoch_2_100.pth", "srresnet", 2),
        ("weights/srgan_leftthomas/netG_epoch_4_100.pth", "srresnet", 4),
    ],
)
def test_real_checkpoint_detected_once_and_loads(refs: Path, rel: str, arch: str, scale: int) -> None:
    sd = _load_ref(refs / rel)
    claims = {name: a.detect(sd) for name, a in architectures().items()}
    claims = {name: det for name, det in claims.items() if det is not None}
    assert list(claims) == [arch]
    det = claims[arch]
    assert det.hparams["scale"] == scale
    model = architectures()[arch].build(**det.hparams).eval()
    model.load_state_dict(det.state_dict, strict=True)
    out = _run(model, _input(12))
    assert out.shape == (1, 3, 12 * scale, 12 * scale) and torch.isfinite(out).all()
    if arch == "srresnet":  # leftthomas: 5 blocks, conv + PReLU closing the trunk, (tanh + 1) / 2 output
        assert det.hparams["num_block"] == 5 and det.hparams["output_act"] == "tanh"
        assert det.hparams["body_end"] == "prelu"


def _matlab_y(rgb: np.ndarray) -> np.ndarray:
    """Y of MATLAB ``rgb2ycbcr`` for 8-bit RGB values, as EXPECTED.md writes it (not srbatch's implementation)."""
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


@pytest.mark.refs
def test_imdn_x4_set5_psnr_y_matches_published(refs: Path) -> None:
    """The official IMDN x4 weights, run by the module directly, reproduce the authors' Set5 x4 figure.

    Published: 32.21 dB (IMDN authors' poster, ACM MM 2019, as recorded in ../shared/refs/EXPECTED.md), in the paper
    convention EXPECTED.md states: MATLAB Y, output rounded to 8 bit, ``scale`` pixels shaved, peak 255, mean of the
    per-image PSNRs over the five images. Tolerance 0.05 dB, the one EXPECTED.md sets. For scale: MATLAB bicubic
    reaches 28.42 dB on the same set, so an upscaler that is merely smooth is more than 3.7 dB short.
    """
    from PIL import Image

    _, model = _detect_and_load(imdn, _load_ref(refs / "weights" / "imdn_official" / "IMDN_x4.pth"))
    base, scale = refs / "sets" / "Set5" / "image_SRF_4", 4
    psnrs = []
    for i in range(1, 6):
        lr = np.asarray(Image.open(base / f"img_00{i}_SRF_4_LR.png").convert("RGB"))
        hr = np.asarray(Image.open(base / f"img_00{i}_SRF_4_HR.png").convert("RGB")).astype(np.float64)
        x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255.0
        sr = _run(model, x)[0].permute(1, 2, 0).numpy().astype(np.float64)
        assert sr.shape == hr.shape
        sr = np.clip(np.round(sr * 255.0), 0, 255)
        diff = (_matlab_y(sr) - _matlab_y(hr))[scale:-scale, scale:-scale]
        psnrs.append(10 * np.log10(255.0**2 / np.mean(diff**2)))
    assert float(np.mean(psnrs)) == pytest.approx(32.21, abs=0.05), psnrs
