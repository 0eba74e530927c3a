"""Planning benchmark: how long the upscale job's driver takes, and how much memory it needs, to decide what a rerun
does, for N inputs and a manifest history of R past runs.

    python jobs/benchmark.py planning --inputs 100000 --runs 10
    python jobs/benchmark.py planning --inputs 300 --runs 4 --failed-fraction 0.1 --json

Synthetic data on local disk under ``--workdir`` (a temporary folder by default, removed at the end unless
``--keep``): N empty ``.png`` inputs (the job lists by extension and never opens a file while planning), the N outputs
of a finished job, and R past runs of the manifest in the job's own layout and schema (``run=<id>/part-*.parquet``,
5000 rows a part as the job's writer writes them, written with pyarrow directly for speed). Run 0 processed every
input ``ok``; runs 1..R-1 carried them over as ``skipped`` rows (copied as the job copies them); a ``--failed-fraction``
of the inputs failed in every run, so they have no output. The run state (``_srbatch/state.parquet``) and run records
are written as the job leaves them after its last run. A rerun with the job's own configuration therefore processes
exactly the failed inputs and skips the others; the benchmark checks that the plan says so.

The measurement runs in a fresh Python process (so its peak memory is the planning's alone) and calls, in order, what
:func:`srbatch.upscale.run_job` calls before any Ray work: the model identity and fingerprint, the run state
(:class:`~srbatch.upscale.state.RunState` ``.load``), the output listing with its temp-file sweep,
:func:`~srbatch.upscale.plan.make_plan` (input listing and the Arrow join); then what it does at the end of a run: the
skipped inputs' manifest rows and the new state (the run folder is removed afterwards, so the history stays R runs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = ["build_parser", "main", "make_history", "run_ids"]

FILES_PER_FOLDER = 1000
MODEL, SCALE = "bicubic", 4  # a weight-free model: its identity costs nothing to load, as a checkpoint's would not
MEASURED_RUN = "bench-planning"
PLANNING_STEPS = ("model", "load_state", "list_outputs", "plan")
STEPS = (*PLANNING_STEPS, "write_skipped", "commit_state")


def build_parser(prog: str = "jobs/benchmark.py planning") -> argparse.ArgumentParser:
    """The planning benchmark's argument parser."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Measure the upscale job's planning on the driver (manifest read, latest rows, input listing and "
        "plan) for N synthetic inputs and a manifest history of R past runs: wall seconds per step and the driver "
        "process's peak RSS.",
        epilog="The data is made on local disk (empty .png inputs, their outputs, R runs x N manifest rows in the "
        "job's layout and schema); the measurement runs in a fresh process. Exit codes: 0 done, 1 the plan is not "
        "the one the synthetic history implies, 2 bad arguments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--inputs", "-n", type=int, required=True, help="number of input images (N)")
    p.add_argument("--runs", "-r", type=int, required=True, help="number of past runs in the manifest (R)")
    p.add_argument("--failed-fraction", type=float, default=0.0,
                   help="fraction of the inputs that failed in every past run (the rerun's work)")  # fmt: skip
    p.add_argument("--workdir", default=None, help="folder for the synthetic data [a new temporary folder]")
    p.add_argument("--keep", action="store_true", help="keep the synthetic data (default: removed at the end)")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON object (last line)")
    return p


def run_ids(runs: int) -> list[str]:
    """The ids of the synthetic past runs, oldest first (the job's format: UTC time, one day apart)."""
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return [(t0 + timedelta(days=r)).strftime("%Y%m%dT%H%M%SZ") for r in range(runs)]


def _keys(n: int) -> list[str]:
    return [f"d{i // FILES_PER_FOLDER:04d}/img{i:07d}" for i in range(n)]


def _failed(n: int, fraction: float) -> list[int]:
    k = int(round(n * fraction))
    return sorted(random.Random(0).sample(range(n), k))


def _touch_all(root: str, keys: list[str], skip: set[int]) -> None:
    made = set()
    for i, k in enumerate(keys):
        if i in skip:
            continue
        d = os.path.join(root, k.split("/", 1)[0])
        if d not in made:
            os.makedirs(d, exist_ok=True)
            made.add(d)
        open(os.path.join(root, k + ".png"), "wb").close()


