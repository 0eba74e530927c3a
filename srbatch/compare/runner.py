"""The comparison job's driver: list and pair the images, pick the mode, run every model over every image on Ray
actors (one model after another, each with the whole cluster), then write the Parquet table and the HTML report."""

from __future__ import annotations

import io
import logging
import math
import posixpath
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TextIO

from srbatch.compare.config import CompareConfig
from srbatch.compare.worker import ROW_SCHEMA, CompareWorker, empty_row
from srbatch.errors import ConfigError
from srbatch.jobkit.cli import ExitCode
from srbatch.io.storage import join_uri, list_images, write_bytes

log = logging.getLogger("srbatch.compare")

__all__ = ["CompareResult", "run_compare", "model_labels", "choose_mode", "report_convention"]

AUTO_SAMPLE = 16


@dataclass
class CompareResult:
    """What a comparison produced: rows (one per image x model), the mode, and where the files are."""

    output: str
    mode: str
    models: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    report: str = ""
    parquet: str = ""
    seconds: float = 0.0
    shown: int = 0
    convention: str = ""
    """How the figures were measured (:func:`report_convention`): printed under the table and shown in the report."""

    @property
    def failed(self) -> int:
        """Image x model pairs that failed."""
        return sum(r["status"] != "ok" for r in self.rows)

    @property
    def exit_code(self) -> int:
        """0 when every image x model succeeded, 1 otherwise."""
        return ExitCode.FAILED if self.failed else ExitCode.OK

    def table(self) -> str:
        """The mean-per-model table printed at the end."""
        from srbatch.compare.report import model_summary

        ref = self.mode == "reference"
        lp = any(r.get("lpips") is not None for r in self.rows)
        nq = not ref and any(r.get("niqe") is not None for r in self.rows)
        vid = ref and any(r.get("video_uri") and r["status"] == "ok" for r in self.rows)
        fl = any(r.get("flicker_tde") is not None for r in self.rows)
        head = (f"{'model':<24} {'params':>10}"
                + (f" {'PSNR_Y':>8} {'SSIM_Y':>7} {'PSNR_RGB':>9} {'SSIM_RGB':>9}" if ref else "")
                + (f" {'LPIPS':>7}" if lp else "") + (f" {'NIQE':>7}" if nq else "")
                + (f" {'vPSNR_Y':>8} {'vSSIM_Y':>7}" if vid else "") + (f" {'TDE':>7}" if fl else "")
                + f" {'s/image':>8} {'ok':>4} {'failed':>6}")  # fmt: skip
        lines = [head, "-" * len(head)]
        for s in model_summary(self.rows, self.models):
            params = f"{s['params']:,}" if s["params"] is not None else "-"
            line = f"{s['model'][:24]:<24} {params:>10}"
            if ref:
                line += "".join(f" {_f(s[k], w, p)}" for k, w, p in (("psnr_y", 8, 3), ("ssim_y", 7, 4),
                                                                      ("psnr_rgb", 9, 3), ("ssim_rgb", 9, 4)))  # fmt: skip
            if lp:
                line += f" {_f(s.get('lpips'), 7, 4)}"
            if nq:
                line += f" {_f(s['niqe'], 7, 3)}"
            if vid:
                line += f" {_f(s['video_psnr_y'], 8, 3)} {_f(s['video_ssim_y'], 7, 4)}"
            if fl:
                line += f" {_f(s['flicker_tde'], 7, 3)}"
            line += f" {_f(s['runtime_s'], 8, 4)} {s['images']:>4} {s['failed']:>6}"
            lines.append(line)
        inputs = {r["image"]: r["input_niqe"] for r in self.rows if r.get("input_niqe") is not None}
        if nq and inputs:
            lines.append(f"{'input (no upscaling)':<24} {'':>10} {_f(float(sum(inputs.values()) / len(inputs)), 7, 3)}"
                         f" {'':>8} {len(inputs):>4}")  # fmt: skip
        return "\n".join(lines)

    def summary(self) -> str:
        """The end-of-run summary: the table, failures, and the files."""
        n = len({r["image"] for r in self.rows})
        lines = [f"srbatch compare: {n} image(s) x {len(self.models)} model(s), mode {self.mode}, "
                 f"{self.seconds:.1f} s", self.table()]  # fmt: skip
        if self.convention:
            lines.append(f"  convention: {self.convention}")
        vids = sorted({r["video_uri"] for r in self.rows if r.get("video_uri")})
        if vids:
            runs = sorted({r["flicker_frames"] for r in self.rows if r.get("flicker_frames")})
            frames = len({r["image"] for r in self.rows if r.get("frame_index") is not None})
            text = (f"  videos: {len(vids)}, {frames} frame(s) compared (each model's temporal window, clamped at "
                    "the ends)")
            if self.mode == "reference":
                text += "; vPSNR_Y/vSSIM_Y: means over video frames"
            if runs:
                text += (f"; TDE: flicker (temporal-difference error of Y, lower is better) over "
                         f"{'/'.join(map(str, runs))} consecutive middle frames per video")  # fmt: skip
            lines.append(text)
        grey = sorted({r["image"] for r in self.rows if r.get("grey")})
        if grey:
            how = "converted to RGB (--grey-as-rgb)" if any(r.get("grey_as_rgb") for r in self.rows) else \
                "measured as they are (no --grey-as-rgb)"
            lines.append(f"  grey images: {len(grey)} of {n} ({', '.join(grey[:5])}{' ...' if len(grey) > 5 else ''}), "
                         f"{how}")  # fmt: skip
        bad = [r for r in self.rows if r["status"] != "ok"]
        for r in bad[:10]:
            lines.append(f"  failed: {r['image']} with {r['model']}: {r['error_type']}: {r['error_message']}")
        if len(bad) > 10:
            lines.append(f"  ... and {len(bad) - 10} more (see the Parquet table)")
        lines.append(f"  report:  {self.report} ({self.shown} image(s) shown)")
        lines.append(f"  table:   {self.parquet}")
        return "\n".join(lines)


