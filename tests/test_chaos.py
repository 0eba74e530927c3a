"""Chaos and hostile input: actors killed, storage failing, drivers dying, malicious weights, hostile keys, secrets.

Each test prints the figure it measures (`CHAOS <item>: ...`; run with `-s` or read the captured output). Real parts
only: the session's local Ray cluster, moto's S3 server on 127.0.0.1 (behind a fault-injecting HTTP proxy for item 2),
real image files, and the jobs' own command lines.
"""

from __future__ import annotations

import http.client
import io
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _expect import assert_as_engine

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

ROOT = Path(__file__).resolve().parents[1]
JOB = [sys.executable, str(ROOT / "jobs" / "upscale.py")]


def _png(rng: np.random.Generator, h: int, w: int) -> bytes:
    # smooth content plus noise: the model has something to do, PNG stays small
    y, x = np.mgrid[0:h, 0:w]
    base = (np.stack([np.sin(x / 7.0), np.cos(y / 5.0), np.sin((x + y) / 9.0)], -1) + 1) * 100
    img = (base + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _s3():
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return fs


def _manifest_rows(output: str, **so) -> list[dict]:
    from srbatch.upscale import read_manifest

    t = read_manifest(output, so or None)
    return [] if t is None else t.to_pylist()


# ------------------------------------------------------------------------------------------------ 1. actor killed


def test_actor_killed_mid_batch_every_input_exactly_one_ok_row(ray_cluster, s3_bucket):
    from ray._private import state as ray_state

    from srbatch.upscale import UpscaleConfig, run_job

    fs = _s3()
    rng = np.random.default_rng(1)
    n = 50
    sources = {}
    for i in range(n):
        sources[f"{i:02d}.png"] = _png(rng, 160, 160)
        fs.pipe_file(f"{s3_bucket}/in/{i:02d}.png", sources[f"{i:02d}.png"])
    out = f"s3://{s3_bucket}/out"
    cfg = UpscaleConfig(input=f"s3://{s3_bucket}/in/", output=out, model="default", scale=4, actors=2,
                        cpus_per_actor=1, torch_threads=1, batch_size=4, progress=False, run_id="chaos-kill")  # fmt: skip
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("r", run_job(cfg)))
    t.start()
    killed = None
    deadline = time.monotonic() + 300
    while t.is_alive() and time.monotonic() < deadline:
        done = len([p for p in _s3().find(f"{s3_bucket}/out/") if "/_manifest/" not in p and "/_srbatch/" not in p])
        actors = [a for a in ray_state.actors().values()
                  if a["State"] == "ALIVE" and "UpscaleWorker" in a["ActorClassName"]]  # fmt: skip
        if done >= 6 and actors:  # work has started: the actors are mid-batch
            killed = actors[0]["Pid"]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.2)
    t.join(timeout=600)
    assert killed is not None, "no actor to kill: the job finished before the fault was injected"
    res = result["r"]
    rows = [r for r in _manifest_rows(out) if r["run_id"] == "chaos-kill"]
    per_input: dict[str, list[str]] = {}
    for r in rows:
        per_input.setdefault(r["input_uri"], []).append(r["status"])
    dup = sum(len(v) - 1 for v in per_input.values())
    not_ok = [k for k, v in per_input.items() if v != ["ok"]]
    outputs = sorted(p for p in _s3().find(f"{s3_bucket}/out/") if "/_manifest/" not in p and "/_srbatch/" not in p)
    temps = [p for p in _s3().find(f"{s3_bucket}/") if ".srbatch-tmp-" in p]
    for p in outputs:  # whole, and the default model's own pixels (those of the killed actor's batch included)
        written = _s3().cat_file(p)
        with Image.open(io.BytesIO(written)) as im:
            assert im.size == (640, 640), p
        assert_as_engine(written, sources[p.rsplit("/", 1)[-1]], model="default", scale=4, name=p)
    print(f"CHAOS 1 actor killed: pid {killed} SIGKILLed mid-run; {len(per_input)}/{n} inputs with a row, "
          f"{len(per_input) - len(not_ok)} with exactly one ok row, duplicate rows {dup}, lost images "
          f"{n - len(outputs)}, outputs {len(outputs)} all 640x640 with the engine's pixels, "
          f"temporary objects {len(temps)}")  # fmt: skip
    assert res.exit_code == 0 and res.ok == n
    assert len(per_input) == n and not not_ok and dup == 0 and len(outputs) == n and not temps


