"""Operating a scheduled job's manifest: a summary of runs, the current failures, one input's history, and compaction
of old run partitions. The library side of ``srbatch manifest`` (:mod:`srbatch.upscale.manifest_cli`).

Every function takes the job's output prefix (a local path or a URI) and fsspec storage options, and reads only what
it needs: run records (small JSON files), the state's columns that are asked for, and the ``status`` column of a run
partition that has no record. The cost of :func:`failures` (without a run) depends on the number of inputs, not on the
number of past runs; :func:`show` reads one input's rows with a filter pushed down to the Parquet parts.

:func:`compact` merges the run partitions that are folded into the state and older than the newest ``keep_runs`` into
one partition ``run=compacted-<UTC time>`` holding, per input, the latest outcome row among them; its part is written
whole before the old partitions are deleted, so an interrupted compaction leaves duplicates (removed by the next one),
never a hole. The state (``_srbatch/state.parquet``) and the run records are not touched.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from srbatch.errors import ConfigError, SrbatchError, StorageError
from srbatch.io.storage import join_uri
from srbatch.upscale.manifest import SCHEMA, manifest_uri, part_name, put_atomic
from srbatch.upscale.state import (
    COMPACTED_KEY,
    COMPACTED_PREFIX,
    FOLDED_KEY,
    OUTCOMES,
    RunState,
    cast_to_schema,
    control_uri,
    fold,
    latest_outcomes,
)

log = logging.getLogger("srbatch.upscale")

__all__ = [
    "NothingToRead",
    "CompactionRefused",
    "RunLine",
    "Summary",
    "Failures",
    "History",
    "CompactionReport",
    "summarize",
    "failures",
    "show",
    "compact",
]

FAILURE_COLUMNS = ["input_uri", "error_type", "error_message", "run_id", "finished_at"]
"""Columns listed by :func:`failures`."""
COMPACTED_ROW_GROUP = 65_536
"""Rows per row group of a compacted part. Its rows are sorted by ``input_uri``, so each row group's statistics cover
a narrow range of inputs and a filter on one input (``srbatch manifest show``, DuckDB, polars) skips the others."""


class NothingToRead(SrbatchError):
    """The output prefix holds nothing the command can read (no manifest, no state, no such run or input)."""


class CompactionRefused(SrbatchError):
    """Compaction was refused (a run is writing, or there is no state yet); nothing was changed."""


# ---------------------------------------------------------------------------------------------------- reading helpers


def _utc(value: Any) -> datetime | None:
    """An ISO string or datetime as an aware UTC datetime (None when absent or unreadable)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        d = value
    else:
        try:
            d = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    return d.replace(tzinfo=timezone.utc) if d.tzinfo is None else d.astimezone(timezone.utc)


