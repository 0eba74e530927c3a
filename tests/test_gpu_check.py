"""The GPU check (srbatch/benchmark/gpu.py) on the CPU: its dry run reports finite figures, the module works with Ray,
pydantic, s3fs and spandrel absent (as on the device machine), the FLOP count agrees with one made from the network's
convolution shapes, and the utilisation poller reads the right GPU's line from nvidia-smi."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from srbatch.benchmark import gpu

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("ray", "pydantic", "pydantic_core", "s3fs", "spandrel")


def _conv_flops(module: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """2 x multiply-adds of every Conv2d, from the output shapes seen by forward hooks (not FlopCounterMode)."""
    total = 0

    def hook(m: torch.nn.Conv2d, _inp, out) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += 2 * (m.in_channels // m.groups) * kh * kw * out.numel()

    hooks = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            module(torch.zeros(shape))
    finally:
        for h in hooks:
            h.remove()
    return total


def test_flop_count_matches_the_convolutions_of_the_network():
    from srbatch.models.loader import build_model

    for name in ("edsr-baseline", "espcn"):
        desc = build_model(name, scale=4)
        shape = (1, desc.info.in_channels, 12, 10)
        want = _conv_flops(desc.module, shape)
        assert want > 0
        assert gpu.count_flops(desc.module, shape) == want, name


def test_dry_run_reports_finite_figures(capsys):
    code = gpu.main(["--dry-run", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "DRY RUN on the CPU" in out
    r = json.loads(out.strip().splitlines()[-1])
    assert r["dry_run"] is True and r["errors"] == []
    assert math.isfinite(r["matmul"]["tflops"]) and r["matmul"]["tflops"] > 0
    (m,) = r["models"]
    assert m["model"] == "edsr-baseline"
    from srbatch.models.loader import build_model

    size = r["plan"]["size"]
    assert m["flops_per_image"] == _conv_flops(build_model("edsr-baseline", scale=4).module, (1, 3, size, size))
    assert {run["dtype"] for run in m["runs"]} == {"bfloat16", "float32"}
    for run in m["runs"]:
        if "skipped" in run:
            continue
        assert run["engine"] == "Upscaler.upscale_tensor"
        ips = run["images_per_s"]
        assert math.isfinite(ips) and ips > 0
        assert math.isclose(run["tflops"], m["flops_per_image"] * ips / 1e12, rel_tol=1e-9)
        assert math.isclose(run["fraction_of_matmul"], run["tflops"] / r["matmul"]["tflops"], rel_tol=1e-9)
        for b, per in run["per_batch"].items():
            assert per["output_shape"] == [int(b), 3, 4 * size, 4 * size] and per["finite"]
    e2e = r["e2e"]
    fused = e2e["fused"]
    assert fused["ok"] == r["plan"]["images"] and fused["failed"] == 0 and fused["wrong_size"] == 0
    assert math.isfinite(fused["images_per_s"]) and fused["images_per_s"] > 0
    assert math.isclose(fused["ratio_to_model_only"], fused["images_per_s"] / e2e["model_only_images_per_s"])


def test_the_module_imports_and_dry_runs_without_ray_pydantic_s3fs_spandrel():
    code = (
        "import sys\n"
        f"for n in {BLOCKED!r}:\n"
        "    sys.modules[n] = None\n"
        "from srbatch.benchmark import gpu\n"
        "rc = gpu.main(['--dry-run', '--dtypes', 'float32', '--json'])\n"
        f"assert not [n for n in {BLOCKED!r} if sys.modules.get(n) is not None], 'a blocked module was imported'\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    (run,) = r["models"][0]["runs"]
    assert run["engine"].startswith("the network called directly (pydantic is missing")
    assert math.isfinite(run["images_per_s"]) and run["images_per_s"] > 0
    assert "pydantic is missing" in r["e2e"]["skipped"]


def test_parse_smi_picks_the_gpu_by_uuid():
    text = "GPU-aaaa-1111, 10, 100\nGPU-BBBB-2222, 70, 2000\n"
    assert gpu.parse_smi(text, "bbbb-2222") == (70.0, 2000.0)
    assert gpu.parse_smi(text, "GPU-aaaa-1111") == (10.0, 100.0)
    assert gpu.parse_smi(text, None) == (10.0, 100.0)
    assert gpu.parse_smi("No devices were found\n", None) is None
    assert gpu.parse_smi("GPU-x, [N/A], 5\n", None) is None


def test_poller_samples_a_fake_nvidia_smi(tmp_path, monkeypatch):
    """The poller runs the nvidia-smi it finds on PATH (here a script printing two GPUs) every interval."""
    smi = tmp_path / "nvidia-smi"
    calls = tmp_path / "calls"
    smi.write_text(f"#!/bin/sh\necho x >> {calls}\necho 'GPU-aaaa, 10, 100'\necho 'GPU-bbbb, 70, 2000'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # the nvidia-smi path, even where pynvml is installed
    poller = gpu.GpuPoller("bbbb", interval=0.05).start()
    import time

    time.sleep(0.6)
    s = poller.stop()
    assert s["source"] == "nvidia-smi" and s["samples"] >= 3
    assert s["samples"] == len(calls.read_text().split())
    assert s["util_mean"] == 70.0 and s["util_p50"] == 70.0 and s["memory_max_mib"] == 2000.0


def test_sigterm_still_prints_what_was_measured():
    """`timeout` stops the check with SIGTERM: the report of the parts done so far is printed, exit code 1."""
    import signal

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "srbatch.benchmark.gpu", "--dry-run", "--json"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for line in p.stderr:  # the matmul is done and the first model is being measured (seconds in bfloat16)
            if line.startswith("gpu check: bf16 matmul"):
                break
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 1, out
    r = json.loads(out.strip().splitlines()[-1])
    assert r["matmul"]["tflops"] > 0 and r["e2e"] is None
    assert any("stopped by SIGTERM" in e for e in r["errors"])
    assert "bf16 matmul 256^3" in out and "stopped by SIGTERM" in out
