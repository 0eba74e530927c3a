"""The job's Parquet manifest: one row per input per run under ``<output>/_manifest/run=<run id>/part-*.parquet``.

Parts are written whole (one PUT on object storage, temp-file + rename locally), every few seconds while the job runs,
so a killed driver loses at most the rows of its last interval and never leaves a half-written part. The layout is
Hive-partitioned by run (``run=<run id>``, a key distinct from the ``run_id`` column, which every part also
holds), so pandas, polars, duckdb and pyarrow read the folder as one table. The job plans from its run state
(:mod:`srbatch.upscale.state`), never by reading this history.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from srbatch.errors import StorageError
from srbatch.io.storage import filesystem, join_uri

log = logging.getLogger("srbatch.upscale")

MANIFEST_DIR = "_manifest"
TMP_PREFIX = ".srbatch-tmp-"
"""Name prefix of the temp files of atomic local writes (swept by the next run)."""

SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("input_uri", pa.string(), nullable=False),
        pa.field("output_uri", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("input_width", pa.int32()),
        pa.field("input_height", pa.int32()),
        pa.field("input_mode", pa.string()),
        pa.field("input_bytes", pa.int64()),
        pa.field("output_width", pa.int32()),
        pa.field("output_height", pa.int32()),
        pa.field("output_mode", pa.string()),
        pa.field("output_bytes", pa.int64()),
        pa.field("model", pa.string()),
        pa.field("architecture", pa.string()),
        pa.field("model_sha256", pa.string()),
        pa.field("scale", pa.float64()),
        pa.field("dtype", pa.string()),
        pa.field("device", pa.string()),
        pa.field("gpu_ids", pa.string()),
        pa.field("actor_id", pa.string()),
        pa.field("fingerprint", pa.string()),
        pa.field("read_s", pa.float64()),
        pa.field("decode_s", pa.float64()),
        pa.field("infer_s", pa.float64()),
        pa.field("encode_s", pa.float64()),
        pa.field("write_s", pa.float64()),
        pa.field("total_s", pa.float64()),
        pa.field("psnr_y", pa.float64()),
        pa.field("ssim_y", pa.float64()),
        pa.field("psnr_rgb", pa.float64()),
        pa.field("ssim_rgb", pa.float64()),
        pa.field("niqe", pa.float64()),
        pa.field("tile_height", pa.int32()),
        pa.field("tile_width", pa.int32()),
        pa.field("tile_exact", pa.bool_()),
        pa.field("finished_at", pa.timestamp("us", tz="UTC"), nullable=False),
        # videos (null for images; manifests written before these columns read them as null)
        pa.field("media", pa.string()),
        pa.field("video_frames", pa.int64()),
        pa.field("video_segments", pa.int32()),
        pa.field("video_segments_done", pa.int32()),
        pa.field("video_fps", pa.float64()),
        pa.field("video_codec", pa.string()),
        pa.field("video_duration_s", pa.float64()),
        pa.field("probe_s", pa.float64()),
        pa.field("join_s", pa.float64()),
    ]
)
"""Column types of the manifest. See README, "The manifest", for the meaning of each column."""

STATUSES = ("ok", "failed", "skipped")
OUTCOME_STATUSES = ("ok", "failed")
"""Statuses that record work done on an input (``skipped`` only carries an earlier outcome over)."""


def empty_row(**values: Any) -> dict[str, Any]:
    """A manifest row with every column present (None where not given) and ``finished_at`` = now."""
    row: dict[str, Any] = {f.name: None for f in SCHEMA}
    row["finished_at"] = datetime.now(timezone.utc)
    row.update(values)
    return row


def to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts) as a table of exactly :data:`SCHEMA`."""
    rows = list(rows)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in SCHEMA} for r in rows], schema=SCHEMA)