def _subset(columns: Sequence[str]) -> pa.Schema:
    return pa.schema([SCHEMA.field(c) for c in columns])


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """``t`` with exactly the columns of ``schema`` (missing ones as nulls), cast to its types."""
    cols = [t.column(f.name).cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def _part_files(store: RunState, path: str) -> dict[str, int]:
    """Path -> size of every file under one run partition (the parts, and temp files a killed writer left)."""
    try:
        found = store.fs.find(path, detail=True)
    except Exception as e:
        raise StorageError(f"could not list the manifest partition {path}: {type(e).__name__}: {e}") from e
    return {p: int(info.get("size") or 0) for p, info in sorted(found.items())}


def _parts(files: Mapping[str, int]) -> list[str]:
    return [p for p in files if p.endswith(".parquet") and "/.srbatch-tmp-" not in p]


def _scan(store: RunState, files: Sequence[str], columns: Sequence[str], where: Any = None, *,
          with_file: bool = False) -> pa.Table:  # fmt: skip
    """The rows of ``files`` matching ``where`` (a pyarrow compute expression, pushed down to the Parquet row groups),
    only ``columns``, as one table (plus ``__filename`` when ``with_file``). One pyarrow dataset scan with little
    read-ahead (peak memory: a few row groups' worth of ``columns``, whatever the history); when a part cannot be read
    that way (unreadable, or an older layout), part by part, the unreadable ones reported and ignored."""
    schema = _subset(columns)
    out_schema = schema.append(pa.field("__filename", pa.string())) if with_file else schema
    if not files:
        return out_schema.empty_table()
    names = [*columns, "__filename"] if with_file else list(columns)
    try:
        dataset = ds.dataset(list(files), schema=SCHEMA, format="parquet", filesystem=store.fs)
        scan = dataset.scanner(columns=names, filter=where, batch_size=65_536, batch_readahead=1, fragment_readahead=1)
        return scan.to_table().cast(out_schema)
    except Exception as e:
        log.info("scanning %d part(s) one by one (%s: %s)", len(files), type(e).__name__, e)
    tables = []
    for p in files:
        try:
            with store.fs.open(p, "rb") as f:
                t = cast_to_schema(pq.read_table(f))
        except Exception as e:
            log.warning("ignoring unreadable manifest part %s: %s: %s", p, type(e).__name__, e)
            continue
        if where is not None:
            t = t.filter(where)
        t = _conform(t, schema)
        if with_file:
            t = t.append_column("__filename", pa.array([p] * t.num_rows, pa.string()))
        tables.append(t)
    return pa.concat_tables(tables) if tables else out_schema.empty_table()


def _state_meta(store: RunState) -> tuple[int, list[str]] | None:
    """(rows, folded runs) of the state from its footer alone; None when there is no state. A state that exists but
    cannot be read raises :class:`StorageError`."""
    store.fs.invalidate_cache()
    if not store.fs.exists(store.state_path):
        return None
    try:
        with store.fs.open(store.state_path, "rb") as f:
            pf = pq.ParquetFile(f)
            folded = json.loads((pf.schema_arrow.metadata or {})[FOLDED_KEY])
            return pf.metadata.num_rows, [str(r) for r in folded]
    except Exception as e:
        raise StorageError(
            f"the run state {control_uri(store.output, 'state.parquet')} cannot be read ({type(e).__name__}: {e}); "
            "the next run of the job rebuilds it from the manifest"
        ) from e


def _read_state(store: RunState, columns: Sequence[str] | None) -> tuple[pa.Table | None, list[str]] | None:
    """The state's folded runs (from its footer) and, when ``columns`` is given, only those columns of it; None when
    there is no state or it cannot be read (then the run partitions are used instead, as planning does)."""
    store.fs.invalidate_cache()
    if not store.fs.exists(store.state_path):
        return None
    try:
        with store.fs.open(store.state_path, "rb") as f:
            pf = pq.ParquetFile(f)
            folded = [str(r) for r in json.loads((pf.schema_arrow.metadata or {})[FOLDED_KEY])]
            if columns is None:
                return None, folded
            t = pf.read(columns=[c for c in columns if c in pf.schema_arrow.names])
    except Exception as e:
        log.warning("the run state %s cannot be read (%s: %s): using the manifest's run partitions instead",
                    control_uri(store.output, "state.parquet"), type(e).__name__, e)  # fmt: skip
        return None
    return _conform(t, _subset(columns)), folded


def _is_folded(store: RunState, run_id: str, path: str, folded: set[str]) -> bool:
    """Whether the state holds the rows of the partition ``run_id`` (a compacted one: of every run it holds)."""
    if run_id in folded:
        return True
    if run_id.startswith(COMPACTED_PREFIX):
        held = store.compacted_runs(path)
        return held is not None and set(held) <= folded
    return False


@dataclass
class _Current:
    table: pa.Table
    folded: list[str]
    pending: list[str]
    has_state: bool


def _current(store: RunState, columns: Sequence[str], partitions: Mapping[str, str]) -> _Current:
    """The latest outcome of every input now: the state's ``columns`` (and ``status``), with the run partitions it does
    not hold yet (a killed run, a running one, runs of an earlier srbatch when there is no state) folded in, as
    planning does. Only when there are such runs are ``input_uri`` and ``finished_at`` read too."""
    meta = _read_state(store, None)
    folded = meta[1] if meta is not None else []
    done = set(folded)
    pending = [r for r, p in sorted(partitions.items()) if not _is_folded(store, r, p, done)]
    extra = ["status", "input_uri", "finished_at"] if pending else ["status"]
    columns = list(dict.fromkeys([*columns, *extra]))
    got = _read_state(store, columns) if meta is not None else None
    table = got[0] if got is not None and got[0] is not None else _subset(columns).empty_table()
    for run_id in pending:
        rows = _scan(store, _parts(_part_files(store, partitions[run_id])), columns,
                     pc.field("status").isin(list(OUTCOMES)))  # fmt: skip
        table = fold(table, rows)
    return _Current(table, folded, pending, got is not None)


def _need_manifest(store: RunState) -> dict[str, str]:
    partitions = store.run_partitions()
    store.fs.invalidate_cache()
    if not partitions and not store.fs.exists(store.state_path):
        raise NothingToRead(
            f"no manifest under {manifest_uri(store.output)} and no run state under {control_uri(store.output)}: "
            "is OUTPUT the job's --output? (run the job once first)"
        )
    return partitions


# ---------------------------------------------------------------------------------------------------------- summary


@dataclass
class RunLine:
    """One run in :class:`Summary`. ``source``: ``record`` (its run record) or ``parts`` (no complete record:
    counts computed from the ``status`` column of its manifest parts; ``seconds`` and ``throughput`` are then
    unknown and ``started`` is its earliest row's ``finished_at``). ``status``: complete, interrupted, crashed
    (killed before its end), running (no record yet and a fresh active-run marker) or ``no record`` (folded into the
    state by a rebuild: a run of an earlier srbatch, or its record was lost). ``partition``: its folder under
    ``_manifest/``, None once compacted."""

    run_id: str
    started: datetime | None
    seconds: float | None
    total: int | None
    ok: int | None
    failed: int | None
    skipped: int | None
    throughput: float | None
    status: str
    source: str
    partition: str | None
    compacted_into: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["started"] = self.started.isoformat() if self.started else None
        return d


@dataclass
class Summary:
    """What :func:`summarize` found: the runs (oldest first), the compacted partitions, and the state now."""

    output: str
    runs: list[RunLine]
    compacted: list[dict[str, Any]]
    state: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"output": self.output, "runs": [r.as_dict() for r in self.runs], "compacted": self.compacted,
                "state": self.state}  # fmt: skip

    def text(self) -> str:
        head = ["run id", "started (UTC)", "seconds", "total", "ok", "failed", "skipped", "images/s", "status"]
        rows = [[
            r.run_id, r.started.strftime("%Y-%m-%d %H:%M:%S") if r.started else "-", _num(r.seconds, ".1f"),
            _num(r.total), _num(r.ok), _num(r.failed), _num(r.skipped), _num(r.throughput, ".2f"),
            r.status + ("*" if r.source == "parts" else "") + (" (compacted)" if r.compacted_into else ""),
        ] for r in self.runs]  # fmt: skip
        widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
        right = {2, 3, 4, 5, 6, 7}

        def line(cells: Sequence[str]) -> str:
            cols = enumerate(zip(cells, widths, strict=True))
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in cols).rstrip()

        out = [f"srbatch manifest: {self.output}: {len(self.runs)} run(s), newest last"]
        out += [line(head), *(line(r) for r in rows)]
        if any(r.source == "parts" for r in self.runs):
            out.append("* no complete run record: counts from the run's manifest parts (a killed or running run, "
                       "or a run of an earlier srbatch); seconds and images/s unknown, started = its first row's time")
        for c in self.compacted:
            out.append(f"compacted partition {c['partition']}: {c['rows']} rows, the latest outcomes of "
                       f"{len(c['runs'])} run(s)")  # fmt: skip
        s = self.state
        if s["has_state"]:
            line_ = (f"state: {s['inputs']} inputs known: {s['ok']} ok, {s['failed']} failed now "
                     f"({s['folded_runs']} run(s) folded into {control_uri(self.output, 'state.parquet')})")
        else:
            line_ = (f"state: none ({control_uri(self.output, 'state.parquet')} missing or unreadable); from the run "
                     f"partitions: {s['inputs']} inputs known: {s['ok']} ok, {s['failed']} failed now")  # fmt: skip
        if s["has_state"] and s["pending"]:
            line_ += (f"; {len(s['pending'])} run(s) not folded yet ({', '.join(s['pending'][:5])}"
                      f"{' ...' if len(s['pending']) > 5 else ''}): counted here, folded by the next run")  # fmt: skip
        out.append(line_)
        return "\n".join(out)


