"""The upscale job the way users run it on a cluster: `ray start --head` + `ray job submit`, and on a machine whose Ray
reports GPUs (fake ones here: two actors, each with its own CUDA_VISIBLE_DEVICES, the model falling back to CPU)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _expect import assert_as_engine

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _write_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")


def _assert_outputs_as_engine(src: Path, out: Path, scale: int = 2) -> None:
    """Every input's output holds the bicubic engine's pixels (bicubic: the job's default model)."""
    inputs = sorted(src.glob("*.png"))
    assert inputs and sorted(p.name for p in out.glob("*.png")) == [p.name for p in inputs]
    for p in inputs:
        assert_as_engine(out / p.name, p, model="bicubic", scale=scale, name=p.name)


def test_fake_gpus_two_actors_each_their_own_device(tmp_path):
    _write_images(tmp_path / "in", 6)
    script = textwrap.dedent(
        """
        import json, os, sys
        from srbatch.jobkit.cluster import ray_env_defaults
        ray_env_defaults()  # what the job's own entry points do before Ray is imported
        import ray
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, configure_logging=False)
        from srbatch.upscale import UpscaleConfig, read_manifest, run_job
        res = run_job(UpscaleConfig(input=sys.argv[1], output=sys.argv[2], scale=2, progress=False, batch_size=1))
        rows = read_manifest(sys.argv[2]).to_pylist()
        print("RESULT " + json.dumps({"exit": res.exit_code, "ok": res.ok, "devices": sorted({r["device"] for r in rows}),
                                      "gpu_ids": sorted({r["gpu_ids"] for r in rows})}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "in"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert res["exit"] == 0 and res["ok"] == 6
    assert res["devices"] == ["cpu"]  # torch sees no CUDA: the model runs on CPU, chosen by torch, not by Ray
    assert set(res["gpu_ids"]) <= {"0", "1"}
    assert "2 actor(s), 1 GPU and 0.5 CPU each; pipeline staged" in out  # GPU actors: the CPU work as Ray tasks
    # each actor logs the device it got: one saw GPU 0, the other GPU 1
    assert "Ray GPU ids ['0'], CUDA_VISIBLE_DEVICES='0'" in out, out
    assert "Ray GPU ids ['1'], CUDA_VISIBLE_DEVICES='1'" in out, out
    _assert_outputs_as_engine(tmp_path / "in", tmp_path / "out")


def _e2e_helpers():
    """infra/local/e2e.py's Ray head helpers (one implementation of "a second Ray head on 127.0.0.1")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("srbatch_infra_e2e", ROOT / "infra" / "local" / "e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ray_head():
    """A separate Ray head (`ray start --head --block`) on 127.0.0.1 with its own ports and temp dir, in its own
    process group, so stopping it cannot touch the test session's cluster (`ray stop` would). Shared by this module's
    tests (starting a head takes most of a minute on 2 cores)."""
    e2e = _e2e_helpers()
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Unix socket paths must stay short
    env = dict(os.environ)
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    head = None
    try:
        try:
            head, address, gcs = e2e.start_ray_head(temp, env, worker_ports="21000-21999")
        except RuntimeError as e:
            pytest.fail(str(e))
        yield address, env, gcs
    finally:
        if head is not None:
            e2e.stop(head)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_end_to_end(ray_cluster, ray_head, s3_server, s3_bucket):
    import s3fs

    address, env, _ = ray_head
    fs = s3fs.S3FileSystem()
    rng = np.random.default_rng(11)
    sources = []
    for i in range(5):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 20 + i, 3), dtype=np.uint8)).save(buf, format="PNG")
        sources.append(buf.getvalue())
        fs.pipe_file(f"{s3_bucket}/in/set/{i}.png", buf.getvalue())
    runtime_env = {"env_vars": {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                          "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                                          "AWS_EC2_METADATA_DISABLED")}}  # fmt: skip
    sid = f"srbatch-e2e-{uuid.uuid4().hex[:8]}"
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", sid, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps(runtime_env), "--", "python", "jobs/upscale.py",
         "--input", f"s3://{s3_bucket}/in/", "--output", f"s3://{s3_bucket}/out/", "--scale", "2", "--no-progress",
         "--run-id", "submitted"],
        env=env, capture_output=True, text=True, timeout=400, cwd=ROOT,
    )  # fmt: skip
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0, out
    assert "5 ok, 0 failed, 0 skipped" in out
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, sid], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert f"Job '{sid}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(address).get_job_status(sid) == JobStatus.SUCCEEDED
    fs.invalidate_cache()
    for i in range(5):
        written = fs.cat_file(f"{s3_bucket}/out/set/{i}.png")
        assert Image.open(io.BytesIO(written)).size == (2 * (20 + i), 32)
        assert_as_engine(written, sources[i], model="bicubic", scale=2, name=f"set/{i}.png")
    from srbatch.upscale import read_manifest

    rows = read_manifest(f"s3://{s3_bucket}/out/").to_pylist()
    assert len(rows) == 5 and {r["run_id"] for r in rows} == {"submitted"}
    # the test session's own cluster is still alive
    import ray

    assert ray.get(ray.put("still here")) == "still here"