def cast_to_schema(t: pa.Table) -> pa.Table:
    """``t`` with exactly the manifest's columns and types (missing columns as nulls, unknown ones dropped)."""
    cols = []
    for f in SCHEMA:
        if f.name in t.column_names:
            cols.append(t.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(t.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=SCHEMA)


def manifest_uri(output: str) -> str:
    """``<output>/_manifest``."""
    return join_uri(output, MANIFEST_DIR)


def run_uri(output: str, run_id: str) -> str:
    """The folder holding one run's parts."""
    return join_uri(output, MANIFEST_DIR, f"run={run_id}")


def put_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` so that nothing half-written is ever visible: one PUT on object stores, a hidden
    temp file renamed into place on local disks (a leftover temp file from a killed run is removed by the next run)."""
    if is_local(fs):
        parent = posixpath.dirname(path)
        tmp = posixpath.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            f = open(tmp, "wb")
        except FileNotFoundError:  # the folder is made on first use only, not checked before every image
            os.makedirs(parent, exist_ok=True)
            f = open(tmp, "wb")
        try:
            with f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
    else:  # object stores: one PUT; the object appears only when complete
        fs.pipe_file(path, data)


def put_file_atomic(fs: Any, path: str, write: Callable[[Any], None]) -> int:
    """Like :func:`put_atomic` for outputs too large to hold as bytes: ``write(fh)`` writes a local temp file (in the
    destination folder on local disks, renamed into place; in the system temp folder for object stores, then
    uploaded with ``put_file``, a multipart upload that appears only when complete). Returns the file's size."""
    import tempfile

    local = is_local(fs)
    if local:
        parent = posixpath.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}")
    else:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX)
        os.close(fd)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        size = os.path.getsize(tmp)
        if local:
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
        return size
    finally:
        try:
            os.remove(tmp)
        except OSError:
            pass


def is_local(fs: Any) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")


FLUSH_ROWS = 5000
"""Rows per manifest part written row by row (parts are also cut every ``flush_seconds``)."""
TABLE_PART_ROWS = 250_000
"""Rows per manifest part written from a table (the skipped inputs of a run)."""


def part_name(seq: int, token: str) -> str:
    """The file name of part ``seq`` of a run written by the writer identified by ``token``."""
    return f"part-{seq:05d}-{token}.parquet"


class ManifestWriter:
    """Buffers rows and writes them as numbered Parquet parts of one run. Call :meth:`add` (one row),
    :meth:`add_table` (many rows at once, e.g. the skipped inputs) and :meth:`close`.

    The outcome rows written (status ok/failed) are kept as Arrow tables in :attr:`outcomes`, for the run state.
    ``on_flush`` is called after each part is written (the job refreshes its active-run marker there).
    """

    def __init__(
        self,
        output: str,
        run_id: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        flush_seconds: float = 30.0,
        flush_rows: int = FLUSH_ROWS,
        on_flush: Callable[[], None] | None = None,
    ) -> None:
        self.uri = run_uri(output, run_id)
        self.fs, self.path = filesystem(self.uri, storage_options)
        self.flush_seconds = flush_seconds
        self.flush_rows = flush_rows
        self.on_flush = on_flush
        self._rows: list[dict[str, Any]] = []
        self._tables: list[pa.Table] = []
        self._queued = 0
        self._written = False
        self._last = time.monotonic()
        self._token = uuid.uuid4().hex[:8]
        self._seq = 0
        self.parts: list[str] = []
        self.rows_written = 0
        self.outcomes: list[pa.Table] = []

    def add(self, row: Mapping[str, Any]) -> None:
        """Queue one row; writes a part when enough rows or time have gathered."""
        self._rows.append(dict(row))
        self._queued += 1
        self._maybe_flush()

    def add_batch(self, table: pa.Table) -> None:
        """Queue the rows of ``table`` (cast to the manifest's schema); writes a part when enough rows or time have
        gathered."""
        if self._rows:  # keep the order rows came in
            self._tables.append(to_table(self._rows))
            self._rows.clear()
        self._tables.append(cast_to_schema(table))
        self._queued += table.num_rows
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self._queued >= self.flush_rows or time.monotonic() - self._last >= self.flush_seconds:
            self.flush()

    def add_table(self, table: pa.Table, *, rows_per_part: int = TABLE_PART_ROWS) -> None:
        """Write ``table`` (manifest schema) as parts of at most ``rows_per_part`` rows, straight from Arrow."""
        self.flush()
        for start in range(0, table.num_rows, rows_per_part):
            self._write(table.slice(start, rows_per_part))

    def flush(self) -> None:
        """Write the queued rows as one part (nothing when the queue is empty)."""
        self._last = time.monotonic()
        if self._rows:
            self._tables.append(to_table(self._rows))
            self._rows.clear()
        if not self._tables:
            return
        # Taken off the queue before writing, so that an interruption (SIGTERM and Ctrl-C raise KeyboardInterrupt
        # anywhere) after the part is written never writes its rows a second time from close(); put back when the
        # part was not written.
        tables, queued = self._tables, self._queued
        self._tables, self._queued = [], 0
        self._written = False
        try:
            self._write(pa.concat_tables(tables))
        except BaseException:
            if not self._written:
                self._tables, self._queued = tables + self._tables, queued + self._queued
            raise

    def _write(self, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        name = part_name(self._seq, self._token)
        path = posixpath.join(self.path, name)
        try:
            put_atomic(self.fs, path, buf.getvalue())
            self._written = True
        except Exception as e:
            raise StorageError(f"could not write manifest part {join_uri(self.uri, name)}: {type(e).__name__}: {e}") from e
        self._seq += 1
        self.rows_written += table.num_rows
        self.parts.append(join_uri(self.uri, name))
        outcome = table.filter(pc.is_in(table["status"], pa.array(OUTCOME_STATUSES)))
        if outcome.num_rows:
            self.outcomes.append(outcome)
        if self.on_flush is not None:
            try:
                self.on_flush()
            except Exception as e:  # a marker is a courtesy to `srbatch manifest compact`; never fail the run for it
                log.warning("could not refresh the active-run marker: %s", e)

    def close(self) -> None:
        """Write what is left."""
        self.flush()

    def outcome_table(self) -> pa.Table | None:
        """Every outcome row written so far, as one table (None when there is none)."""
        return pa.concat_tables(self.outcomes) if self.outcomes else None


def read_manifest(
    output: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    runs: Iterable[str] | None = None,
    columns: Iterable[str] | None = None,
) -> pa.Table | None:
    """The rows of every run (or of the given ``runs``) under ``<output>/_manifest``, all columns or ``columns``
    (None when there is no manifest yet).

    Parts that cannot be read are reported and ignored (their inputs are then simply redone).
    """
    fs, path = filesystem(manifest_uri(output), storage_options)
    names = list(columns) if columns is not None else SCHEMA.names
    unknown = [c for c in names if c not in SCHEMA.names]
    if unknown:
        raise ValueError(f"unknown manifest columns {unknown}; the columns are: {', '.join(SCHEMA.names)}")
    try:
        fs.invalidate_cache()
        if not fs.exists(path):
            return None
        if runs is None:
            found = fs.find(path)
        else:
            found = []
            for r in runs:
                d = posixpath.join(path, f"run={r}")
                if fs.exists(d):
                    found += fs.find(d)
        parts = sorted(p for p in found if p.endswith(".parquet") and "/.srbatch-tmp-" not in p)
    except Exception as e:
        raise StorageError(f"could not list the manifest under {manifest_uri(output)}: {type(e).__name__}: {e}") from e
    schema = pa.schema([SCHEMA.field(n) for n in names])
    tables = []
    for p in parts:
        try:
            with fs.open(p, "rb") as f:
                pf = pq.ParquetFile(f)
                have = [n for n in names if n in pf.schema_arrow.names]
                t = pf.read(columns=have)
            cols = [t.column(n).cast(schema.field(n).type) if n in have else pa.nulls(t.num_rows, schema.field(n).type)
                    for n in names]  # fmt: skip
            tables.append(pa.Table.from_arrays(cols, schema=schema))
        except Exception as e:
            log.warning("ignoring unreadable manifest part %s: %s: %s", p, type(e).__name__, e)
    if not tables:
        return None
    return pa.concat_tables(tables)