def make_history(workdir: str, inputs: int, runs: int, failed_fraction: float = 0.0) -> dict[str, Any]:
    """Write the synthetic inputs (``<workdir>/in``), outputs and manifest (``<workdir>/out``). Returns what was made:
    the input and output folders, the failed inputs' indices and the fingerprint written in the rows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from srbatch.io.storage import join_uri
    from srbatch.upscale.manifest import FLUSH_ROWS, SCHEMA, part_name, run_uri
    from srbatch.upscale.plan import fingerprint
    from srbatch.upscale.runner import _model_identity
    from srbatch.upscale.state import RunState, fold

    in_dir = os.path.abspath(os.path.join(workdir, "in"))
    out_dir = os.path.abspath(os.path.join(workdir, "out"))
    cfg = _config(in_dir, out_dir)
    ident, _desc = _model_identity(cfg)
    fp = fingerprint(cfg, ident)
    keys = _keys(inputs)
    failed = _failed(inputs, failed_fraction)
    failed_set = set(failed)
    _touch_all(in_dir, keys, set())
    _touch_all(out_dir, keys, failed_set)  # a failed input has no output

    n = inputs
    is_failed = pa.array([i in failed_set for i in range(n)])
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def const(v: Any, typ: pa.DataType) -> pa.Array:
        return pa.array([v] * n, typ)

    def masked(values: pa.Array, typ: pa.DataType, keep_failed: bool) -> pa.Array:
        """``values`` on the ok rows and null on the failed ones (or the opposite with ``keep_failed``)."""
        mask = is_failed if not keep_failed else pc.invert(is_failed)
        return pc.if_else(mask, pa.nulls(n, typ), values)

    input_uri = pa.array([f"{in_dir}/{k}.png" for k in keys], pa.string())
    output_uri = pa.array([join_uri(out_dir, k + ".png") for k in keys], pa.string())
    first = {  # run 0: every input processed (ok), the failed ones failed
        "input_uri": input_uri,
        "output_uri": masked(output_uri, pa.string(), False),
        "input_width": const(256, pa.int32()), "input_height": const(256, pa.int32()),
        "input_mode": const("RGB", pa.string()), "input_bytes": const(150_000, pa.int64()),
        "output_width": masked(const(1024, pa.int32()), pa.int32(), False),
        "output_height": masked(const(1024, pa.int32()), pa.int32(), False),
        "output_mode": masked(const("RGB", pa.string()), pa.string(), False),
        "output_bytes": masked(const(2_000_000, pa.int64()), pa.int64(), False),
        "model": const(ident["name"], pa.string()), "architecture": const(ident["architecture"], pa.string()),
        "model_sha256": const(ident["sha256"], pa.string()), "scale": const(float(SCALE), pa.float64()),
        "dtype": const("float32", pa.string()), "device": const("cpu", pa.string()),
        "gpu_ids": const(None, pa.string()), "fingerprint": const(fp, pa.string()),
        "psnr_y": const(None, pa.float64()), "ssim_y": const(None, pa.float64()),
        "psnr_rgb": const(None, pa.float64()), "ssim_rgb": const(None, pa.float64()),
        "tile_height": const(None, pa.int32()), "tile_width": const(None, pa.int32()),
        "tile_exact": const(None, pa.bool_()),
        "finished_at": pa.array([t0 + timedelta(microseconds=i) for i in range(n)], pa.timestamp("us", tz="UTC")),
    }  # fmt: skip
    error_type = masked(const("DecodeError", pa.string()), pa.string(), True)
    error_message = masked(const("cannot identify image file (synthetic)", pa.string()), pa.string(), True)
    status_first = pa.array(["failed" if i in failed_set else "ok" for i in range(n)], pa.string())
    status_later = pa.array(["failed" if i in failed_set else "skipped" for i in range(n)], pa.string())
    timing = pa.array([0.01 * (1 + i % 7) for i in range(n)], pa.float64())
    ids = run_ids(runs)
    store = RunState(out_dir)
    state = None
    for r, run_id in enumerate(ids):
        cols = dict(first)
        cols["run_id"] = const(run_id, pa.string())
        cols["status"] = status_first if r == 0 else status_later
        cols["error_type"], cols["error_message"] = error_type, error_message
        # The job copies a skipped row from the input's latest outcome (the state), clears actor and timings and
        # stamps it with the run's time; a failed input is worked on again, so its row is new.
        actor = const(uuid.UUID(int=r + 1).hex, pa.string())
        cols["actor_id"] = actor if r == 0 else masked(actor, pa.string(), True)
        for c in ("read_s", "decode_s", "infer_s", "encode_s", "write_s", "total_s"):
            cols[c] = timing if r == 0 else masked(timing, pa.float64(), True)
        if r:
            later = pa.array([t0 + timedelta(days=r, microseconds=i) for i in range(n)], pa.timestamp("us", tz="UTC"))
            cols["finished_at"] = later
        # Columns the synthetic history does not model (NIQE, the video columns) are null, as in image runs
        # without --quality-metric.
        table = pa.table([cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in SCHEMA], schema=SCHEMA)
        folder = run_uri(out_dir, run_id)
        os.makedirs(folder, exist_ok=True)
        token = uuid.UUID(int=r + 1).hex[:8]
        for seq, start in enumerate(range(0, n, FLUSH_ROWS)):
            pq.write_table(table.slice(start, FLUSH_ROWS), os.path.join(folder, part_name(seq, token)),
                           compression="zstd")  # fmt: skip
        outcomes = table if r == 0 else table.filter(is_failed)
        state = fold(state, outcomes)
        store.write_run_record(run_id, {"run_id": run_id, "complete": True, "total": n,
                                        "ok": n - len(failed) if r == 0 else 0, "failed": len(failed),
                                        "skipped": 0 if r == 0 else n - len(failed)})  # fmt: skip
    store.write_state(state, ids)  # as the job leaves it after its last run
    return {"input": in_dir, "output": out_dir, "failed": failed, "fingerprint": fp}


def _config(in_dir: str, out_dir: str) -> Any:
    from srbatch.upscale.config import UpscaleConfig

    return UpscaleConfig(input=in_dir, output=out_dir, model=MODEL, scale=SCALE, run_id=MEASURED_RUN, progress=False)


def _rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its peak (``VmHWM``), in MiB.

    The peak is read from ``VmHWM``, not ``getrusage().ru_maxrss``: on Linux ``ru_maxrss`` survives ``exec``, so a
    child started by ``subprocess`` (vfork + exec) reports its parent's peak when that was higher (the parent had
    just built the synthetic history)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _measure(in_dir: str, out_dir: str) -> dict[str, Any]:
    """The planning of :func:`srbatch.upscale.run_job`, step by step, in this (fresh) process, and its end-of-run
    state update (for a no-change rerun: no Ray work in between)."""
    from srbatch.upscale.manifest import ManifestWriter, run_uri
    from srbatch.upscale.plan import existing_outputs, fingerprint, make_plan
    from srbatch.upscale.runner import _model_identity, _sweep_temp_files
    from srbatch.upscale.state import RunState

    cfg = _config(in_dir, out_dir)
    so = cfg.fs_options()
    import srbatch.models.loader  # noqa: F401  (imported before the baseline, as a job's driver has it loaded)

    rss_before = _rss_mib()
    sec: dict[str, float] = {}
    t = time.perf_counter()
    ident, desc = _model_identity(cfg)
    fp = fingerprint(cfg, ident)
    sec["model"] = time.perf_counter() - t
    t = time.perf_counter()
    store = RunState(cfg.output, so)
    loaded = store.load(reopen=cfg.run_id)
    sec["load_state"] = time.perf_counter() - t
    t = time.perf_counter()
    outputs = _sweep_temp_files(existing_outputs(cfg.output, so), cfg)
    sec["list_outputs"] = time.perf_counter() - t
    t = time.perf_counter()
    plan = make_plan(cfg, fp, loaded.table, outputs=outputs)
    del outputs
    sec["plan"] = time.perf_counter() - t
    t = time.perf_counter()
    writer = ManifestWriter(cfg.output, cfg.run_id, so, flush_seconds=cfg.manifest_flush_seconds)
    for rows in store.skipped_tables(plan.done, cfg.run_id):
        writer.add_table(rows)
    writer.close()
    sec["write_skipped"] = time.perf_counter() - t
    t = time.perf_counter()
    store.merge(writer.outcome_table(), [*loaded.folded_runs, cfg.run_id])
    sec["commit_state"] = time.perf_counter() - t
    shutil.rmtree(run_uri(cfg.output, cfg.run_id), ignore_errors=True)  # the history stays R runs
    peak = _rss_mib("VmHWM")
    return {
        "seconds": sec,
        "total_s": sum(sec.values()),
        "planning_s": sum(sec[s] for s in PLANNING_STEPS),
        "state_rows": loaded.table.num_rows,
        "recovered_runs": len(loaded.recovered_runs),
        "total": plan.total,
        "todo": plan.todo.num_rows,
        "skipped": len(plan.done),
        "skipped_rows": writer.rows_written,
        "rejected": len(plan.rejected),
        "fingerprint": fp,
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak,
    }


def _du(path: str) -> tuple[int, int]:
    """Bytes on disk (allocated blocks, folders included) and number of files under ``path``."""
    total, files = 0, 0
    for dirpath, _dirs, names in os.walk(path):
        total += os.stat(dirpath).st_blocks * 512
        for f in names:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_blocks * 512
                files += 1
            except OSError:
                pass
    return total, files


def render(res: dict[str, Any]) -> str:
    """The printed table."""
    m = res["machine"]
    rows = [
        ("machine", f"{m['cpu']}, {m['cpus']} CPUs, load avg {res['load_avg_1m']:.2f} at start; torch {m['torch']}, "
                    f"Python {m['python']}"),
        ("history", f"{res['inputs']} inputs x {res['runs']} past runs = {res['manifest_rows']} manifest rows "
                    f"({res['manifest_mib']:.1f} MiB of Parquet); {res['failed']} inputs failed in every run"),
        ("synthetic data", f"{res['files']} files, {res['disk_mib']:.1f} MiB on disk, made in {res['make_s']:.1f} s "
                           f"under {res['workdir']}" + ("" if res["kept"] else " (removed)")),
        ("", ""),
    ]  # fmt: skip
    rows += [(step, f"{res['seconds'][step]:9.3f} s") for step in STEPS]
    rows += [
        ("planning", f"{res['planning_s']:9.3f} s  (model .. plan: before any Ray work)"),
        ("total", f"{res['total_s']:9.3f} s  (+ the skipped rows and the state written at the end of the run)"),
        ("plan", f"{res['todo']} to process, {res['skipped']} skipped, {res['rejected']} refused"),
        ("driver RSS", f"{res['rss_before_mib']:.0f} MiB before planning (imports), "
                       f"peak {res['peak_rss_mib']:.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["srbatch benchmark planning: the upscale job's driver deciding a rerun (fresh process)"]
    lines += [f"  {k:<{width}}  {v}".rstrip() for k, v in rows]
    if res["load_avg_1m"] >= 0.5 * m["cpus"]:
        lines.append(f"  WARNING: the 1-minute load average was {res['load_avg_1m']:.2f} on {m['cpus']} CPUs at the "
                     "start: other processes competed for the CPUs, so the times are not reliable")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str = "jobs/benchmark.py planning") -> int:
    """Run the planning benchmark; returns the exit code (0 done, 1 wrong plan, 2 bad arguments)."""
    p = build_parser(prog)
    a = p.parse_args(argv)
    if a.inputs < 1 or a.runs < 1:
        p.error("--inputs and --runs must be at least 1")
    if not 0 <= a.failed_fraction <= 1:
        p.error(f"--failed-fraction must be between 0 and 1; got {a.failed_fraction}")
    from srbatch.benchmark.report import machine_info

    made_dir = a.workdir is None
    workdir = tempfile.mkdtemp(prefix="srbatch-planning-") if made_dir else a.workdir
    if not made_dir and any(os.path.exists(os.path.join(workdir, d)) for d in ("in", "out")):
        p.error(f"{workdir} already holds an in/ or out/ folder; give an empty or new --workdir")
    os.makedirs(workdir, exist_ok=True)
    load = os.getloadavg()[0]  # before this benchmark's own work (making the data keeps a CPU busy)
    try:
        t = time.perf_counter()
        made = make_history(workdir, a.inputs, a.runs, a.failed_fraction)
        make_s = time.perf_counter() - t
        proc = subprocess.run(
            [sys.executable, "-c", "import json, sys; from srbatch.benchmark.planning import _measure; "
             "print(json.dumps(_measure(sys.argv[1], sys.argv[2])))", made["input"], made["output"]],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            print(f"benchmark planning: the measuring process failed (exit {proc.returncode}):\n{proc.stderr}",
                  file=sys.stderr)  # fmt: skip
            return 1
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        manifest_bytes, _ = _du(os.path.join(made["output"], "_manifest"))
        disk, files = _du(workdir)
    finally:
        if not a.keep:  # only what this run made: a --workdir given by the user stays, emptied of in/ and out/
            for d in ([workdir] if made_dir else [os.path.join(workdir, "in"), os.path.join(workdir, "out")]):
                shutil.rmtree(d, ignore_errors=True)
    n_failed = len(made["failed"])
    res.update(
        inputs=a.inputs, runs=a.runs, failed=n_failed, manifest_rows=a.inputs * a.runs, make_s=make_s, workdir=workdir, kept=a.keep,
        manifest_mib=manifest_bytes / 2**20, disk_mib=disk / 2**20, files=files, load_avg_1m=load,
        machine=machine_info("cpu"),
    )  # fmt: skip
    print(render(res), flush=True)
    code = 0
    want = {"todo": n_failed, "skipped": a.inputs - n_failed, "rejected": 0, "total": a.inputs,
            "state_rows": a.inputs, "recovered_runs": 0, "fingerprint": made["fingerprint"]}  # fmt: skip
    wrong = {k: (res[k], v) for k, v in want.items() if res[k] != v}
    if wrong:
        print(f"benchmark planning: the plan is not what the history implies (got, expected): {wrong}", file=sys.stderr)
        code = 1
    if a.json:
        print(json.dumps(res), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
