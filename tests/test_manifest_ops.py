"""`srbatch manifest` (summary, failures, show, compact) over histories written in the job's own layout: manifest parts
by :class:`ManifestWriter`, the run state and run records by :class:`RunState`, folded as the job's driver does.

Every expectation is computed independently of srbatch's functions: pandas or DuckDB over the Parquet files under
``_manifest/``, file hashes for what must stay untouched."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from srbatch.upscale.manifest import SCHEMA, ManifestWriter, empty_row
from srbatch.upscale.ops import CompactionRefused, NothingToRead, compact, failures, show, summarize
from srbatch.upscale.state import COMPACTED_KEY, RunState, fold

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
IN = "s3://photos/in/"


def uri(i: int | str) -> str:
    return f"{IN}img{i:03d}.png" if isinstance(i, int) else f"{IN}{i}"


# ------------------------------------------------------------------------------------------- histories, as the job


class History:
    """Writes runs the way the job's driver does: ``RunState.load`` (folding runs that ended without updating the
    state), the run's rows through ``ManifestWriter`` (outcomes row by row, skipped rows as one table), then the
    state, the records of recovered runs and the run's own record. ``commit=False``: a run killed before its end."""

    def __init__(self, output: str, storage_options: dict | None = None) -> None:
        self.output = output
        self.so = storage_options
        self.store = RunState(output, storage_options)
        self.order: list[str] = []

    def run(self, run_id: str, hour: int, outcomes: dict[str, list[str]], *, skip_rest: bool = True,
            commit: bool = True, record: bool = True) -> None:  # fmt: skip
        started = T0 + timedelta(hours=hour)
        loaded = self.store.load(reopen=run_id)
        w = ManifestWriter(self.output, run_id, self.so, flush_rows=7)
        counts = {"ok": 0, "failed": 0, "skipped": 0}
        if skip_rest:  # the inputs not worked on whose latest outcome is ok: carried over as skipped rows
            prev = loaded.table.filter(pc.invert(pc.is_in(loaded.table["input_uri"], pa.array(list(outcomes)))))
            done = prev.filter(pc.equal(prev["status"], "ok"))["input_uri"]
            ts = SCHEMA.field("finished_at").type
            for t in self.store.skipped_tables(done.combine_chunks(), run_id):  # as the job writes them
                at = t.schema.get_field_index("finished_at")
                t = t.set_column(at, SCHEMA.field("finished_at"),
                                 pa.repeat(pa.scalar(started + timedelta(seconds=0.5), ts), t.num_rows))
                w.add_table(t)
                counts["skipped"] += t.num_rows
        for k, (u, statuses) in enumerate(sorted(outcomes.items())):
            for j, status in enumerate(statuses):
                when = started + timedelta(seconds=k + 1, milliseconds=j)
                err = {}
                if status == "failed":
                    err = {"error_type": "ImageDecodeError", "error_message": f"bad {u} in {run_id} #{j}"}
                w.add(empty_row(run_id=run_id, input_uri=u, output_uri=u.replace("/in/", "/out/"), status=status,
                                finished_at=when, fingerprint="fp1", model="bicubic", total_s=0.01 * (k + 1),
                                input_bytes=1000 + k, **err))  # fmt: skip
                counts[status] += 1
        w.close()
        self.order.append(run_id)
        if not commit:
            return
        self.store.merge(w.outcome_table(), [*loaded.folded_runs, run_id])  # as the job commits
        for rid, c in loaded.recovered_counts.items():
            self.store.write_run_record(rid, {"run_id": rid, "complete": False, "recovered_by": run_id, **c})
        if record:
            total = sum(counts.values())
            self.store.write_run_record(run_id, {
                "run_id": run_id, "complete": True, "interrupted": False, "started_at": started.isoformat(),
                "finished_at": (started + timedelta(minutes=2)).isoformat(), "seconds": 120.0, "total": total,
                **counts, "throughput": round((counts["ok"] + counts["failed"]) / 100.0, 4),
            })  # fmt: skip


