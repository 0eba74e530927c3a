"""Tests of srbatch.inference.Upscaler: tiling exactness, colour paths, OOM splits, precision fallback (CPU)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from srbatch.errors import ConfigError, InferenceError
from srbatch.inference import TilingConfig, Upscaler
from srbatch.inference.tiling import plan_axis
from srbatch.inference.upscaler import GREY_WEIGHTS, half_precision_failed
from srbatch.io.images import DecodedImage
from srbatch.metrics.color import rgb2ycbcr, ycbcr2rgb
from srbatch.metrics.resize import imresize, imresize_uint8
from srbatch.models.descriptor import ArchInfo, ColorSpace, ModelDescriptor
from srbatch.models.loader import build_model

TOL = 1e-4


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _report(name: str, diff: float) -> None:
    print(f"max abs diff {name}: {diff:.3e}")


# ---------------------------------------------------------------- toy models


class ConvStack(nn.Module):
    """``layers`` 3x3 convs (receptive-field radius = layers) then a nearest x``scale`` upsample."""

    def __init__(
        self, cin: int = 3, cout: int = 3, layers: int = 3, scale: int = 2, feats: int = 8, offset: float = 0.0
    ) -> None:
        super().__init__()
        self.offset = offset
        chans = [cin] + [feats] * (layers - 1) + [cout]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        self.scale = scale
        self.cin = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.cin, f"toy model got {x.shape[1]} channels"
        for i, c in enumerate(self.convs):
            x = c(x)
            if i < len(self.convs) - 1:
                x = torch.tanh(x)
        x = x + self.offset
        return F.interpolate(x, scale_factor=self.scale, mode="nearest") if self.scale > 1 else x


class Symmetric(nn.Module):
    """Dihedral-equivariant toy: convs with kernels symmetric under rotation and flip, then nearest x2."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(8, 3, 3))  # (out, in, {centre, edge, corner})
        self.b = nn.Parameter(torch.randn(3, 8, 3))

    @staticmethod
    def _kernel(p: torch.Tensor) -> torch.Tensor:
        c, e, k = p[..., 0], p[..., 1], p[..., 2]
        rows = [torch.stack([k, e, k], -1), torch.stack([e, c, e], -1), torch.stack([k, e, k], -1)]
        return torch.stack(rows, -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(F.conv2d(x, self._kernel(self.a) * 0.3, padding=1))
        x = F.conv2d(x, self._kernel(self.b) * 0.3, padding=1)
        return F.interpolate(x, scale_factor=2, mode="nearest")


class Unshuffle(nn.Module):
    """Needs inputs that are multiples of 2: pixel-unshuffle, conv, pixel-shuffle x4 (net scale 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(12, 48, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0
        return F.pixel_shuffle(self.conv(F.pixel_unshuffle(x, 2)), 4)


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class NanInHalf(nn.Module):
    """A ConvStack that returns NaN (or black) whenever it runs in reduced precision."""

    def __init__(self, mode: str = "nan") -> None:
        super().__init__()
        self.inner = ConvStack()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if x.dtype != torch.float32:
            return torch.full_like(y, float("nan")) if self.mode == "nan" else torch.zeros_like(y)
        return y


def _toy(
    module: nn.Module,
    *,
    scale: int = 2,
    cin: int = 3,
    cs: ColorSpace = "RGB",
    halo: int = 4,
    upsampled: bool = False,
    multiple: int = 1,
) -> ModelDescriptor:
    info = ArchInfo(
        scale=scale, in_channels=cin, out_channels=cin, color_space=cs, input_upsampled=upsampled,
        size_multiple=multiple, receptive_halo=halo,
    )  # fmt: skip
    return ModelDescriptor(module=module.eval(), architecture="toy", info=info, name="toy")


def _cpu(desc: ModelDescriptor, **kw) -> Upscaler:
    return Upscaler(desc, device="cpu", **kw)


def _tiled_vs_untiled(desc: ModelDescriptor, x: torch.Tensor, tiling: TilingConfig) -> tuple[float, Upscaler]:
    ref = _cpu(desc, tiling=TilingConfig(tile=0)).upscale_tensor(x)
    up = _cpu(desc, tiling=tiling)
    out = up.upscale_tensor(x)
    assert out.shape == ref.shape
    assert up.stats["tiles"] > up.stats["images"], "the image was not actually tiled"
    return float((out - ref).abs().max()), up


# ---------------------------------------------------------------- tiling exactness


def test_plan_axis_covers_and_stays_inside() -> None:
    for length in (1, 7, 37, 45, 64, 101):
        for tile, margin, mult in ((8, 3, 1), (16, 5, 4), (5, 0, 1), (12, 14, 2)):
            if length % mult:
                continue
            window, tiles = plan_axis(length, tile, margin, mult)
            covered = np.zeros(length, int)
            for t in tiles:
                covered[t.core_start : t.core_end] += 1
                assert 0 <= t.win_start and t.win_start + window <= length
                assert t.win_start % mult == 0 and window % mult == 0
                # every core pixel has `margin` context or the true border
                assert t.win_start <= max(t.core_start - margin, 0)
                assert t.win_start + window >= min(t.core_end + margin, length)
            assert (covered == 1).all()


def test_tiled_equals_untiled_edsr_baseline() -> None:
    desc = build_model("edsr-baseline", scale=2, n_resblocks=2, n_feats=16)
    x = torch.rand(1, 3, 37, 45)
    diff, up = _tiled_vs_untiled(desc, x, TilingConfig(tile=12, batch_size=3))
    _report("edsr-baseline x2 (tile 12, default overlap/blend)", diff)
    assert diff < TOL
    diff0, _ = _tiled_vs_untiled(desc, x, TilingConfig(tile=12, batch_size=3, blend=0))
    _report("edsr-baseline x2 (tile 12, blend 0)", diff0)
    assert diff0 < TOL


def test_overlap_below_receptive_field_is_detected() -> None:
    """The comparison is sensitive: ConvStack(layers=5) has radius 5; overlap 5 is exact, overlap 3 is not."""
    desc = _toy(ConvStack(layers=5), halo=5)
    x = torch.rand(2, 3, 33, 29)
    exact, _ = _tiled_vs_untiled(desc, x, TilingConfig(tile=8, blend=0, batch_size=5))
    _report("conv-stack r=5, overlap 5, blend 0", exact)
    assert exact < TOL
    short, _ = _tiled_vs_untiled(desc, x, TilingConfig(tile=8, overlap=3, blend=0))
    assert short > 1e-3


def test_tiled_equals_untiled_rrdbnet() -> None:
    desc = build_model("rrdbnet", scale=4, num_block=1, num_feat=8, num_grow_ch=4)
    x = torch.rand(1, 3, 61, 67)
    halo = desc.info.receptive_halo  # 21 for one block
    diff, up = _tiled_vs_untiled(desc, x, TilingConfig(tile=16, blend=0, batch_size=4))
    _report(f"rrdbnet x4 tiny (61x67, tile 16, overlap {halo}, {up.stats['tiles']} tiles)", diff)
    assert diff < TOL


def test_tiled_equals_untiled_imdn() -> None:
    """IMDN's channel attention pools over the whole input, so tiling is only exact-ish: with random weights the
    attention is nearly constant and the difference stays far below the tolerance; trained weights may differ more."""
    desc = build_model("imdn", scale=2, nf=16, num_modules=2)
    x = torch.rand(1, 3, 48, 40)
    halo = desc.info.receptive_halo
    diff, up = _tiled_vs_untiled(desc, x, TilingConfig(tile=8, blend=0, batch_size=8))
    _report(f"imdn x2 small (48x40, tile 8, overlap {halo}, {up.stats['tiles']} tiles)", diff)
    assert diff < TOL


def test_tiled_equals_untiled_vdsr_upsampled_input() -> None:
    desc = build_model("vdsr", scale=2, num_layers=4, num_features=8)
    x = torch.rand(1, 1, 21, 17)
    diff, _ = _tiled_vs_untiled(desc, x, TilingConfig(tile=12))
    _report("vdsr tiny (input upsampled, tile 12)", diff)
    assert diff < TOL


def test_size_multiple_padding_and_tiling() -> None:
    desc = _toy(Unshuffle(), halo=4, multiple=4)
    x = torch.rand(1, 3, 23, 31)
    up = _cpu(desc, tiling=TilingConfig(tile=0))
    ref = up.upscale_tensor(x)
    assert ref.shape == (1, 3, 46, 62)
    diff, _ = _tiled_vs_untiled(desc, x, TilingConfig(tile=8))
    _report("pixel-unshuffle toy, size_multiple 4", diff)
    assert diff < TOL


def test_batch_of_images_and_3d_input() -> None:
    desc = _toy(ConvStack(layers=2), halo=2)
    x = torch.rand(3, 3, 19, 23)
    up = _cpu(desc, tiling=TilingConfig(tile=8, batch_size=4))
    out = up.upscale_tensor(x)
    single = torch.stack([up.upscale_tensor(x[i]) for i in range(3)])
    assert out.shape == (3, 3, 38, 46) and single.shape == out.shape
    assert float((out - single).abs().max()) < 1e-5


# ---------------------------------------------------------------- OOM


class _OOMUpscaler(Upscaler):
    """Pretends the device runs out of memory for windows larger than ``limit`` pixels."""

    limit = 48
    error: type[BaseException] = torch.OutOfMemoryError
    seen: list[tuple[int, ...]]

    def _forward(self, x: torch.Tensor, *, fp32: bool = False) -> torch.Tensor:
        self.seen = [*getattr(self, "seen", []), tuple(x.shape)]
        if max(x.shape[-2:]) > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return super()._forward(x, fp32=fp32)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_oom_splits_and_matches(error: type[BaseException]) -> None:
    desc = build_model("edsr-baseline", scale=2, n_resblocks=2, n_feats=16)
    x = torch.rand(1, 3, 64, 57)
    ref = _cpu(desc, tiling=TilingConfig(tile=0)).upscale_tensor(x)
    up = _OOMUpscaler(desc, device="cpu", tiling=TilingConfig(min_tile=8))
    up.error = error
    out = up.upscale_tensor(x)
    assert up.stats["oom_splits"] >= 1
    assert max(max(s[-2:]) for s in up.seen[-1:]) <= up.limit
    diff = float((out - ref).abs().max())
    _report(f"oom split ({error.__name__})", diff)
    assert diff < TOL
    # the reduced tile is remembered: the next image does not OOM again
    splits = up.stats["oom_splits"]
    up.upscale_tensor(x)
    assert up.stats["oom_splits"] == splits


def test_oom_gives_up_with_inference_error() -> None:
    desc = build_model("edsr-baseline", scale=2, n_resblocks=2, n_feats=16)
    up = _OOMUpscaler(desc, device="cpu", tiling=TilingConfig(min_tile=32))
    with pytest.raises(InferenceError, match="out of memory"):
        up.upscale_tensor(torch.rand(1, 3, 64, 64))
    up0 = _OOMUpscaler(desc, device="cpu", tiling=TilingConfig(tile=0))
    with pytest.raises(InferenceError, match="tiling disabled"):
        up0.upscale_tensor(torch.rand(1, 3, 64, 64))


def test_other_runtime_errors_propagate() -> None:
    class Broken(_OOMUpscaler):
        error = RuntimeError

        def _forward(self, x: torch.Tensor, *, fp32: bool = False) -> torch.Tensor:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")

    up = Broken(_toy(ConvStack()), device="cpu")
    with pytest.raises(RuntimeError, match="CUDNN"):
        up.upscale_tensor(torch.rand(1, 3, 8, 8))
    assert up.stats["oom_splits"] == 0


# ---------------------------------------------------------------- precision


def test_bf16_nan_falls_back_to_fp32() -> None:
    desc = _toy(NanInHalf("nan"))
    x = torch.rand(1, 3, 31, 29)
    ref = _cpu(desc).upscale_tensor(x)
    up = _cpu(desc, dtype="bfloat16", tiling=TilingConfig(tile=8, overlap=4, blend=0, batch_size=2))
    assert up.dtype == torch.bfloat16
    out = up.upscale_tensor(x)
    assert up.stats["fp32_fallbacks"] == up.stats["batches"] > 1
    assert float((out - ref).abs().max()) < TOL
    assert next(desc.module.parameters()).dtype == torch.float32  # the descriptor's module was not converted


def test_bf16_black_output_falls_back_and_black_input_does_not() -> None:
    up = _cpu(_toy(NanInHalf("black")), dtype=torch.bfloat16)
    up.upscale_tensor(torch.rand(1, 3, 9, 9))
    assert up.stats["fp32_fallbacks"] == 1
    up.upscale_tensor(torch.zeros(1, 3, 9, 9))  # black in, black out: legitimate
    assert up.stats["fp32_fallbacks"] == 1


def test_half_precision_check_helper() -> None:
    inp = torch.rand(4, 3, 5, 5)
    inp[3] = 0
    out = torch.rand(4, 3, 10, 10)
    out[1, 0, 0, 0] = float("inf")
    out[2] = 0
    out[3] = 0
    assert half_precision_failed(inp, out).tolist() == [False, True, True, False]


def test_fp16_on_cpu_falls_back_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="srbatch.inference"):
        up = Upscaler(_toy(ConvStack()), device="auto", dtype="float16")
    assert up.dtype == torch.float32
    assert up.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if up.device.type == "cpu":
        assert any("float16" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    assert any(str(up.device) in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_nonfinite_fp32_output_raises() -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, scale_factor=2) / 0.0

    with pytest.raises(InferenceError, match="NaN"):
        _cpu(_toy(Bad())).upscale_tensor(torch.rand(1, 3, 6, 6))


# ---------------------------------------------------------------- self-ensemble, outscale, upsampled input


def _dihedral(x: torch.Tensor, transpose: bool, flip_h: bool, flip_v: bool) -> torch.Tensor:
    x = x.transpose(-2, -1) if transpose else x
    x = x.flip(-1) if flip_h else x
    return x.flip(-2) if flip_v else x


def _undo_dihedral(y: torch.Tensor, transpose: bool, flip_h: bool, flip_v: bool) -> torch.Tensor:
    y = y.flip(-2) if flip_v else y
    y = y.flip(-1) if flip_h else y
    return y.transpose(-2, -1) if transpose else y


def test_self_ensemble_is_the_mean_of_the_eight_transforms() -> None:
    """A model that is not equivariant: the engine's x8 self-ensemble equals the mean of the network's outputs on the
    8 transposes/flips of the input, each transformed back, computed here with the network called directly (written
    as transpose x flip-h x flip-v, not as the engine's rotations x flips); and it differs from the plain output."""
    desc = build_model("edsr-baseline", scale=2, n_resblocks=1, n_feats=8)
    x = torch.rand(1, 3, 13, 19)
    ens = _cpu(desc, self_ensemble=True, tiling=TilingConfig(tile=0)).upscale_tensor(x)
    assert ens.shape == (1, 3, 26, 38)
    with torch.no_grad():
        outs = [
            _undo_dihedral(desc.module(_dihedral(x, t, h, v)), t, h, v)
            for t in (False, True) for h in (False, True) for v in (False, True)
        ]  # fmt: skip
        plain = desc.module(x)
    expected = torch.stack(outs).mean(0)
    diff = float((ens - expected).abs().max())
    _report("self-ensemble vs mean of the 8 transforms, edsr-baseline", diff)
    assert diff < 1e-5
    assert float((ens - plain).abs().max()) > 1e-3  # this model is not equivariant: the ensemble changes the output


def test_self_ensemble_of_an_equivariant_model_is_its_plain_output() -> None:
    sym = _toy(Symmetric())
    x = torch.rand(1, 3, 15, 22)
    plain = _cpu(sym).upscale_tensor(x)
    ens = _cpu(sym, self_ensemble=True, tiling=TilingConfig(tile=8, overlap=2)).upscale_tensor(x)
    diff = float((plain - ens).abs().max())
    _report("self-ensemble vs plain, equivariant toy", diff)
    assert diff < 1e-5


@pytest.mark.parametrize(("outscale", "size"), [(3.0, (111, 135)), (1.5, (56, 68)), (2.0, (74, 90))])
def test_outscale(outscale: float, size: tuple[int, int]) -> None:
    desc = _toy(ConvStack(layers=1))
    x = torch.rand(1, 3, 37, 45)
    up = _cpu(desc, outscale=outscale)
    out = up.upscale_tensor(x)
    assert tuple(out.shape[-2:]) == size
    native = _cpu(desc).upscale_tensor(x)
    expected = native if outscale == 2.0 else imresize(native, output_shape=size)
    assert float((out - expected).abs().max()) < 1e-5
    arr = up.upscale_array((np.random.default_rng(0).random((37, 45, 3)) * 255).astype(np.uint8))
    assert arr.shape == (*size, 3)


def test_input_upsampled_receives_bicubic() -> None:
    x = torch.rand(1, 3, 11, 14)
    out = _cpu(_toy(Identity(), scale=3, upsampled=True)).upscale_tensor(x)
    assert out.shape == (1, 3, 33, 42)
    assert float((out - imresize(x, 3)).abs().max()) < 1e-6


def test_bicubic_architecture_matches_imresize_tiled() -> None:
    desc = build_model("bicubic", scale=2)
    x = torch.rand(1, 3, 27, 33)
    out = _cpu(desc, tiling=TilingConfig(tile=8)).upscale_tensor(x)
    assert float((out - imresize(x, 2)).abs().max()) < 1e-5


# ---------------------------------------------------------------- colour handling and images


def _img(h: int, w: int, c: int, dtype: type = np.uint8, seed: int = 0) -> np.ndarray:
    maxv = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, maxv + 1, size=(h, w, c), dtype=np.int64).astype(dtype)


def test_grey_image_through_rgb_model_stays_grey() -> None:
    desc = _toy(ConvStack(layers=2, offset=0.5))
    pix = _img(13, 17, 1)
    up = _cpu(desc)
    res = up.upscale_image(DecodedImage(pixels=pix, mode="L"))
    assert res.pixels.shape == (26, 34, 1) and res.pixels.dtype == np.uint8 and res.mode == "L"
    # the RGB output of the replicated grey image, reduced with the BT.601 weights, then clamped and rounded
    rgb = up.upscale_tensor(torch.from_numpy(pix[..., 0] / 255.0).float().expand(1, 3, 13, 17))
    grey = sum(w * rgb[0, i] for i, w in enumerate(GREY_WEIGHTS))
    expected = np.floor(np.clip(grey.numpy().astype(np.float64), 0, 1) * 255 + 0.5)
    assert np.abs(res.pixels[..., 0].astype(int) - expected.astype(int)).max() <= 1
    assert len(np.unique(res.pixels)) > 10


def test_rgba_keeps_alpha() -> None:
    pix, alpha = _img(12, 15, 3), _img(12, 15, 1, seed=1)[..., 0]
    up = _cpu(_toy(ConvStack()))
    res = up.upscale_image(DecodedImage(pixels=pix, alpha=alpha, mode="RGBA", format="PNG"))
    assert res.pixels.shape == (24, 30, 3) and res.alpha is not None and res.alpha.shape == (24, 30)
    assert res.alpha.dtype == np.uint8 and res.format == "PNG"
    assert np.abs(res.alpha.astype(int) - imresize_uint8(alpha, 2).astype(int)).max() <= 1
    arr = up.upscale_array(np.dstack([pix, alpha]))  # 4-channel arrays: last channel is alpha
    assert arr.shape == (24, 30, 4) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1


def test_uint16_stays_uint16() -> None:
    pix = _img(10, 11, 3, np.uint16)
    alpha = _img(10, 11, 1, np.uint16, seed=2)[..., 0]
    res = _cpu(build_model("bicubic", scale=2)).upscale_image(DecodedImage(pixels=pix, alpha=alpha, mode="RGBA"))
    assert res.pixels.dtype == np.uint16 and res.alpha is not None and res.alpha.dtype == np.uint16
    assert np.abs(res.pixels.astype(int) - imresize_uint8(pix, 2).astype(int)).max() <= 1
    assert res.pixels.max() > 255


def test_y_model_on_rgb_and_grey() -> None:
    desc = _toy(ConvStack(cin=1, cout=1, layers=2), cin=1, cs="Y")
    pix = _img(9, 14, 3)
    up = _cpu(desc)
    out = up.upscale_array(pix)
    assert out.shape == (18, 28, 3)
    x = torch.from_numpy(pix / 255.0).float().permute(2, 0, 1)[None]
    ycc = rgb2ycbcr(x)
    y = up.upscale_tensor(ycc[:, :1])
    expected = ycbcr2rgb(torch.cat([y, imresize(ycc[:, 1:], 2)], 1)).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert np.abs(out - expected).max() < 1e-5
    grey = _img(9, 14, 1)
    gout = up.upscale_array(grey)
    direct = up.upscale_tensor(torch.from_numpy(grey / 255.0).float().permute(2, 0, 1)[None]).clamp(0, 1)
    assert gout.shape == (18, 28, 1) and np.abs(gout[..., 0] - direct[0, 0].numpy()).max() < 1e-6


def test_vdsr_y_model_and_upsampled_input() -> None:
    up = _cpu(build_model("vdsr", scale=3, num_layers=3, num_features=4))
    res = up.upscale_image(DecodedImage(pixels=_img(8, 10, 3)))
    assert res.pixels.shape == (24, 30, 3)


def test_l_model_runs_each_channel() -> None:
    desc = _toy(ConvStack(cin=1, cout=1, layers=2), cin=1, cs="L")
    pix = _img(7, 9, 3)
    up = _cpu(desc)
    out = up.upscale_array(pix)
    for c in range(3):
        single = up.upscale_array(pix[..., c : c + 1])
        assert np.abs(out[..., c] - single[..., 0]).max() < 1e-6


def test_ycbcr_model_converts_both_ways() -> None:
    class NearestUp(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, scale_factor=2, mode="nearest")

    pix = _img(6, 7, 3)
    out = _cpu(_toy(NearestUp(), cs="YCbCr")).upscale_array(pix)
    expected = np.repeat(np.repeat(pix / 255.0, 2, 0), 2, 1)
    assert np.abs(out - expected).max() < 1e-5


# ---------------------------------------------------------------- configuration


def test_config_validation() -> None:
    with pytest.raises(ValidationError):
        TilingConfig(tile=-1)
    with pytest.raises(ValidationError):
        TilingConfig(tiles=4)  # type: ignore[call-arg]
    cfg = TilingConfig(tile=64)
    with pytest.raises(ValidationError):
        cfg.tile = 32  # type: ignore[misc]
    desc = _toy(ConvStack())
    with pytest.raises(ConfigError):
        _cpu(desc, dtype="int8")
    with pytest.raises(ConfigError):
        _cpu(desc, outscale=0)
    with pytest.raises(ConfigError, match="channels"):
        _cpu(desc).upscale_tensor(torch.rand(1, 1, 8, 8))
    with pytest.raises(ConfigError):
        _cpu(desc).upscale_array(np.zeros((4, 4, 3), np.int32))


@pytest.mark.refs
def test_real_imdn_is_not_tiled_by_default(refs) -> None:
    """IMDN's channel attention pools over the whole image, so its receptive field is the image: by default the
    engine runs it untiled (exact); forced small tiles differ, and we print by how much."""
    import numpy as np
    from PIL import Image

    from srbatch import load_model

    desc = load_model(str(refs / "weights/imdn_official/IMDN_x4.pth"))
    assert desc.info.tile_hint is None
    lr = np.array(Image.open(refs / "sets/Set5/image_SRF_4/img_001_SRF_4_LR.png"))
    x = torch.from_numpy(lr.astype(np.float32) / 255).permute(2, 0, 1)[None]
    untiled = Upscaler(desc, tiling=TilingConfig(tile=0)).upscale_tensor(x)
    default = Upscaler(desc)
    assert torch.equal(default.upscale_tensor(x), untiled) and default.stats["tiles"] <= 1
    forced = Upscaler(desc, tiling=TilingConfig(tile=48)).upscale_tensor(x)
    print(f"real IMDN x4, forced tile 48: max abs diff {float((forced - untiled).abs().max()):.2e}")
