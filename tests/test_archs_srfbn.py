"""SRFBN / SRFBN-S: the authors' checkpoint layout, an independent functional forward, no hidden-state leaks, the
measured receptive field and tiling, published sizes, argument errors.

The authors' layout is written here from ``Paper99/SRFBN_CVPR19`` ``networks/srfbn_arch.py`` and
``networks/blocks.py`` (key names and shapes), never taken from :mod:`srbatch.models.archs.srfbn`; their forward is
recomputed with ``torch.nn.functional`` ops on the raw tensors in float64. Tiny hyper-parameters, CPU.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from srbatch import load_model, save_model
from srbatch.errors import ConfigError
from srbatch.inference.tiling import run_tiled
from srbatch.models.archs import srfbn
from srbatch.models.loader import build_model, detect_architecture
from srbatch.models.registry import architectures, variants
from srbatch.weights.checkpoint import canonicalize

# upstream's table (srfbn_arch.py, FeedbackBlock.__init__): scale -> kernel, stride, padding
AUTHORS_KSP = {2: (6, 2, 2), 3: (7, 3, 2), 4: (8, 4, 2), 8: (12, 8, 2)}
DIV2K = (0.4488, 0.4371, 0.4040)
STEPS = 4  # not readable from shapes: detect returns the authors' T


def _authors_shapes(m: int, groups: int, scale: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``SRFBN(in_channels=3, out_channels=3, num_features=m, num_groups=groups,
    upscale_factor=scale)``: ``ConvBlock``/``DeconvBlock`` are ``sequential(conv, PReLU)`` (``.0``, ``.1``), the
    ``conv_out`` block has no activation (``.0`` only); ``MeanShift`` is a bare 1x1 ``nn.Conv2d``."""
    k = AUTHORS_KSP[scale][0]
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_block(name: str, cin: int, cout: int, ks: int, act: bool = True) -> None:
        shapes[f"{name}.0.weight"], shapes[f"{name}.0.bias"] = (cout, cin, ks, ks), (cout,)
        if act:
            shapes[f"{name}.1.weight"] = (1,)

    def deconv_block(name: str, cin: int, cout: int) -> None:
        shapes[f"{name}.0.weight"], shapes[f"{name}.0.bias"] = (cin, cout, k, k), (cout,)
        shapes[f"{name}.1.weight"] = (1,)

    for ms in ("sub_mean", "add_mean"):
        shapes[f"{ms}.weight"], shapes[f"{ms}.bias"] = (3, 3, 1, 1), (3,)
    conv_block("conv_in", 3, 4 * m, 3)
    conv_block("feat_in", 4 * m, m, 1)
    conv_block("block.compress_in", 2 * m, m, 1)
    for g in range(groups):
        deconv_block(f"block.upBlocks.{g}", m, m)
        conv_block(f"block.downBlocks.{g}", m, m, k)
        if g > 0:
            conv_block(f"block.uptranBlocks.{g - 1}", m * (g + 1), m, 1)
            conv_block(f"block.downtranBlocks.{g - 1}", m * (g + 1), m, 1)
    conv_block("block.compress_out", groups * m, m, 1)
    deconv_block("out", m, m)
    conv_block("conv_out", m, 3, 3, act=False)
    return shapes


