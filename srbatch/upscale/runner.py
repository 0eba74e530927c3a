"""The upscale job's driver: plan the run, start (or join) Ray, stream the inputs through a pool of model actors with
Ray Data, write the manifest as rows come back, print progress and a summary, and decide the exit code."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from srbatch.upscale.config import UpscaleConfig
from srbatch.upscale.manifest import ManifestWriter, empty_row, latest_rows, read_manifest, run_uri
from srbatch.upscale.plan import TMP_PREFIX, Plan, fingerprint, make_plan

log = logging.getLogger("srbatch.upscale")

__all__ = ["JobResult", "run_job", "ensure_ray", "is_loopback_address", "ray_env_defaults", "resources_for"]

EXIT_OK, EXIT_FAILURES, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130


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
    exit_code: int = EXIT_OK
    interrupted: bool = False

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
        for uri, msg in self.failures[:10]:
            lines.append(f"  failed: {uri}: {msg}")
        if len(self.failures) > 10:
            lines.append(f"  ... and {len(self.failures) - 10} more failures (see the manifest)")
        lines.append(f"  outputs:  {self.output}")
        lines.append(f"  manifest: {self.manifest}")
        return "\n".join(lines)


#: Ray's driver folds log lines that differ only in numbers into one "[repeated Nx across cluster]" line, printed
#: seconds later or never (when the job ends first). Each actor's start-up line ("srbatch actor <id> (pid N): model
#: ... on cuda:0 ...") names the device it got, and each training worker's lines (progress, resume, validation)
#: carry its own step and figures, so those are always printed in full.
NEVER_DEDUP_LOG_REGEX = r"srbatch actor |srbatch train: |__ray_testing_never_deduplicate__"


def is_loopback_address(address: str | None) -> bool:
    """True for a Ray address on this machine's loopback interface (``127.0.0.1:6379``, ``localhost:6379``,
    ``ray://[::1]:10001``, ``http://127.0.0.1:8265``)."""
    if not address:
        return False
    from urllib.parse import urlsplit

    host = urlsplit(address if "://" in address else f"//{address}").hostname or ""
    return host == "localhost" or host == "::1" or host.startswith("127.")


