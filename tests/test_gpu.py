"""On a CUDA device (the device machine; skipped with the reason elsewhere): the engine and the upscale job's actor
class give the CPU's results on the GPU.

Run there with ``pytest -m gpu tests/test_gpu.py`` (no Ray is needed: the actor class is called directly, as Ray Data
would call it). The CPU reference is computed in the same test, so these fail on a wrong GPU path (a dtype that is
never cast back, a colour conversion skipped on CUDA, a device that is not used) rather than on a stored figure.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image

from srbatch.inference import TilingConfig, Upscaler
from srbatch.io.images import DecodedImage
from srbatch.models.loader import build_model, load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (run on the device machine)"),
]


def _texture(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(xx / 3.0)[..., None] * np.cos(yy / 5.0)[..., None] * np.array([1.0, 0.6, -0.8])
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", ["espcn", "edsr-baseline", "srresnet", "imdn"])
def test_fp32_on_cuda_equals_cpu(name):
    torch.manual_seed(0)
    desc = build_model(name, scale=2 if name != "srresnet" else 4)
    x = torch.rand(2, desc.info.in_channels, 24, 20)
    with torch.no_grad():
        cpu = desc.module.float().cpu()(x)  # the network itself on the CPU: independent of the engine
    gpu_up = Upscaler(desc, device="cuda", tiling=TilingConfig(tile=0))
    assert gpu_up.device.type == "cuda"
    gpu = gpu_up.upscale_tensor(x.cuda())
    assert gpu.device.type == "cuda"  # returned on the input's device
    assert torch.allclose(gpu.float().cpu(), cpu, atol=2e-4), float((gpu.float().cpu() - cpu).abs().max())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cuda_stays_close_to_fp32(dtype):
    desc = load_model("default", scale=4)
    img = _texture()
    ref = Upscaler(desc, device="cuda", tiling=TilingConfig(tile=0)).upscale_array(img.astype(np.float32) / 255)
    cpu = Upscaler(desc, device="cpu", tiling=TilingConfig(tile=0)).upscale_array(img.astype(np.float32) / 255)
    assert np.abs(ref - cpu).max() < 2e-3 and ref.std() > 0.05  # fp32 on CUDA is the CPU's (textured) image
    half = Upscaler(desc, device="cuda", dtype=dtype, tiling=TilingConfig(tile=0)).upscale_array(
        img.astype(np.float32) / 255
    )
    mse = float(np.mean((half - ref) ** 2))
    psnr = 10 * np.log10(1 / max(mse, 1e-12))
    assert psnr > 40, f"{dtype} output is only {psnr:.1f} dB from fp32"


def test_upscale_actor_runs_on_cuda_and_writes_the_cpu_engines_pixels(tmp_path):
    from _expect import assert_as_engine

    from srbatch.upscale.config import UpscaleConfig
    from srbatch.upscale.worker import UpscaleWorker

    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    buf = io.BytesIO()
    Image.fromarray(_texture(64, 56)).save(buf, format="PNG")
    src.write_bytes(buf.getvalue())
    out = tmp_path / "out" / "a.png"
    cfg = UpscaleConfig(input=str(src.parent), output=str(out.parent), model="default", scale=4, progress=False)
    worker = UpscaleWorker(cfg.model_dump(), fingerprint="f" * 16)
    assert worker.device.startswith("cuda")
    table = worker({"input_uri": np.array([str(src)]), "output_uri": np.array([str(out)]), "run_id": np.array(["r"])})
    row = table.to_pylist()[0]
    assert row["status"] == "ok" and row["device"].startswith("cuda"), row
    assert_as_engine(out, src, model="default", scale=4, name="a.png")  # the CPU engine's pixels, within 1 level


def test_large_image_on_cuda_is_planned_from_device_memory_and_equals_cpu():
    """A 1200x1100 image (above the probe threshold) on CUDA: the working set is measured with the CUDA allocator,
    the plan fits 80% of the free device memory, and the output equals the CPU engine's (regions or not)."""
    from srbatch.io.images import DecodedImage

    torch.manual_seed(0)
    desc = build_model("edsr-baseline", scale=2, n_resblocks=2, n_feats=16)
    rng = np.random.default_rng(0)
    img = DecodedImage(pixels=np.repeat(np.repeat(_texture(120, 110), 10, 0), 10, 1)
                       + rng.integers(0, 3, (1200, 1100, 3), dtype=np.uint8))  # fmt: skip
    gpu = Upscaler(desc, device="cuda", max_memory="3GiB")
    out = gpu.upscale_image(img).pixels
    assert gpu.stats["probes"] == 1 and gpu.last_plan is not None and gpu.last_plan.estimate is not None
    cpu = Upscaler(build_model("edsr-baseline", scale=2, n_resblocks=2, n_feats=16), device="cpu")
    cpu.module.load_state_dict(desc.module.state_dict())
    ref = cpu.upscale_image(img).pixels
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


# ---------------------------------------------------------------- engine on CUDA: precision, memory, batching, options
# (issue #16, item 6). References are computed in the same test: the float32 run, a CPU run, the untiled run.


