"""Smoke test of jobs/benchmark.py: a tiny run through a local S3 server and Ray, in a subprocess. No timing thresholds:
only that both throughputs are measured, the ratio is theirs, and every image went through the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "jobs" / "benchmark.py"


def test_benchmark_tiny_run_reports_both_throughputs_and_their_ratio():
    pytest.importorskip("moto.server")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a cluster of its own, never one a previous test left in the environment
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "bicubic", "--scale", "2", "--images", "3", "--size", "32",
         "--storage", "s3", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    res = json.loads(line)
    assert res["n_images"] == 3
    assert res["image_size"] == "32x32"
    assert res["bare_images_per_s"] > 0
    assert res["e2e_images_per_s"] > 0
    assert res["ratio"] == pytest.approx(res["e2e_images_per_s"] / res["bare_images_per_s"], rel=1e-9)
    assert res["e2e"]["ok"] == 3 and res["e2e"]["failed"] == 0
    assert res["bare"]["images"] == 3
    # the printed table carries the same figures
    assert "(a) bare forward" in proc.stdout and "(b) end-to-end" in proc.stdout and "ratio e2e/bare" in proc.stdout


def test_benchmark_help_explains_the_options():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--model", "--images", "--size", "--input", "--storage", "--device", "--dtype", "--tile",
                 "--batch-size", "--actors", "--json"):  # fmt: skip
        assert flag in proc.stdout