def standard_history(output: str, so: dict | None = None) -> History:
    """Six runs, chronological order = build order; run ids deliberately not in that order when sorted by name.

    nightly-b: 30 inputs (every i % 7 == 3 fails) + img001.png.orig; nightly-a: retries (those < 15 now ok), five new
    (032 fails), img005 attempted twice (failed, then ok: a superseded attempt); manual-x: no record but folded (a run
    of an earlier srbatch), three new (036 fails); nightly-d: killed before its end (its record is written by the next
    run); nightly-c: folds nightly-d; crash-z: killed, not folded, no record.
    """
    h = History(output, so)
    first = {uri(i): ["failed" if i % 7 == 3 else "ok"] for i in range(30)}
    first[uri("img001.png.orig")] = ["ok"]
    h.run("nightly-b", 0, first)
    second = {uri(i): ["ok" if i < 15 else "failed"] for i in range(30) if i % 7 == 3}
    second.update({uri(i): ["failed" if i == 32 else "ok"] for i in range(30, 35)})
    second[uri(5)] = ["failed", "ok"]
    h.run("nightly-a", 1, second)
    h.run("manual-x", 2, {uri(i): ["failed" if i == 36 else "ok"] for i in range(35, 38)}, record=False)
    h.run("nightly-d", 3, {uri(38): ["ok"], uri(39): ["ok"], uri(3): ["failed"], uri(17): ["ok"]}, commit=False)
    h.run("nightly-c", 4, {uri(24): ["ok"], uri(36): ["failed"]})
    h.run("crash-z", 5, {uri(10): ["failed"], uri(40): ["ok"]}, commit=False)
    return h


# --------------------------------------------------------------------------------------------- independent readers


def manifest_frame(output: Path, runs: list[str] | None = None) -> pd.DataFrame:
    """Every row under ``_manifest/``, read file by file with pandas (optionally only the partitions of ``runs``)."""
    files = sorted(glob.glob(str(output / "_manifest" / "run=*" / "*.parquet")))
    if runs is not None:
        files = [f for f in files if Path(f).parent.name.removeprefix("run=") in runs]
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def latest_outcome(df: pd.DataFrame) -> pd.DataFrame:
    """Per input, the row of status ok/failed with the greatest finished_at."""
    out = df[df.status.isin(["ok", "failed"])].sort_values(["input_uri", "finished_at"], kind="stable")
    return out.groupby("input_uri", as_index=False).tail(1).sort_values("input_uri").reset_index(drop=True)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def frame(t: pa.Table) -> pd.DataFrame:
    return t.to_pandas().sort_values("input_uri").reset_index(drop=True)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "srbatch", "manifest", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120)  # fmt: skip


# --------------------------------------------------------------------------------------------------------- summary


def test_summary_counts_per_run_equal_duckdb_and_order_is_chronological(tmp_path):
    import duckdb

    out = tmp_path / "out"
    h = standard_history(str(out))
    s = summarize(str(out))
    assert [r.run_id for r in s.runs] == h.order  # newest last, by start time, not by name
    got = {r.run_id: (r.total, r.ok, r.failed, r.skipped) for r in s.runs}
    rows = duckdb.sql(
        f"select run_id, count(*) n, count(*) filter (status = 'ok') ok, count(*) filter (status = 'failed') failed, "
        f"count(*) filter (status = 'skipped') skipped from read_parquet('{out}/_manifest/**/*.parquet') group by 1"
    ).fetchall()
    assert got == {r[0]: tuple(r[1:]) for r in rows}
    status = {r.run_id: (r.status, r.source) for r in s.runs}
    assert status == {"nightly-b": ("complete", "record"), "nightly-a": ("complete", "record"),
                      "manual-x": ("no record", "parts"), "nightly-d": ("crashed", "parts"),
                      "nightly-c": ("complete", "record"), "crash-z": ("crashed", "parts")}  # fmt: skip
    nb = next(r for r in s.runs if r.run_id == "nightly-b")
    assert (nb.seconds, nb.throughput, nb.started) == (120.0, 0.31, T0)
    # the state now (crash-z's rows counted although not folded yet): pandas' latest outcome per input
    latest = latest_outcome(manifest_frame(out))
    assert (s.state["inputs"], s.state["ok"], s.state["failed"]) == (
        len(latest), int((latest.status == "ok").sum()), int((latest.status == "failed").sum()))
    assert s.state["pending"] == ["crash-z"] and s.state["has_state"]
    assert [r.run_id for r in summarize(str(out), last=2).runs] == ["nightly-c", "crash-z"]
    text = s.text()
    assert "crash-z" in text and "crashed*" in text and "no complete run record" in text


