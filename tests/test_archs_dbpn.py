"""D-DBPN: the authors' checkpoint layout, an independent functional forward, residual on/off, receptive field, tiling.

The reference state dicts are written here from the authors' module definitions (``alterzero/DBPN-Pytorch``:
``dbpn.py`` ``Net``, ``base_networks.py`` ``ConvBlock``/``DeconvBlock``/``UpBlock``/``DownBlock``/``D_UpBlock``/
``D_DownBlock``), with the ``module.`` prefix their ``nn.DataParallel`` checkpoints carry, never from srbatch's module.
The reference forward uses ``torch.nn.functional`` on those raw tensors in float64; the reference bicubic is MATLAB's
formula written out in numpy.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from srbatch import build_model, load_model, save_model
from srbatch.errors import ConfigError
from srbatch.models.archs import dbpn
from srbatch.models.loader import detect_architecture
from srbatch.models.registry import architectures, variants
from srbatch.weights.checkpoint import canonicalize

# the authors' dbpn.py: scale -> (kernel, stride, padding) of every projection layer
KSP = {2: (6, 2, 2), 4: (8, 4, 2), 8: (12, 8, 2)}


def _authors_state_dict(
    *, scale: int, channels: int = 3, feat: int, nf: int, stages: int, seed: int = 0, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes the authors' ``Net`` has, as saved from ``nn.DataParallel``."""
    k = KSP[scale][0]
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def rand(*shape: int, std: float) -> torch.Tensor:
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=g) * std

    def prelu(name: str) -> None:  # nn.PReLU(): one slope, initialised at 0.25
        sd[f"module.{name}.act.weight"] = 0.25 + rand(1, std=0.05)

    def conv(name: str, cout: int, cin: int, ks: int, act: bool = True) -> None:  # ConvBlock: .conv (+ .act)
        sd[f"module.{name}.conv.weight"] = rand(cout, cin, ks, ks, std=1 / math.sqrt(cin * ks * ks))
        sd[f"module.{name}.conv.bias"] = rand(cout, std=0.05)
        if act:
            prelu(name)

    def deconv(name: str) -> None:  # DeconvBlock: .deconv (ConvTranspose2d weight is (in, out, k, k)) + .act
        sd[f"module.{name}.deconv.weight"] = rand(nf, nf, k, k, std=1 / math.sqrt(nf * k * k / KSP[scale][1] ** 2))
        sd[f"module.{name}.deconv.bias"] = rand(nf, std=0.05)
        prelu(name)

    def up(name: str, inputs: int) -> None:  # UpBlock / D_UpBlock
        if inputs > 1:
            conv(f"{name}.conv", nf, nf * inputs, 1)
        deconv(f"{name}.up_conv1")
        conv(f"{name}.up_conv2", nf, nf, k)
        deconv(f"{name}.up_conv3")

    def down(name: str, inputs: int) -> None:  # DownBlock / D_DownBlock
        if inputs > 1:
            conv(f"{name}.conv", nf, nf * inputs, 1)
        conv(f"{name}.down_conv1", nf, nf, k)
        deconv(f"{name}.down_conv2")
        conv(f"{name}.down_conv3", nf, nf, k)

    conv("feat0", feat, channels, 3)
    conv("feat1", nf, feat, 1)
    up("up1", 1)
    down("down1", 1)
    up("up2", 1)
    for i in range(2, stages):
        down(f"down{i}", i)
        up(f"up{i + 1}", i)
    conv("output_conv", channels, stages * nf, 3, act=False)
    return sd


def _matlab_bicubic(x: np.ndarray, s: int) -> np.ndarray:
    """MATLAB ``imresize(x, s, 'bicubic')`` for an integer upscale, written out (a = -0.5, symmetric padding)."""

    def cubic(t: np.ndarray) -> np.ndarray:
        a = np.abs(t)
        return np.where(a <= 1, 1.5 * a**3 - 2.5 * a**2 + 1, np.where(a < 2, -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2, 0))

    def axis(n: int) -> np.ndarray:
        m = np.zeros((n * s, n))
        for o in range(n * s):
            u = (o + 0.5) / s - 0.5
            for j in range(math.floor(u) - 1, math.floor(u) + 3):
                jj = -j - 1 if j < 0 else (2 * n - 1 - j if j >= n else j)
                m[o, jj] += cubic(np.array(u - j))
        return m / m.sum(1, keepdims=True)

    return axis(x.shape[-2]) @ x @ axis(x.shape[-1]).T