def _num(x: float | int | None, fmt: str = "d") -> str:
    return "-" if x is None else format(x, fmt)


def _counts_from_parts(store: RunState, path: str) -> tuple[dict[str, int], int, datetime | None]:
    """(count by status, rows, earliest finished_at) of one run partition, reading two columns."""
    t = _scan(store, _parts(_part_files(store, path)), ["status", "finished_at"])
    counts = {c["values"]: c["counts"] for c in pc.value_counts(t["status"]).to_pylist()} if t.num_rows else {}
    first = pc.min(t["finished_at"]).as_py() if t.num_rows else None
    return counts, t.num_rows, _utc(first)


def _fresh(marker: Mapping[str, Any], now: datetime, stale_after: timedelta) -> bool:
    updated = _utc(marker.get("updated_at"))
    return updated is None or now - updated < stale_after


def summarize(
    output: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    last: int | None = None,
    stale_after_minutes: float = 15.0,
) -> Summary:
    """One line per run (oldest first; the newest ``last`` when given) from the run records, a partition without a
    record counted from its parts, and the state now (inputs known, ok, failed)."""
    store = RunState(output, storage_options)
    partitions = _need_manifest(store)
    records = store.run_records()
    now = datetime.now(timezone.utc)
    active = {m.get("run_id"): m for m in store.active_runs()}
    current = _current(store, ["status"], partitions)
    folded = set(current.folded)
    compacted = []
    compacted_into: dict[str, str] = {}
    for run_id, path in sorted(partitions.items()):
        if run_id.startswith(COMPACTED_PREFIX):
            held = store.compacted_runs(path) or []
            rows = sum(_footer_rows(store, p) for p in _parts(_part_files(store, path)))
            compacted.append({"partition": run_id, "runs": held, "rows": rows})
            compacted_into.update({r: run_id for r in held})
    lines = []
    for run_id in sorted(set(records) | {r for r in partitions if not r.startswith(COMPACTED_PREFIX)}):
        rec = records.get(run_id)
        path = partitions.get(run_id)
        full = rec is not None and "total" in rec
        if full:
            ended = "interrupted" if rec.get("interrupted") else "complete" if rec.get("complete") else "crashed"
            line = RunLine(run_id, _utc(rec.get("started_at")), rec.get("seconds"), rec.get("total"), rec.get("ok"),
                           rec.get("failed"), rec.get("skipped"), rec.get("throughput"), ended, "record",
                           path and f"run={run_id}")  # fmt: skip
        elif path is not None:
            counts, n, first = _counts_from_parts(store, path)
            if rec is not None:
                status = "crashed"
            elif run_id in active and _fresh(active[run_id], now, timedelta(minutes=stale_after_minutes)):
                status = "running"
            elif run_id in folded:
                status = "no record"
            else:
                status = "crashed"
            line = RunLine(run_id, first, None, n, counts.get("ok", 0), counts.get("failed", 0),
                           counts.get("skipped", 0), None, status, "parts", f"run={run_id}")  # fmt: skip
        else:  # the record of a killed run whose partition was compacted since: its outcome counts only
            ok, failed = rec.get("ok"), rec.get("failed")
            total = (ok or 0) + (failed or 0) if ok is not None or failed is not None else None
            line = RunLine(run_id, _utc(rec.get("started_at")), None, total, ok, failed, None, None, "crashed",
                           "record", None)  # fmt: skip
        line.compacted_into = compacted_into.get(run_id) if path is None else None
        lines.append(line)
    # a killed run whose partition was compacted has no start time left: it ran just before the run that recovered it
    start = {r.run_id: r.started for r in lines}
    floor = datetime.min.replace(tzinfo=timezone.utc)

    def key(r: RunLine) -> tuple[datetime, int, str]:
        if r.started is not None:
            return r.started, 1, r.run_id
        after = start.get(str((records.get(r.run_id) or {}).get("recovered_by")))
        return (after, 0, r.run_id) if after is not None else (floor, 0, r.run_id)

    lines.sort(key=key)
    if last is not None:
        lines = lines[-last:] if last > 0 else []
    st = current.table["status"]
    state = {"has_state": current.has_state, "inputs": current.table.num_rows,
             "ok": pc.sum(pc.equal(st, "ok")).as_py() or 0, "failed": pc.sum(pc.equal(st, "failed")).as_py() or 0,
             "folded_runs": len(current.folded), "pending": current.pending}  # fmt: skip
    return Summary(output, lines, compacted, state)


