"""The upscale job's staged pipeline: CPU stages that scale with the cluster's CPUs around the model actors.

    decode stage (Ray tasks, 1 CPU each)  ->  model stage (actors: one per GPU)  ->  encode stage (Ray tasks)
    read + decode                             upscale (same-size images batched)    encode + atomic write

With a fast GPU the model takes milliseconds per image while reading, decoding and above all PNG encoding take tenths
of a second of CPU; in the fused pipeline (one actor does everything, :class:`~srbatch.upscale.worker.UpscaleWorker`)
the GPU then waits on the few threads of its own actor. Here the CPU work runs as Ray Data tasks on every core of every
node, and the model actor only moves tensors and runs the model.

What passes between the stages, per input: ``row`` (the manifest row so far, as JSON), ``kind`` (what ``payload``
holds) and ``payload``:

* :data:`DECODED` / :data:`UPSCALED`: a pickled :class:`~srbatch.io.images.DecodedImage` (uint8/uint16 arrays: the
  decoded input, then the upscaled output), through Ray's object store (shared memory on a node);
* :data:`ENCODED`: the output file's bytes (JPEG encoded on the GPU by the model actor);
* :data:`BYTES`: an input too large to pass around decoded (its output would be streamed band by band, see
  :data:`~srbatch.upscale.worker.STREAM_OUTPUT_BYTES`): its file's bytes, for the actor to do it all;
* :data:`LARGE`: a TIFF read region by region by the actor itself (nothing read here);
* :data:`DONE`: the row is final (a failure, or an image the actor finished).

Every guarantee of the fused pipeline holds: one row per input (the stage functions never raise: an exception is
that input's failed row), atomic outputs, the same keys and the same pixels.

:func:`run_local` runs the same three stages without Ray (process pools around an in-process model), for machines
without Ray and for the GPU check (``scripts/gpu-check.sh``).
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from srbatch.jobkit.actor import error_fields
from srbatch.upscale.config import UpscaleConfig
from srbatch.upscale.worker import STREAM_OUTPUT_BYTES, ImageIO, _StreamedTiff, rows_table

__all__ = ["DECODED", "UPSCALED", "ENCODED", "BYTES", "LARGE", "DONE", "STAGE_SCHEMA", "decode_batch",
           "encode_batch", "run_local", "LocalRun", "DECODED_BYTES"]  # fmt: skip

DECODED, UPSCALED, ENCODED, BYTES, LARGE, DONE = "decoded", "upscaled", "encoded", "bytes", "large", "done"

STAGE_SCHEMA = pa.schema([("row", pa.large_string()), ("kind", pa.string()), ("payload", pa.large_binary())])
"""What the stages hand each other (one row per input)."""

DECODED_BYTES = 16 * 1024**2
"""Inputs whose decoded samples take more than this, or whose output is streamed, go to the model actor undecoded
(the actor plans their memory and may read and write them region by region)."""

_JSONABLE = (str, int, float, bool, type(None))


def dumps(img: Any) -> bytes:
    """A decoded image as bytes for the next stage (pickle protocol 5: the arrays are copied once, not converted)."""
    return pickle.dumps(img, protocol=5)


def loads(data: Any) -> Any:
    """The image :func:`dumps` made."""
    return pickle.loads(data)


def pack(rows: list[dict[str, Any]], kinds: list[str], payloads: list[bytes | None]) -> pa.Table:
    """The stage table of ``rows`` (JSON), ``kinds`` and ``payloads``."""
    text = [json.dumps({k: _plain(v) for k, v in r.items() if isinstance(_plain(v), _JSONABLE)}) for r in rows]
    return pa.Table.from_arrays([pa.array(text, pa.large_string()), pa.array(kinds, pa.string()),
                                 pa.array(payloads, pa.large_binary())], schema=STAGE_SCHEMA)  # fmt: skip


def _plain(v: Any) -> Any:
    """numpy scalars (metrics, sizes) as the Python numbers JSON takes."""
    return v.item() if isinstance(v, np.generic) else v


def unpack(batch: Any) -> tuple[list[dict[str, Any]], list[str], list[Any]]:
    """``(rows, kinds, payloads)`` of a stage batch (a dict of numpy columns, as Ray Data hands it, or a table)."""
    if isinstance(batch, pa.Table):
        batch = {name: batch[name].to_pylist() for name in batch.column_names}
    rows = [json.loads(str(r)) for r in batch["row"]]
    return rows, [str(k) for k in batch["kind"]], list(batch["payload"])


class _StageIO(ImageIO):
    """:class:`ImageIO` for a CPU stage: the job's configuration and a thread pool for object-store round trips."""

    def __init__(self, config: dict[str, Any], budget: int) -> None:
        self.cfg = UpscaleConfig.model_validate(config)
        self.so = self.cfg.fs_options()
        self.window = 2 * self.cfg.io_threads
        self.budget = int(budget)
        self.pool = ThreadPoolExecutor(self.cfg.io_threads, thread_name_prefix="srbatch-stage-io")

    def _budget(self) -> int:
        return self.budget

    def close(self) -> None:
        self.pool.shutdown(wait=True)