def test_driver_joins_a_loopback_head_by_its_gcs_address(ray_cluster, ray_head, tmp_path):
    """`jobs/upscale.py --ray-address 127.0.0.1:<port>` run on the head machine of a cluster started with
    `--node-ip-address 127.0.0.1`: the driver joins it (Ray alone would rewrite 127.0.0.1 to the machine's network
    address and wait for a GCS that is not there)."""
    _, env, gcs = ray_head
    env = {k: v for k, v in env.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    _write_images(tmp_path / "in", 3)
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/upscale.py"), "--input", str(tmp_path / "in"),
                           "--output", str(tmp_path / "out"), "--scale", "2", "--no-progress", "--ray-address", gcs],
                          env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"joining the Ray cluster at {gcs}" in out, out
    assert "3 ok, 0 failed, 0 skipped" in out, out
    _assert_outputs_as_engine(tmp_path / "in", tmp_path / "out")
    # the test session's own cluster is still alive
    import ray

    assert ray.get(ray.put("still here")) == "still here"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_nothing_half_written_and_resumes(tmp_path, sig):
    src, out = tmp_path / "in", tmp_path / "out"
    rng = np.random.default_rng(5)
    src.mkdir()
    n = 40
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(src / f"{i:02d}.png")
    cmd = [sys.executable, str(ROOT / "jobs/upscale.py"), str(src), "-o", str(out), "--scale", "4", "--batch-size",
           "1", "--manifest-flush-seconds", "0.2", "--no-progress", "--run-id", "first"]  # fmt: skip
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not list((out / "_manifest").rglob("*.parquet")):  # wait until some images are done
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
        time.sleep(0.1)
    job.send_signal(sig)
    log = job.communicate(timeout=120)[0]
    assert job.returncode == 130, log
    assert "INTERRUPTED" in log
    assert not list(out.rglob(".srbatch-tmp-*"))
    outputs = sorted(p for p in out.rglob("*.png"))
    for p in outputs:  # everything visible is whole
        with Image.open(p) as im:
            im.load()
            assert im.size == (640, 640)
    import pandas as pd

    first = pd.read_parquet(out / "_manifest")
    assert 0 < len(first) < n and set(first.status) == {"ok"} and first.input_uri.is_unique
    # the rerun does only what the first run did not record
    proc = subprocess.run([*cmd[:-1], "second"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{n - len(first)} ok, 0 failed, {len(first)} skipped" in proc.stdout, proc.stdout
    assert len(list(out.rglob("*.png"))) == n
    _assert_outputs_as_engine(src, out, scale=4)  # those written before the signal and after the resume
    print(f"\n{signal.Signals(sig).name}: first run recorded {len(first)} of {n}; the rerun did {n - len(first)}")