def _footer_rows(store: RunState, path: str) -> int:
    try:
        with store.fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    except Exception as e:
        log.warning("ignoring unreadable manifest part %s: %s: %s", path, type(e).__name__, e)
        return 0


# --------------------------------------------------------------------------------------------------------- failures


@dataclass
class Failures:
    """What :func:`failures` found: ``rows`` (at most the limit, newest first), ``total`` failures, and where they
    come from (``source``)."""

    rows: pa.Table
    total: int
    source: str
    run: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def more(self) -> int:
        return self.total - self.rows.num_rows


def failures(
    output: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    run: str | None = None,
    limit: int | None = 50,
) -> Failures:
    """The inputs whose latest outcome is ``failed`` (from the state, plus any run it does not hold yet), or with
    ``run`` that run's failed rows (from its partition; once compacted, those of its failures still latest)."""
    store = RunState(output, storage_options)
    partitions = _need_manifest(store)
    failed = pc.field("status") == "failed"
    notes = []
    if run is None:
        cur = _current(store, FAILURE_COLUMNS, partitions)
        rows = cur.table.filter(pc.equal(cur.table["status"], "failed"))
        source = "state" if cur.has_state else "manifest"
        if cur.pending:
            notes.append(f"includes {len(cur.pending)} run(s) not folded into the state yet: {', '.join(cur.pending)}")
    elif run in partitions:
        rows = _scan(store, _parts(_part_files(store, partitions[run])), [*FAILURE_COLUMNS, "status"], failed)
        source = f"run={run}"
    else:
        compacted = [p for r, p in partitions.items() if r.startswith(COMPACTED_PREFIX)]
        files = [f for p in compacted for f in _parts(_part_files(store, p))]
        rows = _scan(store, files, [*FAILURE_COLUMNS, "status"], failed & (pc.field("run_id") == run))
        if rows.num_rows == 0 and run not in store.run_records():
            known = sorted(r for r in partitions if not r.startswith(COMPACTED_PREFIX))
            raise NothingToRead(f"no run {run!r} under {manifest_uri(output)}; its runs are: "
                                f"{', '.join(known[-10:]) or 'none'} (see `srbatch manifest summary`)")  # fmt: skip
        source = "compacted"
        notes.append(f"run {run} was compacted: only its failures that are still their input's latest outcome remain")
    rows = rows.sort_by([("finished_at", "descending"), ("input_uri", "ascending")]).select(FAILURE_COLUMNS)
    total = rows.num_rows
    if limit is not None:
        rows = rows.slice(0, max(0, limit))
    return Failures(rows, total, source, run, notes)