def _reference(sd: dict[str, torch.Tensor], x: torch.Tensor, scale: int, stages: int, residual: bool) -> torch.Tensor:
    """The authors' forward, in float64 with torch.nn.functional on the raw (``module.``-prefixed) tensors."""
    _, s, p = KSP[scale]
    w = {k.removeprefix("module."): v.double() for k, v in sd.items()}

    def block(name: str, t: torch.Tensor, kind: str, stride: int = 1, pad: int = 0, act: bool = True):
        if kind == "deconv":
            t = F.conv_transpose2d(t, w[f"{name}.deconv.weight"], w[f"{name}.deconv.bias"], stride, pad)
        else:
            t = F.conv2d(t, w[f"{name}.conv.weight"], w[f"{name}.conv.bias"], stride, pad)
        return F.prelu(t, w[f"{name}.act.weight"]) if act else t

    def up(name: str, t: torch.Tensor) -> torch.Tensor:
        if f"{name}.conv.conv.weight" in w:
            t = block(f"{name}.conv", t, "conv")
        h0 = block(f"{name}.up_conv1", t, "deconv", s, p)
        l0 = block(f"{name}.up_conv2", h0, "conv", s, p)
        return block(f"{name}.up_conv3", l0 - t, "deconv", s, p) + h0

    def down(name: str, t: torch.Tensor) -> torch.Tensor:
        if f"{name}.conv.conv.weight" in w:
            t = block(f"{name}.conv", t, "conv")
        l0 = block(f"{name}.down_conv1", t, "conv", s, p)
        h0 = block(f"{name}.down_conv2", l0, "deconv", s, p)
        return block(f"{name}.down_conv3", h0 - t, "conv", s, p) + l0

    xd = x.double()
    t = block("feat1", block("feat0", xd, "conv", 1, 1), "conv")
    hs, ls = [up("up1", t)], []
    ls.append(down("down1", hs[0]))
    hs.append(up("up2", ls[0]))
    for i in range(2, stages):
        ls.append(down(f"down{i}", torch.cat(hs[::-1], 1)))
        hs.append(up(f"up{i + 1}", torch.cat(ls[::-1], 1)))
    out = block("output_conv", torch.cat(hs[::-1], 1), "conv", 1, 1, act=False)
    if residual:
        out = out + torch.from_numpy(_matlab_bicubic(xd.numpy(), scale))
    return out


def _input(n: int, seed: int = 1, channels: int = 3) -> torch.Tensor:
    return torch.rand(1, channels, n, n, generator=torch.Generator().manual_seed(seed))


# (scale, stages, channels) of tiny authors'-layout networks
LAYOUTS = [(2, 2, 3), (4, 3, 3), (8, 3, 3), (4, 4, 1)]


@pytest.mark.parametrize(("scale", "stages", "channels"), LAYOUTS, ids=[f"x{s}-T{t}-c{c}" for s, t, c in LAYOUTS])
def test_authors_checkpoint_detected_once_loads_and_matches_functional(scale, stages, channels, tmp_path: Path):
    sd = _authors_state_dict(scale=scale, channels=channels, feat=6, nf=4, stages=stages)
    assert all(k.startswith("module.") for k in sd)
    path = tmp_path / "DIV2K_train_HRhostDBPNtpami_epoch_99.pth"
    torch.save(sd, path)  # what the authors' checkpoint() writes: model.state_dict() of the DataParallel wrapper

    flat = canonicalize(torch.load(path, weights_only=True))
    claims = detect_architecture(flat)
    assert [name for name, _ in claims] == ["dbpn"]
    want_hp = {"scale": scale, "channels": channels, "feat": 6, "base_filter": 4, "num_stages": stages,
               "residual": False}  # fmt: skip
    assert claims[0][1].hparams == want_hp

    desc = load_model(str(path))
    assert desc.architecture == "dbpn" and desc.hparams == want_hp and desc.scale == scale
    assert desc.info.receptive_halo == dbpn.receptive_radius(scale, stages) + 2
    x = _input(9, channels=channels)
    with torch.no_grad():
        got = desc.module(x)
    assert got.shape == (1, channels, 9 * scale, 9 * scale)
    torch.testing.assert_close(got.double(), _reference(sd, x, scale, stages, False), rtol=0, atol=1e-5)

    # residual on (the authors' main.py default): the same weights plus the bicubic upscale of the input
    res = build_model("dbpn", **{**want_hp, "residual": True}).module
    res.load_state_dict(claims[0][1].state_dict, strict=True)
    with torch.no_grad():
        got_res = res(x)
    torch.testing.assert_close(got_res.double(), _reference(sd, x, scale, stages, True), rtol=0, atol=1e-5)
    assert (got_res - got).abs().max() > 0.1  # the bicubic term is really there

    # safetensors round trip keeps every hyper-parameter, residual included, and the output
    for module, hp, out in ((desc.module, want_hp, got), (res, {**want_hp, "residual": True}, got_res)):
        path_st = str(tmp_path / f"dbpn-{hp['residual']}.safetensors")
        save_model(dataclasses.replace(desc, module=module, hparams=hp), path_st)
        back = load_model(path_st)
        assert back.architecture == "dbpn" and back.hparams == hp
        with torch.no_grad():
            assert torch.equal(back.module(x), out)


