"""The staged pipeline (read+decode and encode+write as CPU tasks around the model actors): on a real local Ray cluster
and a real S3 endpoint, in-process stage by stage, and without Ray (run_local). Every output is checked against the
engine's own output for the same input (tests/_expect.py), never only its size."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from _expect import assert_as_engine
from test_job import _jpeg, _png
from srbatch.upscale import UpscaleConfig, read_manifest, run_job
from srbatch.upscale import stages
from srbatch.upscale.manifest import SCHEMA
from srbatch.upscale.worker import UpscaleWorker


def _dataset(seed: int = 0) -> tuple[dict[str, bytes], list[str]]:
    """Textured images of several layouts (two of the same size, so the model stage batches them) and broken files."""
    rng = np.random.default_rng(seed)
    files = {
        "a.png": _png(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)),
        "same.png": _png(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)),
        "b/c.jpg": _jpeg(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)),
        "b/grey.png": _png(rng.integers(0, 256, (9, 11), dtype=np.uint8)),
        "b/rgba.png": _png(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA"),
        "deep.png": _png(rng.integers(0, 65536, (7, 9), dtype=np.uint16)),
    }
    broken = {"broken/truncated.jpg": files["b/c.jpg"][:70], "broken/zero.png": b""}
    return {**files, **broken}, list(broken)


def _out(key: str) -> str:
    return key.rsplit(".", 1)[0] + ".png"


def _local(tmp: Path, files: dict[str, bytes]) -> Path:
    root = tmp / "in"
    for k, v in files.items():
        (root / k).parent.mkdir(parents=True, exist_ok=True)
        (root / k).write_bytes(v)
    return root


@pytest.mark.slow
def test_staged_job_on_s3_writes_the_engine_output_and_resumes(ray_cluster, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    files, broken = _dataset()
    for k, v in files.items():
        fs.pipe_file(f"{s3_bucket}/in/{k}", v)
    base = dict(input=f"s3://{s3_bucket}/in/", output=f"s3://{s3_bucket}/out/", model="bicubic", scale=2,
                progress=False, batch_size=3, pipeline="stages", max_failed_fraction=1.0)  # fmt: skip
    r1 = run_job(UpscaleConfig(**base, run_id="r1"))
    assert (r1.ok, r1.failed, r1.total) == (len(files) - len(broken), len(broken), len(files))
    fs.invalidate_cache()
    for k, v in files.items():
        if k in broken:
            assert not fs.exists(f"{s3_bucket}/out/{_out(k)}")
            continue
        assert_as_engine(fs.cat_file(f"{s3_bucket}/out/{_out(k)}"), v, model="bicubic", scale=2, name=k)
    t = read_manifest(base["output"]).to_pandas().set_index("input_uri")
    assert len(t) == len(files) and t.index.is_unique
    ok = t[t.status == "ok"]
    for col in ("read_s", "decode_s", "infer_s", "encode_s", "write_s", "total_s", "input_width", "output_bytes"):
        assert ok[col].notna().all(), col  # each stage recorded its part
    assert (ok.actor_id.str.len() > 0).all() and (ok.device == "cpu").all() and (ok.model == "bicubic").all()
    assert (ok.output_width == 2 * ok.input_width).all()
    bad = t.loc[[f"s3://{s3_bucket}/in/{k}" for k in broken]]
    assert (bad.status == "failed").all() and (bad.error_type == "ImageDecodeError").all()
    assert all(k.split("/")[-1] in m for k, m in zip(broken, bad.error_message))
    # resume: the good ones are skipped, the broken ones retried; no temp files left
    r2 = run_job(UpscaleConfig(**base, run_id="r2"))
    assert (r2.ok, r2.failed, r2.skipped) == (0, len(broken), len(files) - len(broken))
    assert [p for p in fs.find(f"{s3_bucket}/out") if ".srbatch-tmp-" in p] == []


def test_stages_in_process_match_the_engine_including_images_left_to_the_actor(tmp_path):
    """decode -> model -> encode called one after the other: decoded images go through the model stage batched;
    images the decode stage leaves whole (their bytes, or a large TIFF to read region by region) are finished by the
    actor; a missing file is a failed row; nothing raises."""
    files, broken = _dataset(1)
    root = _local(tmp_path, files)
    out = tmp_path / "out"
    keys = sorted(files) + ["missing.png"]
    items = {"input_uri": [str(root / k) for k in keys], "output_uri": [str(out / _out(k)) for k in keys],
             "run_id": ["r"] * len(keys)}  # fmt: skip
    cfg = UpscaleConfig(input=str(root), output=str(out), model="bicubic", scale=2, progress=False)
    conf = cfg.model_dump()
    decoded = stages.decode_batch(items, config=conf, scale=2.0, budget=2**30)
    rows, kinds, payloads = stages.unpack(decoded)
    assert kinds.count(stages.DECODED) == len(files) - len(broken)
    assert [r["error_type"] for r, k in zip(rows, kinds) if k == stages.DONE] == ["ImageDecodeError"] * 2 + ["StorageError"]
    # hand two images to the actor whole, as the decode stage does for large ones
    jpg, grey = keys.index("b/c.jpg"), keys.index("b/grey.png")
    kinds[jpg], payloads[jpg] = stages.BYTES, files["b/c.jpg"]
    kinds[grey], payloads[grey] = stages.LARGE, None
    worker = UpscaleWorker(conf, fingerprint="f" * 16, torch_threads=1)
    upscaled = worker(stages._columns(stages.pack(rows, kinds, payloads)))
    _, kinds2, _ = stages.unpack(upscaled)
    assert kinds2[jpg] == kinds2[grey] == stages.DONE  # finished by the actor
    assert kinds2.count(stages.UPSCALED) == len(files) - len(broken) - 2
    table = stages.encode_batch(stages._columns(upscaled), config=conf, budget=2**30)
    assert table.schema == SCHEMA and table.num_rows == len(keys)
    got = {r["input_uri"]: r for r in table.to_pylist()}
    for k in keys:
        r = got[str(root / k)]
        if k in broken or k == "missing.png":
            assert r["status"] == "failed" and r["output_uri"] is None and not (out / _out(k)).exists()
            continue
        assert r["status"] == "ok", (k, r["error_message"])
        assert r["fingerprint"] == "f" * 16 and r["model"] == "bicubic" and r["run_id"] == "r"
        assert_as_engine(out / _out(k), files[k], model="bicubic", scale=2, name=k)
    assert worker.up.stats["batches"] < worker.up.stats["images"]  # a.png and same.png went through together


def test_decode_stage_leaves_large_images_to_the_actor():
    """The header decides: decoded samples above DECODED_BYTES, or an output that will be streamed, stay encoded."""
    big = _png(np.zeros((2100, 2100, 3), np.uint8))  # 13 MB decoded: passed decoded at x1, streamed at x4
    small = _png(np.zeros((64, 64, 3), np.uint8))
    huge = _png(np.zeros((2400, 2400, 3), np.uint8))  # 17 MB decoded
    assert not stages._large(small, 4.0, 2**27)
    assert not stages._large(big, 1.0, 2**27)
    assert stages._large(big, 4.0, 2**27)  # 211 MB of output samples: streamed by the actor
    assert stages._large(huge, 1.0, 2**27)
    assert not stages._large(b"not an image", 4.0, 2**27)  # decode_image reports it
    palette = Image.fromarray(np.zeros((2100, 2100), np.uint8), "P")  # 4.4 MB as indices, 13-18 MB decoded
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    assert stages._large(buf.getvalue(), 1.0, 2**27)


def test_run_local_without_ray(tmp_path):
    files, broken = _dataset(2)
    root = _local(tmp_path, files)
    cfg = UpscaleConfig(input=str(root), output=str(tmp_path / "out"), model="bicubic", scale=2, batch_size=2,
                        progress=False)  # fmt: skip
    run = stages.run_local(cfg, cpu_workers=2)
    assert run.rows.num_rows == len(files) and run.seconds > 0 and run.images_per_s > 0
    status = dict(zip(run.rows["input_uri"].to_pylist(), run.rows["status"].to_pylist()))
    for k, v in files.items():
        if k in broken:
            assert status[str(root / k)] == "failed"
        else:
            assert status[str(root / k)] == "ok"
            assert_as_engine(tmp_path / "out" / _out(k), v, model="bicubic", scale=2, name=k)
    assert isinstance(run.rows, pa.Table)


def test_the_quality_audit_is_the_same_in_both_pipelines(tmp_path):
    """--reference self in the model step gives the fused actor's figures (test_job checks those against
    `srbatch evaluate`); numpy metrics survive the hand-over between steps."""
    rng = np.random.default_rng(3)
    root = _local(tmp_path, {"t.png": _png(rng.integers(0, 256, (24, 28, 3), dtype=np.uint8))})
    items = {"input_uri": [str(root / "t.png")], "output_uri": [str(tmp_path / "o" / "t.png")], "run_id": ["r"]}
    conf = UpscaleConfig(input=str(root), output=str(tmp_path / "o"), model="bicubic", scale=2,
                         reference="self").model_dump()  # fmt: skip
    worker = UpscaleWorker(conf, fingerprint="f" * 16, torch_threads=1)
    fused = worker({k: np.array(v, dtype=object) for k, v in items.items()}).to_pylist()[0]
    staged = stages.encode_batch(stages._columns(worker(stages._columns(
        stages.decode_batch(items, config=conf, scale=2.0, budget=2**30)))), config=conf, budget=2**30).to_pylist()[0]
    assert fused["status"] == staged["status"] == "ok"
    for k in ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"):
        assert staged[k] is not None and staged[k] == pytest.approx(fused[k], abs=1e-9), k
    assert 10 < staged["psnr_y"] < 60
