"""The per-input state that lets a run plan without reading the manifest's history.

``<output>/_srbatch/`` is the job's control folder (beside ``_manifest/``, never inside it, so that
``_manifest/**/*.parquet`` stays the users' table):

- ``state.parquet``: the latest *outcome* row (status ``ok`` or ``failed``) of every input ever seen, in the manifest's
  schema. ``skipped`` rows only carry an earlier outcome over, so they never change it. Its Parquet metadata
  ``srbatch.folded_runs`` lists the runs whose rows it holds. Written whole (one PUT, or temp file + rename) at the end of
  every run: readers see the old state or the new one.
- ``runs/<run id>.json``: one record per run (counts by status, times, model, fingerprint), written after the state.
- ``active/<run id>.json``: present while a run writes, refreshed at each manifest flush; ``srbatch manifest compact``
  refuses to run while one is fresh.

Planning reads the state and only the run partitions it does not hold yet (a run killed before its end left parts but
never updated the state): its cost depends on the number of inputs, not on the number of past runs. When the state is
missing or unreadable it is rebuilt from every run partition, one partition at a time, with a warning.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from srbatch.errors import StorageError
from srbatch.io.storage import filesystem, join_uri
from srbatch.upscale.manifest import SCHEMA, cast_to_schema, manifest_uri, put_atomic

log = logging.getLogger("srbatch.upscale")

__all__ = [
    "CONTROL_DIR",
    "OUTCOMES",
    "RunState",
    "LoadedState",
    "latest_outcomes",
    "fold",
    "control_uri",
    "cast_to_schema",
    "skipped_rows",
]

CONTROL_DIR = "_srbatch"
STATE_FILE = "state.parquet"
OUTCOMES = ("ok", "failed")
FOLDED_KEY = b"srbatch.folded_runs"
COMPACTED_KEY = b"srbatch.compacted_runs"
COMPACTED_PREFIX = "compacted-"
_ORDER = "__srbatch_order"
PLAN_COLUMNS = ("input_uri", "status", "fingerprint", "output_uri")
"""The state's columns that planning reads."""
STATE_ROW_GROUP = 65_536
"""Rows per row group of the state file (the unit in which it is streamed)."""


def control_uri(output: str, *parts: str) -> str:
    """``<output>/_srbatch[/parts...]``."""
    return join_uri(output, CONTROL_DIR, *parts)


def latest_outcomes(table: pa.Table | None) -> pa.Table:
    """The latest outcome row (status ``ok``/``failed``, greatest ``finished_at``; on a tie the later row) of each
    input of ``table``, in no particular order. Vectorised: no Python object per row."""
    if table is None or table.num_rows == 0:
        return SCHEMA.empty_table()
    t = table.filter(pc.is_in(table["status"], pa.array(OUTCOMES)))
    if t.num_rows == 0:
        return SCHEMA.empty_table()
    t = t.append_column(_ORDER, pa.array(range(t.num_rows), pa.int64()))
    t = t.sort_by([("input_uri", "ascending"), ("finished_at", "ascending"), (_ORDER, "ascending")])
    uri = t["input_uri"].combine_chunks()
    n = t.num_rows
    # the last row of each run of equal input_uri: where the next row's uri differs (and the very last row)
    last = pc.not_equal(uri.slice(0, n - 1), uri.slice(1, n - 1))
    keep = pa.concat_arrays([last.fill_null(True), pa.array([True])])
    return t.filter(keep).drop_columns([_ORDER])


def fold(state: pa.Table | None, rows: pa.Table | None) -> pa.Table:
    """``state`` updated with ``rows``: per input, the latest outcome of both. Cost linear in the state (a hash
    lookup), with a sort of only the rows' inputs."""
    new = latest_outcomes(rows)
    if state is None or state.num_rows == 0:
        return new
    if new.num_rows == 0:
        return state
    touched = pc.is_in(state["input_uri"], value_set=new["input_uri"])
    merged = latest_outcomes(pa.concat_tables([state.filter(touched), new]))
    return pa.concat_tables([state.filter(pc.invert(touched)), merged])


@dataclass
class LoadedState:
    """What :meth:`RunState.load` found: the state (latest outcome per input), the runs it holds, and what had to be
    recovered or rebuilt on the way."""

    table: pa.Table
    folded_runs: list[str] = field(default_factory=list)
    recovered_runs: list[str] = field(default_factory=list)
    rebuilt: bool = False
    runs_in_manifest: list[str] = field(default_factory=list)
    recovered_counts: dict[str, dict[str, int]] = field(default_factory=dict)