def _levels(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


def _edsr(scale: int = 2, blocks: int = 2, feats: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("edsr-baseline", scale=scale, n_resblocks=blocks, n_feats=feats)


def _same_weights(desc, src):
    desc.module.load_state_dict(src.module.state_dict())
    return desc


@contextlib.contextmanager
def _ieee_fp32():
    """float32 convolutions in IEEE float32 on CUDA: PyTorch lets cuDNN use TF32 (10-bit mantissa) by default, which
    is a precision choice of the GPU run, not a bug the CPU comparisons should absorb."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def _overflowing_edsr(factor: float = 2.0**12):
    """An EDSR whose trunk runs ``factor`` times larger than usual and whose upsampler divides it back: the same
    function in exact (and, with a power of two, in float32) arithmetic, but its trunk activations (about 1e5 with
    4096) overflow float16's 65504, so a float16 forward gives inf/NaN."""
    desc = _edsr(seed=1)
    m = desc.module
    with torch.no_grad():
        m.head[0].weight.mul_(factor)
        m.head[0].bias.mul_(factor)
        for name, p in m.body.named_parameters():
            if name.endswith("bias"):  # ReLU and the convolutions are homogeneous once the biases scale too
                p.mul_(factor)
        m.tail[0][0].weight.div_(factor)  # the first upsampler convolution brings the scale back
    return desc


def test_fp16_overflow_falls_back_to_fp32_and_equals_the_fp32_run():
    img = DecodedImage(pixels=_texture(40, 36))
    desc = _overflowing_edsr()
    x = torch.from_numpy(img.pixels.astype(np.float32) / 255).permute(2, 0, 1)[None].cuda()
    with torch.no_grad():  # the premise: this network really overflows in float16 and not in float32
        assert not bool(torch.isfinite(copy.deepcopy(desc.module).cuda().half()(x.half())).all())
        assert bool(torch.isfinite(copy.deepcopy(desc.module).cuda()(x)).all())
    half = Upscaler(desc, device="cuda", dtype="float16")
    out = half.upscale_image(img).pixels
    assert half.dtype == torch.float16 and half.stats["fp32_fallbacks"] > 0, half.stats
    fp32 = Upscaler(_overflowing_edsr(), device="cuda").upscale_image(img).pixels
    assert _levels(out, fp32) <= 1
    plain = Upscaler(_edsr(seed=1), device="cuda").upscale_image(img).pixels  # the unscaled network: same function
    assert _levels(out, plain) <= 1 and out.std() > 5


def test_real_cuda_oom_splits_tiles_and_equals_a_tiled_cpu_run():
    """Cap this process at about 1 GiB more than it holds: the untiled 1024x1024 forward (its x2 upsampler alone
    makes a 1 GiB float32 map) runs out of memory for real; the engine splits the tiles and the result equals a
    tiled CPU run of the same network within one level."""
    import gc

    desc = _edsr(scale=2, blocks=2, feats=64, seed=2)
    cpu_desc = _same_weights(_edsr(scale=2, blocks=2, feats=64, seed=3), desc)
    x = torch.from_numpy(np.repeat(np.repeat(_texture(128, 128), 8, 0), 8, 1).astype(np.float32) / 255)
    x = x.permute(2, 0, 1)[None].contiguous()
    gc.collect()
    torch.cuda.empty_cache()
    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(dev).total_memory
    cap = torch.cuda.memory_reserved(dev) + (1 << 30)
    up = Upscaler(desc, device="cuda", tiling=TilingConfig(tile=1024))  # one tile: the whole image in one forward
    torch.cuda.set_per_process_memory_fraction(cap / total, dev)
    try:
        with _ieee_fp32():
            gpu = up.upscale_tensor(x.cuda()).clamp_(0, 1).cpu()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        torch.cuda.empty_cache()
    assert up.stats["oom_splits"] > 0 and up.stats["tiles"] > 1, up.stats
    cpu = Upscaler(cpu_desc, device="cpu", tiling=TilingConfig(tile=256)).upscale_tensor(x).clamp_(0, 1)
    q = lambda t: torch.floor(t.double() * 255 + 0.5)  # noqa: E731
    assert float((q(gpu) - q(cpu)).abs().max()) <= 1


@pytest.mark.refs
def test_bf16_psnr_on_set5_is_within_tolerance_of_fp32(refs):
    """IMDN x4 (the authors' checkpoint) on Set5: bfloat16's PSNR_Y (crop 4, MATLAB Y) is within 0.05 dB of float32's
    on every image and within 0.02 dB on the mean. Measured on CPU bf16 (2026-11-29): at most 0.006 dB per image,
    0.002 dB on the mean; the tolerances leave room for cuDNN's other kernels."""
    from srbatch.metrics.quality import measure

    desc = load_model(str(refs / "weights/imdn_official/IMDN_x4.pth"), scale=4)
    lrs = sorted((refs / "sets/Set5/image_SRF_4").glob("*_LR.png"))
    assert len(lrs) == 5
    figures: dict[str, list[float]] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    for dtype in ("float32", "bfloat16"):
        up = Upscaler(desc, device="cuda", dtype=dtype)
        assert up.dtype == getattr(torch, dtype)
        figures[dtype], outputs[dtype] = [], []
        for lr in lrs:
            hr = np.asarray(Image.open(str(lr).replace("_LR", "_HR")).convert("RGB"))
            sr = up.upscale_image(DecodedImage(pixels=np.asarray(Image.open(lr).convert("RGB")))).pixels
            figures[dtype].append(measure(sr, hr, crop_border=4).psnr_y)
            outputs[dtype].append(sr)
        assert up.stats["fp32_fallbacks"] == 0
    f32, b16 = np.array(figures["float32"]), np.array(figures["bfloat16"])
    print(f"Set5 x4 IMDN PSNR_Y fp32 {f32.mean():.3f} dB, bf16 {b16.mean():.3f} dB, per image {np.round(b16 - f32, 4)}")
    assert f32.mean() > 31.5  # the checkpoint really works (published 32.21 dB)
    assert any(not np.array_equal(a, b) for a, b in zip(outputs["float32"], outputs["bfloat16"]))  # bf16 really ran
    assert np.abs(b16 - f32).max() <= 0.05 and abs(b16.mean() - f32.mean()) <= 0.02


def test_tiled_equals_untiled_on_cuda():
    desc = _edsr(scale=2, blocks=4, feats=32, seed=4)
    img = DecodedImage(pixels=_texture(150, 130, seed=4))
    whole = Upscaler(desc, device="cuda", tiling=TilingConfig(tile=0)).upscale_image(img).pixels
    tiled_up = Upscaler(desc, device="cuda", tiling=TilingConfig(tile=48, batch_size=3))
    tiled = tiled_up.upscale_image(img).pixels
    assert tiled_up.stats["tiles"] > 4  # it really was tiled
    assert _levels(tiled, whole) <= 1 and whole.std() > 5


def _mixed_images() -> list[DecodedImage]:
    rng = np.random.default_rng(5)
    imgs = []
    for i in range(3):
        imgs.append(DecodedImage(pixels=_texture(40, 36, seed=i)))
        imgs.append(DecodedImage(pixels=_texture(40, 36, seed=10 + i)[..., :1], mode="L"))
        imgs.append(DecodedImage(pixels=(_texture(32, 30, seed=20 + i).astype(np.uint16) * 256
                                         + rng.integers(0, 256, (32, 30, 3), dtype=np.uint16))))  # fmt: skip
    for i in range(2):
        imgs.append(DecodedImage(pixels=_texture(40, 36, seed=30 + i), alpha=_texture(40, 36, seed=40 + i)[..., 0]))
    return imgs


def test_batched_images_on_cuda_equal_one_by_one_and_the_cpu():
    desc = _edsr(seed=5)
    imgs = _mixed_images()
    gpu = Upscaler(desc, device="cuda", device_batch=4)
    with _ieee_fp32():
        out = gpu.upscale_images(imgs)
        single = Upscaler(desc, device="cuda")
        singles = [single.upscale_image(im) for im in imgs]
    assert gpu.stats["batches"] == 4, gpu.stats  # 4 shape groups of 2 or 3 images: one forward each
    assert single.stats["batches"] == len(imgs)
    cpu = Upscaler(_same_weights(_edsr(seed=6), desc), device="cpu")
    for im, o, s in zip(imgs, out, singles):
        assert isinstance(o, DecodedImage), o
        assert o.pixels.dtype == im.pixels.dtype
        assert _levels(o.pixels, s.pixels) <= 1
        ref = cpu.upscale_image(im)
        assert _levels(o.pixels, ref.pixels) <= 1
        if im.alpha is not None:
            assert _levels(o.alpha, ref.alpha) <= 1


@pytest.mark.parametrize("option", ["channels_last", "compile"])
def test_channels_last_and_compile_on_cuda_equal_the_plain_run(option):
    import shutil

    from torch._dynamo.utils import counters

    if option == "compile" and not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("torch.compile on CUDA: Triton builds its launcher with a C compiler, and none is installed")
    desc = _edsr(seed=7)
    imgs = [DecodedImage(pixels=_texture(48, 40, seed=i)) for i in range(3)]

    plain = Upscaler(desc, device="cuda").upscale_images(imgs)
    graphs = counters["stats"]["unique_graphs"]
    up = Upscaler(desc, device="cuda", **{option: True})
    out = up.upscale_images(imgs)
    if option == "compile":
        assert counters["stats"]["unique_graphs"] > graphs and up.stats["compile_s"] > 0
        print(f"torch.compile on CUDA: first forward {up.stats['compile_s']:.1f} s")
    else:
        assert up.channels_last and up.module.head[0].weight.is_contiguous(memory_format=torch.channels_last)
    for p, o in zip(plain, out):
        assert _levels(o.pixels, p.pixels) <= 1