def _authors_state_dict(m: int, groups: int, scale: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values in the authors' layout (MeanShift as ``blocks.py`` sets it: identity, ``sign * 255 * mean``).

    Weights have std ``1.5 / sqrt(taps per output)``: loud enough that the first step's hidden state and far pixels
    still matter after all steps (with PyTorch's default scale their influence fades below the tolerance)."""
    g = torch.Generator().manual_seed(seed)
    stride = AUTHORS_KSP[scale][1]
    sd: dict[str, torch.Tensor] = {}
    for key, shape in _authors_shapes(m, groups, scale).items():
        if key.startswith(("sub_mean", "add_mean")):
            sign = -1.0 if key.startswith("sub") else 1.0
            sd[key] = torch.eye(3).view(3, 3, 1, 1) if key.endswith("weight") else sign * 255.0 * torch.tensor(DIV2K)
        elif len(shape) == 4:
            deconv = key.startswith(("block.upBlocks.", "out."))
            taps = shape[0] * (shape[2] / stride) ** 2 if deconv else shape[1] * shape[2] * shape[3]
            sd[key] = torch.randn(shape, generator=g) * 1.5 / math.sqrt(taps)
        elif key.endswith(".1.weight"):  # PReLU slope
            sd[key] = torch.rand(shape, generator=g) * 0.4 - 0.1
        else:
            sd[key] = torch.randn(shape, generator=g) * 0.1
    return sd


def _as_saved_by_authors(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What ``SRSolver.save_checkpoint`` writes: the DataParallel state dict (``module.``) inside a dict."""
    return {
        "epoch": 7,
        "state_dict": {f"module.{k}": v for k, v in sd.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "best_pred": 31.5,
        "best_epoch": 6,
        "records": {"train_loss": [0.1, 0.05], "psnr": [30.0, 31.5]},
    }


def _reference(sd: dict[str, torch.Tensor], x: torch.Tensor, scale: int, groups: int, steps: int) -> list[torch.Tensor]:
    """Upstream's ``SRFBN.forward`` recomputed with functional ops on the raw tensors (float64), one image per step."""
    sd = {k: v.double() for k, v in sd.items()}
    _, s, p = AUTHORS_KSP[scale]

    def cb(name: str, h: torch.Tensor, stride: int = 1, pad: int | None = None, act: bool = True) -> torch.Tensor:
        w = sd[f"{name}.0.weight"]
        h = F.conv2d(h, w, sd[f"{name}.0.bias"], stride=stride, padding=(w.shape[-1] - 1) // 2 if pad is None else pad)
        return F.prelu(h, sd[f"{name}.1.weight"]) if act else h

    def db(name: str, h: torch.Tensor) -> torch.Tensor:
        h = F.conv_transpose2d(h, sd[f"{name}.0.weight"], sd[f"{name}.0.bias"], stride=s, padding=p)
        return F.prelu(h, sd[f"{name}.1.weight"])

    x = F.conv2d(x.double() * 255.0, sd["sub_mean.weight"], sd["sub_mean.bias"])
    inter_res = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    feat = cb("feat_in", cb("conv_in", x))
    last_hidden = feat.clone()  # should_reset: the hidden state starts as a copy of the input
    outs = []
    for _ in range(steps):
        h = cb("block.compress_in", torch.cat((feat, last_hidden), 1))
        lr, hr = [h], []
        for i in range(groups):
            ld_l = torch.cat(lr, 1)
            if i > 0:
                ld_l = cb(f"block.uptranBlocks.{i - 1}", ld_l)
            hr.append(db(f"block.upBlocks.{i}", ld_l))
            ld_h = torch.cat(hr, 1)
            if i > 0:
                ld_h = cb(f"block.downtranBlocks.{i - 1}", ld_h)
            lr.append(cb(f"block.downBlocks.{i}", ld_h, stride=s, pad=p))
        last_hidden = cb("block.compress_out", torch.cat(lr[1:], 1))
        out = inter_res + cb("conv_out", db("out", last_hidden), act=False)
        outs.append(F.conv2d(out, sd["add_mean.weight"], sd["add_mean.bias"]) / 255.0)
    return outs


def _image(n: int, seed: int = 1, batch: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(batch, 3, n, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _loud(model: srfbn.SRFBN, gain: float = 2.0) -> srfbn.SRFBN:
    """Re-draw the (de)conv weights with std ``gain / sqrt(taps per output)``: with PyTorch's default init the
    influence of far pixels fades below float32 rounding, so missing context would go unnoticed; here it does not."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name in ("sub_mean", "add_mean"):
                continue
            if isinstance(mod, torch.nn.ConvTranspose2d):
                taps = mod.weight.shape[0] * (mod.weight.shape[2] / mod.stride[0]) ** 2
            elif isinstance(mod, torch.nn.Conv2d):
                taps = mod.weight[0].numel()
            else:
                continue
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * gain / math.sqrt(taps))
    return model


def _tiny(scale: int, seed: int = 0, **kw: Any) -> srfbn.SRFBN:
    """A tiny SRFBN with every weight (PReLU slopes included) random, in eval mode."""
    hp = {"scale": scale, "num_features": 4, "num_steps": 2, "num_groups": 2, **kw}
    torch.manual_seed(seed)
    model = srfbn.SRFBN(**hp)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.PReLU):
                mod.weight.uniform_(-0.3, 0.5)
    return model.eval()


# ------------------------------------------------------------------------------ the authors' layout and forward


@pytest.mark.parametrize(("scale", "m", "groups"), [(2, 4, 2), (3, 4, 1), (4, 8, 3), (8, 4, 2)])
def test_authors_checkpoint_detected_once_loads_and_matches_functional_forward(
    scale: int, m: int, groups: int, tmp_path: Path
) -> None:
    sd = _authors_state_dict(m, groups, scale)
    path = tmp_path / "best_ckp.pth"
    torch.save(_as_saved_by_authors(sd), path)
    # only srfbn claims it, after the one canonicalisation every loader applies
    canon = canonicalize(torch.load(path, weights_only=True))
    assert set(canon) == set(sd)
    assert [name for name, _ in detect_architecture(canon)] == ["srfbn"]

    desc = load_model(str(path))
    want_hp = {"scale": scale, "num_features": m, "num_steps": STEPS, "num_groups": groups, "rgb_range": 255.0}
    assert desc.architecture == "srfbn" and desc.hparams == want_hp and desc.scale == scale
    assert desc.info.receptive_halo == srfbn.receptive_radius(scale, STEPS, groups) + 2
    model = desc.module.double()
    x = _image(7, dtype=torch.float64)
    ref = _reference(sd, x, scale, groups, STEPS)
    with torch.no_grad():
        out, steps = model(x), model.forward_steps(x)
    assert out.shape == (1, 3, 7 * scale, 7 * scale)
    assert len(steps) == STEPS
    tol = 1e-5 * max(1.0, float(ref[-1].abs().max()))
    for got, want in zip(steps, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=tol)
    torch.testing.assert_close(out, ref[-1], rtol=0, atol=tol)  # forward = the last step
    assert (ref[-1] - ref[-2]).abs().max() > 100 * tol  # the steps differ, so "the last one" is a real choice


def test_bare_state_dict_and_missing_mean_shift_and_unit_range() -> None:
    """A bare ``module.`` dict loads too; MeanShift tensors may be missing (filled with the authors' constants);
    a 0..1 checkpoint (``sub_mean.bias = -mean``) is read as ``rgb_range`` 1."""
    sd = _authors_state_dict(4, 2, 2, seed=3)
    x = _image(6, dtype=torch.float64)
    want = _reference(sd, x, 2, 2, STEPS)[-1]
    no_ms = canonicalize({f"module.{k}": v for k, v in sd.items() if not k.startswith(("sub_mean", "add_mean"))})
    det = srfbn.detect(no_ms)
    assert det is not None and det.hparams["rgb_range"] == 255.0
    model = srfbn.SRFBN(**det.hparams).double().eval()
    model.load_state_dict(det.state_dict, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    unit = {**sd, "sub_mean.bias": -torch.tensor(DIV2K), "add_mean.bias": torch.tensor(DIV2K)}
    det = srfbn.detect(unit)
    assert det is not None and det.hparams["rgb_range"] == 1.0


def test_detect_claims_nothing_else_and_never_raises() -> None:
    """srfbn claims no other registered model's layout, nor garbage; damaged copies of its own are refused."""
    for name in sorted(set(architectures()) | set(variants())):
        arch = architectures()[variants()[name][0] if name in variants() else name]
        if not arch.needs_weights or arch.name == "srfbn":
            continue
        with torch.device("meta"):
            sd = build_model(name, scale=2).module.state_dict()
        assert srfbn.detect(sd) is None, name
    good = _authors_state_dict(4, 2, 4)
    bad_dicts: list[dict[str, Any]] = [
        {},
        {"conv_in.0.weight": torch.zeros(3)},
        {k: v for k, v in good.items() if k != "block.compress_out.1.weight"},  # one tensor missing
        {**good, "extra.weight": torch.zeros(1)},
        {k.replace("upBlocks", "up_blocks"): v for k, v in good.items()},
        {k: v for k, v in good.items() if not k.startswith("block.upBlocks.1.")},  # a gap in the groups
        {**good, "block.upBlocks.0.0.weight": torch.zeros(4, 4, 5, 5)},  # no scale has kernel 5
        {**good, "conv_in.0.weight": torch.zeros(16, 1, 3, 3)},  # grey input
    ]
    for key in ("conv_in.0.weight", "block.upBlocks.0.0.weight", "block.downBlocks.1.0.weight", "conv_out.0.bias"):
        for bad in ("x", torch.tensor(1.0), torch.zeros(0)):
            bad_dicts.append({**good, key: bad})
    for sd in bad_dicts:
        assert srfbn.detect(sd) is None, list(sd)[:3]
    assert srfbn.detect(good) is not None


# ------------------------------------------------------------------------------------- state, round trip, tiling


def test_no_hidden_state_leaks_between_calls_or_images() -> None:
    model = _tiny(2).double()
    a, b = _image(8, seed=1, dtype=torch.float64), _image(8, seed=2, dtype=torch.float64)
    with torch.no_grad():
        first = model(a)
        model(b)
        again = model(a)
        both = model(torch.cat([b, a]))
        steps = model.forward_steps(a)
        alone_b = model(b)
    assert torch.equal(first, again)
    torch.testing.assert_close(both[1:], first)
    torch.testing.assert_close(both[:1], alone_b)
    torch.testing.assert_close(steps[-1], first)


def test_safetensors_round_trip(tmp_path: Path) -> None:
    model = _tiny(3)
    x = _image(9)
    with torch.no_grad():
        want = model(x)
    raw = tmp_path / "raw.safetensors"  # plain tensors, no srbatch metadata: detect must find everything
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(raw))
    det = srfbn.detect(load_file(str(raw)))
    assert det is not None
    assert det.hparams == {"scale": 3, "num_features": 4, "num_steps": STEPS, "num_groups": 2, "rgb_range": 255.0}
    desc = build_model("srfbn", scale=3, num_features=4, num_steps=2, num_groups=2)
    desc.module.load_state_dict(model.state_dict())
    path = str(tmp_path / "m.safetensors")
    save_model(desc, path)
    back = load_model(path)
    assert back.architecture == "srfbn" and back.hparams == desc.hparams  # num_steps 2 kept by the metadata
    with torch.no_grad():
        assert torch.equal(back.module(x), want)


def _grad_radius(model: torch.nn.Module, scale: int, n: int) -> int:
    """Largest ``|x - c|`` over input columns/rows with a non-zero gradient of output pixel ``(c*s+o, c*s+o)``."""
    model = model.double()
    x = _image(n, dtype=torch.float64).requires_grad_(True)
    c, radius = n // 2, 0
    for o in range(scale):
        x.grad = None
        model(x)[0, :, c * scale + o, c * scale + o].sum().backward()
        support = (x.grad.abs().sum((0, 1)) > 0).nonzero()
        radius = max(radius, int((support - c).abs().max()))
    return radius


@pytest.mark.parametrize(("scale", "steps", "groups"), [(2, 2, 2), (4, 3, 1)])
def test_receptive_radius_is_the_measured_one(scale: int, steps: int, groups: int) -> None:
    model = _tiny(scale, num_steps=steps, num_groups=groups)
    radius = srfbn.receptive_radius(scale, steps, groups)
    assert _grad_radius(model, scale, 2 * radius + 6) == radius
    assert srfbn.info({"scale": scale, "num_steps": steps, "num_groups": groups}).receptive_halo == radius + 2


@pytest.mark.parametrize("scale", [2, 4])
def test_halo_makes_tiles_match(scale: int) -> None:
    """A window computed from a crop padded by ``receptive_halo`` equals the same window of the full output; one
    pixel less context than the radius does not; the tiling engine with that overlap reproduces the whole image."""
    model = _loud(_tiny(scale))
    info = srfbn.info({"scale": scale, "num_features": 4, "num_steps": 2, "num_groups": 2})
    s, pad, win = scale, info.receptive_halo, 4
    radius = srfbn.receptive_radius(scale, 2, 2)
    start = pad + 2
    x = _image(2 * start + win, seed=3)
    with torch.no_grad():
        full = model(x)
    tol = 1e-5 * float(full.abs().max())  # relative to the output's range (large with these weights)
    with torch.no_grad():

        def window(ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
            crop = x[..., start - ctx : start + win + ctx, start - ctx : start + win + ctx]
            tile = model(crop)[..., ctx * s : (ctx + win) * s, ctx * s : (ctx + win) * s]
            return tile, full[..., start * s : (start + win) * s, start * s : (start + win) * s]

        torch.testing.assert_close(*window(pad), rtol=0, atol=tol)
        torch.testing.assert_close(*window(radius), rtol=0, atol=tol)  # the radius is enough ...
        short, want = window(radius - 1)
        assert (short - want).abs().max() > 100 * tol  # ... and one pixel less is not
        tiled = run_tiled(x, model, tile=6, margin=pad, half_blend=0, multiple=1, scale=s, batch=4, out_channels=3)
    torch.testing.assert_close(tiled, full, rtol=0, atol=tol)


# ---------------------------------------------------------------------------------- sizes and argument checks


def test_variants_match_published_sizes() -> None:
    """Trainable parameters at x4 (meta device) within 1% of the paper's 3,631K (SRFBN) and 483K (SRFBN-S)."""
    for builder, published in ((srfbn.srfbn, 3_631e3), (srfbn.srfbn_s, 483e3)):
        with torch.device("meta"):
            n = sum(p.numel() for p in builder(scale=4).parameters() if p.requires_grad)
        assert abs(n - published) / published < 0.01, (builder.__name__, n)
    assert set(srfbn.ARCH.variants) == {"srfbn", "srfbn-s"}
    assert srfbn.info({**srfbn.VARIANTS["srfbn"], "scale": 4}).receptive_halo == 26 + 2  # gradient-measured radius 26
    assert srfbn.info({**srfbn.VARIANTS["srfbn-s"], "scale": 4}).receptive_halo == 14 + 2  # gradient-measured radius 14


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scale": 5}, "scale"),
        ({"scale": True}, "scale"),
        ({"num_features": 0}, "num_features"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 2.0}, "num_steps"),
        ({"num_groups": -1}, "num_groups"),
        ({"rgb_range": 0}, "rgb_range"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=f"`{field}`"):
        srfbn.SRFBN(**kwargs)