# ------------------------------------------------------------------------------------------------------------- show


@dataclass
class History:
    """Every manifest row of one input (oldest first, with the ``partition`` that holds it) and its state row."""

    input_uri: str
    rows: pa.Table
    current: dict[str, Any] | None


def show(
    output: str,
    input_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    columns: Sequence[str] | None = None,
) -> History:
    """Every row of ``input_uri`` across all runs (one pyarrow dataset scan, the filter pushed down to the parts; only
    ``columns`` when given, else all), and its latest outcome in the state."""
    store = RunState(output, storage_options)
    partitions = _need_manifest(store)
    files = [f for p in partitions.values() for f in _parts(_part_files(store, p))]
    where = pc.field("input_uri") == input_uri
    wanted = list(dict.fromkeys([*(columns or SCHEMA.names), "input_uri", "run_id", "finished_at"]))
    rows = _scan(store, files, wanted, where, with_file=True)
    names = rows["__filename"].to_pylist()
    part = pa.array([_partition_of(n) for n in names], pa.string())
    rows = rows.drop_columns(["__filename"]).append_column("partition", part)
    rows = rows.sort_by([("finished_at", "ascending"), ("run_id", "ascending")])
    store.fs.invalidate_cache()
    state = _scan(store, [store.state_path], wanted, where) if store.fs.exists(store.state_path) else None
    current = state.to_pylist()[-1] if state is not None and state.num_rows else None
    if rows.num_rows == 0 and current is None:
        sample = _scan(store, files[-1:], ["input_uri"]).slice(0, 1)["input_uri"].to_pylist() if files else []
        hint = f" (inputs are recorded as full URIs, e.g. {sample[0]})" if sample else ""
        raise NothingToRead(f"no rows for {input_uri!r} under {manifest_uri(output)}{hint}")
    return History(input_uri, rows, current)


