"""Videos in the upscale job: probe on the cluster, cut into keyframe-aligned segments that the model actors upscale
frame by frame (each segment written whole under ``<output>/_srbatch/video/``), then joined by packet copy.

Data flow (driver ``D``, Ray task ``T``, model actor ``A``)::

    D list -> T probe (packets only; VideoInfo back) -> D plan segments, skip the segment files already written
      -> A decode segment (+ overlap) -> engine per frame -> encode -> segment file     (same actor pool as images)
      -> T join segments + source audio/subtitles (no re-encode) -> output; work folder removed -> D manifest row

Only keys, a segment's pts and small rows travel through Ray; pixels stay in the actor that decodes them.
A segment's file name holds its id (``s0003-00000750-00001000``) under a folder named by the video fingerprint
(model, tiling, codec settings, segment length), so a rerun with the same settings redoes only the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from srbatch.io.storage import VIDEO_EXTENSIONS, is_video, join_uri
from srbatch.upscale.config import UpscaleConfig

__all__ = ["VIDEO_EXTENSIONS", "is_video", "video_container", "video_fingerprint", "segment_folder", "VideoJob",
           "probe_video", "join_video", "process_segment_item", "segment_table", "write_segment_table"]

WORK_DIR = "video"
"""Segments of a video go to ``<output>/_srbatch/video/<output key>/<video fingerprint>/<segment id><ext>``."""


def video_container(src_uri: str, cfg: UpscaleConfig) -> str:
    """The output container (extension) of a video: ``video_container`` when set, else the source's when it can hold
    the codec, else ``.mkv``."""
    from srbatch.video import CODECS

    if cfg.video_container != "auto":
        return cfg.video_container
    ext = posixpath.splitext(src_uri)[1].lower()
    return ext if ext in CODECS[cfg.video_codec].containers else ".mkv"


def video_fingerprint(cfg: UpscaleConfig, fp: str) -> str:
    """16 hex digits: the image fingerprint ``fp`` (model, tiling, scale, dtype) plus the video encoder settings."""
    payload = {"fp": fp, "codec": cfg.video_codec, "crf": cfg.video_crf, "preset": cfg.video_preset,
               "container": cfg.video_container, "pix_fmt": cfg.video_pix_fmt}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def segment_folder(cfg: UpscaleConfig, out_uri: str, vfp: str) -> str:
    """The work folder of one video's segments (named by its output key, the video fingerprint and segment length)."""
    from srbatch.upscale.state import CONTROL_DIR

    key = out_uri[len(cfg.output.rstrip("/")) + 1:] if out_uri.startswith(cfg.output.rstrip("/") + "/") else \
        posixpath.basename(out_uri)
    return join_uri(cfg.output, CONTROL_DIR, WORK_DIR, key, f"{vfp}-f{cfg.video_segment_frames}")


# ----------------------------------------------------------------------------------------------- Ray task bodies


