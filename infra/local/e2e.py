"""The scheduled-run story on one machine: a real S3-compatible server and a Ray head on 127.0.0.1, the upscale job
submitted three times with `ray job submit` as a schedule would (run id = schedule time), then everything torn down.

    .venv/bin/python infra/local/e2e.py [--model default --scale 4] [--keep]

Run 1 processes every image; run 2 finds nothing new and processes nothing; then two images are added and run 3
processes only those. The script prints one line per run (processed / skipped, from the job's own summary and from the
manifest) and exits 1 if any run did not do exactly that. Nothing listens beyond 127.0.0.1; no network access.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUCKET = "srbatch-e2e"
SUMMARY = re.compile(r"(\d+) inputs: (\d+) ok, (\d+) failed, (\d+) skipped")


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_s3() -> tuple[object, dict[str, str]]:
    """moto's S3 server on 127.0.0.1 (a real HTTP endpoint) and the AWS_* variables that point at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    (port,) = _free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "e2e", "AWS_SECRET_ACCESS_KEY": "e2e-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    return server, env


def start_ray_head(
    temp: str, env: dict[str, str], worker_ports: str = "22000-22999"
) -> tuple[subprocess.Popen, str, str]:
    """`ray start --head --block` on 127.0.0.1 with its own ports (workers in ``worker_ports``) and temp dir, in its
    own process group (stop it with :func:`stop`); returns the process, the address for `ray job submit` and the GCS
    address a driver joins (``--ray-address``). Also the test suite's second cluster (tests/test_job_cluster.py)."""
    gcs, dash, agent, agent_grpc, client, nm, om, metrics, rtenv = _free_ports(9)
    low, high = worker_ports.split("-")
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--ray-client-server-port={client}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rtenv}", f"--min-worker-port={low}", f"--max-worker-port={high}",
           f"--temp-dir={temp}", "--disable-usage-stats"]  # fmt: skip
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 180
    while True:
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True)  # fmt: skip
        if probe.returncode == 0:
            return head, address, f"127.0.0.1:{gcs}"
        if head.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the Ray head did not start: " + (Path(temp) / "head.log").read_text()[-3000:])
        time.sleep(2)