def _partition_of(path: str) -> str:
    for part in reversed(path.split("/")):
        if part.startswith("run="):
            return part[len("run="):]
    return ""


# ---------------------------------------------------------------------------------------------------------- compact


@dataclass
class CompactionReport:
    """What :func:`compact` did (or would do, ``dry_run``). ``merged``: the partitions merged and deleted;
    ``held_runs``: the run ids the new partition holds; ``kept``: the newest runs left alone; ``unfolded``: runs not
    folded into the state (never touched); ``skipped_unreadable``: runs left alone because a part could not be read."""

    output: str
    partition: str | None
    merged: list[str]
    held_runs: list[str]
    kept: list[str]
    unfolded: list[str]
    rows_before: int = 0
    rows_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    dry_run: bool = False
    stale_markers: list[dict[str, Any]] = field(default_factory=list)
    skipped_unreadable: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        verb = "would merge" if self.dry_run else "merged"
        out = []
        for m in self.stale_markers:
            out.append(f"ignoring the active-run marker of run {m.get('run_id')} (updated {m.get('updated_at')}, "
                       "older than --stale-after: a killed run)")  # fmt: skip
        for r in self.skipped_unreadable:
            out.append(f"left run {r} alone: one of its parts cannot be read")
        if not self.merged:
            out.append(f"srbatch manifest compact: nothing to compact under {manifest_uri(self.output)} "
                       f"({len(self.kept)} newest run(s) kept, {len(self.unfolded)} not folded into the state)")
            return "\n".join(out)
        out.append(
            f"srbatch manifest compact: {verb} {len(self.merged)} partition(s) ({len(self.held_runs)} run(s)) into "
            f"run={self.partition}: rows {self.rows_before} -> {self.rows_after}, bytes {self.bytes_before} -> "
            f"{self.bytes_after}{' (dry run: nothing written)' if self.dry_run else ''}"
        )
        out.append(f"  merged: {', '.join(self.merged)}")
        out.append(f"  kept (newest): {', '.join(self.kept) or 'none'}")
        if self.unfolded:
            out.append(f"  not folded into the state, left alone: {', '.join(self.unfolded)}")
        return "\n".join(out)