def _f(v: float | None, w: int, p: int) -> str:
    return f"{v:{w}.{p}f}" if v is not None else f"{'-':>{w}}"


def model_labels(specs: list[str]) -> list[str]:
    """Short unique names for the report: zoo names as they are, files and folders by their stem."""
    labels = []
    for s in specs:
        base = posixpath.basename(s.rstrip("/")) or s
        for ext in (".safetensors", ".pth", ".pt", ".ckpt", ".bin"):
            base = base.removesuffix(ext)
        labels.append(base)
    out = []
    for i, lab in enumerate(labels):
        n = labels[:i].count(lab)
        out.append(lab if labels.count(lab) == 1 else f"{lab}#{n + 1}")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def _header_size(uri: str, so: dict[str, Any]) -> tuple[int, int] | None:
    import fsspec
    from PIL import Image

    from srbatch.compare.video import is_video

    try:
        if is_video(uri):
            from srbatch.video import probe

            info = probe(uri, so)
            return info.width, info.height
        with fsspec.open(uri, "rb", **so) as f, Image.open(f) as im:
            return im.size
    except Exception:  # noqa: BLE001 - a broken file decides nothing; the workers report it
        return None


def choose_mode(cfg: CompareConfig, uris: list[str]) -> tuple[str, str]:
    """``(mode, why)``: the configured mode, or for ``auto`` reference when ``--lr`` is given or the sampled images
    (up to 16, spread over the list; headers only) have a median short side of at least ``reference_min_lr`` x the
    scale, so that their downscaled copies are still worth measuring; real otherwise. ``--lr``, ``--noise-sigma`` and
    ``--lpips-weights`` make it reference."""
    if cfg.mode != "auto":
        return cfg.mode, "as asked"
    if cfg.lr:
        return "reference", "auto: --lr gives the LR images"
    if cfg.noise_sigma:
        return "reference", "auto: --noise-sigma measures against the clean images"
    if cfg.lpips_weights:
        return "reference", "auto: --lpips-weights measures against the original images"
    sample = uris[:: max(1, math.ceil(len(uris) / AUTO_SAMPLE))][:AUTO_SAMPLE]
    sides = sorted(min(s) for s in (_header_size(u, cfg.fs_options()) for u in sample) if s)
    need = cfg.reference_min_lr * cfg.scale
    if not sides:
        return "real", "auto: no readable image header to decide from"
    median = sides[len(sides) // 2]
    if median >= need:
        return "reference", f"auto: the images' median short side is {median} px >= {need} px"
    return "real", f"auto: the images' median short side is {median} px < {need} px ({cfg.reference_min_lr} px x{cfg.scale})"


def _plan(cfg: CompareConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """``(images, video URIs)``: the image items (paired with --lr when given) and the videos listed."""
    from srbatch.compare.video import VIDEO_EXTENSIONS, is_video
    from srbatch.evaluate import pair_images
    from srbatch.io.storage import IMAGE_EXTENSIONS

    so = cfg.fs_options()
    listed = list_images(cfg.images, so, extensions=IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)
    hr = [u for u in listed if not is_video(u)]
    videos = [u for u in listed if is_video(u)]
    pairs = pair_images(hr, list_images(cfg.lr, so) if cfg.lr else None) if hr else []
    none = {"video_uri": "", "frame_index": -1, "flicker_frames": 0}
    return [{"image": key, "image_uri": h, "lr_uri": lr or "", **none} for key, h, lr in pairs], videos


def _video_items(cfg: CompareConfig, videos: list[str], mode: str) -> list[dict[str, Any]]:
    from srbatch.compare.video import video_items

    out: list[dict[str, Any]] = []
    for uri in videos:
        out += video_items(uri, cfg.video_frames, cfg.video_flicker_frames, mode, cfg.fs_options())
    return out


def _validate_models(cfg: CompareConfig) -> None:
    from srbatch.models.loader import load_model

    for spec in cfg.models:
        desc = load_model(spec, scale=cfg.scale, storage_options=cfg.fs_options())
        if desc.scale != cfg.scale:
            raise ConfigError(f"--models {spec}: a x{desc.scale} model; compare it with --scale {desc.scale}")


def _lpips_net(cfg: CompareConfig, mode: str) -> str | None:
    """Check ``--lpips-weights`` on the driver (a bad file is a configuration error before any actor starts); its
    trunk (alex or vgg), or None when LPIPS is not measured."""
    if not cfg.lpips_weights or mode != "reference":
        return None
    from srbatch.metrics.lpips import load_lpips

    return load_lpips(cfg.lpips_weights, storage_options=cfg.fs_options()).net


def run_compare(cfg: CompareConfig, *, stream: TextIO | None = None) -> CompareResult:
    """Run the comparison described by ``cfg``; print progress and the summary to ``stream`` (stdout)."""
    stream = stream or sys.stdout
    t0 = time.perf_counter()
    items, videos = _plan(cfg)
    mode, why = choose_mode(cfg, [i["image_uri"] for i in items] + videos)
    items += _video_items(cfg, videos, mode)
    labels = model_labels(cfg.models)
    _validate_models(cfg)
    lpips_net = _lpips_net(cfg, mode)
    print(f"srbatch compare: {len(items)} image(s) x {len(labels)} model(s) ({', '.join(labels)}), x{cfg.scale}, "
          f"mode {mode} ({why})", file=stream, flush=True)  # fmt: skip
    out = cfg.output.rstrip("/")
    for i, it in enumerate(items):
        it["n"] = i
    res = CompareResult(output=out, mode=mode, models=labels, convention=report_convention(cfg, mode, lpips_net))
    from srbatch.jobkit.cluster import ray_session

    with ray_session(cfg):
        res.rows = _run_models(cfg, items, labels, mode)
        res.parquet = _write_parquet(cfg, res.rows)
        res.report, res.shown = _write_report(cfg, items, res.rows, labels, mode, why, res.convention)
    res.seconds = time.perf_counter() - t0
    print(res.summary(), file=stream, flush=True)
    return res


def report_convention(cfg: CompareConfig, mode: str, lpips_net: str | None = None) -> str:
    """The convention line of the report and the printed summary: how the references were made and measured, with
    ``grey_as_rgb``, ``noise_sigma`` and LPIPS (``lpips_net``: its trunk, when measured; see
    :func:`srbatch.evaluate.describe_convention`)."""
    from srbatch.evaluate import describe_convention

    opts = f"grey_as_rgb={cfg.grey_as_rgb}; noise_sigma={cfg.noise_sigma:g}"
    if mode != "reference":
        grey = " Grey images converted to RGB before the models." if cfg.grey_as_rgb else ""
        return f"Real mode: no ground truth; pictures only ({opts}).{grey}"
    return ("Reference mode: each image cropped to a multiple of the scale and downscaled with MATLAB bicubic "
            f"(or the given LR); {opts}; {describe_convention(cfg.grey_as_rgb, cfg.noise_sigma, lpips_net)}. "
            "Runtime: the model's upscaling time per image.")  # fmt: skip


def _output_uri(cfg: CompareConfig, model_index: int, label: str, item: dict[str, Any]) -> str:
    return join_uri(cfg.output, "images", f"m{model_index + 1}-{_slug(label)}", f"{item['n']:04d}-{_slug(item['image'])}.png")


def _run_models(cfg: CompareConfig, items: list[dict[str, Any]], labels: list[str], mode: str) -> list[dict[str, Any]]:
    """Every model over every image, one model after another (each with the whole actor pool); one row per pair."""
    import ray

    from srbatch.jobkit.pool import run_actor_pool
    from srbatch.jobkit.resources import plan_actors

    rows: list[dict[str, Any]] = []
    rs = plan_actors(cfg, ray.cluster_resources())
    for m, label in enumerate(labels):
        run_actor_pool(
            [{"image": it["image"], "image_uri": it["image_uri"], "lr_uri": it["lr_uri"],
              "video_uri": it["video_uri"], "frame_index": it["frame_index"], "flicker_frames": it["flicker_frames"],
              "output_uri": _output_uri(cfg, m, label, it)} for it in items],  # fmt: skip
            key="image",
            actor=CompareWorker,
            actor_kwargs={"config": cfg.model_dump(), "model": m, "label": label, "mode": mode},
            resources=rs,
            batch_size=cfg.batch_size,
            on_row=rows.append,
            lost_row=lambda it, error_type, message, m=m, label=label: empty_row(
                image=it["image"], image_uri=it["image_uri"], lr_uri=it["lr_uri"] or None, model=label,
                model_spec=cfg.models[m], scale=cfg.scale, mode=mode, status="failed", error_type=error_type,
                error_message=message, grey_as_rgb=cfg.grey_as_rgb, noise_sigma=cfg.noise_sigma,
                video_uri=it["video_uri"] or None, frame_index=it["frame_index"] if it["frame_index"] >= 0 else None,
            ),  # fmt: skip
            progress=cfg.progress,
            desc=f"compare {label}",
            log=log,
        )
    order = {lab: i for i, lab in enumerate(labels)}
    rows.sort(key=lambda r: (r["image"], order[r["model"]]))
    for r in rows:
        r["lr_uri"] = r["lr_uri"] or None
    return rows


def _write_parquet(cfg: CompareConfig, rows: list[dict[str, Any]]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), buf)
    uri = join_uri(cfg.output, "comparison.parquet")
    write_bytes(uri, buf.getvalue(), cfg.fs_options())
    return uri


LARGE_PANEL_PIXELS = 16 * 1024**2
"""Images whose outputs have more pixels than this get their report panel from :func:`render_panel_large`."""
REDUCED_PIXELS = 4 * 1024**2
"""About how many pixels the block-averaged maps of a large panel have."""


def _panel_task(cfg_dump: dict[str, Any], item: dict[str, Any], outputs: dict[str, str], mode: str) -> Any:
    """Ray task: read one image and its models' outputs, choose crops, write thumbnail and crops."""
    from srbatch.compare.report import render_panel
    from srbatch.compare.worker import load_input
    from srbatch.io.images import decode_image
    from srbatch.io.storage import read_bytes

    cfg = CompareConfig.model_validate(cfg_dump)
    so = cfg.fs_options()
    if item.get("video_uri"):
        from srbatch.compare.video import VideoFrames
        from srbatch.io.images import DecodedImage

        vf = VideoFrames(item["video_uri"], cfg.scale, mode, so)
        lr, hr = DecodedImage(pixels=vf.lr(item["frame_index"]), mode="RGB"), vf.hr(item["frame_index"])
    else:
        lr, hr, _ = load_input(cfg, item["image_uri"], item["lr_uri"] or None, mode, item["image"])

    def write(rel: str, data: bytes) -> None:
        write_bytes(join_uri(cfg.output, rel), data, so, content_type="image/png")

    out_px = lr.height * lr.width * cfg.scale**2
    if out_px > LARGE_PANEL_PIXELS:  # one output in memory at a time, crops chosen on block-averaged maps
        from srbatch.compare.report import render_panel_large

        k = max(1, math.ceil(math.sqrt(out_px / REDUCED_PIXELS) / cfg.scale))
        loaders = {label: (lambda uri=uri: decode_image(read_bytes(uri, so), name=uri, max_pixels=out_px + 1).pixels)
                   for label, uri in outputs.items()}  # fmt: skip
        return render_panel_large(index=item["n"], image=item["image"], lr=lr.pixels, hr=hr, outputs=loaders,
                                  scale=cfg.scale, crops=cfg.user_crops(), crop_size=cfg.crop_size,
                                  crops_per_image=cfg.crops_per_image, write=write, factor=k * cfg.scale)  # fmt: skip
    outs = {label: decode_image(read_bytes(uri, so), name=uri).pixels for label, uri in outputs.items()}

    return render_panel(index=item["n"], image=item["image"], lr=lr.pixels, hr=hr, outputs=outs, scale=cfg.scale,
                        crops=cfg.user_crops(), crop_size=cfg.crop_size, crops_per_image=cfg.crops_per_image,
                        write=write)  # fmt: skip


def _write_report(
    cfg: CompareConfig, items: list[dict[str, Any]], rows: list[dict[str, Any]], labels: list[str], mode: str, why: str,
    convention: str | None = None,
) -> tuple[str, int]:
    from srbatch.compare.report import build_html

    ok_outputs: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["status"] == "ok":
            ok_outputs.setdefault(r["image"], {})[r["model"]] = r["output_uri"]
    shown = [it for it in items if it["image"] in ok_outputs][: cfg.max_report_images]
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(_panel_task)
    refs = [task.remote(cfg.model_dump(), it, ok_outputs[it["image"]], mode) for it in shown]
    panels = []
    for it, ref in zip(shown, refs):
        try:
            panels.append(ray.get(ref))
        except Exception as e:  # noqa: BLE001 - the report shows what it can
            log.warning("report: no crops for %s: %s", it["image"], e)
    page = build_html(
        title=cfg.title or f"srbatch comparison x{cfg.scale}", rows=rows, models=labels, panels=panels,
        scale=cfg.scale, mode=mode, mode_text=why, n_images=len(items), max_images=cfg.max_report_images,
        convention=convention or report_convention(cfg, mode), grey_as_rgb=cfg.grey_as_rgb,
        noise_sigma=cfg.noise_sigma,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )  # fmt: skip
    uri = join_uri(cfg.output, "index.html")
    write_bytes(uri, page.encode("utf-8"), cfg.fs_options(), content_type="text/html; charset=utf-8")
    return uri, len(panels)

