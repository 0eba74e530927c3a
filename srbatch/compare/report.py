"""The comparison report: crop images and thumbnails per image, and one self-contained ``index.html``.

Everything the page needs is inline (CSS, the SVG plot) or a relative link to an image file beside it, so the report
opens from a local folder or from the bucket it was written to; no network resource is referenced.
"""

from __future__ import annotations

import html
import io
import math
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from srbatch.compare.config import Crop

__all__ = ["png_bytes", "to_display", "ImagePanel", "render_panel", "render_panel_large", "reduced_maps",
           "model_summary", "build_html", "plot_svg", "MetricColumn", "METRIC_COLUMNS", "metric_columns"]

THUMB_MAX = 320
CROP_DISPLAY = 200
COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG of an HWC (C = 1 or 3) uint8/uint16 array, bit depth kept."""
    from srbatch.io.images import DecodedImage, encode_image

    mode = "L" if pixels.shape[2] == 1 else "RGB"
    return encode_image(DecodedImage(pixels=np.ascontiguousarray(pixels), mode=mode), format="PNG")


def to_display(pixels: np.ndarray) -> np.ndarray:
    """8-bit HWC (C = 1 or 3) version of an image for the browser (16-bit scaled to 8)."""
    if pixels.dtype == np.uint16:
        pixels = ((pixels.astype(np.uint32) + 128) // 257).clip(0, 255).astype(np.uint8)
    return pixels


def _png8(pixels: np.ndarray) -> bytes:
    from PIL import Image

    px = to_display(pixels)
    im = Image.fromarray(px[..., 0] if px.shape[2] == 1 else px)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


@dataclass
class ImagePanel:
    """What the report shows of one image: its thumbnail, crops, and the files of each crop (relative paths)."""

    image: str
    width: int
    height: int
    thumb: str
    crops: list[Crop]
    lr_files: list[str]
    hr_files: list[str] | None
    model_files: dict[str, list[str]] = field(default_factory=dict)
    note: str = ""


def _thumb(pixels: np.ndarray, crops: Sequence[Crop]) -> bytes:
    from PIL import Image, ImageDraw

    px = to_display(pixels)
    im = Image.fromarray(px[..., 0] if px.shape[2] == 1 else px).convert("RGB")
    f = min(1.0, THUMB_MAX / max(im.width, im.height))
    if f < 1:
        im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(im)
    for i, c in enumerate(crops):
        box = [c.x * f, c.y * f, (c.x + c.w) * f - 1, (c.y + c.h) * f - 1]
        draw.rectangle(box, outline=COLOURS[i % len(COLOURS)], width=2)
        draw.text((box[0] + 3, box[1] + 1), str(i + 1), fill=COLOURS[i % len(COLOURS)])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _start_panel(index: int, image: str, w: int, h: int, chosen: list[Crop], asked: Sequence[Crop] | None,
                 reference: bool) -> ImagePanel:
    panel = ImagePanel(image=image, width=w, height=h, thumb=f"report/{index:04d}/thumb.png", crops=chosen,
                       lr_files=[], hr_files=[] if reference else None)  # fmt: skip
    if asked is not None and len(chosen) < len(asked):
        panel.note = f"{len(asked) - len(chosen)} of the --crops boxes fall outside this image"
    return panel


def _write_input_crops(panel: ImagePanel, lr: np.ndarray, hr: np.ndarray | None, scale: int, write: Any) -> None:
    """Each crop of the LR (nearest-neighbour enlarged to output size) and of the HR when there is one."""
    stem = posixpath.dirname(panel.thumb)
    for j, c in enumerate(panel.crops):
        lr_crop = lr[c.y // scale : (c.y + c.h) // scale, c.x // scale : (c.x + c.w) // scale]
        panel.lr_files.append(f"{stem}/crop{j + 1}_lr.png")
        write(panel.lr_files[-1], _png8(np.repeat(np.repeat(lr_crop, scale, axis=0), scale, axis=1)))
        if hr is not None and panel.hr_files is not None:
            panel.hr_files.append(f"{stem}/crop{j + 1}_hr.png")
            write(panel.hr_files[-1], _png8(hr[c.y : c.y + c.h, c.x : c.x + c.w]))


def _write_model_crops(panel: ImagePanel, m: int, label: str, out: np.ndarray, write: Any) -> None:
    stem = posixpath.dirname(panel.thumb)
    for j, c in enumerate(panel.crops):
        name = f"{stem}/crop{j + 1}_m{m + 1}.png"
        panel.model_files.setdefault(label, []).append(name)
        write(name, _png8(np.ascontiguousarray(out[c.y : c.y + c.h, c.x : c.x + c.w])))


def render_panel(
    *,
    index: int,
    image: str,
    lr: np.ndarray,
    hr: np.ndarray | None,
    outputs: Mapping[str, np.ndarray],
    scale: int,
    crops: Sequence[Crop] | None,
    crop_size: int,
    crops_per_image: int,
    write: Any,
) -> ImagePanel:
    """Choose the crops of one image (``crops`` given: clipped to it; None: automatic), write the thumbnail and every
    crop through ``write(relative_path, png_bytes)``, and describe them.

    ``lr`` is the model input, ``hr`` the reference (None in real mode), ``outputs`` each model's upscaled pixels.
    """
    from srbatch.compare.crops import auto_crops, fit_crops

    outs = {k: v for k, v in outputs.items() if v is not None}
    h = lr.shape[0] * scale
    w = lr.shape[1] * scale
    if hr is not None:
        base = hr
    elif outs:
        base = np.mean([to_display(v)[:h, :w].astype(np.float64) for v in outs.values()], axis=0).astype(np.uint8)
    else:
        base = np.repeat(np.repeat(to_display(lr), scale, 0), scale, 1)
    if crops is None:
        chosen = auto_crops(base, list(outs.values()), scale=scale, size=crop_size, count=crops_per_image)
    else:
        chosen = fit_crops(crops, width=w, height=h, scale=scale)
    panel = _start_panel(index, image, w, h, chosen, crops, hr is not None)
    write(panel.thumb, _thumb(base, chosen))
    _write_input_crops(panel, lr, hr, scale, write)
    for m, (label, out) in enumerate(outs.items()):
        _write_model_crops(panel, m, label, out, write)
    return panel


def reduced_maps(img: np.ndarray, factor: int, *, band: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(luma, detail, display)`` of ``img`` averaged over ``factor`` x ``factor`` blocks (partial blocks at the
    right and bottom dropped), computed a band of rows at a time so no whole-image float copy exists: the block mean
    of the BT.601 luma, of its local detail (:func:`~srbatch.compare.crops.detail_map`), and of the 8-bit pixels."""
    from srbatch.compare.crops import detail_map, luma

    f = int(factor)
    hb, wb = img.shape[0] // f, img.shape[1] // f
    c = img.shape[2] if img.ndim == 3 else 1
    lum = np.empty((hb, wb), np.float32)
    det = np.empty((hb, wb), np.float32)
    disp = np.empty((hb, wb, c), np.uint8)
    step = band * f
    for y in range(0, hb * f, step):
        blk = img[y : min(y + step, hb * f), : wb * f]
        n = blk.shape[0] // f
        y_plane = luma(blk)
        lum[y // f : y // f + n] = y_plane.reshape(n, f, wb, f).mean(axis=(1, 3))
        det[y // f : y // f + n] = detail_map(y_plane).reshape(n, f, wb, f).mean(axis=(1, 3))
        shown = to_display(blk.reshape(blk.shape[0], blk.shape[1], c)).astype(np.float32)
        disp[y // f : y // f + n] = (shown.reshape(n, f, wb, f, c).mean(axis=(1, 3)) + 0.5).astype(np.uint8)
    return lum, det, disp


def render_panel_large(
    *,
    index: int,
    image: str,
    lr: np.ndarray,
    hr: np.ndarray | None,
    outputs: Mapping[str, Any],
    scale: int,
    crops: Sequence[Crop] | None,
    crop_size: int,
    crops_per_image: int,
    write: Any,
    factor: int,
) -> ImagePanel:
    """:func:`render_panel` for outputs too large to hold together: ``outputs`` maps each model to a function that
    loads its pixels; each is loaded once to build its block-averaged maps (:func:`reduced_maps`, ``factor`` a
    multiple of ``scale``) and once more to cut the crops, so one output is in memory at a time.

    Automatic crops are chosen on the reduced maps: detail from the HR (or the models' mean detail), disagreement as
    the spread of the models' block-mean luma, so they are placed to ``factor`` pixels and disagreement is measured
    at that resolution, not per pixel.
    """
    from srbatch.compare.crops import _best, fit_crops

    f = int(factor)
    h, w = lr.shape[0] * scale, lr.shape[1] * scale
    lums, dets, disps = [], [], []
    for load in outputs.values():
        out = load()
        lum, det, disp = reduced_maps(out[:h, :w], f)
        del out
        lums.append(lum), dets.append(det), disps.append(disp.astype(np.float32))
    if hr is not None:
        _, base_det, base = reduced_maps(hr, f)
    elif dets:
        base_det = np.mean(dets, axis=0)
        base = (np.mean(disps, axis=0) + 0.5).astype(np.uint8)
    else:
        base_det = None
        base = np.repeat(np.repeat(to_display(lr), scale // f or 1, 0), scale // f or 1, 1)
    if crops is None:
        chosen: list[Crop] = []
        if base_det is not None:
            disagree = np.std(np.stack(lums), axis=0) if len(lums) >= 2 else None
            size = max(scale, min(crop_size, h, w) // scale * scale)
            small = max(1, size // f)
            taken: list[Crop] = []
            for k in range(crops_per_image):
                use = disagree is not None and k % 2 == 1
                c = _best(disagree if use else base_det, small, 1, taken, "models disagree" if use else "detail")
                if c is None:
                    break
                taken.append(c)
                y = min(c.y * f // scale * scale, h - size)
                x = min(c.x * f // scale * scale, w - size)
                chosen.append(Crop(x=x, y=y, w=size, h=size, reason=c.reason))
    else:
        chosen = fit_crops(crops, width=w, height=h, scale=scale)
    panel = _start_panel(index, image, w, h, chosen, crops, hr is not None)
    reduced = [Crop(x=c.x // f, y=c.y // f, w=max(1, c.w // f), h=max(1, c.h // f), reason=c.reason) for c in chosen]
    write(panel.thumb, _thumb(base, reduced))
    _write_input_crops(panel, lr, hr, scale, write)
    for m, (label, load) in enumerate(outputs.items()):
        _write_model_crops(panel, m, label, load(), write)  # one output in memory at a time
    return panel


# ------------------------------------------------------------------ summary, plot and page

@dataclass(frozen=True)
class MetricColumn:
    """One metric of the comparison: its column in the rows, its heading, its number format, which way is better,
    its unit, the mode in which its table column is always shown (else only when some model has a value), whether the
    plot offers it as the vertical axis and whether each image's line shows it."""

    key: str
    label: str
    fmt: str = "%.4f"
    higher_is_better: bool = True
    unit: str = ""
    always_in: str | None = "reference"
    plot: bool = False
    per_image: bool = False


METRIC_COLUMNS: tuple[MetricColumn, ...] = (
    MetricColumn("psnr_y", "PSNR_Y", "%.3f", unit="dB", plot=True, per_image=True),
    MetricColumn("ssim_y", "SSIM_Y", "%.4f"),
    MetricColumn("psnr_rgb", "PSNR_RGB", "%.3f", unit="dB"),
    MetricColumn("ssim_rgb", "SSIM_RGB", "%.4f"),
    MetricColumn("lpips", "LPIPS", "%.4f", higher_is_better=False, always_in=None, plot=True, per_image=True),
    MetricColumn("niqe", "NIQE", "%.3f", higher_is_better=False, always_in=None, plot=True, per_image=True),
    MetricColumn("video_psnr_y", "video PSNR_Y", "%.3f", unit="dB", always_in=None),
    MetricColumn("video_ssim_y", "video SSIM_Y", "%.4f", always_in=None),
    MetricColumn("flicker_tde", "flicker TDE", "%.3f", higher_is_better=False, always_in=None, per_image=True),
)
"""The metrics the summary table, the plot and the per-image lines know, in table order. A new metric is one more
entry here (and a column in :data:`~srbatch.compare.worker.ROW_SCHEMA`)."""

METRICS = tuple(c.key for c in METRIC_COLUMNS)


def metric_columns(summary: Sequence[Mapping[str, Any]], mode: str) -> list[MetricColumn]:
    """The metric columns of the page: those always shown in ``mode`` and those some model has a value of."""
    return [c for c in METRIC_COLUMNS
            if c.always_in == mode or any(s.get(c.key) is not None for s in summary)]  # fmt: skip


def model_summary(rows: Sequence[Mapping[str, Any]], models: Sequence[str]) -> list[dict[str, Any]]:
    """Per model: mean metrics over its ok images (None where no image has the metric), mean runtime, parameters,
    counts (in ``models`` order). ``video_psnr_y`` / ``video_ssim_y``: the means over its ok video-frame rows only;
    ``flicker_tde``: the mean over the videos' flicker figures; ``video_frames``: its ok video-frame rows."""
    out = []
    for label in models:
        mine = [r for r in rows if r["model"] == label]
        ok = [r for r in mine if r["status"] == "ok"]
        d: dict[str, Any] = {"model": label, "images": len(ok), "failed": len(mine) - len(ok),
                             "architecture": next((r["architecture"] for r in mine if r["architecture"]), None),
                             "params": next((r["params"] for r in mine if r["params"] is not None), None)}  # fmt: skip
        for k in (*METRICS, "runtime_s"):
            src = k.removeprefix("video_")
            use = [r for r in ok if r.get("video_uri")] if k.startswith("video_") else ok
            vals = [r[src] for r in use if r.get(src) is not None and math.isfinite(r[src])]
            d[k] = float(np.mean(vals)) if vals else None
        d["video_frames"] = sum(1 for r in ok if r.get("video_uri"))
        out.append(d)
    return out


def _best(summary: Sequence[Mapping[str, Any]], key: str, lower: bool = False) -> float | None:
    vals = [s[key] for s in summary if s.get(key) is not None]
    if not vals:
        return None
    return min(vals) if lower else max(vals)


def _nice_step(raw: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= ``raw`` (> 0)."""
    e = math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * 10.0**e >= raw * (1 - 1e-9):
            return m * 10.0**e
    return 10.0 ** (e + 1)


def _column(metric: str | MetricColumn) -> MetricColumn:
    if isinstance(metric, MetricColumn):
        return metric
    for c in METRIC_COLUMNS:
        if c.key == metric:
            return c
    raise KeyError(f"unknown metric {metric!r}; known: {list(METRICS)}")


def plot_svg(
    summary: Sequence[Mapping[str, Any]], width: int = 560, height: int = 320, *, metric: str | MetricColumn = "psnr_y"
) -> str:
    """An inline SVG scatter of the mean of ``metric`` (a key of :data:`METRIC_COLUMNS`, PSNR_Y by default) against
    mean runtime per image (log scale), one labelled dot per model; "" when no model has both."""
    col = _column(metric)
    key = col.key
    pts = [(s["model"], s["runtime_s"], s[key]) for s in summary if s.get("runtime_s") and s.get(key) is not None]
    if not pts:
        return ""
    left, right, top, bottom = 60, 20, 20, 45
    xs = [math.log10(max(p[1], 1e-6)) for p in pts]
    ys = [p[2] for p in pts]
    x0, x1 = min(xs) - 0.15, max(xs) + 0.15
    lo, hi = min(ys), max(ys)
    pad = (hi - lo) * 0.15 or max(abs(hi) * 0.05, 1e-3)
    step = _nice_step((hi - lo + 2 * pad) / 5)
    y0, y1 = math.floor((lo - pad) / step) * step, math.ceil((hi + pad) / step) * step
    unit = f" ({col.unit})" if col.unit else ""
    axis = f"{col.label}{unit}, {'higher' if col.higher_is_better else 'lower'} is better"

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (width - left - right)

    def py(v: float) -> float:
        return top + (y1 - v) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(col.label)} against runtime per model">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#999"/>']  # fmt: skip
    for e in range(math.floor(x0), math.ceil(x1) + 1):
        for mult in (1, 2, 5):
            t = e + math.log10(mult)
            if x0 <= t <= x1:
                parts.append(f'<line x1="{px(t):.1f}" y1="{top}" x2="{px(t):.1f}" y2="{height - bottom}" '
                             f'stroke="#eee"/><text x="{px(t):.1f}" y="{height - bottom + 15}" font-size="11" '
                             f'text-anchor="middle">{mult * 10.0**e:g} s</text>')  # fmt: skip
    for k in range(round((y1 - y0) / step) + 1):
        v = y0 + k * step
        parts.append(f'<line x1="{left}" y1="{py(v):.1f}" x2="{width - right}" y2="{py(v):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{py(v) + 4:.1f}" font-size="11" text-anchor="end">'
                     f"{round(v, 9):g}</text>")  # fmt: skip
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" font-size="12" text-anchor="middle">'
                 "runtime per image (s, log scale)</text>"
                 f'<text x="14" y="{(top + height - bottom) / 2}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + height - bottom) / 2})">{html.escape(axis)}</text>')  # fmt: skip
    for i, ((label, _, y), x) in enumerate(zip(pts, xs)):
        c = COLOURS[i % len(COLOURS)]
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{c}"><title>{html.escape(label)}: '
                     f"{col.fmt % y}{(' ' + col.unit) if col.unit else ''}</title></circle>"
                     f'<text x="{px(x) + 8:.1f}" y="{py(y) - 6:.1f}" font-size="12">{html.escape(label)}</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


TEMPLATE = "report.html.j2"
"""The page's Jinja2 template, in ``srbatch/compare/templates/`` (shipped with the package; rendered autoescaped)."""


@lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("srbatch.compare", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


def build_html(
    *,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    models: Sequence[str],
    panels: Sequence[ImagePanel],
    scale: int,
    mode: str,
    mode_text: str,
    n_images: int,
    max_images: int,
    convention: str,
    created: str,
    grey_as_rgb: bool = False,
    noise_sigma: float = 0.0,
) -> str:
    """The report page (the Jinja2 template :data:`TEMPLATE`, autoescaped). Images whose rows have ``grey`` set are
    marked, with how they were measured (``grey_as_rgb``); ``noise_sigma`` > 0 is stated beside the mode."""
    from srbatch import __version__

    summary = model_summary(rows, models)
    reference = mode == "reference"
    columns = metric_columns(summary, mode)
    best = {c.key: _best(summary, c.key, lower=not c.higher_is_better) for c in METRIC_COLUMNS}
    best["runtime_s"] = _best(summary, "runtime_s", lower=True)
    plots = [(c, svg) for c in columns if c.plot for svg in [plot_svg(summary, metric=c)] if svg]
    niqe_shown = any(c.key == "niqe" for c in columns)
    inputs = {r["image"]: r["input_niqe"] for r in rows if r.get("input_niqe") is not None}
    input_niqe = float(np.mean(list(inputs.values()))) if inputs else None
    per_image: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["status"] == "ok":
            parts = [f"{r['psnr_y']:.2f} dB"] if r.get("psnr_y") is not None else []
            parts += [f"{c.label} {c.fmt % r[c.key]}" for c in columns
                      if c.per_image and c.key != "psnr_y" and r.get(c.key) is not None]  # fmt: skip
            v = ", ".join(parts) or "ok"
        else:
            v = r["status"]
        per_image.setdefault(r["image"], {})[r["model"]] = v
    failures = [f"{r['image']} · {r['model']}: {r['error_type']}: {r['error_message']}" for r in rows
                if r["status"] != "ok"]  # fmt: skip
    devices = ", ".join(sorted({str(r["device"]) for r in rows if r["device"]})) or "n/a"
    grey_images = sorted({r["image"] for r in rows if r.get("grey")})
    return _environment().get_template(TEMPLATE).render(
        title=title, summary=summary, best=best, reference=reference, models=list(models), panels=panels,
        scale=scale, mode=mode, mode_text=mode_text, n_images=n_images, limited=n_images > max_images,
        max_images=max_images, plots=plots, columns=columns, per_image=per_image, failures=failures,
        devices=devices, created=created, version=__version__, convention=convention, crop_px=CROP_DISPLAY,
        grey_images=grey_images, grey_as_rgb=grey_as_rgb, noise_sigma=noise_sigma, niqe_shown=niqe_shown,
        input_niqe=input_niqe, input_niqe_images=len(inputs),
    )  # fmt: skip