def test_summary_marks_a_run_with_a_fresh_marker_as_running(tmp_path):
    out = tmp_path / "out"
    h = standard_history(str(out))
    h.store.mark_active("crash-z", T0)
    s = summarize(str(out))
    assert {r.run_id: r.status for r in s.runs}["crash-z"] == "running"


# -------------------------------------------------------------------------------------------------------- failures


def test_failures_equal_a_pandas_query(tmp_path):
    out = tmp_path / "out"
    standard_history(str(out))
    df = manifest_frame(out)
    latest = latest_outcome(df)
    want = latest[latest.status == "failed"].sort_values(["finished_at", "input_uri"], ascending=[False, True])
    f = failures(str(out), limit=None)
    got = f.rows.to_pandas()
    assert f.total == len(want) == 4
    cols = ["input_uri", "error_type", "error_message", "run_id", "finished_at"]
    pd.testing.assert_frame_equal(got[cols].reset_index(drop=True), want[cols].reset_index(drop=True))
    assert uri(10) in set(got.input_uri) and any("crash-z" in n for n in f.notes)  # the unfolded run counts
    assert uri(3) in set(got.input_uri)  # failed again in the killed run nightly-d, folded since
    lim = failures(str(out), limit=2)
    assert lim.rows.num_rows == 2 and lim.more == len(want) - 2
    assert list(lim.rows["input_uri"].to_pylist()) == list(want.input_uri[:2])
    # one run's failed rows: its partition, superseded attempts included
    for run in ("nightly-a", "crash-z"):
        want_run = df[(df.run_id == run) & (df.status == "failed")]
        fr = failures(str(out), run=run, limit=None)
        assert sorted(fr.rows["error_message"].to_pylist()) == sorted(want_run.error_message)
    with pytest.raises(NothingToRead, match="no run 'nope'"):
        failures(str(out), run="nope")


# ------------------------------------------------------------------------------------------------------------ show


def test_show_lists_exactly_the_rows_of_one_input(tmp_path):
    out = tmp_path / "out"
    standard_history(str(out))
    df = manifest_frame(out)
    for u in (uri(5), uri(1), uri(10), uri(36)):
        h = show(str(out), u)
        want = df[df.input_uri == u].sort_values("finished_at")
        got = h.rows.to_pandas()
        assert list(got.run_id) == list(want.run_id) and list(got.status) == list(want.status), u
        assert list(got.finished_at) == list(want.finished_at)
        assert list(got.partition) == list(got.run_id)
    assert show(str(out), uri(1)).rows.num_rows == len(df[df.input_uri == uri(1)])  # not img001.png.orig's rows
    assert show(str(out), uri(5)).current["status"] == "ok"
    with pytest.raises(NothingToRead, match="full URIs"):
        show(str(out), "img005.png")


# --------------------------------------------------------------------------------------------------------- compact


def test_compact_keeps_the_latest_outcome_per_input_and_nothing_else_changes(tmp_path):
    out = tmp_path / "out"
    standard_history(str(out))
    merged = ["nightly-b", "nightly-a", "manual-x", "nightly-d"]
    kept = ["nightly-c", "crash-z"]  # crash-z: newest, and not folded
    before_all = manifest_frame(out)
    want = latest_outcome(manifest_frame(out, merged))
    hashes = tree_hashes(out / "_manifest")
    merged_bytes = sum(os.path.getsize(f) for r in merged for f in glob.glob(str(out / "_manifest" / f"run={r}" / "*")))
    state_before = frame(RunState(str(out)).view())
    assert_frame_equal_rows(state_before, latest_outcome(before_all))
    state_file = (out / "_srbatch" / "state.parquet").read_bytes()

    rep = compact(str(out), keep_runs=2)
    assert sorted(rep.merged) == sorted(merged) and rep.held_runs == sorted(merged)
    assert rep.kept == kept and rep.unfolded == ["crash-z"]
    assert rep.rows_before == len(before_all[before_all.run_id.isin(merged)])
    assert rep.rows_after == len(want) and rep.bytes_before == merged_bytes
    parts = sorted(glob.glob(str(out / "_manifest" / f"run={rep.partition}" / "*.parquet")))
    assert rep.partition.startswith("compacted-") and len(parts) == 1 and rep.bytes_after == os.path.getsize(parts[0])
    assert json.loads(pq.read_schema(parts[0]).metadata[COMPACTED_KEY]) == sorted(merged)
    got = pd.read_parquet(parts[0]).sort_values("input_uri").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)  # every column of the latest outcome row, nothing else
    assert set(got.status) == {"ok", "failed"} and got.input_uri.is_unique
    # kept and unfolded runs byte-identical; merged partitions gone; the state untouched
    after = tree_hashes(out / "_manifest")
    for k, v in hashes.items():
        part = k.split("/")[0].removeprefix("run=")
        assert (after.get(k) == v) if part in kept else (k not in after), k
    assert sorted({k.split("/")[0] for k in after}) == sorted([f"run={r}" for r in kept] + [f"run={rep.partition}"])
    assert (out / "_srbatch" / "state.parquet").read_bytes() == state_file
    # the job's state is the same: loaded (the compacted partition is known to be folded), and rebuilt from scratch
    loaded = RunState(str(out)).load()  # folds crash-z into the state file, as planning does
    assert loaded.recovered_runs == ["crash-z"]
    pd.testing.assert_frame_equal(frame(RunState(str(out)).read_state()[0]), state_before)
    (out / "_srbatch" / "state.parquet").unlink()
    rebuilt = RunState(str(out)).load()
    assert rebuilt.rebuilt
    pd.testing.assert_frame_equal(frame(RunState(str(out)).read_state()[0]), state_before)


