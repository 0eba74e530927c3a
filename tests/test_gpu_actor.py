"""The upscale actor on CUDA writes what it writes on CPU (within 1 level), in both pipelines: fused (the actor does it
all) and staged (decode stage -> model stage on the device, same-size images batched -> encode stage).

Runs without Ray (the actor class and the stage functions are plain Python), so it runs on the GPU machine, where Ray
cannot be installed: ``scripts/gpu-check.sh`` runs it there. The CPU-only test checks the comparison itself (the CPU
actor against the engine called directly), so a broken comparison cannot hide behind a skip."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srbatch.models.loader import build_model


def _images(root: Path) -> dict[str, np.ndarray]:
    """Textured RGB images, two of the same size (batched together on the device), one grey, one RGBA."""
    rng = np.random.default_rng(5)
    arrays = {
        "a.png": rng.integers(0, 256, (40, 48, 3), dtype=np.uint8),
        "b.png": rng.integers(0, 256, (40, 48, 3), dtype=np.uint8),
        "grey.png": rng.integers(0, 256, (33, 29), dtype=np.uint8),
        "rgba.png": rng.integers(0, 256, (24, 24, 4), dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for k, a in arrays.items():
        Image.fromarray(a).save(root / k)
    return arrays


def _model(tmp: Path) -> str:
    """An EDSR-baseline x2 with random weights (seed 0) saved as safetensors: a real convolutional network."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    desc = build_model("edsr-baseline", scale=2)
    path = tmp / "edsr_baseline_x2.safetensors"
    save_file({k: v.contiguous() for k, v in desc.module.state_dict().items()}, str(path))
    return str(path)


def _run(tmp: Path, model: str, device: str, pipeline: str) -> dict[str, np.ndarray]:
    """Outputs of the actor on ``device``: fused (worker called on a batch of keys) or staged (stage by stage)."""
    from srbatch.upscale import stages
    from srbatch.upscale.config import UpscaleConfig
    from srbatch.upscale.worker import UpscaleWorker

    src, out = tmp / "in", tmp / f"out-{device}-{pipeline}"
    keys = sorted(p.name for p in src.iterdir())
    cfg = UpscaleConfig(input=str(src), output=str(out), model=model, scale=2, device=device, progress=False)
    conf = cfg.model_dump()
    items = {"input_uri": np.array([str(src / k) for k in keys], dtype=object),
             "output_uri": np.array([str(out / k) for k in keys], dtype=object),
             "run_id": np.array(["r"] * len(keys), dtype=object)}  # fmt: skip
    worker = UpscaleWorker(conf, fingerprint="f" * 16, torch_threads=2)
    assert worker.device.startswith(device)
    if pipeline == "fused":
        table = worker(items)
    else:
        decoded = stages.decode_batch(items, config=conf, scale=2.0, budget=2**30)
        upscaled = worker(stages._columns(decoded))
        table = stages.encode_batch(stages._columns(upscaled), config=conf, budget=2**30)
    assert table["status"].to_pylist() == ["ok"] * len(keys), table["error_message"].to_pylist()
    return {k: np.asarray(Image.open(io.BytesIO((out / k).read_bytes()))) for k in keys}


def _close(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        d = np.abs(a[k].astype(int) - b[k].astype(int))
        assert d.max() <= 1 and (d > 0).mean() < 0.01, f"{k}: up to {d.max()} levels, {(d > 0).mean():.2%} off"


def test_cpu_actor_both_pipelines_write_the_network_output(tmp_path):
    """The comparison the GPU test relies on, on CPU: both pipelines write the engine's output for each image."""
    from _expect import assert_as_engine

    _images(tmp_path / "in")
    model = _model(tmp_path)
    fused = _run(tmp_path, model, "cpu", "fused")
    staged = _run(tmp_path, model, "cpu", "stages")
    _close(fused, staged)
    for k in fused:
        assert_as_engine(tmp_path / "out-cpu-stages" / k, tmp_path / "in" / k, model=model, scale=2, name=k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_actor_writes_what_the_cpu_actor_writes(tmp_path):
    # full float32 on the GPU: PyTorch lets cuDNN run float32 convolutions as TF32 by default (10-bit mantissa)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _cuda_against_cpu(tmp_path)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _cuda_against_cpu(tmp_path: Path) -> None:
    _images(tmp_path / "in")
    model = _model(tmp_path)
    cpu = _run(tmp_path, model, "cpu", "fused")
    for pipeline in ("fused", "stages"):
        _close(_run(tmp_path, model, "cuda", pipeline), cpu)
