"""Upscaler.upscale_images (whole same-shape images batched per forward pass), its memory sizing and fallbacks, and
the device options (channels_last, cudnn_benchmark, compile) on the CPU.

References are independent of the batching: the network called directly on each image (quantised here with numpy's
MATLAB rounding), MATLAB bicubic (``imresize_uint8``) for the bicubic model, and ``upscale_image`` per image.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from srbatch.errors import ConfigError
from srbatch.inference import Upscaler
from srbatch.inference.upscaler import PROBE_PIXELS
from srbatch.io.images import DecodedImage
from srbatch.metrics.resize import imresize_uint8
from srbatch.models.descriptor import ArchInfo, ModelDescriptor
from srbatch.models.loader import build_model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _pix(h: int, w: int, c: int, dtype: type = np.uint8, seed: int = 0) -> np.ndarray:
    """Smooth texture plus noise, so that the bicubic/network outputs use the whole range and are not constant."""
    rng = np.random.default_rng(seed)
    maxv = np.iinfo(dtype).max
    yy, xx = np.mgrid[0:h, 0:w]
    base = 0.5 + 0.3 * np.sin(xx / 2.5 + seed)[..., None] * np.cos(yy / 3.5)[..., None] * np.linspace(1, -0.7, c)
    return np.clip((base + rng.normal(0, 0.08, (h, w, c))) * maxv, 0, maxv).round().astype(dtype)


def _mixed() -> list[DecodedImage]:
    """Grey, RGB, RGBA and 16-bit RGB images, several of each shape, in an interleaved order, and one odd size."""
    imgs = []
    for i in range(3):
        imgs.append(DecodedImage(pixels=_pix(20, 24, 3, seed=i)))
        imgs.append(DecodedImage(pixels=_pix(20, 24, 1, seed=10 + i), mode="L"))
        imgs.append(DecodedImage(pixels=_pix(16, 18, 3, np.uint16, seed=20 + i), mode="RGB;16"))
    for i in range(2):
        imgs.append(DecodedImage(pixels=_pix(20, 24, 3, seed=30 + i), alpha=_pix(20, 24, 1, seed=40 + i)[..., 0],
                                 mode="RGBA"))  # fmt: skip
    imgs.append(DecodedImage(pixels=_pix(17, 21, 3, seed=50)))  # alone in its shape: one by one
    return imgs


def _expected_forwards(imgs: list[DecodedImage], k: int) -> int:
    groups: dict[tuple, int] = {}
    for im in imgs:
        key = (*im.pixels.shape, im.pixels.dtype.str, im.alpha is not None)
        groups[key] = groups.get(key, 0) + 1
    return sum(-(-n // k) for n in groups.values())


def _quantise(y: np.ndarray, maxv: int) -> np.ndarray:
    return np.floor(np.clip(y.astype(np.float64), 0, 1) * maxv + 0.5)


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


@pytest.mark.parametrize("name", ["bicubic", "edsr-baseline"])
def test_batched_images_equal_one_by_one(name: str) -> None:
    kw = {} if name == "bicubic" else {"n_resblocks": 2, "n_feats": 16}
    desc = build_model(name, scale=2, **kw)
    imgs = _mixed()
    single = Upscaler(desc, device="cpu")
    ref = [single.upscale_image(im) for im in imgs]
    assert single.stats["batches"] == len(imgs)
    up = Upscaler(desc, device="cpu", device_batch=2)
    out = up.upscale_images(imgs)
    # batching happened: one forward per group of up to 2 same-shape images, not one per image
    assert up.stats["batches"] == _expected_forwards(imgs, 2) < len(imgs), up.stats
    assert up.stats["regions"] == len(imgs) and up.stats["images"] == len(imgs)
    worst = 0
    for im, r, o in zip(imgs, ref, out):
        assert isinstance(o, DecodedImage), o
        assert o.pixels.dtype == im.pixels.dtype and o.pixels.shape == r.pixels.shape and o.mode == im.mode
        assert (o.alpha is None) == (im.alpha is None)
        worst = max(worst, _diff(o.pixels, r.pixels))
        if im.alpha is not None:
            assert _diff(o.alpha, r.alpha) == 0  # alpha never goes through the network: same MATLAB resize
    # <= 1 rather than 0: the batched convolution may sum in another order than the batch of one (float rounding
    # can cross a rounding boundary); printed so a run shows whether it did.
    print(f"{name}: max |batched - one by one| = {worst} level(s)")
    assert worst <= 1

    # independent references for the RGB 8-bit and 16-bit images
    for im, o in zip(imgs, out):
        pix = im.pixels
        if pix.shape[2] != 3 or im.alpha is not None:
            continue
        maxv = np.iinfo(pix.dtype).max
        if name == "bicubic":
            want = imresize_uint8(pix, 2)
        else:
            x = torch.from_numpy(pix.astype(np.float32) / maxv).permute(2, 0, 1)[None]
            with torch.no_grad():
                y = desc.module(x)[0].permute(1, 2, 0).numpy()
            want = _quantise(y, maxv)
        assert _diff(o.pixels, want) <= 1


def test_a_broken_image_fails_in_its_slot_and_the_rest_succeed() -> None:
    desc = build_model("edsr-baseline", scale=2, n_resblocks=1, n_feats=8)
    good = [DecodedImage(pixels=_pix(12, 14, 3, seed=i)) for i in range(4)]
    broken = DecodedImage(pixels=_pix(12, 14, 2))  # two channels without being grey + alpha
    no_array = DecodedImage(pixels=None)  # type: ignore[arg-type]
    imgs = [good[0], broken, good[1], good[2], no_array, good[3]]
    up = Upscaler(desc, device="cpu", device_batch=8)
    out = up.upscale_images(imgs)
    assert isinstance(out[1], ConfigError) and "(H, W, 1|3)" in str(out[1])
    assert isinstance(out[4], ConfigError)
    assert up.stats["batches"] == 1  # the four good ones in one forward
    ref = Upscaler(desc, device="cpu")
    for i in (0, 2, 3, 5):
        assert isinstance(out[i], DecodedImage)
        assert _diff(out[i].pixels, ref.upscale_image(imgs[i]).pixels) <= 1


class _FailsInBatches(nn.Module):
    """x2 nearest upsample that raises on a batch of more than one (a model that cannot batch) or on a marked
    input (``kind``: the exception type)."""

    def __init__(self, kind: type[BaseException] = RuntimeError) -> None:
        super().__init__()
        self.kind = kind
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            raise self.kind("cannot batch")
        return torch.nn.functional.interpolate(x * self.w, scale_factor=2, mode="nearest")


def _toy(module: nn.Module) -> ModelDescriptor:
    info = ArchInfo(scale=2, in_channels=3, out_channels=3, color_space="RGB", input_upsampled=False,
                    size_multiple=1, receptive_halo=0, tile_hint=None, local=True, dtypes=(torch.float32,))  # fmt: skip
    return ModelDescriptor(module=module, info=info, architecture="toy", name="toy")


def test_a_batch_that_raises_is_redone_one_by_one() -> None:
    imgs = [DecodedImage(pixels=_pix(10, 12, 3, seed=i)) for i in range(3)]
    up = Upscaler(_toy(_FailsInBatches()), device="cpu")
    out = up.upscale_images(imgs)
    for im, o in zip(imgs, out):
        assert isinstance(o, DecodedImage)
        assert np.array_equal(o.pixels, im.pixels.repeat(2, 0).repeat(2, 1))  # nearest x2, exactly


def test_keyboard_interrupt_is_raised_not_returned() -> None:
    imgs = [DecodedImage(pixels=_pix(10, 12, 3, seed=i)) for i in range(2)]
    up = Upscaler(_toy(_FailsInBatches(KeyboardInterrupt)), device="cpu")
    with pytest.raises(KeyboardInterrupt):
        up.upscale_images(imgs)


def test_the_batch_is_sized_by_the_memory_plan() -> None:
    """Above PROBE_PIXELS a batch is measured: with a budget between the cost of 2 and 3 whole images, 4 images go
    in 2 forwards of 2, and the results are still the per-image ones."""
    desc = build_model("bicubic", scale=2)
    side = 520  # 4 * 520^2 > PROBE_PIXELS >= 520^2
    assert side * side <= PROBE_PIXELS < 4 * side * side
    up = Upscaler(desc, device="cpu")
    a, b = up._estimate(3, False, 1)  # measured once per upscaler; the budgets below are set around it
    per = side * side * 3 + (2 * side) ** 2 * 3  # held input + output of one image

    def cost(k: int) -> float:
        return k * per + a + b * k * side * side

    for k in (1, 2, 3, 4):
        up.max_memory = int((cost(k) + cost(k + 1)) / 2)
        assert up._whole_batch_size(side, side, 3, "|u1", False, want=4) == k
    up.max_memory = int((cost(2) + cost(3)) / 2)
    imgs = [DecodedImage(pixels=_pix(side, side, 3, seed=i)) for i in range(4)]
    before = up.stats["batches"]  # the memory probes ran forwards too
    out = up.upscale_images(imgs, batch=4)
    assert up.stats["batches"] - before == 2, up.stats
    for im, o in zip(imgs, out):
        assert _diff(o.pixels, imresize_uint8(im.pixels, 2)) <= 1


def test_device_options_on_cpu_and_validation() -> None:
    desc = build_model("edsr-baseline", scale=2, n_resblocks=1, n_feats=8)
    before = torch.backends.cudnn.benchmark
    try:
        up = Upscaler(desc, device="cpu")
        assert up.stats["compile_s"] == 0.0 and up.device_batch == 8 and not up.channels_last
        assert torch.backends.cudnn.benchmark == before  # None on CPU: left alone
        Upscaler(desc, device="cpu", cudnn_benchmark=not before)
        assert torch.backends.cudnn.benchmark == (not before)
    finally:
        torch.backends.cudnn.benchmark = before
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="device_batch"):
            Upscaler(desc, device="cpu", device_batch=bad)
    with pytest.raises(ConfigError, match="batch"):
        Upscaler(desc, device="cpu").upscale_images([], batch=0)
    assert Upscaler(desc, device="cpu").upscale_images([]) == []


def test_channels_last_gives_the_networks_output() -> None:
    desc = build_model("edsr-baseline", scale=2, n_resblocks=2, n_feats=16)
    x = torch.rand(2, 3, 20, 24)  # contiguous NCHW: the option converts it
    with torch.no_grad():
        eager = desc.module(x)
    seen: list[bool] = []
    up = Upscaler(desc, device="cpu", channels_last=True)
    up.module.sub_mean.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    out = up.upscale_tensor(x)
    assert up.channels_last and seen == [True]
    assert up.module.head[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert float((out - eager).abs().max()) <= 1e-5


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile (inductor) needs a C++ compiler")
def test_compiled_network_equals_eager() -> None:
    """torch.compile (inductor, C++ on this CPU) gives the eager network's output; the compilation is timed."""
    desc = build_model("espcn", scale=2)
    x = torch.rand(2, desc.info.in_channels, 20, 24)
    with torch.no_grad():
        eager = desc.module(x)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    up = Upscaler(desc, device="cpu", compile=True)
    out = up.upscale_tensor(x)
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled network ran, not the eager one
    assert up.stats["compile_s"] > 0
    print(f"torch.compile of ESPCN x2 on CPU: first forward {up.stats['compile_s']:.1f} s")
    assert float((out - eager).abs().max()) <= 1e-5
    first = up.stats["compile_s"]
    up.upscale_tensor(x)
    assert up.stats["compile_s"] == first  # only the first forward is the compilation
