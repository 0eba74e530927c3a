"""The tiny-image benchmark (``jobs/benchmark.py tiny``) and the upscale actor's per-batch fast path.

The actor is called directly on batches in this process (no Ray) and checked against what it must keep doing: one row
per input of exactly the manifest's schema, failed rows for broken, missing and unwritable images, the timing columns,
atomic outputs (no temp file left), the same results through the local inline reads, the remote thread-pool reads and
a batch that mixes protocols. Pixels are checked against a MATLAB bicubic written here in numpy (not srbatch's).

The benchmark runs on 40 images in the session's Ray cluster: every output the job wrote must equal the plain loop's
and that numpy reference, and the printed figures must be the ones their definitions give. No timing thresholds.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _cubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(x)
    return np.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))  # fmt: skip


def _matrix(n: int, s: int) -> np.ndarray:
    """MATLAB ``imresize`` upscaling by ``s`` along one axis: cubic kernel a = -0.5, symmetric edges."""
    m = np.zeros((n * s, n))
    for j in range(n * s):
        x = (j + 0.5) / s - 0.5
        f = int(np.floor(x))
        for k in range(f - 1, f + 3):
            m[j, -k - 1 if k < 0 else (2 * n - k - 1 if k >= n else k)] += _cubic(np.float64(x - k))
    return m / m.sum(axis=1, keepdims=True)


def matlab_bicubic(rgb: np.ndarray, s: int) -> np.ndarray:
    """An independent MATLAB ``imresize(img, s, 'bicubic')`` of a uint8 image (rounded half up, clipped)."""
    out = np.einsum("ih,hwc,jw->ijc", _matrix(rgb.shape[0], s), rgb.astype(np.float64), _matrix(rgb.shape[1], s))
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _texture(seed: int, h: int = 24, w: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(xx / 3.0 + seed)[..., None] * np.cos(yy / 4.0)[..., None]
    return np.clip(base + rng.integers(-30, 31, (h, w, 3)), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ the actor, no Ray


@pytest.fixture(scope="module")
def worker():
    from srbatch.upscale.config import UpscaleConfig
    from srbatch.upscale.worker import UpscaleWorker

    cfg = UpscaleConfig(input="/unused", output="/unused", model="bicubic", scale=2, progress=False)
    return UpscaleWorker(cfg.model_dump(), fingerprint="f" * 16, torch_threads=1)


def _batch(inputs: list[str], outputs: list[str]) -> dict[str, np.ndarray]:
    return {"input_uri": np.array(inputs), "output_uri": np.array(outputs), "run_id": np.array(["r1"] * len(inputs))}


def test_actor_rows_for_good_broken_missing_and_unwritable_images(worker, tmp_path):
    from srbatch.upscale.manifest import SCHEMA

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    goods = [_texture(i) for i in range(3)]
    for i, rgb in enumerate(goods):
        (src / f"g{i}.png").write_bytes(_png(rgb))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (out / "blocked").parent.mkdir(parents=True)
    (out / "blocked").write_bytes(b"a file where a folder is needed")
    names = ["g0.png", "broken.png", "g1.png", "missing.png", "g2.png"]
    outs = [str(out / "sub" / n) for n in names]
    outs[4] = str(out / "blocked" / "g2.png")  # its folder is a file: the write fails
    table = worker(_batch([str(src / n) for n in names], outs))

    assert table.schema == SCHEMA
    rows = table.to_pylist()
    assert [r["input_uri"] for r in rows] == [str(src / n) for n in names]
    by = {Path(r["input_uri"]).name: r for r in rows}
    assert [by[n]["status"] for n in names] == ["ok", "failed", "ok", "failed", "failed"]
    assert by["broken.png"]["error_type"] == "ImageDecodeError"
    assert by["missing.png"]["error_type"] == "StorageError"
    assert by["missing.png"]["error_message"] == f"not found: {src / 'missing.png'}"
    assert by["g2.png"]["error_type"] == "StorageError" and "could not write" in by["g2.png"]["error_message"]
    for r in rows:
        assert r["run_id"] == "r1" and r["fingerprint"] == "f" * 16 and r["model"] == "bicubic"
        assert r["device"] == "cpu" and r["actor_id"].startswith("pid-") and r["scale"] == 2
        if r["status"] == "failed":
            assert r["output_uri"] is None and r["error_message"]
    assert len({r["finished_at"] for r in rows}) == 1  # the batch's rows are stamped together, at its end
    for n, rgb in (("g0.png", goods[0]), ("g1.png", goods[1])):
        r = by[n]
        stages = [r[k] for k in ("read_s", "decode_s", "infer_s", "encode_s", "write_s")]
        assert all(v is not None and v >= 0 for v in stages), r
        assert r["total_s"] == pytest.approx(sum(stages))
        assert (r["input_width"], r["input_height"], r["output_width"], r["output_height"]) == (20, 24, 40, 48)
        assert r["input_bytes"] == (src / n).stat().st_size
        written = (out / "sub" / n).read_bytes()
        assert r["output_bytes"] == len(written)
        assert np.abs(_pixels(written).astype(int) - matlab_bicubic(rgb, 2).astype(int)).max() <= 1
    assert sorted(p.name for p in (out / "sub").iterdir()) == ["g0.png", "g1.png"]  # no temp file, nothing else
    assert sorted(p.name for p in out.iterdir()) == ["blocked", "sub"]


def test_actor_remote_reads_and_mixed_protocols_give_the_same_pixels(worker, tmp_path):
    import fsspec

    rgb = [_texture(10 + i) for i in range(3)]
    mem = fsspec.filesystem("memory")
    root = f"/tiny-test-{tmp_path.name}"
    for i, a in enumerate(rgb):
        mem.pipe_file(f"{root}/in/m{i}.png", _png(a))
    (tmp_path / "l0.png").write_bytes(_png(rgb[0]))
    remote = worker(_batch([f"memory://{root}/in/m{i}.png" for i in range(3)] + [f"memory://{root}/in/none.png"],
                           [f"memory://{root}/out/m{i}.png" for i in range(4)])).to_pylist()  # fmt: skip
    assert [r["status"] for r in remote] == ["ok", "ok", "ok", "failed"]
    assert remote[3]["error_type"] == "StorageError" and remote[3]["error_message"].startswith("not found: ")
    mixed = worker(_batch([str(tmp_path / "l0.png"), f"memory://{root}/in/m1.png"],
                          [f"memory://{root}/mixed/l0.png", str(tmp_path / "o" / "m1.png")])).to_pylist()  # fmt: skip
    assert [r["status"] for r in mixed] == ["ok", "ok"], mixed
    want = [matlab_bicubic(a, 2).astype(int) for a in rgb]
    for i in range(3):
        assert np.abs(_pixels(mem.cat_file(f"{root}/out/m{i}.png")).astype(int) - want[i]).max() <= 1
    assert np.abs(_pixels(mem.cat_file(f"{root}/mixed/l0.png")).astype(int) - want[0]).max() <= 1
    assert np.abs(_pixels((tmp_path / "o" / "m1.png").read_bytes()).astype(int) - want[1]).max() <= 1
    assert sorted(mem.ls(f"{root}/out", detail=False)) == [f"{root}/out/m{i}.png" for i in range(3)]
    mem.rm(root, recursive=True)


def test_actor_large_batch_through_a_small_window_keeps_each_row_with_its_image(tmp_path):
    """20 remote images through one I/O thread (2 reads ahead, 2 uploads pending at most): every row, output and
    pixel belongs to its own input."""
    import fsspec

    from srbatch.upscale.config import UpscaleConfig
    from srbatch.upscale.worker import UpscaleWorker

    cfg = UpscaleConfig(input="/unused", output="/unused", model="bicubic", scale=2, io_threads=1, progress=False)
    w = UpscaleWorker(cfg.model_dump(), fingerprint="f" * 16, torch_threads=1)
    assert w.window == 2
    mem = fsspec.filesystem("memory")
    root = f"/tiny-window-{tmp_path.name}"
    rgb = [_texture(100 + i, h=12 + i % 5, w=10 + i % 7) for i in range(20)]
    for i, a in enumerate(rgb):
        mem.pipe_file(f"{root}/in/{i:02d}.png", _png(a))
    rows = w(_batch([f"memory://{root}/in/{i:02d}.png" for i in range(20)],
                    [f"memory://{root}/out/{i:02d}.png" for i in range(20)])).to_pylist()  # fmt: skip
    for i, (r, a) in enumerate(zip(rows, rgb)):
        assert r["status"] == "ok" and r["input_uri"].endswith(f"/{i:02d}.png"), r
        assert (r["input_height"], r["input_width"]) == a.shape[:2]
        got = _pixels(mem.cat_file(f"{root}/out/{i:02d}.png"))
        assert np.abs(got.astype(int) - matlab_bicubic(a, 2).astype(int)).max() <= 1, i
    mem.rm(root, recursive=True)


def test_actor_holds_at_most_window_upscaled_images_waiting_for_upload(tmp_path):
    """Uploads blocked: the actor stops upscaling once ``window`` results wait, instead of queueing the whole batch
    (the memory bound that makes large batches safe for large images)."""
    import threading

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from srbatch.upscale.config import UpscaleConfig
    from srbatch.upscale.worker import UpscaleWorker

    release = threading.Event()

    class Blocking(MemoryFileSystem):
        protocol = "tinyblock"

        @classmethod
        def _strip_protocol(cls, path: str) -> str:
            return "/" + path.removeprefix("tinyblock://").lstrip("/")

        def pipe_file(self, path, value, **kwargs):  # noqa: ANN001 - fsspec's signature
            release.wait(30)
            return super().pipe_file(path, value, **kwargs)

    fsspec.register_implementation("tinyblock", Blocking, clobber=True)
    cfg = UpscaleConfig(input="/unused", output="/unused", model="bicubic", scale=2, io_threads=1, progress=False)
    w = UpscaleWorker(cfg.model_dump(), fingerprint="f" * 16, torch_threads=1)
    for i in range(20):
        (tmp_path / f"{i:02d}.png").write_bytes(_png(_texture(200 + i, h=8, w=8)))
    queued: list[int] = []

    def watch() -> None:
        deadline = threading.Event()
        for _ in range(20):  # the work queue's length while the only I/O thread is stuck in the first upload
            queued.append(w.pool._work_queue.qsize())
            deadline.wait(0.05)
        release.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    root = f"tinyblock:///tiny-block-{tmp_path.name}"
    rows = w(_batch([str(tmp_path / f"{i:02d}.png") for i in range(20)],
                    [f"{root}/{i:02d}.png" for i in range(20)])).to_pylist()  # fmt: skip
    watcher.join()
    assert [r["status"] for r in rows] == ["ok"] * 20
    assert max(queued) <= w.window - 1, queued  # one upload running, the others of the window queued


def test_actor_outside_ray_does_not_start_ray():
    """In a fresh interpreter (this test process may already hold the session's Ray connection): asking for the
    actor's identity outside Ray answers "pid-N" and starts no Ray."""
    import subprocess
    import sys

    code = ("import ray; from srbatch.jobkit.actor import ray_identity; actor, gpus = ray_identity(); "
            "assert actor.startswith('pid-') and gpus == [], (actor, gpus); "
            "assert not ray.is_initialized(), 'ray_identity started Ray'; print('OK')")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ the benchmark


def test_tiny_help_lists_its_options():
    from srbatch.benchmark.cli import main

    with pytest.raises(SystemExit) as e:
        main(["tiny", "--help"])
    assert e.value.code == 0


@pytest.mark.slow
def test_tiny_benchmark_job_equals_the_loop_pixel_for_pixel_and_figures_agree(ray_cluster, capsys):
    from srbatch.benchmark.prepare import Storage
    from srbatch.benchmark.tiny import main

    n = 40
    store = Storage("local")
    try:
        code = main(["--images", str(n), "--size", "32", "--scale", "2", "--model", "bicubic", "--batch-size", "4,16",
                     "--json"], storage=store)  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out
        res = json.loads(out.strip().splitlines()[-1])
        root = Path(store.root)
        names = sorted(p.name for p in (root / "in").iterdir())
        assert len(names) == n
        loop = res["loop"]
        assert loop["images"] == n
        assert loop["images_per_s"] == pytest.approx(n / loop["seconds"])
        assert res["ray"]["how"] == "already connected" and res["ray"]["init_s"] is None
        assert [j["batch_size"] for j in res["jobs"]] == [4, 16]
        for j in res["jobs"]:
            assert j["ok"] == n and j["failed"] == 0 and j["exit_code"] == 0
            assert j["images_per_s"] == pytest.approx(n / j["seconds"])
            assert j["ratio"] == pytest.approx(j["images_per_s"] / loop["images_per_s"])
            assert j["fixed_cost_per_image_s"] == pytest.approx((j["seconds"] - loop["seconds"]) / n)
            assert j["wall_per_image_s"] == pytest.approx(j["seconds"] / n)
            assert j["stage_sum_s"] == pytest.approx(sum(j["stage_means_s"].values()))
            assert 0 < j["startup_s"] <= j["seconds"]
            assert j["same_as_loop"] == {"compared": n, "identical": n, "differ": []}
            assert f"ratio job/loop {j['ratio']:.3f}" in out
            assert f"fixed cost   {j['fixed_cost_per_image_s'] * 1e3:.3f} ms per image" in out
            # every job output equals the loop's, and both the numpy MATLAB bicubic, read here independently
            job_dir = Path(j["output"])
            assert sorted(p.name for p in job_dir.iterdir() if p.name not in ("_manifest", "_srbatch")) == names
            for name in names:
                src = _pixels((root / "in" / name).read_bytes())
                got = _pixels((job_dir / name).read_bytes())
                assert np.array_equal(got, _pixels((root / "loop" / name).read_bytes())), name
                assert np.abs(got.astype(int) - matlab_bicubic(src, 2).astype(int)).max() <= 1, name
        assert f"{loop['images_per_s']:.1f} images/s" in out
    finally:
        store.close()
