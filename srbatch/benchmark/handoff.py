"""Hand-off benchmark: the driver's memory and time to hand N tasks to Ray Data and take N result rows back, as the
upscale job does, with an actor that does no work (so only the hand-off is measured).

    python jobs/benchmark.py handoff --items 1000000
    python jobs/benchmark.py handoff --items 100000 --mode dicts --json

``--mode arrow`` (the job's way): :func:`srbatch.jobkit.pool.run_actor_pool` on an Arrow table of (input_uri,
output_uri, run_id), Ray Data blocks made from slices of it, result rows handed back as Arrow batches, the driver
keeping only the set of keys that came back.
``--mode dicts`` (the way before issue 14, kept here for comparison): a Python dict per task, ``ray.data.from_items``
with one block per batch, and a dict of pending tasks on the driver. Each mode runs in a fresh driver process against
a local Ray cluster started for the run (2 CPUs by default), and reports its peak RSS (``VmHWM``; the driver's
pages of Ray's object store it wrote count in it) and seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

__all__ = ["build_parser", "main", "NoWork"]


class NoWork:
    """A map_batches callable that returns one ``ok`` row per task without touching any file."""

    def __init__(self, torch_threads: int | None = None) -> None:
        self.torch_threads = torch_threads

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = len(batch["input_uri"])
        return {"input_uri": batch["input_uri"], "status": ["ok"] * n, "output_uri": batch["output_uri"]}


def _rss_mib(field: str = "VmRSS") -> float:
    """Resident memory (``VmRSS``) or its peak (``VmHWM``, which unlike ``ru_maxrss`` does not carry a parent's peak
    over ``exec``), in MiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _tasks(n: int) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    i = pa.array(range(n), pa.int64()).cast(pa.string())
    key = pc.binary_join_element_wise(pc.utf8_lpad(i, 7, "0"), ".png", "")
    uri = pc.binary_join_element_wise("s3://photos/raw/d", key, "")
    out = pc.binary_join_element_wise("s3://photos/x4/d", key, "")
    return pa.table({"input_uri": uri, "output_uri": out, "run_id": pa.repeat(pa.scalar("bench-handoff"), n)})


def _measure(mode: str, n: int, batch_size: int, cpus: int) -> dict[str, Any]:
    """One mode in this (fresh) process."""
    import ray

    from srbatch.jobkit.cluster import ray_env_defaults
    from srbatch.jobkit.pool import run_actor_pool
    from srbatch.jobkit.resources import ActorResources

    ray_env_defaults()  # before Ray is imported: every port on 127.0.0.1
    t = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_start_s = time.perf_counter() - t
    import ray.data  # noqa: F401  (imported before the baseline: the job's driver has it loaded)

    rss_before = _rss_mib()
    rs = ActorResources(actors=1, max_actors=1, gpus_per_actor=0, cpus_per_actor=0.5, torch_threads=1)
    seen = 0

    def on_row(row: dict[str, Any]) -> None:
        nonlocal seen
        seen += 1

    def on_batch(batch: Any) -> None:
        nonlocal seen
        seen += batch.num_rows

    def lost(item: Any, error_type: str, message: str) -> dict[str, Any]:
        return {"input_uri": item["input_uri"], "status": "failed"}

    t = time.perf_counter()
    table = _tasks(n)
    if mode == "arrow":
        run_actor_pool(table, key="input_uri", actor=NoWork, actor_kwargs={}, resources=rs, batch_size=batch_size,
                       on_row=on_row, on_batch=on_batch, lost_row=lost, progress=False)  # fmt: skip
    else:
        _dicts_handoff(table.to_pylist(), batch_size, rs, on_row)
    del table
    seconds = time.perf_counter() - t
    peak = _rss_mib("VmHWM")
    ray.shutdown()
    return {"mode": mode, "items": n, "rows": seen, "seconds": seconds, "ray_start_s": ray_start_s,
            "rss_before_mib": rss_before, "peak_rss_mib": peak}  # fmt: skip


def _dicts_handoff(items: list[dict[str, Any]], batch_size: int, rs: Any, on_row: Any) -> None:
    """The hand-off as the job did it before issue 14: dicts, ``from_items``, a pending dict."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    pending = {str(it["input_uri"]): it for it in items}
    blocks = max(1, min(len(items), math.ceil(len(items) / batch_size)))
    ds = ray.data.from_items([dict(it) for it in items], override_num_blocks=blocks).map_batches(
        NoWork, fn_constructor_kwargs={"torch_threads": 1}, batch_size=batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(min_size=rs.actors, max_size=rs.max_actors), **rs.remote_args(),
    )  # fmt: skip
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        for row in batch.to_pylist():
            if pending.pop(str(row["input_uri"]), None) is not None:
                on_row(row)


def build_parser(prog: str = "jobs/benchmark.py handoff") -> argparse.ArgumentParser:
    """The hand-off benchmark's argument parser."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Measure the driver's peak memory and time to hand N tasks to Ray Data and take N rows back, "
        "with an actor that does no work: the job's Arrow hand-off, or the earlier dict hand-off for comparison.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--items", "-n", type=int, default=1_000_000, help="number of tasks")
    p.add_argument("--mode", choices=["arrow", "dicts", "both"], default="both",
                   help="arrow: the job's hand-off; dicts: the hand-off before issue 14")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, help="tasks per actor call (the job's --batch-size)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster started for the run")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON object (last line)")
    return p


def main(argv: list[str] | None = None, *, prog: str = "jobs/benchmark.py handoff") -> int:
    """Run the hand-off benchmark; 0 done, 1 a mode lost rows or failed, 2 bad arguments."""
    p = build_parser(prog)
    a = p.parse_args(argv)
    if a.items < 1 or a.batch_size < 1 or a.cpus < 1:
        p.error("--items, --batch-size and --cpus must be at least 1")
    from srbatch.benchmark.report import machine_info

    load = os.getloadavg()[0]
    results = []
    code = 0
    for mode in (["arrow", "dicts"] if a.mode == "both" else [a.mode]):
        proc = subprocess.run(
            [sys.executable, "-c", "import json, sys; from srbatch.benchmark.handoff import _measure; "
             "print(json.dumps(_measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))",
             mode, str(a.items), str(a.batch_size), str(a.cpus)],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            print(f"benchmark handoff: mode {mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
                  file=sys.stderr)  # fmt: skip
            code = 1
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        if res["rows"] != a.items:
            print(f"benchmark handoff: mode {mode} handed back {res['rows']} rows for {a.items} tasks", file=sys.stderr)
            code = 1
        results.append(res)
    m = machine_info("cpu")
    print(f"srbatch benchmark handoff: {a.items} tasks through Ray Data and back (no work per task), batch size "
          f"{a.batch_size}, local Ray with {a.cpus} CPUs")  # fmt: skip
    print(f"  machine  {m['cpu']}, {m['cpus']} CPUs, load avg {load:.2f} at start; Python {m['python']}")
    for r in results:
        print(f"  {r['mode']:<6} {r['seconds']:8.2f} s ({r['items'] / r['seconds']:,.0f} tasks/s)   driver RSS "
              f"{r['rss_before_mib']:.0f} MiB after Ray start -> peak {r['peak_rss_mib']:.0f} MiB "
              f"(+{r['peak_rss_mib'] - r['rss_before_mib']:.0f} MiB)")  # fmt: skip
    if a.json:
        print(json.dumps({"items": a.items, "batch_size": a.batch_size, "load_avg_1m": load, "results": results}))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
