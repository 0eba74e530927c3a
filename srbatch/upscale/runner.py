"""The upscale job's driver: plan the run, start (or join) Ray, stream the inputs through a pool of model actors with
Ray Data, write the manifest as rows come back, print progress and a summary, and decide the exit code."""

from __future__ import annotations

import logging
import math
import posixpath
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TextIO

import pyarrow as pa

from srbatch.io.storage import filesystem
from srbatch.jobkit.cli import ExitCode
from srbatch.upscale.config import UpscaleConfig
from srbatch.upscale.manifest import ManifestWriter, empty_row, run_uri
from srbatch.upscale.plan import TMP_PREFIX, Plan, existing_outputs, fingerprint, make_plan
from srbatch.upscale.state import LoadedState, RunState
from srbatch.upscale.video import video_fingerprint

log = logging.getLogger("srbatch.upscale")

__all__ = ["JobResult", "run_job"]

STAGE_BATCH = 8
"""Images per task of the staged pipeline's CPU stages (small: the tasks spread over every core)."""

MAX_FAILURES_KEPT = 100
"""Failures kept in :attr:`JobResult.failures` (the summary prints 10; the manifest holds every one)."""


@dataclass
class JobResult:
    """What a run did. ``exit_code`` follows the failure policy (0 ok, 1 too many failures, 130 interrupted)."""

    run_id: str
    output: str
    manifest: str
    total: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    pipeline_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    devices: dict[str, str] = field(default_factory=dict)
    exit_code: int = ExitCode.OK
    interrupted: bool = False
    videos: list[str] = field(default_factory=list)
    """One summary line per video processed."""

    @property
    def processed(self) -> int:
        """Inputs worked on this run (ok + failed)."""
        return self.ok + self.failed

    @property
    def throughput(self) -> float:
        """Images processed per second of the pipeline (actor start-up included)."""
        return self.processed / self.pipeline_seconds if self.pipeline_seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        """Per-image latency percentile (seconds of read + decode + infer + encode + write), nearest rank."""
        if not self.latencies:
            return math.nan
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]

    def summary(self) -> str:
        """The end-of-run summary printed by the job."""
        lines = [
            f"srbatch upscale: run {self.run_id}{' INTERRUPTED' if self.interrupted else ''}: {self.total} inputs: "
            f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped",
            f"  time {self.seconds:.1f} s (pipeline {self.pipeline_seconds:.1f} s), throughput "
            f"{self.throughput:.2f} images/s, per-image latency p50 {self.percentile(50):.3f} s, "
            f"p95 {self.percentile(95):.3f} s",
        ]
        for actor, dev in sorted(self.devices.items()):
            lines.append(f"  actor {actor[:12]}: {dev}")
        lines.extend(f"  video {v}" for v in self.videos[:20])
        for uri, msg in self.failures[:10]:
            lines.append(f"  failed: {uri}: {msg}")
        if self.failed > 10:
            lines.append(f"  ... and {self.failed - 10} more failures (see the manifest, or `srbatch manifest "
                         f"failures {self.output}`)")
        lines.append(f"  outputs:  {self.output}")
        lines.append(f"  manifest: {self.manifest}")
        return "\n".join(lines)


def _model_identity(cfg: UpscaleConfig) -> tuple[dict[str, Any], Any]:
    """Load the model once on the driver (CPU) to validate it early and fingerprint it."""
    from srbatch.models.loader import load_model

    desc = load_model(cfg.model, scale=cfg.scale, sha256=cfg.sha256, storage_options=cfg.fs_options())
    ident = {"name": desc.name, "architecture": desc.architecture, "hparams": desc.hparams, "sha256": desc.sha256,
             "scale": desc.scale}  # fmt: skip
    return ident, desc


def _sweep_temp_files(outputs: list[str], cfg: UpscaleConfig) -> list[str]:
    """Remove the temp files a killed run left under the output prefix (found in its listing ``outputs``). Returns
    the listing without them."""
    temps = [p for p in outputs if posixpath.basename(p).startswith(TMP_PREFIX)]
    if not temps:
        return outputs
    fs, _ = filesystem(cfg.output, cfg.fs_options())
    for p in temps:
        try:
            fs.rm_file(p)
        except Exception as e:
            log.warning("could not remove the temporary file %s: %s", p, e)
    log.warning("removed %d temporary files left by an interrupted run under %s", len(temps), cfg.output)
    gone = set(temps)
    return [p for p in outputs if p not in gone]


