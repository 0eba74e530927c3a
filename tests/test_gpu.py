"""On a CUDA device (the device machine; skipped with the reason elsewhere): the engine and the upscale job's actor
class give the CPU's results on the GPU.

Run there with ``pytest -m gpu tests/test_gpu.py`` (no Ray is needed: the actor class is called directly, as Ray Data
would call it). The CPU reference is computed in the same test, so these fail on a wrong GPU path (a dtype that is
never cast back, a colour conversion skipped on CUDA, a device that is not used) rather than on a stored figure.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from srbatch.inference import TilingConfig, Upscaler
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