def probe_video(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Ray task: probe ``uri`` (packet scan, no decode). ``{"info": VideoInfo, "bytes", "probe_s"}`` or
    ``{"error": (type, message), "probe_s"}`` (a broken video is a failed row, never a failed job)."""
    from srbatch.io.storage import filesystem
    from srbatch.jobkit.actor import error_fields
    from srbatch.video import probe

    t = time.perf_counter()
    try:
        info = probe(uri, storage_options)
        fs, path = filesystem(uri, storage_options)
        size = int(fs.size(path) or 0)
        return {"info": info, "bytes": size, "probe_s": time.perf_counter() - t}
    except Exception as e:  # noqa: BLE001 - one broken video is one failed row
        f = error_fields(e)
        return {"error": (f["error_type"], f["error_message"]), "probe_s": time.perf_counter() - t}


def existing_segments(folder: str, storage_options: Mapping[str, Any] | None) -> set[str]:
    """Names of the complete segment files in ``folder`` (the library writes whole files only; hidden ``.part``
    files of a killed writer are not counted)."""
    from srbatch.io.storage import list_files

    try:
        return {posixpath.basename(p) for p in list_files(folder, storage_options, skip_top=())
                if not posixpath.basename(p).startswith(".")}
    except Exception:  # noqa: BLE001 - nothing listed: every segment is redone
        return set()


def join_video(
    segment_uris: Sequence[str], src: str, out_uri: str, info: Any, folder: str,
    storage_options: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Ray task: join the segments and the source's audio/subtitles into ``out_uri`` (packet copy), then remove the
    work folder. ``{"bytes", "join_s", "copied", "skipped"}`` or ``{"error": (type, message), "join_s"}``."""
    from srbatch.io.storage import filesystem
    from srbatch.jobkit.actor import error_fields
    from srbatch.video import join_segments

    t = time.perf_counter()
    try:
        res = join_segments(segment_uris, src, out_uri, source_info=info, storage_options=storage_options)
        fs, path = filesystem(out_uri, storage_options)
        size = int(fs.size(path) or 0)
    except Exception as e:  # noqa: BLE001
        f = error_fields(e)
        return {"error": (f["error_type"], f["error_message"]), "join_s": time.perf_counter() - t}
    join_s = time.perf_counter() - t
    try:
        fs, path = filesystem(folder, storage_options)
        fs.rm(path, recursive=True)
    except Exception:  # noqa: BLE001 - a leftover work folder costs space only; the output is complete
        pass
    return {"bytes": size, "join_s": join_s, "copied": sum(res.copied_packets.values()),
            "skipped": list(res.skipped_streams)}


# ----------------------------------------------------------------------------------------------- the driver's plan


@dataclass
class VideoJob:
    """One video of the run, on the driver: its probe, its segments, which are done, and their rows."""

    input_uri: str
    output_uri: str
    folder: str
    ext: str
    info: Any = None
    input_bytes: int | None = None
    probe_s: float = 0.0
    segments: list[Any] = field(default_factory=list)
    reused: set[str] = field(default_factory=set)
    """Ids of segments whose files a previous run wrote (not redone)."""
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Segment id -> the actor's row for the segments done this run."""
    error: tuple[str, str] | None = None

    def segment_uri(self, seg: Any) -> str:
        return join_uri(self.folder, f"{seg.id}{self.ext}")

    def key(self, seg: Any) -> str:
        """The pool's item key of a segment."""
        return f"{self.input_uri}#{seg.id}"

    def plan(self, cfg: UpscaleConfig, radius: int, have: set[str]) -> None:
        from srbatch.video import plan_segments

        self.segments = plan_segments(self.info, target_frames=cfg.video_segment_frames, overlap=radius)
        self.reused = {s.id for s in self.segments if f"{s.id}{self.ext}" in have}

    def items(self, run_id: str, radius: int) -> list[dict[str, Any]]:
        """The pool items of the segments still to do (keys, URIs and the segment's pts: small)."""
        info = self.info
        out = []
        for s in self.segments:
            if s.id in self.reused:
                continue
            payload = {
                "src": self.input_uri, "segment": asdict(s), "radius": radius, "fps": str(info.fps),
                "time_base": str(info.time_base), "pts": list(info.frame_pts[s.start:s.end]),
                "colour": asdict(info.colour), "rotation": info.rotation, "frames": info.frames,
            }
            out.append({"input_uri": self.key(s), "output_uri": self.segment_uri(s), "run_id": run_id,
                        "segment": json.dumps(payload)})
        return out

    def failed_segment(self) -> dict[str, Any] | None:
        for s in self.segments:
            r = self.rows.get(s.id)
            if s.id not in self.reused and (r is None or r.get("status") != "ok"):
                return r or {"error_type": "LostResult", "error_message": f"segment {s.id} gave no result"}
        return None

    def row(self, common: Mapping[str, Any], join: Mapping[str, Any] | None) -> dict[str, Any]:
        """The video's manifest row."""
        from srbatch.upscale.manifest import empty_row

        info = self.info
        done = [r for r in self.rows.values() if r.get("status") == "ok"]

        def total(k: str) -> float | None:
            xs = [r.get(k) for r in done if r.get(k) is not None]
            return float(sum(xs)) if xs else None

        row = empty_row(input_uri=self.input_uri, output_uri=self.output_uri, status="failed", **common)
        row.update(input_bytes=self.input_bytes, probe_s=self.probe_s, media="video")
        if info is not None:
            row.update(input_width=info.width, input_height=info.height, input_mode=info.pix_fmt,
                       video_frames=info.frames, video_segments=len(self.segments),
                       video_segments_done=len(self.rows), video_fps=float(info.fps),
                       video_duration_s=info.duration)
        row.update(decode_s=total("decode_s"), infer_s=total("infer_s"), encode_s=total("encode_s"))
        for r in done[:1]:
            row.update(output_width=r.get("output_width"), output_height=r.get("output_height"),
                       video_codec=r.get("video_codec"), device=r.get("device"), actor_id=r.get("actor_id"),
                       dtype=r.get("dtype"))
        if self.error is None and join is not None and "error" in join:
            self.error = tuple(join["error"])
        if join is not None:
            row["join_s"] = join.get("join_s")
        if self.error is not None:
            row.update(error_type=self.error[0], error_message=self.error[1], output_uri=None)
        else:
            row.update(status="ok", output_bytes=join["bytes"] if join else None)
        row["total_s"] = sum(row.get(k) or 0.0 for k in ("probe_s", "decode_s", "infer_s", "encode_s", "join_s"))
        return row


# ----------------------------------------------------------------------------------------------- the actor's part


class _Pts:
    """``frame_pts`` of a segment's frames, indexed by the frame's index in the whole video."""

    def __init__(self, start: int, pts: Sequence[int]) -> None:
        self.start, self.pts = start, pts

    def __getitem__(self, t: int) -> int:
        return self.pts[t - self.start]


def process_segment_item(item: Mapping[str, Any], upscaler: Any, cfg: UpscaleConfig, storage_options: Any,
                         temporal: Any = None) -> dict[str, Any]:
    """Upscale one segment item (see :meth:`VideoJob.items`) into its segment file; returns the timing fields of its
    row. Frames go through ``upscaler.upscale_image`` one by one (radius 0), exactly as images do; a temporal model
    (radius > 0) gets its window of ``2 * radius + 1`` frames through ``temporal(window)``."""
    from srbatch.io.images import DecodedImage
    from srbatch.video import Colour, Segment, VideoInfo, process_segment

    p = json.loads(item["segment"])
    seg = Segment(**p["segment"])
    radius = int(p["radius"])
    info = VideoInfo(
        uri=p["src"], container="", codec="", width=0, height=0, pix_fmt=None, fps=Fraction(p["fps"]),
        time_base=Fraction(p["time_base"]), frames=int(p["frames"]), declared_frames=None,
        frame_pts=_Pts(seg.start, p["pts"]), frame_duration=0, keyframes=(), colour=Colour(**p["colour"]),
        rotation=int(p["rotation"]),
    )
    timings: dict[str, float] = {}
    shape: list[tuple[int, int]] = []

    if radius == 0:
        def frame_fn(rgb: Any) -> Any:
            return upscaler.upscale_image(DecodedImage(pixels=rgb)).pixels
    else:
        if temporal is None:
            from srbatch.errors import ConfigError

            raise ConfigError(f"the model has a temporal radius of {radius} but its engine has no upscale_frames; "
                              "update srbatch, or use a per-frame model")
        frame_fn = temporal

    def timed(x: Any) -> Any:
        t = time.perf_counter()
        out = frame_fn(x)
        timings["model"] = timings.get("model", 0.0) + time.perf_counter() - t
        if not shape:
            shape.append(out.shape[:2])
        return out

    t0 = time.perf_counter()
    frames = process_segment(p["src"], seg, info, timed, item["output_uri"], radius=radius, codec=cfg.video_codec,
                             crf=cfg.video_crf, preset=cfg.video_preset, pix_fmt=cfg.video_pix_fmt,
                             storage_options=storage_options, timings=timings)
    total = time.perf_counter() - t0
    model = timings.get("model", 0.0)
    decode = timings.get("decode", 0.0)
    return {"video_frames": frames, "video_segments": 1, "infer_s": model, "decode_s": decode,
            "encode_s": timings.get("encode", max(total - model - decode, 0.0)), "video_codec": cfg.video_codec,
            "output_height": shape[0][0] if shape else None, "output_width": shape[0][1] if shape else None}


SEGMENT_SCHEMA_FIELDS = (("run_id", "string"), ("input_uri", "string"), ("segment_id", "string"),
                         ("start", "int64"), ("end", "int64"), ("status", "string"), ("reused", "bool"),
                         ("error_type", "string"), ("error_message", "string"), ("actor_id", "string"),
                         ("decode_s", "float64"), ("infer_s", "float64"), ("encode_s", "float64"),
                         ("output_uri", "string"))


def _segment_schema() -> Any:
    import pyarrow as pa

    return pa.schema([pa.field(n, getattr(pa, t)() if t != "bool" else pa.bool_()) for n, t in SEGMENT_SCHEMA_FIELDS])


def segment_table(videos: Sequence[VideoJob], run_id: str) -> Any:
    """Per-segment detail of this run's videos (one row per segment, reused ones flagged)."""
    import pyarrow as pa

    rows = []
    for v in videos:
        for s in v.segments:
            r = v.rows.get(s.id, {})
            rows.append({"run_id": run_id, "input_uri": v.input_uri, "segment_id": s.id, "start": s.start,
                         "end": s.end, "status": "ok" if s.id in v.reused else r.get("status", "failed"),
                         "reused": s.id in v.reused, "error_type": r.get("error_type"),
                         "error_message": r.get("error_message"), "actor_id": r.get("actor_id"),
                         "decode_s": r.get("decode_s"), "infer_s": r.get("infer_s"), "encode_s": r.get("encode_s"),
                         "output_uri": v.segment_uri(s)})
    return pa.Table.from_pylist(rows, schema=_segment_schema())


def write_segment_table(cfg: UpscaleConfig, videos: Sequence[VideoJob]) -> str | None:
    """Write the per-segment detail to ``<output>/_srbatch/video_segments/run=<run id>.parquet``; returns its URI."""
    import io

    import pyarrow.parquet as pq

    from srbatch.io.storage import filesystem
    from srbatch.upscale.manifest import put_atomic
    from srbatch.upscale.state import CONTROL_DIR

    if not videos:
        return None
    uri = join_uri(cfg.output, CONTROL_DIR, "video_segments", f"run={cfg.run_id}.parquet")
    buf = io.BytesIO()
    pq.write_table(segment_table(videos, cfg.run_id), buf)
    fs, path = filesystem(uri, cfg.fs_options())
    try:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    except Exception:  # noqa: BLE001 - object stores have no folders
        pass
    put_atomic(fs, path, buf.getvalue())
    return uri