def ray_env_defaults(address: str | None = None) -> None:
    """Set srbatch's defaults for environment variables Ray reads when it is imported (call before ``import ray``;
    a variable already set wins).

    - Never fold the actors' and training workers' own lines (:data:`NEVER_DEDUP_LOG_REGEX`).
    - With no ``address`` (a new single-machine cluster), bind every port to 127.0.0.1 (see
      ../shared/ENVIRONMENT.md) instead of the machine's network address. With a loopback ``address`` (a head
      started with ``ray start --head --node-ip-address 127.0.0.1``), keep that address as given: otherwise Ray
      rewrites 127.0.0.1 to the machine's network address, where such a head does not listen, and the driver
      waits for the GCS forever.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", NEVER_DEDUP_LOG_REGEX)
    if not address or is_loopback_address(address):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def ensure_ray(cfg: Any, *, dashboard: bool = False) -> bool:
    """Connect to the cluster at ``cfg.ray_address``, ``$RAY_ADDRESS``, or start a local one on 127.0.0.1 (with the
    dashboard, on 127.0.0.1 too, when ``dashboard``: Ray Train's state queries need it). Returns True when this call
    started Ray (so the caller shuts it down)."""
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if "ray" not in sys.modules:
        ray_env_defaults(address)
    import ray

    if ray.is_initialized():
        return False
    if address:
        print(f"srbatch: joining the Ray cluster at {address}", file=sys.stderr, flush=True)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=True,
                 configure_logging=False)  # fmt: skip
    return True


def resources_for(cfg: UpscaleConfig, cluster: dict[str, float]) -> dict[str, Any]:
    """Actor pool size and per-actor resources for ``cfg`` on a cluster with ``cluster`` resources."""
    gpus = float(cluster.get("GPU", 0))
    cpus = float(cluster.get("CPU", 1))
    gpa = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus > 0 else 0.0)
    if gpa > 0:
        actors = cfg.actors or max(1, int(gpus // gpa))
        cpa = cfg.cpus_per_actor if cfg.cpus_per_actor is not None else 0.5
        threads = cfg.torch_threads
    else:
        actors = cfg.actors or 1
        cpa = cfg.cpus_per_actor if cfg.cpus_per_actor is not None else 1.0
        threads = cfg.torch_threads or max(1, int(cpus // actors))
    max_actors = max(getattr(cfg, "max_actors", None) or actors, actors)  # the comparison job has no max_actors
    return {"gpus_per_actor": gpa, "cpus_per_actor": cpa, "actors": actors, "max_actors": max_actors,
            "torch_threads": threads}  # fmt: skip


def _model_identity(cfg: UpscaleConfig) -> tuple[dict[str, Any], Any]:
    """Load the model once on the driver (CPU) to validate it early and fingerprint it."""
    from srbatch.models.loader import load_model

    desc = load_model(cfg.model, scale=cfg.scale, sha256=cfg.sha256, storage_options=cfg.fs_options())
    ident = {"name": desc.name, "architecture": desc.architecture, "hparams": desc.hparams, "sha256": desc.sha256,
             "scale": desc.scale}  # fmt: skip
    return ident, desc


def _sweep_temp_files(cfg: UpscaleConfig) -> int:
    """Remove temp files a killed run left under a local output folder. Returns how many."""
    if "://" in cfg.output and not cfg.output.startswith("file://"):
        return 0
    root = cfg.output.removeprefix("file://")
    n = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if f.startswith(TMP_PREFIX):
                try:
                    os.remove(os.path.join(dirpath, f))
                    n += 1
                except OSError:
                    pass
    return n


def run_job(cfg: UpscaleConfig, *, stream: TextIO | None = None) -> JobResult:
    """Run the upscale job described by ``cfg`` and return what it did (the manifest holds the details).

    Configuration problems (bad model, empty input, ...) raise :class:`~srbatch.errors.SrbatchError` before any work.
    Problems with single images never raise: they become failed rows.
    """
    stream = stream or sys.stdout
    t_start = time.perf_counter()
    so = cfg.fs_options()
    ident, desc = _model_identity(cfg)
    fp = fingerprint(cfg, ident)
    swept = _sweep_temp_files(cfg)
    if swept:
        log.warning("removed %d temporary files left by an interrupted run under %s", swept, cfg.output)
    latest = {} if cfg.force else latest_rows(read_manifest(cfg.output, so))
    plan = make_plan(cfg, fp, latest, run_id=cfg.run_id)
    res = JobResult(cfg.run_id, cfg.output, run_uri(cfg.output, cfg.run_id), total=plan.total)
    print(
        f"srbatch upscale: run {cfg.run_id}: {plan.total} inputs under {cfg.input}: {len(plan.todo)} to process, "
        f"{len(plan.skipped)} already done (skipped), {len(plan.rejected)} refused; model "
        f"{desc.name or desc.architecture} x{desc.scale} (fingerprint {fp})",
        file=stream, flush=True,
    )  # fmt: skip
    del desc
    writer = ManifestWriter(cfg.output, cfg.run_id, so, flush_seconds=cfg.manifest_flush_seconds)
    common = {"model": ident["name"], "architecture": ident["architecture"], "model_sha256": ident["sha256"],
              "fingerprint": fp, "run_id": cfg.run_id, "scale": cfg.outscale or float(ident["scale"])}  # fmt: skip
    for row in plan.skipped:
        writer.add(row)
        res.skipped += 1
    for task in plan.rejected:
        _record(res, writer, empty_row(input_uri=task.input_uri, status="failed", error_type="ConfigError",
                                       error_message=task.error, **common))  # fmt: skip
    try:
        if plan.todo:
            _run_pipeline(cfg, plan, fp, res, writer, common, stream)
    except KeyboardInterrupt:
        res.interrupted = True
    finally:
        writer.close()
        res.seconds = time.perf_counter() - t_start
    if res.interrupted:
        res.exit_code = EXIT_INTERRUPTED
    elif res.processed and res.failed / res.processed > cfg.max_failed_fraction:
        res.exit_code = EXIT_FAILURES
    print(res.summary(), file=stream, flush=True)
    if res.exit_code == EXIT_FAILURES:
        print(
            f"srbatch upscale: {res.failed} of {res.processed} processed images failed "
            f"({res.failed / res.processed:.1%} > --max-failed-fraction {cfg.max_failed_fraction}); exit code 1. "
            "Fix or remove them and rerun: only failed and new images are processed.",
            file=stream, flush=True,
        )  # fmt: skip
    return res


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
        res.failures.append((row["input_uri"], f"{row.get('error_type')}: {row.get('error_message')}"))
    if row.get("total_s") is not None and row["status"] == "ok":
        res.latencies.append(float(row["total_s"]))
    if row.get("actor_id") and row["actor_id"] not in res.devices:
        gpu = f", Ray GPU ids {row['gpu_ids']}" if row.get("gpu_ids") else ""
        res.devices[row["actor_id"]] = f"{row.get('device')}{gpu}"


def _run_pipeline(
    cfg: UpscaleConfig,
    plan: Plan,
    fp: str,
    res: JobResult,
    writer: ManifestWriter,
    common: dict[str, Any],
    stream: TextIO,
) -> None:
    started = ensure_ray(cfg)
    previous = _sigterm_as_interrupt()  # after ray.init, which installs its own handler
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    from srbatch.upscale.worker import UpscaleWorker

    t0 = time.perf_counter()
    pending = {t.input_uri: t for t in plan.todo}
    try:
        rs = resources_for(cfg, ray.cluster_resources())
        log.info("actor pool: %s", rs)
        if not log.isEnabledFor(logging.INFO):
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False
        n = len(plan.todo)
        items = [{"input_uri": t.input_uri, "output_uri": t.output_uri, "run_id": cfg.run_id} for t in plan.todo]
        blocks = max(1, min(n, math.ceil(n / cfg.batch_size)))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        # Ray Data restarts dead actors and retries their batches (max_restarts=-1, max_task_retries=-1 by default).
        remote_args: dict[str, Any] = {"num_cpus": rs["cpus_per_actor"]}
        if rs["gpus_per_actor"] > 0:
            remote_args["num_gpus"] = rs["gpus_per_actor"]
        ds = ds.map_batches(
            UpscaleWorker,
            fn_constructor_kwargs={"config": cfg.model_dump(), "fingerprint": fp,
                                   "torch_threads": rs["torch_threads"]},  # fmt: skip
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(min_size=rs["actors"], max_size=rs["max_actors"]),
            **remote_args,
        )
        print(
            f"srbatch upscale: {rs['actors']}{'-' + str(rs['max_actors']) if rs['max_actors'] > rs['actors'] else ''} "
            f"actor(s), {rs['gpus_per_actor']:g} GPU and {rs['cpus_per_actor']:g} CPU each"
            + (f", {rs['torch_threads']} torch threads" if rs["gpus_per_actor"] == 0 else ""),
            file=stream, flush=True,
        )  # fmt: skip
        bar = tqdm(total=n, unit="img", file=sys.stderr, disable=not cfg.progress, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 10.0, desc="upscale")  # fmt: skip
        with bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                for row in batch.to_pylist():
                    if pending.pop(row["input_uri"], None) is None:
                        continue  # a retried batch's duplicate: its first row already counts
                    _record(res, writer, row)
                    bar.update(1)
                    bar.set_postfix(ok=res.ok, failed=res.failed, refresh=False)
        for task in list(pending.values()):  # never a missing row
            _record(res, writer, empty_row(input_uri=task.input_uri, status="failed", error_type="LostResult",
                                           error_message="the pipeline finished without a result for this image; "
                                           "rerun the job to retry it", **common))  # fmt: skip
        pending.clear()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # the pipeline itself broke: every unfinished input still gets its row
        log.error("the Ray pipeline failed: %s: %s", type(e).__name__, e)
        for task in list(pending.values()):
            _record(res, writer, empty_row(input_uri=task.input_uri, status="failed", error_type=type(e).__name__,
                                           error_message=f"the job's Ray pipeline failed before this image: {e}"[:2000],
                                           **common))  # fmt: skip
        pending.clear()
    finally:
        res.pipeline_seconds = time.perf_counter() - t0
        if started:
            ray.shutdown()
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)