def stop(head: subprocess.Popen) -> None:
    """Stop the head's whole process group (never `ray stop`, which would stop every Ray on the machine). SIGINT
    first: `ray start --block` stops its processes and exits on it within seconds, while on SIGTERM it stops them
    but itself stays blocked."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def upload(fs: object, files: list[Path], prefix: str) -> None:
    for p in files:
        fs.put_file(str(p), f"{BUCKET}/{prefix}/{p.name}")  # type: ignore[attr-defined]
    fs.invalidate_cache()  # type: ignore[attr-defined]


def submit(address: str, env: dict[str, str], run_id: str, model: str, scale: int) -> dict[str, object]:
    """One scheduled run: `ray job submit` of the upscale job; its counts from the job's summary line."""
    runtime_env = {"env_vars": {k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                   "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")}}  # fmt: skip
    sid = f"srbatch-upscale-{run_id.lower()}-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    p = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", sid, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps(runtime_env), "--", "python", "jobs/upscale.py",
         "--input", f"s3://{BUCKET}/in/", "--output", f"s3://{BUCKET}/out/", "--model", model, "--scale", str(scale),
         "--run-id", run_id, "--no-progress"],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    out = p.stdout + p.stderr
    m = SUMMARY.search(out)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"run {run_id}: ray job submit exited {p.returncode}:\n{out[-4000:]}")
    total, ok, failed, skipped = (int(g) for g in m.groups())
    return {"run_id": run_id, "submission_id": sid, "inputs": total, "processed": ok + failed, "ok": ok,
            "failed": failed, "skipped": skipped, "seconds": time.monotonic() - t0}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="default", help="model of the upscale job [default]")
    ap.add_argument("--scale", type=int, default=4, help="scale [4]")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (Ray logs) after the run")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from srbatch.local import sample_images_dir

    temp = tempfile.mkdtemp(prefix="sre2e", dir="/tmp")  # Unix socket paths must stay short
    server, s3env = start_s3()
    env = {**os.environ, **s3env, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    os.environ.update(s3env)
    head = None
    failures: list[str] = []
    try:
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        samples = sorted(p for p in Path(sample_images_dir()).iterdir() if p.suffix.lower() in (".png", ".jpg"))
        upload(fs, samples, "in")
        print(f"e2e: S3 server {s3env['AWS_ENDPOINT_URL']}, bucket {BUCKET}: {len(samples)} images under in/", flush=True)
        head, address, _ = start_ray_head(temp, env)
        print(f"e2e: Ray head on 127.0.0.1 (jobs API {address})", flush=True)

        start = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
        schedule = [(start + timedelta(hours=6 * i)).strftime("%Y-%m-%dT%H-%MZ") for i in range(3)]
        runs = [submit(address, env, schedule[0], args.model, args.scale)]
        runs.append(submit(address, env, schedule[1], args.model, args.scale))
        added = []
        for i, src in enumerate(samples[:2]):  # two new images arrive between the schedules
            dst = Path(temp) / f"new_{i}.png"
            with Image.open(src) as im:
                im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(dst)
            added.append(dst)
        upload(fs, added, "in")
        print(f"e2e: added {len(added)} images under in/", flush=True)
        runs.append(submit(address, env, schedule[2], args.model, args.scale))

        from srbatch.upscale import read_manifest

        rows = read_manifest(f"s3://{BUCKET}/out/").to_pylist()
        n = len(samples)
        expect = [(n, n, 0), (n, 0, n), (n + len(added), len(added), n)]
        print(f"\n{'run (schedule time)':<20} {'inputs':>6} {'processed':>9} {'ok':>4} {'failed':>6} {'skipped':>7} "
              f"{'manifest ok/skipped':>19} {'seconds':>8}")  # fmt: skip
        for r, (inputs, processed, skipped) in zip(runs, expect):
            mine = [row["status"] for row in rows if row["run_id"] == r["run_id"]]
            in_manifest, skipped_rows = sum(st != "skipped" for st in mine), mine.count("skipped")
            print(f"{r['run_id']:<20} {r['inputs']:>6} {r['processed']:>9} {r['ok']:>4} {r['failed']:>6} "
                  f"{r['skipped']:>7} {f'{in_manifest}/{skipped_rows}':>19} {r['seconds']:>8.1f}")  # fmt: skip
            if (r["inputs"], r["processed"], r["skipped"], r["failed"]) != (inputs, processed, skipped, 0):
                failures.append(f"run {r['run_id']}: expected {inputs} inputs, {processed} processed, {skipped} "
                                f"skipped, 0 failed; got {r}")  # fmt: skip
            if (in_manifest, skipped_rows) != (processed, skipped):
                failures.append(f"run {r['run_id']}: the manifest has {in_manifest} processed and {skipped_rows} "
                                f"skipped rows; expected {processed} and {skipped}")  # fmt: skip
        fs.invalidate_cache()
        outputs = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{BUCKET}/out/")
                         if "/_manifest/" not in p and "/_srbatch/" not in p)
        print(f"\ne2e: {len(outputs)} outputs under s3://{BUCKET}/out/: {', '.join(outputs)}")
        if len(outputs) != n + len(added):
            failures.append(f"{len(outputs)} outputs for {n + len(added)} inputs")
    finally:
        if head is not None:
            stop(head)
        server.stop()  # type: ignore[attr-defined]
        if args.keep:
            print(f"e2e: kept {temp}")
        else:
            shutil.rmtree(temp, ignore_errors=True)
        print("e2e: torn down (Ray head stopped, S3 server stopped)", flush=True)
    for f in failures:
        print(f"e2e: FAILED: {f}", file=sys.stderr)
    print("e2e: OK: run 1 processed everything, run 2 nothing new, run 3 only the added images" if not failures
          else "e2e: FAILED")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