def test_dbpn_claims_no_other_architecture() -> None:
    """dbpn's detect refuses every other registered architecture and variant (built on the meta device)."""
    names = sorted(set(architectures()) | set(variants()))
    checked = 0
    for name in names:
        arch = variants()[name][0] if name in variants() else name
        if arch == "dbpn" or not architectures()[arch].needs_weights:
            continue
        with torch.device("meta"):
            sd = build_model(name, scale=2).module.state_dict()
        assert dbpn.detect(sd) is None, name
        checked += 1
    assert checked >= 15


def test_detect_refuses_damaged_layouts() -> None:
    good = canonicalize(_authors_state_dict(scale=4, feat=6, nf=4, stages=3))
    assert dbpn.detect(good) is not None
    bad_kernel = {**good, "up1.up_conv1.deconv.weight": torch.zeros(4, 4, 7, 7)}
    missing = {k: v for k, v in good.items() if k != "down2.conv.act.weight"}
    gap = {k.replace("up3.", "up4."): v for k, v in good.items()}
    extra = {**good, "down3.conv.conv.weight": torch.zeros(4, 12, 1, 1)}
    for sd in ({}, bad_kernel, missing, gap, extra, {**good, "feat0.conv.weight": "x"},
               {**good, "output_conv.conv.weight": torch.zeros(3, 8, 3, 3)}):  # fmt: skip
        assert dbpn.detect(sd) is None


def test_published_parameter_counts() -> None:
    """D-DBPN as published: 10.4M parameters at x4, 5.95M at x2 (Haris et al.; see the module docstring), and the
    module's count equals the authors' layer list exactly at every scale, for D-DBPN and DBPNLL."""
    published = {4: 10.43e6, 2: 5.95e6}
    for scale in (2, 4, 8):
        for builder, stages in ((dbpn.d_dbpn, 7), (dbpn.dbpn_ll, 10)):
            with torch.device("meta"):
                n = sum(p.numel() for p in builder(scale=scale).parameters())
            authors = _authors_state_dict(scale=scale, feat=256, nf=64, stages=stages, device="meta")
            assert n == sum(t.numel() for t in authors.values()), (builder.__name__, scale)
            if builder is dbpn.d_dbpn and scale in published:
                assert abs(n - published[scale]) / published[scale] < 0.01, (scale, n)


@pytest.mark.parametrize(("scale", "stages"), [(2, 2), (2, 7), (4, 3), (4, 7), (8, 3)])
def test_receptive_radius_is_the_gradient_support(scale: int, stages: int) -> None:
    """The farthest LR input column with a non-zero gradient, over every output phase, is :func:`receptive_radius`.

    The field is the same along both axes, so a 3-row strip measures it along the columns cheaply."""
    radius = dbpn.receptive_radius(scale, stages)
    torch.manual_seed(0)
    model = dbpn.DBPN(scale=scale, feat=3, base_filter=2, num_stages=stages).double().eval()
    n = 2 * radius + 7
    c = n // 2
    x = torch.rand(1, 3, 3, n, dtype=torch.float64, requires_grad=True)
    out = model(x)[0, :, scale, c * scale : (c + 1) * scale]  # every output phase of LR pixel (1, c)
    (grad,) = torch.autograd.grad(out.sum(), x)
    cols = (grad.abs().sum((0, 1, 2)) > 0).nonzero().flatten()
    assert int((cols - c).abs().max()) == radius
    assert {2: 41, 4: 21, 8: 21}[scale] == dbpn.receptive_radius(scale, 7)  # D-DBPN, as the docstring says