def assert_frame_equal_rows(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def test_compact_never_touches_an_unfolded_run_even_older_than_the_kept_ones(tmp_path):
    out = tmp_path / "out"
    h = standard_history(str(out))
    # a run started while crash-z was still running (so its planning could not fold crash-z), killed too: crash-z
    # is now an unfolded run older than the newest run
    w = ManifestWriter(str(out), "crash-y", flush_rows=7)
    w.add(empty_row(run_id="crash-y", input_uri=uri(43), output_uri=uri(43).replace("/in/", "/out/"), status="ok",
                    finished_at=T0 + timedelta(hours=6, seconds=1), fingerprint="fp1", model="bicubic"))
    w.close()
    z = tree_hashes(out / "_manifest" / "run=crash-z")
    want = latest_outcome(manifest_frame(out, ["nightly-b", "nightly-a", "manual-x", "nightly-d", "nightly-c"]))
    rep = compact(str(out), keep_runs=1)
    assert rep.kept == ["crash-y"] and rep.unfolded == ["crash-z", "crash-y"]
    assert sorted(rep.merged) == ["manual-x", "nightly-a", "nightly-b", "nightly-c", "nightly-d"]
    assert tree_hashes(out / "_manifest" / "run=crash-z") == z
    got = pd.read_parquet(glob.glob(str(out / "_manifest" / f"run={rep.partition}" / "*.parquet"))[0])
    pd.testing.assert_frame_equal(got.sort_values("input_uri").reset_index(drop=True), want)
    assert sorted(RunState(str(out)).load().recovered_runs) == ["crash-y", "crash-z"]


def test_a_second_compaction_merges_the_first_one(tmp_path):
    out = tmp_path / "out"
    h = standard_history(str(out))
    everything = manifest_frame(out)
    first = compact(str(out), keep_runs=2, now=datetime(2026, 11, 2, tzinfo=timezone.utc))
    h.run("nightly-e", 6, {uri(41): ["ok"]})  # folds crash-z
    h.run("nightly-f", 7, {uri(42): ["failed"]})
    everything = pd.concat([everything, manifest_frame(out, ["nightly-e", "nightly-f"])], ignore_index=True)
    state_before = frame(RunState(str(out)).view())
    rep = compact(str(out), keep_runs=2, now=datetime(2026, 11, 3, tzinfo=timezone.utc))
    assert sorted(rep.merged) == sorted([first.partition, "nightly-c", "crash-z"])
    assert rep.held_runs == sorted(["nightly-b", "nightly-a", "manual-x", "nightly-d", "nightly-c", "crash-z"])
    merged_runs = rep.held_runs
    want = latest_outcome(everything[everything.run_id.isin(merged_runs)])
    got = pd.read_parquet(glob.glob(str(out / "_manifest" / f"run={rep.partition}" / "*.parquet"))[0])
    pd.testing.assert_frame_equal(got.sort_values("input_uri").reset_index(drop=True), want)
    assert sorted(p.name for p in (out / "_manifest").iterdir()) == sorted(
        ["run=nightly-e", "run=nightly-f", f"run={rep.partition}"])
    pd.testing.assert_frame_equal(frame(RunState(str(out)).view()), state_before)
    (out / "_srbatch" / "state.parquet").unlink()
    pd.testing.assert_frame_equal(frame(RunState(str(out)).view()), state_before)
    # summary still lists every run (from its record), marked compacted
    s = summarize(str(out))
    assert [r.run_id for r in s.runs if r.compacted_into] == ["nightly-b", "nightly-a", "nightly-d", "nightly-c",
                                                               "crash-z"]  # manual-x had no record  # fmt: skip
    # show finds the rows that were kept in the compacted partition
    hist = show(str(out), uri(5))
    assert hist.rows["partition"].to_pylist() == [rep.partition, "nightly-e", "nightly-f"]
    assert hist.rows["run_id"].to_pylist() == ["nightly-a", "nightly-e", "nightly-f"]
    assert hist.rows["status"].to_pylist() == ["ok", "skipped", "skipped"]
    # and a compacted run's failures are those still latest
    assert failures(str(out), run="nightly-c", limit=None).rows["input_uri"].to_pylist() == [uri(36)]


def test_compact_refused_while_a_run_writes_runs_after_a_stale_marker_and_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "out"
    h = standard_history(str(out))
    h.store.mark_active("nightly-g", datetime.now(timezone.utc))
    hashes = tree_hashes(out)
    with pytest.raises(CompactionRefused, match=r"run nightly-g is writing.*updated at 20\d\d-.*--force"):
        compact(str(out), keep_runs=2)
    r = _cli("compact", str(out), "--keep-runs", "2")
    assert r.returncode == 2 and "nightly-g" in r.stderr and "--stale-after" in r.stderr, r.stderr
    assert tree_hashes(out) == hashes
    # dry run (forced past the marker): same figures, nothing written
    dry = compact(str(out), keep_runs=2, dry_run=True, force=True)
    assert tree_hashes(out) == hashes and dry.merged and dry.rows_after > 0
    # the marker of a killed run, not refreshed for 20 minutes: ignored
    marker = out / "_srbatch" / "active" / "nightly-g.json"
    old = (datetime.now(timezone.utc) - timedelta(minutes=20)).isoformat()
    marker.write_text(json.dumps({"run_id": "nightly-g", "updated_at": old}))
    r = _cli("compact", str(out), "--keep-runs", "2", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["stale_markers"][0]["run_id"] == "nightly-g"
    for k in ("merged", "held_runs", "rows_before", "rows_after", "bytes_before", "bytes_after"):
        assert rep[k] == getattr(dry, k), k
    assert not (out / "_manifest" / "run=nightly-b").exists()
    assert compact(str(out), keep_runs=2, stale_after_minutes=30, force=True).merged == []  # nothing left to merge


def test_a_compaction_whose_write_fails_deletes_nothing(tmp_path, monkeypatch):
    import srbatch.upscale.ops as ops
    from srbatch.errors import StorageError

    out = tmp_path / "out"
    standard_history(str(out))
    hashes = tree_hashes(out)

    def full_disk(fs, path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ops, "put_atomic", full_disk)
    with pytest.raises(StorageError, match="nothing was deleted"):
        compact(str(out), keep_runs=2)
    assert tree_hashes(out) == hashes


def test_an_unreadable_part_is_reported_and_its_run_is_never_compacted(tmp_path, caplog):
    out = tmp_path / "out"
    standard_history(str(out))
    df = manifest_frame(out)
    bad = sorted(glob.glob(str(out / "_manifest" / "run=nightly-a" / "*.parquet")))[0]
    lost = pd.read_parquet(bad)
    Path(bad).write_bytes(b"PAR1 truncated by a full disk")
    h = show(str(out), uri(1))  # the other parts are still read, part by part
    want = df[(df.input_uri == uri(1))]
    want = want[~want.set_index(["run_id", "finished_at", "status"]).index.isin(
        lost.set_index(["run_id", "finished_at", "status"]).index)]
    assert h.rows["run_id"].to_pylist() == list(want.sort_values("finished_at").run_id)
    assert "ignoring unreadable manifest part" in caplog.text
    a = tree_hashes(out / "_manifest" / "run=nightly-a")
    rep = compact(str(out), keep_runs=2)
    assert rep.skipped_unreadable == ["nightly-a"] and "nightly-a" not in rep.merged
    assert sorted(rep.merged) == ["manual-x", "nightly-b", "nightly-d"]
    assert tree_hashes(out / "_manifest" / "run=nightly-a") == a  # left exactly as it was


def test_compact_refused_without_state_and_nothing_to_read_exits_2(tmp_path):
    out = tmp_path / "out"
    w = ManifestWriter(str(out), "old-run")  # a run of an earlier srbatch: parts, no state
    w.add(empty_row(run_id="old-run", input_uri=uri(1), status="ok"))
    w.close()
    with pytest.raises(CompactionRefused, match="run the job once first"):
        compact(str(out))
    r = _cli("compact", str(out))
    assert r.returncode == 2 and "run the job once first" in r.stderr
    r = _cli("summary", str(tmp_path / "elsewhere"))
    assert r.returncode == 2 and "no manifest" in r.stderr
    s = summarize(str(out))  # without a state, the summary still reads the parts
    assert [(x.run_id, x.total, x.status) for x in s.runs] == [("old-run", 1, "crashed")]
    assert not s.state["has_state"] and s.state["ok"] == 1


# ------------------------------------------------------------------------------------------------------------- CLI


def test_cli_summary_failures_show_through_subprocess(tmp_path):
    out = tmp_path / "out"
    standard_history(str(out))
    latest = latest_outcome(manifest_frame(out))
    r = _cli("summary", str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split()[:3] == ["run", "id", "started"]
    assert [ln.split()[0] for ln in lines[2:8]] == ["nightly-b", "nightly-a", "manual-x", "nightly-d", "nightly-c",
                                                   "crash-z"]  # fmt: skip
    assert f"{len(latest)} inputs known: {(latest.status == 'ok').sum()} ok" in r.stdout
    r = _cli("summary", str(out), "--json", "--last", "1")
    assert r.returncode == 0 and [x["run_id"] for x in json.loads(r.stdout)["runs"]] == ["crash-z"]
    r = _cli("failures", str(out), "--csv", "--limit", "3")
    assert r.returncode == 0, r.stderr
    got = pd.read_csv(io.StringIO(r.stdout))
    n_failed = int((latest.status == "failed").sum())
    assert len(got) == 3 and f"{n_failed - 3} more" in r.stderr
    r = _cli("show", str(out), uri(5))
    df = manifest_frame(out)
    assert r.returncode == 0 and r.stdout.count("run nightly-a:") == 2 and "latest outcome in the state: ok" in r.stdout
    assert f": {int((df.input_uri == uri(5)).sum())} row(s)" in r.stdout
    r = _cli("failures", str(out), "--json", "--csv")
    assert r.returncode == 2  # argparse: not allowed together


# ------------------------------------------------------------------------------------------------------------- S3


def test_s3_summary_failures_compact(s3_bucket, s3_server):
    import s3fs

    output = f"s3://{s3_bucket}/out"
    so = {"client_kwargs": {"endpoint_url": s3_server}}
    h = History(output, so)
    h.run("r1", 0, {uri(i): ["failed" if i % 3 == 0 else "ok"] for i in range(12)})
    h.run("r2", 1, {uri(i): ["ok"] for i in range(12) if i % 3 == 0 and i < 6})
    h.run("r3", 2, {uri(12): ["ok"]})
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.invalidate_cache()

    def read(runs: list[str]) -> pd.DataFrame:
        fs.invalidate_cache()
        files = [f for r in runs for f in fs.glob(f"{s3_bucket}/out/_manifest/run={r}/*.parquet")]
        return pd.concat([pd.read_parquet(io.BytesIO(fs.cat_file(f))) for f in files], ignore_index=True)

    everything = read(["r1", "r2", "r3"])
    s = summarize(output, so)
    assert [(r.run_id, r.ok, r.failed, r.skipped) for r in s.runs] == [
        (r, int(((everything.run_id == r) & (everything.status == "ok")).sum()),
         int(((everything.run_id == r) & (everything.status == "failed")).sum()),
         int(((everything.run_id == r) & (everything.status == "skipped")).sum())) for r in ("r1", "r2", "r3")]
    latest = latest_outcome(everything)
    got_failed = failures(output, so).rows["input_uri"].to_pylist()
    assert sorted(got_failed) == sorted(latest[latest.status == "failed"].input_uri) and got_failed
    want = latest_outcome(read(["r1", "r2"]))
    r3 = {f: fs.cat_file(f) for f in fs.glob(f"{s3_bucket}/out/_manifest/run=r3/*.parquet")}
    # through the command line, with the storage flags
    r = _cli("compact", output, "--keep-runs", "1", "--endpoint-url", s3_server)
    assert r.returncode == 0, r.stderr
    assert "merged 2 partition(s)" in r.stdout
    fs.invalidate_cache()
    parts = fs.glob(f"{s3_bucket}/out/_manifest/run=compacted-*/*.parquet")
    assert len(parts) == 1
    got = pd.read_parquet(io.BytesIO(fs.cat_file(parts[0]))).sort_values("input_uri").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)
    assert not fs.glob(f"{s3_bucket}/out/_manifest/run=r1/*") and not fs.glob(f"{s3_bucket}/out/_manifest/run=r2/*")
    assert {f: fs.cat_file(f) for f in fs.glob(f"{s3_bucket}/out/_manifest/run=r3/*.parquet")} == r3
    fs.rm(f"{s3_bucket}/out/_srbatch/state.parquet")
    rebuilt = RunState(output, so).load()
    assert rebuilt.rebuilt
    pd.testing.assert_frame_equal(frame(RunState(output, so).read_state()[0]), latest)


# ------------------------------------------------------------------------------------------------ the real job


@pytest.mark.slow
def test_job_runs_compact_then_a_third_run_skips_everything(ray_cluster, tmp_path):
    from PIL import Image

    from srbatch.upscale import UpscaleConfig, run_job

    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / f"{i}.png")
    (src / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    base = dict(input=str(src), output=str(out), model="bicubic", scale=2, progress=False, batch_size=4,
                max_failed_fraction=1.0)  # fmt: skip
    t0 = time.perf_counter()
    r1 = run_job(UpscaleConfig(**base, run_id="j1"))
    assert (r1.ok, r1.failed) == (6, 1)
    (src / "bad.png").unlink()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / "6.png")
    r2 = run_job(UpscaleConfig(**base, run_id="j2"))
    assert (r2.ok, r2.skipped) == (1, 6)
    outputs = tree_hashes(out)
    rep = compact(str(out), keep_runs=1)
    assert rep.merged == ["j1"] and rep.rows_before == 7 and rep.rows_after == 7
    s = summarize(str(out))
    assert [(x.run_id, x.status, x.ok, x.skipped) for x in s.runs] == [("j1", "complete", 6, 0),
                                                                          ("j2", "complete", 1, 6)]  # fmt: skip
    r3 = run_job(UpscaleConfig(**base, run_id="j3"))
    assert (r3.total, r3.ok, r3.failed, r3.skipped) == (7, 0, 0, 7)
    for k, v in outputs.items():  # no output rewritten
        if not k.startswith(("_manifest", "_srbatch")):
            assert tree_hashes(out)[k] == v, k
    print(f"MANIFEST-OPS e2e: 3 runs + compact in {time.perf_counter() - t0:.1f} s")


def test_an_interruption_after_a_part_is_written_never_writes_its_rows_twice(tmp_path) -> None:
    """SIGTERM and Ctrl-C raise KeyboardInterrupt anywhere: once in the middle of a flush (after the part is written,
    in the active-run marker's refresh) and once before the part is written. close() then writes every row once."""
    from srbatch.upscale.manifest import ManifestWriter, empty_row, read_manifest

    calls = {"n": 0}

    def interrupt_once() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt("signal 15")

    w = ManifestWriter(str(tmp_path), "r1", flush_rows=3, on_flush=interrupt_once)
    with pytest.raises(KeyboardInterrupt):
        for i in range(3):
            w.add(empty_row(run_id="r1", input_uri=f"in/{i}", status="ok"))
    w.add(empty_row(run_id="r1", input_uri="in/3", status="ok"))
    w.close()
    got = read_manifest(str(tmp_path)).column("input_uri").to_pylist()
    assert sorted(got) == ["in/0", "in/1", "in/2", "in/3"]
    # interrupted before the part is written: the rows stay queued and close() writes them
    w2 = ManifestWriter(str(tmp_path), "r2", flush_rows=100)
    w2.add(empty_row(run_id="r2", input_uri="in/9", status="ok"))
    real = w2._write

    def broken(table):
        raise KeyboardInterrupt("before the PUT")

    w2._write = broken
    with pytest.raises(KeyboardInterrupt):
        w2.flush()
    w2._write = real
    w2.close()
    assert read_manifest(str(tmp_path), runs=["r2"]).column("input_uri").to_pylist() == ["in/9"]