class RunState:
    """The control folder of one output prefix: state, run records and active-run markers."""

    def __init__(self, output: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.output = output
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = filesystem(control_uri(output), self.storage_options)
        _, self.manifest_path = filesystem(manifest_uri(output), self.storage_options)
        self.state_path = posixpath.join(self.path, STATE_FILE)

    # ---- reading -------------------------------------------------------------------------------------------------

    def run_partitions(self) -> dict[str, str]:
        """Run id -> path of every ``run=<id>`` partition under ``_manifest/`` (one listing, one entry per run)."""
        try:
            self.fs.invalidate_cache()
            if not self.fs.exists(self.manifest_path):
                return {}
            entries = self.fs.ls(self.manifest_path, detail=False)
        except Exception as e:
            raise StorageError(f"could not list {manifest_uri(self.output)}: {type(e).__name__}: {e}") from e
        out = {}
        for p in entries:
            name = posixpath.basename(p.rstrip("/"))
            if name.startswith("run="):
                out[name[len("run="):]] = p.rstrip("/")
        return out

    def read_partition(self, path: str, *, outcomes_only: bool = True) -> pa.Table | None:
        """Every readable part of one run partition, cast to the manifest's schema (None when it has none).
        Unreadable parts are reported and ignored (their inputs are then simply redone)."""
        try:
            parts = sorted(p for p in self.fs.find(path) if p.endswith(".parquet") and "/.srbatch-tmp-" not in p)
        except Exception as e:
            raise StorageError(f"could not list the manifest partition {path}: {type(e).__name__}: {e}") from e
        tables = []
        for p in parts:
            try:
                with self.fs.open(p, "rb") as f:
                    t = cast_to_schema(pq.read_table(f))
            except Exception as e:
                log.warning("ignoring unreadable manifest part %s: %s: %s", p, type(e).__name__, e)
                continue
            if outcomes_only:
                t = t.filter(pc.is_in(t["status"], pa.array(OUTCOMES)))
            tables.append(t)
        return pa.concat_tables(tables) if tables else None

    def compacted_runs(self, path: str) -> list[str] | None:
        """The run ids a ``run=compacted-*`` partition holds (from its parts' metadata; None when unreadable)."""
        runs: list[str] = []
        try:
            for p in self.fs.find(path):
                if not p.endswith(".parquet") or "/.srbatch-tmp-" in p:
                    continue
                with self.fs.open(p, "rb") as f:
                    meta = pq.read_schema(f).metadata or {}
                if COMPACTED_KEY not in meta:
                    return None
                runs.extend(json.loads(meta[COMPACTED_KEY]))
        except Exception:
            return None
        return runs

    def read_state(self) -> tuple[pa.Table, list[str]] | None:
        """The state table and its folded runs; None when there is none (or it cannot be read: then it is rebuilt)."""
        try:
            self.fs.invalidate_cache()
            if not self.fs.exists(self.state_path):
                return None
            with self.fs.open(self.state_path, "rb") as f:
                t = pq.read_table(f)
            folded = json.loads((t.schema.metadata or {})[FOLDED_KEY])
            if not isinstance(folded, list):
                raise ValueError("srbatch.folded_runs is not a list")
            return cast_to_schema(t), [str(r) for r in folded]
        except Exception as e:
            log.warning(
                "the run state %s cannot be read (%s: %s): rebuilding it from the manifest's run partitions",
                join_uri(control_uri(self.output), STATE_FILE), type(e).__name__, e,
            )  # fmt: skip
            return None

    def folded_runs(self) -> list[str] | None:
        """The runs the state holds (from its footer only); None when there is no state or it cannot be read (a
        warning says so: it is then rebuilt)."""
        try:
            self.fs.invalidate_cache()
            if not self.fs.exists(self.state_path):
                return None
            with self.fs.open(self.state_path, "rb") as f:
                meta = pq.ParquetFile(f).schema_arrow.metadata or {}
            folded = json.loads(meta[FOLDED_KEY])
            if not isinstance(folded, list):
                raise ValueError("srbatch.folded_runs is not a list")
            return [str(r) for r in folded]
        except Exception as e:
            log.warning(
                "the run state %s cannot be read (%s: %s): rebuilding it from the manifest's run partitions",
                join_uri(control_uri(self.output), STATE_FILE), type(e).__name__, e,
            )  # fmt: skip
            return None

    def read_columns(self, columns: Iterable[str] = PLAN_COLUMNS) -> pa.Table:
        """Only ``columns`` of the state (what planning needs: a few columns per input, not the whole row)."""
        cols = list(columns)
        empty = pa.schema([SCHEMA.field(c) for c in cols]).empty_table()
        try:
            if not self.fs.exists(self.state_path):
                return empty
            with self.fs.open(self.state_path, "rb") as f:
                t = pq.read_table(f, columns=cols)
        except Exception as e:
            raise StorageError(f"could not read the run state {self.state_path}: {type(e).__name__}: {e}") from e
        return t.cast(empty.schema)

    def iter_state(self) -> Iterable[pa.Table]:
        """The state's rows, one row group at a time (memory bounded by a row group, not by the inputs)."""
        if not self.fs.exists(self.state_path):
            return
        with self.fs.open(self.state_path, "rb") as f:
            pf = pq.ParquetFile(f)
            for i in range(pf.num_row_groups):
                yield cast_to_schema(pf.read_row_group(i))

    def skipped_tables(self, done: pa.Array, run_id: str) -> Iterable[pa.Table]:
        """The manifest rows of the inputs ``done`` (carried over from their latest outcome in the state), streamed."""
        for rg in self.iter_state():
            hit = rg.filter(pc.is_in(rg["input_uri"], value_set=done))
            if hit.num_rows:
                yield skipped_rows(hit, run_id)

    def merge(self, rows: pa.Table | None, folded_runs: Iterable[str], *, base: bool = True) -> None:
        """Fold ``rows`` into the state and replace it atomically, streaming the old state row group by row group
        (``base=False``: start from nothing, e.g. when the old state is unreadable)."""
        new = latest_outcomes(rows)
        meta = {FOLDED_KEY: json.dumps(sorted(set(folded_runs))).encode()}
        schema = SCHEMA.with_metadata(meta)
        buf = io.BytesIO()
        touched_old = []
        with pq.ParquetWriter(buf, schema, compression="zstd") as w:
            for rg in self.iter_state() if base else ():
                touched = pc.is_in(rg["input_uri"], value_set=new["input_uri"])
                keep = rg.filter(pc.invert(touched))
                if keep.num_rows:
                    w.write_table(keep.replace_schema_metadata(meta), row_group_size=STATE_ROW_GROUP)
                if new.num_rows:
                    touched_old.append(rg.filter(touched))
            final = latest_outcomes(pa.concat_tables([*touched_old, new])) if touched_old else new
            if final.num_rows:
                w.write_table(final.replace_schema_metadata(meta), row_group_size=STATE_ROW_GROUP)
        self._put(self.state_path, buf.getvalue(), "the run state")

    def view(self) -> pa.Table:
        """The whole state as planning would see it (every column; unfolded run partitions folded in memory), without
        writing anything: for inspection and tests."""
        got = self.read_state()
        state, folded = got if got is not None else (None, [])
        done = set(folded)
        for run_id, path in sorted(self.run_partitions().items()):
            if run_id in done:
                continue
            if run_id.startswith(COMPACTED_PREFIX):
                held = self.compacted_runs(path)
                if held is not None and set(held) <= done:
                    continue
            state = fold(state, self.read_partition(path))
        return state if state is not None else SCHEMA.empty_table()

    def load(self, *, reopen: str | None = None) -> LoadedState:
        """The state's planning columns, after folding in every run partition it does not hold yet (a run killed
        before its end; every partition when there is no usable state). ``reopen``: a run id about to write again
        (its partition is folded anew, so that its earlier rows stay counted)."""
        partitions = self.run_partitions()
        folded = self.folded_runs()
        rebuilt = folded is None and bool(partitions)
        if rebuilt:
            log.warning(
                "no usable run state under %s: rebuilding it from %d run partition(s) of %s (first run with this "
                "version of srbatch, or the state was deleted); nothing with a valid output is redone",
                control_uri(self.output), len(partitions), manifest_uri(self.output),
            )  # fmt: skip
        done = set(folded or [])
        if reopen is not None:
            done.discard(reopen)
        recovered = []
        recovered_counts: dict[str, dict[str, int]] = {}
        delta = None
        for run_id, path in sorted(partitions.items()):
            if run_id in done:
                continue
            if run_id.startswith(COMPACTED_PREFIX):
                held = self.compacted_runs(path)
                if held is not None and set(held) <= done:
                    done.add(run_id)
                    continue
            rows = self.read_partition(path)
            delta = fold(delta, rows)
            done.add(run_id)
            recovered.append(run_id)
            if rows is not None and not run_id.startswith(COMPACTED_PREFIX):
                counts = pc.value_counts(rows["status"]).to_pylist()
                recovered_counts[run_id] = {c["values"]: c["counts"] for c in counts}
        if recovered:
            self.merge(delta, done, base=not rebuilt)
            del delta
        if recovered and not rebuilt:
            log.warning("folded %d run(s) that ended before updating the run state: %s", len(recovered),
                        ", ".join(recovered[:10]) + (" ..." if len(recovered) > 10 else ""))  # fmt: skip
        if rebuilt:  # runs of an earlier srbatch, or of a deleted state: their records are not ours to write
            recovered_counts = {}
        records = self.run_records() if recovered_counts else {}
        recovered_counts = {r: c for r, c in recovered_counts.items() if r not in records and r != reopen}
        return LoadedState(self.read_columns(), sorted(done), [] if rebuilt else recovered, rebuilt,
                           sorted(partitions), recovered_counts)  # fmt: skip

    # ---- writing -------------------------------------------------------------------------------------------------

    def write_state(self, table: pa.Table, folded_runs: Iterable[str]) -> None:
        """Replace the state atomically with ``table`` (the latest outcome per input)."""
        meta = {FOLDED_KEY: json.dumps(sorted(set(folded_runs))).encode()}
        t = cast_to_schema(table).replace_schema_metadata(meta)
        buf = io.BytesIO()
        pq.write_table(t, buf, compression="zstd", row_group_size=STATE_ROW_GROUP)
        self._put(self.state_path, buf.getvalue(), "the run state")

    def write_run_record(self, run_id: str, record: Mapping[str, Any]) -> None:
        """``runs/<run id>.json``."""
        data = json.dumps(dict(record), indent=1, sort_keys=True, default=str).encode()
        self._put(posixpath.join(self.path, "runs", f"{run_id}.json"), data, "the run record")

    def run_records(self) -> dict[str, dict[str, Any]]:
        """Run id -> record of every run that wrote one."""
        d = posixpath.join(self.path, "runs")
        out: dict[str, dict[str, Any]] = {}
        try:
            self.fs.invalidate_cache()
            if not self.fs.exists(d):
                return out
            for p in self.fs.ls(d, detail=False):
                if p.endswith(".json") and not posixpath.basename(p).startswith("."):
                    try:
                        out[posixpath.basename(p)[: -len(".json")]] = json.loads(self.fs.cat_file(p))
                    except Exception as e:
                        log.warning("ignoring unreadable run record %s: %s", p, e)
        except Exception as e:
            raise StorageError(f"could not list {control_uri(self.output, 'runs')}: {type(e).__name__}: {e}") from e
        return out

    def mark_active(self, run_id: str, started_at: datetime) -> None:
        """Write or refresh ``active/<run id>.json``."""
        rec = {"run_id": run_id, "started_at": started_at.isoformat(), "updated_at": _now().isoformat(),
               "host": socket.gethostname(), "pid": os.getpid()}  # fmt: skip
        self._put(self._active_path(run_id), json.dumps(rec).encode(), "the active-run marker")

    def clear_active(self, run_id: str) -> None:
        """Remove ``active/<run id>.json`` (never raises)."""
        try:
            self.fs.rm(self._active_path(run_id))
        except Exception:
            pass

    def active_runs(self) -> list[dict[str, Any]]:
        """The active-run markers (runs that are writing, or were killed before removing theirs)."""
        d = posixpath.join(self.path, "active")
        out = []
        try:
            self.fs.invalidate_cache()
            if not self.fs.exists(d):
                return out
            for p in self.fs.ls(d, detail=False):
                if p.endswith(".json"):
                    try:
                        out.append(json.loads(self.fs.cat_file(p)))
                    except Exception:
                        out.append({"run_id": posixpath.basename(p)[:-5], "updated_at": None})
        except Exception as e:
            raise StorageError(f"could not list {control_uri(self.output, 'active')}: {type(e).__name__}: {e}") from e
        return out

    def _active_path(self, run_id: str) -> str:
        return posixpath.join(self.path, "active", f"{run_id}.json")

    def _put(self, path: str, data: bytes, what: str) -> None:
        try:
            put_atomic(self.fs, path, data)
        except Exception as e:
            raise StorageError(f"could not write {what} {path}: {type(e).__name__}: {e}") from e


def _now() -> datetime:
    return datetime.now(timezone.utc)


def skipped_rows(prev: pa.Table, run_id: str) -> pa.Table:
    """The manifest rows of inputs carried over from their latest outcome ``prev``: this run's id, status
    ``skipped``, no timings, no actor, no error; ``finished_at`` is now."""
    n = prev.num_rows
    t = prev.sort_by("input_uri")
    now = pa.scalar(datetime.now(timezone.utc), SCHEMA.field("finished_at").type)
    for name in ("actor_id", "read_s", "decode_s", "infer_s", "encode_s", "write_s", "total_s", "error_type",
                 "error_message"):  # fmt: skip
        t = t.set_column(t.schema.get_field_index(name), SCHEMA.field(name), pa.nulls(n, SCHEMA.field(name).type))
    for name, value in (("run_id", pa.scalar(run_id, pa.string())), ("status", pa.scalar("skipped", pa.string())),
                        ("finished_at", now)):  # fmt: skip
        col = pa.repeat(value, n) if n else pa.array([], value.type)
        t = t.set_column(t.schema.get_field_index(name), SCHEMA.field(name), col)
    return t