def run_job(cfg: UpscaleConfig, *, stream: TextIO | None = None) -> JobResult:
    """Run the upscale job described by ``cfg`` and return what it did (the manifest holds the details).

    Configuration problems (bad model, empty input, ...) raise :class:`~srbatch.errors.SrbatchError` before any work.
    Problems with single images never raise: they become failed rows.
    """
    stream = stream or sys.stdout
    t_start = time.perf_counter()
    started_at = datetime.now(timezone.utc)
    so = cfg.fs_options()
    ident, desc = _model_identity(cfg)
    radius = int(getattr(desc.info, "temporal_radius", 0) or 0)  # frames a temporal model reads on each side
    fp = fingerprint(cfg, ident)
    vfp = video_fingerprint(cfg, fp)
    store = RunState(cfg.output, so)
    loaded = store.load(reopen=cfg.run_id)
    outputs = _sweep_temp_files(existing_outputs(cfg.output, so), cfg) if cfg.check_outputs == "list" else None
    plan = make_plan(cfg, fp, loaded.table, outputs=outputs, video_fp=vfp)
    del outputs
    loaded.table = loaded.table.slice(0, 0)  # planning is done with it
    res = JobResult(cfg.run_id, cfg.output, run_uri(cfg.output, cfg.run_id), total=plan.total)
    print(
        f"srbatch upscale: run {cfg.run_id}: {plan.total} inputs under {cfg.input}: {plan.todo.num_rows} to process, "
        f"{len(plan.done)} already done (skipped), {len(plan.rejected)} refused; model "
        f"{desc.name or desc.architecture} x{desc.scale} (fingerprint {fp})",
        file=stream, flush=True,
    )  # fmt: skip
    del desc
    store.mark_active(cfg.run_id, started_at)
    writer = ManifestWriter(cfg.output, cfg.run_id, so, flush_seconds=cfg.manifest_flush_seconds,
                            on_flush=lambda: store.mark_active(cfg.run_id, started_at))  # fmt: skip
    common = {"model": ident["name"], "architecture": ident["architecture"], "model_sha256": ident["sha256"],
              "fingerprint": fp, "run_id": cfg.run_id, "scale": cfg.outscale or float(ident["scale"])}  # fmt: skip
    try:
        for rows in store.skipped_tables(plan.done, cfg.run_id):
            writer.add_table(rows)
            res.skipped += rows.num_rows
        for task in plan.rejected:
            _record(res, writer, empty_row(input_uri=task.input_uri, status="failed", error_type="ConfigError",
                                           error_message=task.error, **common))  # fmt: skip
        if plan.todo.num_rows:
            _run_pipeline(cfg, plan, fp, res, writer, common, stream, radius=radius, vfp=vfp)
    except KeyboardInterrupt:
        res.interrupted = True
    finally:
        writer.close()
        res.seconds = time.perf_counter() - t_start
        if res.interrupted:
            res.exit_code = ExitCode.INTERRUPTED
        elif res.processed and res.failed / res.processed > cfg.max_failed_fraction:
            res.exit_code = ExitCode.FAILED
        _commit(store, loaded, writer, res, cfg, ident, fp, started_at)
    print(res.summary(), file=stream, flush=True)
    if res.exit_code == ExitCode.FAILED:
        print(
            f"srbatch upscale: {res.failed} of {res.processed} processed images failed "
            f"({res.failed / res.processed:.1%} > --max-failed-fraction {cfg.max_failed_fraction}); exit code 1. "
            "Fix or remove them and rerun: only failed and new images are processed.",
            file=stream, flush=True,
        )  # fmt: skip
    return res