# ------------------------------------------------------------------------------------------------ 2. storage faults


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server: a seeded ~``rate`` of requests get 503 SlowDown or 500
    InternalError before reaching the server; any request whose path contains ``permanent`` always gets 500."""

    def __init__(self, upstream: str, rate: float, permanent: str, seed: int = 7) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.requests = self.faults = self.permanent_faults = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.requests += 1
                    roll = proxy.rng.random()
                if permanent in self.path:
                    with proxy.lock:
                        proxy.permanent_faults += 1
                    return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
                if roll < rate:
                    with proxy.lock:
                        proxy.faults += 1
                    if roll < rate / 2:
                        return self._error(503, "SlowDown", "Please reduce your request rate.")
                    return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _error(self, status: int, code: str, msg: str) -> None:
                data = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{msg}</Message>'
                        f"<RequestId>{uuid.uuid4().hex}</RequestId></Error>").encode()  # fmt: skip
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_storage_faults_are_retried_and_a_permanent_one_is_one_failed_row(ray_cluster, s3_server, s3_bucket):
    from srbatch.upscale import UpscaleConfig, run_job

    fs = _s3()
    rng = np.random.default_rng(2)
    n = 30
    for i in range(n):
        fs.pipe_file(f"{s3_bucket}/in/{i:02d}.png", _png(rng, 48, 48))
    fs.pipe_file(f"{s3_bucket}/in/permanent-fault.png", _png(rng, 48, 48))
    proxy = FaultProxy(s3_server, rate=0.10, permanent="permanent-fault")
    try:
        out = f"s3://{s3_bucket}/out"
        res = run_job(UpscaleConfig(input=f"s3://{s3_bucket}/in/", output=out, model="bicubic", scale=2,
                                    endpoint_url=proxy.url, max_failed_fraction=0.1, progress=False,
                                    run_id="chaos-faults"))  # fmt: skip
    finally:
        proxy.close()
    rows = _manifest_rows(out)  # read straight from the server, not through the proxy
    ok = {r["input_uri"] for r in rows if r["status"] == "ok"}
    failed = [r for r in rows if r["status"] == "failed"]
    outputs = [p for p in _s3().find(f"{s3_bucket}/out/") if "/_manifest/" not in p and "/_srbatch/" not in p]
    lost = n - len([u for u in ok if "permanent-fault" not in u])
    print(f"CHAOS 2 storage faults: {proxy.faults} of {proxy.requests} requests failed by the proxy "
          f"({proxy.faults / max(1, proxy.requests):.1%}, 503 SlowDown / 500), {proxy.permanent_faults} permanent; "
          f"lost images {lost}, ok {len(ok)}, failed rows {len(failed)}: "
          f"{[(r['input_uri'].rsplit('/', 1)[-1], r['error_type']) for r in failed]}")  # fmt: skip
    assert proxy.faults >= 5, "the proxy injected too few faults to prove anything"
    assert lost == 0 and len(ok) == n and len(outputs) == n and len(rows) == n + 1
    (bad,) = failed
    assert bad["input_uri"].endswith("permanent-fault.png") and bad["error_type"] == "StorageError"
    assert "permanent-fault.png" in bad["error_message"]
    assert res.exit_code == 0 and res.failed == 1


# ------------------------------------------------------------------------------------------------ 3. bad-input corpus


def _corpus(d: Path) -> dict[str, tuple[str, str]]:
    """Write the corpus into ``d``; returns {relative name: (expected status, regex the error message must match)}."""
    rng = np.random.default_rng(3)
    rgb = (rng.integers(0, 256, (40, 56, 3))).astype(np.uint8)
    exp: dict[str, tuple[str, str]] = {}

    def save(name: str, im: Image.Image, status: str = "ok", msg: str = "", **kw: object) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        im.save(d / name, **kw)
        exp[name] = (status, msg)

    def raw(name: str, data: bytes, status: str, msg: str) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
        exp[name] = (status, msg)

    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    jpg = io.BytesIO()
    Image.fromarray(rgb).save(jpg, format="JPEG", quality=90)
    raw("truncated.png", png.getvalue()[: len(png.getvalue()) // 2], "failed", r"truncated\.png: (truncated|corrupt)")
    raw("truncated_jpeg.jpg", jpg.getvalue()[: len(jpg.getvalue()) // 2], "failed",
        r"truncated_jpeg\.jpg: (truncated|corrupt)")
    raw("zero.png", b"", "failed", r"zero\.png: empty file")
    raw("random.jpg", rng.integers(0, 256, 5000).astype(np.uint8).tobytes(), "failed", r"random\.jpg: not an image")
    raw("text.png", b"just some text, not a picture\n" * 20, "failed", r"text\.png: not an image")
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))  # fmt: skip
    raw("bomb.png", bomb, "failed", r"bomb\.png: declares 100000 x 100000")
    save("one_by_one.png", Image.fromarray(rgb[:1, :1]))
    save("one_by_n.png", Image.fromarray(rgb[:1, :]))
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=90)
    save("grey16.png", Image.fromarray((rng.integers(0, 65535, (30, 20))).astype(np.uint16)))
    t16 = (rng.integers(0, 65535, (20, 24, 3))).astype(np.uint16)
    raw("rgb16.tif", _tiff16(t16), "ok", "")
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    save("palette_transparent.png", pal, transparency=0)
    save("grey_alpha.png", Image.fromarray(rgb[..., 0]).convert("LA"))
    save("rgba.png", Image.fromarray(np.dstack([rgb, rgb[..., :1]])))
    frames = [Image.fromarray(np.roll(rgb, k, 1)) for k in range(3)]
    save("animated.gif", frames[0].convert("P"), save_all=True, append_images=[f.convert("P") for f in frames[1:]])
    save("animated_webp.webp", frames[0], save_all=True, append_images=frames[1:], lossless=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", Image.fromarray(rgb), exif=exif.tobytes(), quality=90)
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    save("icc.png", Image.fromarray(rgb), icc_profile=icc)
    save("progressive.jpg", Image.fromarray(rgb), progressive=True, quality=85)
    save("grey.jpg", Image.fromarray(rgb[..., 1]), quality=90)
    raw("photo.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200), "failed",
        r"photo\.heic: a HEIC/HEIF image.*pillow-heif")  # fmt: skip
    save("avif_photo.avif", Image.fromarray(rgb), quality=90)  # this Pillow has AVIF support: decoded like any image
    big = np.kron(rgb, np.ones((40, 40, 1), np.uint8))[:1500, :2000]  # 3 MP, under the 134 MP limit
    save("large.png", Image.fromarray(big), compress_level=1)
    save("name with spaces ünïcødé.png", Image.fromarray(rgb))
    save("folder.png/inside.png", Image.fromarray(rgb))  # a directory named like an image: its file is the input
    save("image.bmp", Image.fromarray(rgb))
    save("still.webp", Image.fromarray(rgb), quality=90)
    raw("png_named.jpg", png.getvalue(), "ok", "")  # the content decides, not the extension
    save("bilevel.png", Image.fromarray(rgb[..., 0] > 128))
    return exp


def _tiff16(px: np.ndarray) -> bytes:
    from srbatch.io.images import DecodedImage, encode_image

    return encode_image(DecodedImage(pixels=px, mode="RGB"), format="TIFF")


def test_bad_input_corpus_one_row_each_with_the_right_status(ray_cluster, tmp_path):
    from srbatch.upscale import UpscaleConfig, run_job

    src, out = tmp_path / "in", tmp_path / "out"
    exp = _corpus(src)
    assert len(exp) >= 25
    res = run_job(UpscaleConfig(input=str(src), output=str(out), model="bicubic", scale=2, max_failed_fraction=1.0,
                                progress=False))  # fmt: skip
    rows = {Path(r["input_uri"]).relative_to(src).as_posix(): r for r in _manifest_rows(str(out))}
    wrong = []
    for name, (status, msg) in sorted(exp.items()):
        r = rows.get(name)
        if r is None or r["status"] != status or (msg and not re.search(msg, r["error_message"] or "")):
            wrong.append((name, status, None if r is None else (r["status"], r["error_message"])))
    good = [n for n, (s, _) in exp.items() if s == "ok"]
    for n in good:
        with Image.open(rows[n]["output_uri"]) as im:
            assert im.size == (rows[n]["input_width"] * 2, rows[n]["input_height"] * 2), n
    print(f"CHAOS 3 bad inputs: {len(exp)} kinds, {len(rows)} rows (one per file), {len(good)} ok as expected, "
          f"{len(exp) - len(good)} failed with their message; mismatches {len(wrong)}")  # fmt: skip
    assert not wrong, wrong
    assert set(rows) == set(exp) and res.ok == len(good) and res.failed == len(exp) - len(good)
    assert "folder.png" not in rows  # the directory itself is not an input
    assert rows["animated.gif"]["input_width"] == 56 and rows["exif_rotated.jpg"]["input_width"] == 40


# ------------------------------------------------------------------------------------------------ 4. driver killed


def _job_env(tmp: str) -> dict[str, str]:
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def test_driver_killed_then_rerun_processes_only_what_is_missing(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(4)
    n = 30
    for i in range(n):
        (src / f"{i:02d}.png").write_bytes(_png(rng, 128, 128))
    args = ["--model", "default", "--scale", "4", "--no-progress", "--manifest-flush-seconds", "1", "--actors", "1",
            "--batch-size", "2"]  # fmt: skip
    raytmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    p = subprocess.Popen([*JOB, str(src), "-o", str(out), *args, "--run-id", "killed"], env=_job_env(raytmp),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and p.poll() is None:
            if len(list(out.glob("*.png"))) >= 5:
                break
            time.sleep(0.2)
        assert p.poll() is None, "the job ended before it could be killed: " + p.stdout.read().decode()[-2000:]
        done_at_kill = len(list(out.glob("*.png")))
        os.kill(p.pid, signal.SIGKILL)  # kill -9 the driver
        p.wait(timeout=30)
    finally:
        time.sleep(2)
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the local Ray processes it started, if any outlived it
        except ProcessLookupError:
            pass
    rerun = subprocess.run([*JOB, str(src), "-o", str(out), *args, "--run-id", "rerun"], env=_job_env(raytmp),
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    m = re.search(r"(\d+) inputs: (\d+) ok, (\d+) failed, (\d+) skipped", rerun.stdout)
    total, ok, failed, skipped = (int(g) for g in m.groups())
    rows = _manifest_rows(str(out))
    oks: dict[str, int] = {}
    for r in rows:
        oks[r["input_uri"]] = oks.get(r["input_uri"], 0) + (r["status"] == "ok")
    final = {r["input_uri"]: r["status"] for r in rows if r["run_id"] == "rerun"}
    wrong = []
    for f in sorted(src.glob("*.png")):  # written before the kill or by the rerun: the default model's own pixels
        try:
            assert_as_engine(out / f.name, f, model="default", scale=4, name=f.name)
        except (AssertionError, OSError) as e:
            wrong.append(str(e))
    same = n - len(wrong)
    temps = [f for f in out.rglob("*") if f.name.startswith(".srbatch-tmp-")]
    print(f"CHAOS 4 driver killed: kill -9 after {done_at_kill} outputs; rerun: {ok} processed, {skipped} skipped, "
          f"{failed} failed; inputs with exactly one ok row {sum(v == 1 for v in oks.values())}/{n}; outputs "
          f"equal to the engine's direct output (within 1 level) {same}/{n}; temporary files {len(temps)}")  # fmt: skip
    assert total == n and failed == 0 and ok + skipped == n and skipped >= 1 and ok < n
    assert len(final) == n and set(final.values()) <= {"ok", "skipped"}
    assert all(v == 1 for v in oks.values()) and len(oks) == n
    assert same == n and not temps, wrong[:3]


# ------------------------------------------------------------------------------------------------ 5. malicious weights


def test_malicious_and_broken_weights_are_refused(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from srbatch.models.loader import build_model, save_model

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(_png(np.random.default_rng(5), 16, 16))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload()}, evil)
    r1 = subprocess.run([*JOB, str(src), "-o", str(tmp_path / "o1"), "--model", str(evil)], capture_output=True,
                        text=True, timeout=300)  # fmt: skip

    good = tmp_path / "espcn.safetensors"
    save_model(build_model("espcn", scale=4), str(good))
    tensors = load_file(good)
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(*[s + 1 for s in tensors[name].shape])
    from safetensors import safe_open

    with safe_open(good, "pt") as f:
        meta = f.metadata()
    bad_shapes = tmp_path / "wrong_shapes.safetensors"
    save_file(tensors, bad_shapes, metadata=meta)
    r2 = subprocess.run([*JOB, str(src), "-o", str(tmp_path / "o2"), "--model", str(bad_shapes), "--scale", "4"],
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    r3 = subprocess.run([*JOB, str(src), "-o", str(tmp_path / "o3"), "--model", str(good), "--scale", "4",
                         "--sha256", "0" * 64], capture_output=True, text=True, timeout=300)  # fmt: skip
    print(f"CHAOS 5 malicious weights: pickle payload -> exit {r1.returncode}, code executed {marker.exists()}; "
          f"wrong shapes -> exit {r2.returncode}; sha256 mismatch -> exit {r3.returncode}; outputs written "
          f"{sum((tmp_path / o).exists() for o in ('o1', 'o2', 'o3'))}")  # fmt: skip
    assert r1.returncode == 2 and not marker.exists()
    assert "evil.pth" in r1.stderr and re.search(r"pickle|unsafe|weights_only", r1.stderr, re.I), r1.stderr
    assert r2.returncode == 2 and name in r2.stderr and "wrong_shapes.safetensors" in r2.stderr, r2.stderr
    assert r3.returncode == 2 and "sha256" in r3.stderr.lower(), r3.stderr
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


# ------------------------------------------------------------------------------------------------ 6. hostile keys


def test_hostile_keys_write_nothing_outside_the_output_prefix(ray_cluster, s3_bucket, tmp_path):
    import boto3

    from srbatch.upscale import UpscaleConfig, run_job

    s3 = boto3.client("s3")
    data = _png(np.random.default_rng(6), 16, 16)
    keys = ["in/ok.png", "in/../../escape.png", "in/sub/../../../up.png", "in//etc/passwd.png", "in/..\\..\\win.png",
            "in/a\\b.png", "in/cafe\u0301.png", "in/caf\u00e9.png", "in/./dot.png", "in/_manifest/x.png",
            "in/.srbatch-tmp-x/y.png", "in/fine/nested.png"]  # fmt: skip
    for k in keys:
        s3.put_object(Bucket=s3_bucket, Key=k, Body=data)
    stored = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    tricks = ["in/../../escape.png", "in/sub/../../../up.png", "in//etc/passwd.png", "in/..\\..\\win.png",
              "in/a\\b.png", "in/./dot.png"]  # fmt: skip
    hostile = [k for k in tricks if k in stored]
    assert len(hostile) == len(tricks), f"the server normalised the keys: {sorted(stored)}"
    before = set(stored)
    # to S3 and to a local folder nested in a sandbox whose whole tree is checked afterwards
    sandbox = tmp_path / "sandbox"
    local_out = sandbox / "a" / "b" / "out"
    sandbox.mkdir()
    results = []
    for out in (f"s3://{s3_bucket}/out", str(local_out)):
        results.append(run_job(UpscaleConfig(input=f"s3://{s3_bucket}/in/", output=out, model="bicubic", scale=2,
                                             max_failed_fraction=1.0, progress=False)))  # fmt: skip
    after = {o["Key"] for o in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket).build_full_result()
             ["Contents"]}  # fmt: skip
    outside_s3 = sorted(k for k in after - before if not k.startswith("out/"))
    outside_fs = sorted(str(p) for p in sandbox.rglob("*")
                        if p.is_file() and local_out not in p.parents)  # fmt: skip
    rows = _manifest_rows(f"s3://{s3_bucket}/out")
    refused = [r for r in rows if r["status"] == "failed"]
    print(f"CHAOS 6 hostile keys: {len(hostile)} hostile keys stored; files outside the output prefix: S3 "
          f"{len(outside_s3)}, filesystem {len(outside_fs)}; refused rows {len(refused)}, ok rows "
          f"{sum(r['status'] == 'ok' for r in rows)}")  # fmt: skip
    assert not outside_s3 and not outside_fs
    ok_keys = sorted(k for k in after if k.startswith("out/") and "/_manifest/" not in k and "/_srbatch/" not in k)
    assert "out/ok.png" in ok_keys and "out/fine/nested.png" in ok_keys
    assert all(".." not in k and "\\" not in k and "//" not in k for k in ok_keys)
    by_key = {r["input_uri"].split(f"s3://{s3_bucket}/", 1)[1]: r for r in rows}
    assert all(by_key[k]["status"] == "failed" and "unsafe input key" in by_key[k]["error_message"] for k in hostile)
    cafe = [by_key[k]["status"] for k in ("in/cafe\u0301.png", "in/caf\u00e9.png")]
    assert sorted(cafe) == ["failed", "ok"]  # NFD and NFC spell one name: one is refused, never overwritten
    # srbatch's own names inside the input are not inputs (skipped by the listing, documented)
    assert "in/_manifest/x.png" not in by_key and "in/.srbatch-tmp-x/y.png" not in by_key
    assert len(refused) == len(hostile) + 1


# ------------------------------------------------------------------------------------------------ 7. training worker


def test_training_worker_killed_resumes_and_no_checkpoint_is_corrupt(ray_cluster, tmp_path):
    """A Ray Train worker process is SIGKILLed from outside (tests/train_faults.py) once checkpoint 2 is committed:
    the worker group restarts once from a committed checkpoint and finishes; every checkpoint left loads intact."""
    import pyarrow.parquet as pq
    import torch
    from train_faults import kill_a_training_worker

    from srbatch.local import sample_images_dir
    from srbatch.train import TrainConfig, run_training
    from srbatch.train.loop import STATE_FILE
    from srbatch.weights.checkpoint import load_checkpoint

    out = tmp_path / "out"
    with kill_a_training_worker(out / "_train" / "train", after="checkpoint_00000002") as kill:
        r = run_training(TrainConfig(data=sample_images_dir(), output=str(out), steps=8, val_every=2, workers=2,
                                     max_failures=1, model="srresnet", model_args={"num_block": 1, "num_feat": 8},
                                     scale=2, crop_size=32, batch_size=2, val_max_size=48,
                                     keep_checkpoints=10))  # fmt: skip
    hist = pq.read_table(out / "history.parquet").to_pylist()
    ckpts = sorted(p for p in (out / "_train" / "train").glob("checkpoint_0*") if p.is_dir())
    loaded = 0
    for c in ckpts:
        state = torch.load(c / STATE_FILE, map_location="cpu", weights_only=True)
        assert state["state"]["step"] == int(c.name.rsplit("_", 1)[1])
        gens = [p for p in c.iterdir() if p.suffix == ".safetensors"]
        assert gens and all(load_checkpoint(str(g)).state_dict for g in gens)
        loaded += 1
    print(f"CHAOS 7 training worker killed: SIGKILL to pid {kill.pid} with {list(kill.committed)} committed; restarts "
          f"{r.card['training']['restarts']}; history steps {[h['step'] for h in hist]} restarts "
          f"{[h['restarts'] for h in hist]}; checkpoints {[c.name[-3:] for c in ckpts]}, {loaded} of {len(ckpts)} "
          "load intact")  # fmt: skip
    assert kill.error is None and kill.pid is not None, f"the worker was not killed: {kill}"
    assert r.card["training"]["restarts"] == 1 and r.card["training"]["steps"] == 8
    # one row per validation; the rows before the kill come from the restored checkpoint, the rest from the restart
    assert [h["step"] for h in hist] == [2, 4, 6, 8]
    restarts = [h["restarts"] for h in hist]
    assert restarts[0] == 0 and restarts[-1] == 1 and restarts == sorted(restarts)
    assert [c.name for c in ckpts] == [f"checkpoint_{s:08d}" for s in (2, 4, 6, 8)]
    assert loaded == 4


# ------------------------------------------------------------------------------------------------ 8. secrets


def _grep_tree(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                hits.append(str(p))
        except OSError:
            continue
    return hits


def test_secrets_never_appear_in_logs_manifests_or_model_cards(ray_cluster, s3_server, s3_bucket, tmp_path):
    import ray

    from srbatch.local import sample_images_dir
    from srbatch.train import TrainConfig, run_training

    secret = f"SRBATCH-SECRET-{uuid.uuid4().hex}"
    key_id = f"SRBATCHKEYID{uuid.uuid4().hex[:8].upper()}"
    fs = _s3()
    fs.pipe_file(f"{s3_bucket}/in/a.png", _png(np.random.default_rng(8), 24, 24))
    raytmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    env = {**_job_env(raytmp), "AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": key_id}
    # (a) credentials from the environment, (b) from the YAML config's storage_options, verbose logging on
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(f"storage_options:\n  key: {key_id}\n  secret: {secret}\n")
    runs = [
        subprocess.run([*JOB, f"s3://{s3_bucket}/in/", "-o", f"s3://{s3_bucket}/out-env", "--model", "bicubic",
                        "--scale", "2", "--no-progress", "-v"], env=env, capture_output=True, timeout=600),
        subprocess.run([*JOB, f"s3://{s3_bucket}/in/", "-o", f"s3://{s3_bucket}/out-cfg", "--model", "bicubic",
                        "--scale", "2", "--no-progress", "-v", "--config", str(cfg_file),
                        "--storage-option", f"secret={secret}"], env=env, capture_output=True, timeout=600),
    ]  # fmt: skip
    for p in runs:
        assert p.returncode == 0, p.stderr[-3000:]
    # (c) the training job with the secret in its storage options (the session cluster; its logs are checked too)
    train_out = tmp_path / "model"
    run_training(TrainConfig(data=sample_images_dir(), output=str(train_out), steps=1, val_every=1, model="espcn",
                             scale=2, crop_size=32, batch_size=2, val_max_size=48,
                             storage_options={"secret": secret, "key": key_id}))  # fmt: skip
    needle = secret.encode()
    hits_out = [i for i, p in enumerate(runs) if needle in p.stdout or needle in p.stderr]
    hits_logs = _grep_tree(Path(raytmp), needle)
    session_logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    hits_session = _grep_tree(session_logs, needle)
    hits_model = _grep_tree(train_out, needle)
    bucket_hits = [k for k in fs.find(f"{s3_bucket}/") if needle in fs.cat_file(k)]
    print(f"CHAOS 8 secrets: secret found in job output {len(hits_out)}, Ray logs {len(hits_logs) + len(hits_session)}"
          f" files ({sum(1 for _ in Path(raytmp).rglob('*'))} + {sum(1 for _ in session_logs.rglob('*'))} searched), "
          f"manifests/outputs {len(bucket_hits)}, model card/checkpoints {len(hits_model)}")  # fmt: skip
    assert not hits_out and not hits_logs and not hits_session and not bucket_hits and not hits_model
    assert (train_out / "model_card.json").exists()
