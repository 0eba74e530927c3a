"""The benchmark (srbatch.benchmark behind jobs/benchmark.py). A smoke test of ``python jobs/benchmark.py`` as users
type it: a tiny run through a local S3 server and Ray, in a subprocess. No timing thresholds: only that both
throughputs are measured, the ratio is theirs, and every image went through the job. The steady-state rate is checked
on manifest rows whose answer is worked out by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "jobs" / "benchmark.py"


@pytest.mark.slow
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


def test_steady_state_leaves_out_each_actors_first_batch():
    """Actor a: batches of 2 images end at 10 s, 12 s, 14 s -> 4 images in 4 s after its first batch = 1.0/s.
    Actor b: batches of 1 image end at 11 s, 16 s -> 1 image in 5 s = 0.2/s. Side by side: 1.2 images/s."""
    from srbatch.benchmark.measure import steady_state

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def row(actor: str, at: float) -> dict:
        return {"actor_id": actor, "finished_at": t0 + timedelta(seconds=at), "decode_s": 0.1, "infer_s": 0.5,
                "encode_s": 0.1}  # fmt: skip

    rows = [row("a", t) for t in (10, 10, 12, 12, 14, 14)] + [row("b", t) for t in (11, 16)]
    res = steady_state(rows)
    assert res["images_per_s"] == pytest.approx(1.2)
    assert res["per_actor"]["a"] == {"images": 6, "batches": 3, "images_per_s": pytest.approx(1.0)}
    assert res["per_actor"]["b"]["batches"] == 2
    one = steady_state([row("a", 10), row("a", 10)])  # one batch: no steady state, and the reason says so
    assert one["images_per_s"] is None and "one batch" in one["reason"]


def test_planning_benchmark_reports_the_plan_the_history_implies():
    """``jobs/benchmark.py planning`` as users type it: 300 inputs, 4 past runs, 10% failed in every run. A rerun must
    process exactly the 30 failed inputs and skip the 270 others (nothing refused), and every figure is measured."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "planning", "--inputs", "300", "--runs", "4", "--failed-fraction", "0.1",
         "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert (res["skipped"], res["todo"], res["rejected"], res["total"]) == (270, 30, 0, 300)
    assert res["manifest_rows"] == 1200 and res["state_rows"] == 300 and res["failed"] == 30
    assert res["skipped_rows"] == 270 and res["recovered_runs"] == 0
    for step in ("load_state", "list_outputs", "plan", "write_skipped", "commit_state"):
        assert res["seconds"][step] > 0, step
    assert res["total_s"] >= res["planning_s"] >= sum(res["seconds"][s] for s in ("load_state", "plan")) > 0
    assert 0 < res["rss_before_mib"] <= res["peak_rss_mib"]
    assert res["machine"]["cpus"] >= 1 and res["load_avg_1m"] >= 0
    assert not os.path.exists(res["workdir"])  # removed without --keep
    # inputs, outputs of the ok inputs, one Parquet part per run, one record per run, the state
    assert res["files"] == 300 + 270 + 4 * 1 + 4 + 1
    assert "30 to process, 270 skipped, 0 refused" in proc.stdout


def test_planning_history_is_the_jobs_own_manifest_and_a_no_change_rerun(tmp_path, capsys):
    """The synthetic history read by ``srbatch.read_manifest``: R x N rows of the job's schema, N per run. And the job
    itself agrees it is a no-change rerun: ``run_job`` with the same configuration skips all N inputs (no Ray needed,
    since nothing is left to do) and adds one run of N skipped rows."""
    import pyarrow.compute as pc

    import srbatch
    from srbatch.benchmark.planning import MODEL, SCALE, make_history, run_ids
    from srbatch.upscale import MANIFEST_SCHEMA, UpscaleConfig, run_job

    n, runs = 40, 3
    made = make_history(str(tmp_path), n, runs, 0.0)
    table = srbatch.read_manifest(made["output"])
    assert table.num_rows == runs * n
    assert table.schema.equals(MANIFEST_SCHEMA)
    counts = table.group_by("run_id").aggregate([("input_uri", "count_distinct")]).to_pylist()
    assert sorted((c["run_id"], c["input_uri_count_distinct"]) for c in counts) == [(r, n) for r in run_ids(runs)]
    assert set(pc.unique(table["fingerprint"]).to_pylist()) == {made["fingerprint"]}
    first, *later = run_ids(runs)  # run 0 processed everything; later runs carried the rows over, as the job does
    statuses = {(r["run_id"], r["status"]) for r in table.select(["run_id", "status"]).to_pylist()}
    assert statuses == {(first, "ok")} | {(r, "skipped") for r in later}

    cfg = UpscaleConfig(input=made["input"], output=made["output"], model=MODEL, scale=SCALE, run_id="rerun",
                        progress=False)  # fmt: skip
    res = run_job(cfg)
    assert (res.skipped, res.ok, res.failed, res.exit_code) == (n, 0, 0, 0)
    after = srbatch.read_manifest(made["output"])
    assert after.num_rows == (runs + 1) * n
    assert after.filter(pc.equal(after["run_id"], "rerun"))["status"].unique().to_pylist() == ["skipped"]