def _commit(
    store: RunState,
    loaded: LoadedState,
    writer: ManifestWriter,
    res: JobResult,
    cfg: UpscaleConfig,
    ident: dict[str, Any],
    fp: str,
    started_at: datetime,
) -> None:
    """After the run's rows are written: the new state (this run's outcomes folded in), the run records (this run's
    and those of killed runs folded on the way), and the active marker removed. A failure here loses nothing: the
    next run folds this run's parts from the manifest."""
    try:
        store.merge(writer.outcome_table(), [*loaded.folded_runs, cfg.run_id])
        for run_id, counts in loaded.recovered_counts.items():
            store.write_run_record(run_id, {"run_id": run_id, "complete": False, "recovered_by": cfg.run_id,
                                            **counts})  # fmt: skip
        store.write_run_record(cfg.run_id, {
            "run_id": cfg.run_id, "complete": not res.interrupted, "interrupted": res.interrupted,
            "started_at": started_at.isoformat(), "finished_at": datetime.now(timezone.utc).isoformat(),
            "seconds": round(res.seconds, 3), "pipeline_seconds": round(res.pipeline_seconds, 3),
            "total": res.total, "ok": res.ok, "failed": res.failed, "skipped": res.skipped,
            "throughput": round(res.throughput, 4), "p50_s": _finite(res.percentile(50)),
            "p95_s": _finite(res.percentile(95)), "exit_code": int(res.exit_code), "fingerprint": fp,
            "model": ident["name"], "architecture": ident["architecture"], "input": cfg.input, "output": cfg.output,
            "force": cfg.force, "rows_written": writer.rows_written,
        })  # fmt: skip
    except Exception as e:
        log.error("could not update the run state under %s (%s: %s); the next run rebuilds it from this run's "
                  "manifest parts", store.path, type(e).__name__, e)  # fmt: skip
    finally:
        store.clear_active(cfg.run_id)


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def _sigterm_as_interrupt() -> Any:
    """`ray job stop` and Kubernetes stop a driver with SIGTERM: treat it like Ctrl-C (the rows so far are written,
    nothing is half-written). Returns the previous handler (None when not on the main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def _record(res: JobResult, writer: ManifestWriter, row: dict[str, Any]) -> None:
    writer.add(row)
    if row["status"] == "ok":
        res.ok += 1
    else:
        res.failed += 1
        if len(res.failures) < MAX_FAILURES_KEPT:  # the manifest has them all
            res.failures.append((row["input_uri"], f"{row.get('error_type')}: {row.get('error_message')}"))
    if row.get("total_s") is not None and row["status"] == "ok":
        res.latencies.append(float(row["total_s"]))
    if row.get("actor_id") and row["actor_id"] not in res.devices:
        gpu = f", Ray GPU ids {row['gpu_ids']}" if row.get("gpu_ids") else ""
        res.devices[row["actor_id"]] = f"{row.get('device')}{gpu}"


def _record_batch(res: JobResult, writer: ManifestWriter, batch: pa.Table) -> None:
    """:func:`_record` for a batch of result rows, in Arrow (Python objects only for failures and new actors)."""
    import pyarrow.compute as pc

    writer.add_batch(batch)
    is_ok = pc.equal(batch["status"], "ok")
    n_ok = pc.sum(is_ok).as_py() or 0
    res.ok += n_ok
    res.failed += batch.num_rows - n_ok
    if n_ok < batch.num_rows and len(res.failures) < MAX_FAILURES_KEPT:
        bad = batch.filter(pc.invert(is_ok)).select(["input_uri", "error_type", "error_message"]).to_pylist()
        for r in bad[: MAX_FAILURES_KEPT - len(res.failures)]:
            res.failures.append((r["input_uri"], f"{r.get('error_type')}: {r.get('error_message')}"))
    if "total_s" in batch.column_names:
        res.latencies.extend(x for x in batch.filter(is_ok)["total_s"].to_pylist() if x is not None)
    if "actor_id" in batch.column_names:
        for r in batch.select([c for c in ("actor_id", "device", "gpu_ids") if c in batch.column_names]).slice(
            0, 1
        ).to_pylist():  # one actor per batch
            if r.get("actor_id") and r["actor_id"] not in res.devices:
                gpu = f", Ray GPU ids {r['gpu_ids']}" if r.get("gpu_ids") else ""
                res.devices[r["actor_id"]] = f"{r.get('device')}{gpu}"


def _run_pipeline(
    cfg: UpscaleConfig,
    plan: Plan,
    fp: str,
    res: JobResult,
    writer: ManifestWriter,
    common: dict[str, Any],
    stream: TextIO,
    *,
    radius: int = 0,
    vfp: str | None = None,
) -> None:
    import pyarrow.compute as pc

    from srbatch.jobkit.cluster import ray_session
    from srbatch.jobkit.pool import CpuStage, run_actor_pool
    from srbatch.jobkit.resources import plan_actors
    from srbatch.upscale import video as vjob
    from srbatch.upscale.worker import UpscaleWorker

    t0 = time.perf_counter()
    with ray_session(cfg) as ray:
        previous = _sigterm_as_interrupt()  # after ray.init, which installs its own handler
        try:
            rs = plan_actors(cfg, ray.cluster_resources())
            log.info("actor pool: %s", rs.as_dict())
            staged = cfg.pipeline == "stages" or (cfg.pipeline == "auto" and rs.gpus_per_actor > 0)
            before: list[CpuStage] = []
            after: list[CpuStage] = []
            if staged:
                from srbatch.inference.memory import available_memory
                from srbatch.upscale import stages

                budget = cfg.max_memory_bytes() or int(available_memory() * rs.memory_share)
                conf = cfg.model_dump()
                size = min(cfg.batch_size, STAGE_BATCH)
                decode = {"config": conf, "scale": common["scale"], "budget": budget}
                before = [CpuStage(stages.decode_batch, decode, size)]
                after = [CpuStage(stages.encode_batch, {"config": conf, "budget": budget}, size)]
            print(f"srbatch upscale: {rs.describe()}; pipeline "
                  f"{'staged (read+decode and encode+write as CPU tasks on every core)' if staged else 'fused'}",
                  file=stream, flush=True)  # fmt: skip
            todo = plan.todo.append_column("run_id", pa.repeat(pa.scalar(cfg.run_id), plan.todo.num_rows))
            is_vid = pc.match_substring_regex(todo["input_uri"], r"\.(mp4|mkv|mov|webm)$", ignore_case=True)
            videos: list[vjob.VideoJob] = []
            if pc.any(is_vid).as_py():
                images = todo.filter(pc.invert(is_vid))
                common_v = {**common, "fingerprint": vfp or fp}
                videos = _probe_videos(ray, cfg, todo.filter(is_vid).to_pylist(), vfp or fp, radius, res, writer,
                                       common_v, stream)
            else:
                images = todo
            segments = {v.key(s): (v, s.id) for v in videos for s in v.segments if s.id not in v.reused}
            seg_items = [it for v in videos for it in v.items(cfg.run_id, radius)]

            def on_row(row: dict[str, Any]) -> None:
                hit = segments.get(str(row["input_uri"]))
                if hit is None:
                    _record(res, writer, row)
                else:
                    hit[0].rows[hit[1]] = row

            def on_batch(batch: pa.Table) -> None:
                if not segments:
                    _record_batch(res, writer, batch)
                    return
                mask = pc.is_in(batch["input_uri"], value_set=pa.array(list(segments), pa.string()))
                if pc.any(mask).as_py():
                    for row in batch.filter(mask).to_pylist():
                        on_row(row)
                    batch = batch.filter(pc.invert(mask))
                if batch.num_rows:
                    _record_batch(res, writer, batch)

            def pool(items: pa.Table, before: list[CpuStage], after: list[CpuStage]) -> None:
                run_actor_pool(
                    items,
                    key="input_uri",
                    actor=UpscaleWorker,
                    actor_kwargs={"config": cfg.model_dump(), "fingerprint": fp},
                    resources=rs,
                    batch_size=cfg.batch_size,
                    on_row=on_row,
                    on_batch=on_batch,
                    lost_row=lambda item, error_type, message: empty_row(
                        input_uri=item["input_uri"], status="failed", error_type=error_type, error_message=message,
                        **common
                    ),
                    progress=cfg.progress,
                    desc="upscale",
                    log=log,
                    before=before,
                    after=after,
                )

            if not seg_items:
                if images.num_rows:
                    pool(images, before, after)
            elif staged:  # the CPU stages take images only: segments go through the model actors on their own
                if images.num_rows:
                    pool(images, before, after)
                pool(pa.Table.from_pylist(seg_items), [], [])
            else:  # one pool: images and segments share the actors (the model loaded once per actor)
                imgs = images.append_column("segment", pa.repeat(pa.scalar(""), images.num_rows))
                segs = pa.Table.from_pylist(seg_items, schema=imgs.schema)
                pool(pa.concat_tables([imgs, segs]), [], [])
            if videos:
                _join_videos(ray, cfg, videos, res, writer, {**common, "fingerprint": vfp or fp})
        finally:
            res.pipeline_seconds = time.perf_counter() - t0
            if previous is not None:
                import signal

                signal.signal(signal.SIGTERM, previous)


def _probe_videos(
    ray: Any, cfg: UpscaleConfig, items: list[dict[str, Any]], vfp: str, radius: int, res: JobResult,
    writer: ManifestWriter, common: dict[str, Any], stream: TextIO,
) -> list[Any]:
    """Probe every video in a Ray task (packets only, next to the data, never downloaded to the driver), plan its
    segments and find the segment files a previous run already wrote. A video that cannot be probed gets its failed
    row here. Returns the videos that have segments to do or to join."""
    from srbatch.upscale import video as vjob

    so = cfg.fs_options()
    probe = ray.remote(num_cpus=1, max_retries=2)(vjob.probe_video)
    refs = [probe.remote(it["input_uri"], so) for it in items]
    videos = []
    for it, got in zip(items, ray.get(refs)):
        ext = posixpath.splitext(it["output_uri"])[1].lower()
        v = vjob.VideoJob(it["input_uri"], it["output_uri"], vjob.segment_folder(cfg, it["output_uri"], vfp), ext,
                          probe_s=got["probe_s"])
        if "error" in got:
            v.error = tuple(got["error"])
            _record(res, writer, v.row(common, None))
            res.videos.append(f"{v.input_uri}: failed at probe: {v.error[1]}")
            continue
        v.info, v.input_bytes = got["info"], got["bytes"]
        v.plan(cfg, radius, vjob.existing_segments(v.folder, so))
        print(f"srbatch upscale: video {v.input_uri}: {v.info.frames} frames at {float(v.info.fps):.3f} fps, "
              f"{v.info.width}x{v.info.height} {v.info.codec}: {len(v.segments)} segments "
              f"({len(v.reused)} already written)", file=stream, flush=True)
        videos.append(v)
    return videos


def _join_videos(
    ray: Any, cfg: UpscaleConfig, videos: list[Any], res: JobResult, writer: ManifestWriter, common: dict[str, Any]
) -> None:
    """Join each video whose segments are all written (Ray tasks, packet copy with the source's audio/subtitles);
    record one row per video, and the per-segment detail under ``_srbatch/video_segments/``."""
    from srbatch.upscale import video as vjob

    so = cfg.fs_options()
    join = ray.remote(num_cpus=1, max_retries=2)(vjob.join_video)
    pending = []
    for v in videos:
        bad = v.failed_segment()
        if bad is not None:
            v.error = (bad.get("error_type") or "VideoError", bad.get("error_message") or "a segment failed")
            pending.append((v, None))
            continue
        uris = [v.segment_uri(s) for s in v.segments]
        pending.append((v, join.remote(uris, v.input_uri, v.output_uri, v.info, v.folder, so)))
    for v, ref in pending:
        got = ray.get(ref) if ref is not None else None
        row = v.row(common, got)
        row["video_codec"] = row["video_codec"] or cfg.video_codec
        _record(res, writer, row)
        done = len(v.rows)
        state = "ok" if row["status"] == "ok" else f"failed: {row['error_type']}: {row['error_message']}"
        res.videos.append(
            f"{v.input_uri}: {state}; {v.info.frames} frames, {len(v.segments)} segments ({done} upscaled now, "
            f"{len(v.reused)} reused), {row.get('video_codec') or cfg.video_codec}, probe {v.probe_s:.2f} s, decode "
            f"{row.get('decode_s') or 0:.2f} s, model {row.get('infer_s') or 0:.2f} s, encode "
            f"{row.get('encode_s') or 0:.2f} s, join {row.get('join_s') or 0:.2f} s"
            + (f" ({done_frames / work:.2f} frames/s decode+model+encode)" if (work := sum(
                row.get(k) or 0.0 for k in ("decode_s", "infer_s", "encode_s"))) > 0 and (done_frames := sum(
                    r.get("video_frames") or 0 for r in v.rows.values() if r.get("status") == "ok")) else "")
        )
    try:
        vjob.write_segment_table(cfg, videos)
    except Exception as e:  # noqa: BLE001 - detail only; the manifest rows are written
        log.warning("could not write the per-segment detail: %s: %s", type(e).__name__, e)