@pytest.mark.parametrize(("scale", "stages", "residual"), [(2, 2, False), (4, 3, True), (8, 2, False)])
def test_halo_makes_tiles_match(scale: int, stages: int, residual: bool) -> None:
    """A window computed from a crop padded by ``receptive_halo`` equals the same window of the full output; with one
    pixel less context than the receptive field it does not. float64: the farthest taps pass through every
    projection layer and weigh about 1e-16 here, yet with enough context the window is bit-identical."""
    hp = {"scale": scale, "feat": 6, "base_filter": 4, "num_stages": stages, "residual": residual}
    torch.manual_seed(0)
    model = dbpn.DBPN(**hp).double().eval()
    with torch.no_grad():  # residual models start with a zero output conv: give it weights
        model.output_conv.conv.weight.normal_(0, 0.05)
    info = dbpn.info(hp)
    assert info.size_multiple == 1 and info.local
    pad, s = info.receptive_halo, scale
    start, win = pad + 1, 5
    x = _input(2 * start + win, seed=3).double()

    def window(context: int) -> torch.Tensor:
        crop = x[..., start - context : start + win + context, start - context : start + win + context]
        with torch.no_grad():
            return model(crop)[..., context * s : (context + win) * s, context * s : (context + win) * s]

    full = window(start)
    assert (window(pad) - full).abs().max() < 1e-12
    assert (window(dbpn.receptive_radius(scale, stages)) - full).abs().max() < 1e-12
    assert (window(dbpn.receptive_radius(scale, stages) - 1) - full).abs().max() > 0
    assert (window(dbpn.receptive_radius(scale, stages) - 3) - full).abs().max() > 1e-13


def test_bad_arguments_name_the_field() -> None:
    for kwargs, field in (({"scale": 3}, "scale"), ({"scale": True}, "scale"), ({"num_stages": 1}, "num_stages"),
                          ({"residual": "yes"}, "residual"), ({"channels": 2}, "channels"), ({"feat": 0}, "feat"),
                          ({"base_filter": 2.5}, "base_filter")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"`{field}`"):
            dbpn.DBPN(**{"scale": 4, **kwargs})
    with pytest.raises(ConfigError, match="`scale`"):
        dbpn.info({"scale": 3})
    with pytest.raises(ConfigError, match="`scale`"):
        build_model("d-dbpn", scale=3)


def test_variants_and_descriptor() -> None:
    assert variants()["d-dbpn"] == ("dbpn", {"feat": 256, "base_filter": 64, "num_stages": 7})
    assert variants()["dbpn-ll"] == ("dbpn", {"feat": 256, "base_filter": 64, "num_stages": 10})
    info = dbpn.info({"scale": 4, **variants()["d-dbpn"][1]})
    assert (info.scale, info.in_channels, info.color_space, info.input_upsampled) == (4, 3, "RGB", False)
    assert info.receptive_halo == 23 and info.tile_hint == 128
    assert dbpn.info({"scale": 2, "channels": 1}).color_space == "Y"


def test_pil_bicubic_equals_matlab_inside_differs_at_borders() -> None:
    """The docstring's claim about the authors' PIL bicubic versus the MATLAB one used for ``residual``."""
    from PIL import Image

    from srbatch.metrics.resize import imresize_fast

    a = np.random.default_rng(0).random((10, 12)).astype(np.float32)
    for s in (2, 4, 8):
        pil = np.asarray(Image.fromarray(a, mode="F").resize((12 * s, 10 * s), Image.BICUBIC), dtype=np.float64)
        ours = imresize_fast(torch.from_numpy(a)[None, None], s)[0, 0].double().numpy()
        np.testing.assert_allclose(ours, _matlab_bicubic(a.astype(np.float64), s), atol=1e-6)
        diff = np.abs(pil - ours)
        assert diff[2 * s : -2 * s, 2 * s : -2 * s].max() < 1e-5
        assert diff[: 2 * s].max() > 1e-3 and diff[:, -2 * s :].max() > 1e-3


def test_initialisation_follows_the_authors_and_residual_starts_at_bicubic() -> None:
    torch.manual_seed(0)
    model = dbpn.DBPN(scale=4, feat=32, base_filter=16, num_stages=2).eval()
    w = model.up1.up_conv2.conv.weight.detach()  # He-normal: std sqrt(2 / fan_in), fan_in = 16 * 8 * 8
    assert abs(float(w.std()) / math.sqrt(2 / (16 * 64)) - 1) < 0.05
    assert all(float(b.detach().abs().max()) == 0 for n, b in model.named_parameters() if n.endswith("bias"))
    x = _input(7)
    with torch.no_grad():
        assert (model(x).abs().mean()) > 0.05
        res = dbpn.DBPN(scale=4, feat=32, base_filter=16, num_stages=2, residual=True).eval()(x)
    np.testing.assert_allclose(res.double().numpy(), _matlab_bicubic(x.double().numpy(), 4), atol=1e-6)