def _run_started(store: RunState, run_id: str, path: str, records: Mapping[str, Mapping[str, Any]]) -> datetime:
    started = _utc((records.get(run_id) or {}).get("started_at"))
    if started is None:
        _, _, started = _counts_from_parts(store, path)
    return started or datetime.min.replace(tzinfo=timezone.utc)


def compact(
    output: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    keep_runs: int = 10,
    stale_after_minutes: float = 15.0,
    dry_run: bool = False,
    force: bool = False,
    now: datetime | None = None,
) -> CompactionReport:
    """Merge the run partitions folded into the state and older than the newest ``keep_runs`` into one partition
    ``run=compacted-<UTC time>`` (per input, the latest outcome row among them; metadata ``srbatch.compacted_runs``),
    written whole before the old ones are deleted. Refused (:class:`CompactionRefused`) without a state, or while an
    active-run marker is fresher than ``stale_after_minutes`` (unless ``force``)."""
    if keep_runs < 1:
        raise ConfigError(f"--keep-runs must be at least 1 (got {keep_runs}): the newest run's rows answer "
                          "'which inputs failed in the latest run'")
    store = RunState(output, storage_options)
    now = now or datetime.now(timezone.utc)
    meta = _state_meta(store)
    if meta is None:
        raise CompactionRefused(
            f"no run state under {control_uri(output)} (state.parquet): run the job once first with this version of "
            f"srbatch (e.g. `srbatch upscale INPUT --output {output} ...`); it writes the state that compaction "
            "relies on to know which runs are safe to merge"
        )
    stale_after = timedelta(minutes=stale_after_minutes)
    markers = store.active_runs()
    fresh = [m for m in markers if _fresh(m, now, stale_after)]
    if fresh and not force:
        m = fresh[0]
        raise CompactionRefused(
            f"run {m.get('run_id')} is writing to {output} (its marker {control_uri(output, 'active')}/"
            f"{m.get('run_id')}.json was updated at {m.get('updated_at') or 'an unreadable time'}, less than "
            f"--stale-after {stale_after_minutes:g} min ago; host {m.get('host')}, pid {m.get('pid')}). Wait for it "
            "to end and rerun; if that run was killed, rerun once its marker is older than --stale-after, or pass "
            "--force"
        )
    folded = set(meta[1])
    partitions = store.run_partitions()
    records = store.run_records()
    runs = {r: p for r, p in partitions.items() if not r.startswith(COMPACTED_PREFIX)}
    order = sorted(runs, key=lambda r: (_run_started(store, r, runs[r], records), r))
    kept = order[-keep_runs:]
    unfolded = [r for r in order if r not in folded]
    merge = [r for r in order if r in folded and r not in kept]
    merge_compacted = [r for r, p in sorted(partitions.items())
                       if r.startswith(COMPACTED_PREFIX) and _is_folded(store, r, p, folded)]  # fmt: skip
    report = CompactionReport(output, None, [], [], kept, unfolded, dry_run=dry_run,
                              stale_markers=[m for m in markers if m not in fresh])  # fmt: skip
    if not merge and len(merge_compacted) < 2:
        return report
    acc: pa.Table | None = None
    held: set[str] = set()
    files_of: dict[str, dict[str, int]] = {}
    for run_id in [*merge_compacted, *merge]:
        path = partitions[run_id]
        files = _part_files(store, path)
        try:
            tables, rows = [], 0
            for p in _parts(files):
                with store.fs.open(p, "rb") as f:
                    pf = pq.ParquetFile(f)
                    rows += pf.metadata.num_rows
                    if _only_skipped(pf):  # the parts of carried-over rows: nothing to keep, nothing to read
                        continue
                    tables.append(cast_to_schema(pf.read()))
            if run_id.startswith(COMPACTED_PREFIX):
                got = store.compacted_runs(path)
                if got is None:
                    raise ValueError("its parts do not list the runs they hold")
                held.update(got)
            else:
                held.add(run_id)
        except Exception as e:
            log.warning("leaving %s alone: %s: %s", path, type(e).__name__, e)
            report.skipped_unreadable.append(run_id)
            continue
        acc = _latest_rows([acc, *tables])
        files_of[run_id] = files
        report.rows_before += rows
        report.bytes_before += sum(files.values())
    report.merged = list(files_of)
    if not report.merged or (len(report.merged) == 1 and report.merged[0].startswith(COMPACTED_PREFIX)):
        report.merged = []
        return report
    table = (acc if acc is not None else SCHEMA.empty_table()).sort_by([("input_uri", "ascending")])
    report.held_runs = sorted(held)
    table = table.replace_schema_metadata({COMPACTED_KEY: json.dumps(report.held_runs).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=COMPACTED_ROW_GROUP)
    data = buf.getvalue()
    report.rows_after, report.bytes_after = table.num_rows, len(data)
    report.partition = _new_name(now, partitions)
    if dry_run:
        return report
    folder = posixpath.join(store.manifest_path, f"run={report.partition}")
    part = posixpath.join(folder, part_name(0, uuid.uuid4().hex[:8]))
    try:
        put_atomic(store.fs, part, data)
        store.fs.invalidate_cache()
        if _footer_rows(store, part) != table.num_rows:
            raise StorageError(f"the compacted part {part} does not read back with {table.num_rows} rows")
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"could not write the compacted partition {part}: {type(e).__name__}: {e}; nothing was "
                           "deleted") from e  # fmt: skip
    for run_id, files in files_of.items():
        try:
            store.fs.rm([p for p in files if p.endswith(".parquet") or "/.srbatch-tmp-" in p])
            _remove_empty_dir(store, partitions[run_id])
        except Exception as e:
            raise StorageError(
                f"wrote {join_uri(manifest_uri(output), 'run=' + report.partition)} but could not delete "
                f"{partitions[run_id]} ({type(e).__name__}: {e}); nothing is lost (the new partition holds its "
                "latest outcomes, the state is unchanged): rerun `srbatch manifest compact` to finish"
            ) from e
    return report