_IO_CACHE: dict[str, _StageIO] = {}


def _stage_io(config: dict[str, Any], budget: int) -> _StageIO:
    """The stage I/O of this worker process for ``config`` (Ray reuses worker processes between tasks: the
    configuration is validated and the thread pool started once per process, not once per batch)."""
    key = json.dumps(config, sort_keys=True, default=str) + f"|{budget}"
    io = _IO_CACHE.get(key)
    if io is None:
        for old in _IO_CACHE.values():
            old.close()
        _IO_CACHE.clear()
        io = _IO_CACHE[key] = _StageIO(config, budget)
    return io


def decode_batch(batch: Any, *, config: dict[str, Any], scale: float, budget: int) -> pa.Table:
    """The decode stage: read and decode the inputs of ``batch`` (columns ``input_uri``, ``output_uri``, ``run_id``).

    ``scale`` is the job's output scale (to foresee streamed outputs) and ``budget`` the memory one image may use
    (to pick the TIFFs read region by region). Never raises: a broken input is a :data:`DONE` failed row."""
    from srbatch.io.images import decode_image

    io = _stage_io(config, budget)
    inputs = [str(u) for u in batch["input_uri"]]
    outputs = [str(u) for u in batch["output_uri"]]
    run_ids = [str(r) for r in batch["run_id"]]
    rows: list[dict[str, Any]] = []
    kinds: list[str] = []
    payloads: list[bytes | None] = []
    if not inputs:
        return pack(rows, kinds, payloads)
    read = io._reader(inputs)
    for i, (uri, out_uri, run_id) in enumerate(zip(inputs, outputs, run_ids)):
        row: dict[str, Any] = {"input_uri": uri, "output_uri": out_uri, "run_id": run_id, "status": "failed"}
        kind, payload = DONE, None
        try:
            data, row["read_s"] = read(i)
            if isinstance(data, BaseException):
                raise data
            if isinstance(data, _StreamedTiff):  # a huge TIFF: the actor reads it region by region
                data.close()
                kind = LARGE
            else:
                row["input_bytes"] = len(data)
                t = time.perf_counter()
                if _large(data, scale, io.cfg.max_pixels):
                    kind, payload = BYTES, data
                else:
                    img = decode_image(data, name=uri, max_pixels=io.cfg.max_pixels)
                    row.update(input_width=img.width, input_height=img.height, input_mode=img.mode)
                    kind, payload = DECODED, dumps(img)
                    del img
                row["decode_s"] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - one broken image is one failed row
            row.update(error_fields(e), output_uri=None)
            kind, payload = DONE, None
        rows.append(row)
        kinds.append(kind)
        payloads.append(payload)
    return pack(rows, kinds, payloads)


def _large(data: bytes, scale: float, max_pixels: int) -> bool:
    """True when the image in ``data`` is better left whole to the actor: its decoded samples exceed
    :data:`DECODED_BYTES` or its output would be streamed. Reads the header only; a header that does not open is
    decoded here (and its error reported here)."""
    from srbatch.io.images import _open_header

    try:
        im = _open_header(data)
        w, h = im.size
        bands = 4 if im.mode in ("P", "PA") else len(im.getbands())  # a palette decodes to RGB(A)
        depth = 2 if im.mode.startswith("I") or ";16" in im.mode else 1
    except Exception:  # noqa: BLE001 - decode_image reports it
        return False
    if w * h > max_pixels:
        return False  # refused by decode_image, with its message
    samples = w * h * bands * depth
    return samples > DECODED_BYTES or samples * scale * scale > STREAM_OUTPUT_BYTES


def encode_batch(batch: Any, *, config: dict[str, Any], budget: int) -> pa.Table:
    """The encode stage: encode and atomically write the upscaled images of ``batch`` (from the model stage) and
    return the finished manifest rows (a table of :data:`~srbatch.upscale.manifest.SCHEMA`). Never raises."""
    io = _stage_io(config, budget)
    rows, kinds, payloads = unpack(batch)
    out_fs = io._filesystem([r["output_uri"] for r in rows if r.get("output_uri")] or ["/"]) if rows else None

    def write(i: int, data: bytes) -> None:
        row = rows[i]
        try:
            row["write_s"] = io._write(row["output_uri"], data, out_fs)
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one failed write is one failed row
            row.update(error_fields(e), output_uri=None, status="failed")

    # One encode at a time on this task's thread (the task holds one CPU; more stage tasks run side by side in other
    # processes, without sharing a GIL); the uploads wait on the thread pool, at most `window` at once.
    pending: list[Any] = []
    for i, (row, kind) in enumerate(zip(rows, kinds)):
        if kind not in (UPSCALED, ENCODED):
            continue
        try:
            data = io._encode_row(loads(payloads[i]), row) if kind == UPSCALED else payloads[i]
            payloads[i] = None
            while len(pending) >= io.window:  # the oldest upload first
                pending.pop(0).result()
            pending.append(io.pool.submit(write, i, data))
            del data
        except Exception as e:  # noqa: BLE001 - one failed encode is one failed row
            row.update(error_fields(e), output_uri=None, status="failed")
    for u in pending:
        u.result()
    for row in rows:
        row["total_s"] = sum(row.get(k) or 0.0 for k in ("read_s", "decode_s", "infer_s", "encode_s", "write_s"))
    return rows_table(rows, {"finished_at": datetime.now(timezone.utc)})


# ------------------------------------------------------------------------------------------------- without Ray


@dataclass
class LocalRun:
    """What :func:`run_local` did: the manifest rows, the wall time of the pipeline, and images per second."""

    rows: pa.Table
    seconds: float
    """From the first batch handed to the decode step to the last row (the pool and the model are started before)."""
    model_seconds: float
    start_seconds: float = 0.0
    """Starting the process pool (its workers import srbatch) and loading the model, before the clock."""

    @property
    def images_per_s(self) -> float:
        return self.rows.num_rows / self.seconds if self.seconds > 0 else 0.0


def _chunks(table: pa.Table, size: int) -> Iterator[dict[str, list[Any]]]:
    for start in range(0, table.num_rows, size):
        part = table.slice(start, size)
        yield {name: part[name].to_pylist() for name in part.column_names}


def run_local(cfg: UpscaleConfig, *, cpu_workers: int | None = None, fingerprint: str = "local",
              items: pa.Table | None = None) -> LocalRun:  # fmt: skip
    """Upscale ``cfg.input`` to ``cfg.output`` through the three stages without Ray: the decode and encode stages on a
    process pool of ``cpu_workers`` (default: every core), the model in this process. Writes the outputs, not the
    manifest or the run state (no resume): for machines without Ray and for measuring the pipeline (the GPU check).
    ``items`` (``input_uri``, ``output_uri``) replaces the listing of ``cfg.input``."""
    import multiprocessing as mp
    import os
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    from srbatch.inference.memory import available_memory
    from srbatch.upscale.plan import make_plan
    from srbatch.upscale.worker import UpscaleWorker

    if items is None:
        items = make_plan(cfg, fingerprint, None).todo
    items = items.select(["input_uri", "output_uri"])
    items = items.append_column("run_id", pa.repeat(pa.scalar(cfg.run_id), items.num_rows))
    workers = cpu_workers or os.cpu_count() or 1
    config = cfg.model_dump()
    budget = cfg.max_memory_bytes() or int(available_memory() * 0.5)
    t_start = time.perf_counter()
    worker = UpscaleWorker(config, fingerprint=fingerprint)  # the model is loaded before the clock starts
    scale = cfg.outscale or float(worker.desc.scale)
    parts: list[pa.Table] = []
    model_s = 0.0
    # spawn, not fork: the parent holds torch (and maybe CUDA); the children only decode and encode
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for f in [pool.submit(_started, 0.2) for _ in range(workers)]:  # every worker up before the clock
            f.result()
        start_s = time.perf_counter() - t_start
        t0 = time.perf_counter()
        decoding: deque[Any] = deque()
        encoding: deque[Any] = deque()
        batches = _chunks(items, cfg.batch_size)

        def feed() -> None:
            while len(decoding) < 2 * workers:
                b = next(batches, None)
                if b is None:
                    return
                decoding.append(pool.submit(decode_batch, b, config=config, scale=scale, budget=budget))

        feed()
        while decoding:
            decoded = decoding.popleft().result()
            feed()
            t = time.perf_counter()
            upscaled = worker(_columns(decoded))
            model_s += time.perf_counter() - t
            encoding.append(pool.submit(encode_batch, _columns(upscaled), config=config, budget=budget))
            while encoding and (encoding[0].done() or len(encoding) > 2 * workers):
                parts.append(encoding.popleft().result())
        while encoding:
            parts.append(encoding.popleft().result())
    seconds = time.perf_counter() - t0
    from srbatch.upscale.manifest import SCHEMA

    rows = pa.concat_tables(parts) if parts else SCHEMA.empty_table()
    return LocalRun(rows=rows, seconds=seconds, model_seconds=model_s, start_seconds=start_s)


def _started(hold: float) -> int:
    """A pool worker's first task: it is up and has imported the stages; held a moment so that each worker of the
    pool gets one."""
    time.sleep(hold)
    return 0


def _columns(table: pa.Table) -> dict[str, Any]:
    """A stage table as the dict of columns Ray Data hands a stage (``batch_format='numpy'``)."""
    out: dict[str, Any] = {}
    for name in table.column_names:
        arr = np.empty(table.num_rows, dtype=object)
        arr[:] = table[name].to_pylist()
        out[name] = arr
    return out