def _only_skipped(pf: pq.ParquetFile) -> bool:
    """Whether every row of a part has status ``skipped``, from its row groups' statistics alone."""
    try:
        idx = pf.schema_arrow.get_field_index("status")
        for i in range(pf.metadata.num_row_groups):
            st = pf.metadata.row_group(i).column(idx).statistics
            if st is None or not st.has_min_max or st.min != "skipped" or st.max != "skipped":
                return False
        return True
    except Exception:
        return False


def _latest_rows(tables: Sequence[pa.Table | None]) -> pa.Table:
    """Per input, the latest outcome row of ``tables`` (manifest schema; on a tie the later row), sorted by input.
    The selection runs on three columns and the rows are taken once, so the peak is about twice the result."""
    t = pa.concat_tables([x for x in tables if x is not None and x.num_rows]) if any(
        x is not None and x.num_rows for x in tables) else SCHEMA.empty_table()  # fmt: skip
    narrow = pa.table({"input_uri": t["input_uri"], "status": t["status"], "finished_at": t["finished_at"],
                       "__row": pa.array(np.arange(t.num_rows, dtype=np.int64))})  # fmt: skip
    keep = latest_outcomes(narrow)
    return t.take(keep["__row"]) if keep.num_rows else SCHEMA.empty_table()


def _new_name(now: datetime, partitions: Mapping[str, str]) -> str:
    base = COMPACTED_PREFIX + now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name, n = base, 1
    while name in partitions:  # the same second as an earlier compaction: never write into a folder being deleted
        name, n = f"{base}-{n}", n + 1
    return name


def _remove_empty_dir(store: RunState, path: str) -> None:
    try:
        if store.fs.exists(path) and not store.fs.ls(path, detail=False):
            store.fs.rmdir(path)
    except Exception:  # object stores have no folders; a folder that is not empty stays
        pass
