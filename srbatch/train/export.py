"""Export of a trained generator: ``model.safetensors`` (self-describing), ``model_card.json``/``MODEL_CARD.md`` and
``history.parquet`` in the output folder. ``srbatch.load_model(<output folder>)`` and ``jobs/upscale.py --model
<output folder>`` load it directly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from srbatch.io.storage import join_uri, read_bytes, write_bytes

__all__ = ["MODEL_FILE", "CARD_JSON", "CARD_MD", "HISTORY_FILE", "export_model", "write_history", "read_card",
           "render_card"]  # fmt: skip

MODEL_FILE = "model.safetensors"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
HISTORY_FILE = "history.parquet"

CONVENTION = (
    "PSNR/SSIM on the Y channel of MATLAB rgb2ycbcr for 8-bit RGB (the plane itself for grey images), "
    "border of `scale` pixels shaved, LR from the configured degradation (MATLAB-exact bicubic and uint rounding "
    "for 'bicubic'), on held-out images (centre crops of at most val_max_size pixels)"
)


def write_history(history: Sequence[Mapping[str, Any]], uri: str, storage_options: Mapping[str, Any] | None) -> None:
    """The training history (one row per validation: step, loss, lr, samples/s, validation metrics) as Parquet."""
    if not history:
        return
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    cols = {k: [row.get(k) for row in history] for k in keys}
    table = pa.table({k: pa.array(v, type=pa.int64() if k in ("step", "restarts") else pa.float64())
                      for k, v in cols.items()})  # fmt: skip
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue().to_pybytes(), storage_options)


def _gain(a: Mapping[str, float] | None, b: Mapping[str, float] | None) -> dict[str, float] | None:
    if not a or not b:
        return None
    return {"psnr_y_db": a["psnr_y"] - b["psnr_y"], "ssim_y": a["ssim_y"] - b["ssim_y"]}


def export_model(
    cfg: Any,
    desc: Any,
    weights: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    plan: Mapping[str, Any],
    storage_options: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Write the generator, its model card (JSON + Markdown) and the training history to ``cfg.output``."""
    from srbatch import __version__
    from srbatch.weights.checkpoint import save_checkpoint

    out = cfg.output
    final = state.get("best") if cfg.export == "best" and state.get("best") else (
        state["history"][-1] if state.get("history") else None)  # fmt: skip
    if final and "val_psnr_y" in final:
        final = {k.removeprefix("val_"): v for k, v in final.items() if k.startswith("val_")}
    exported_step = state.get("best_step") if cfg.export == "best" and state.get("best") else state.get("step")
    name = f"{cfg.name}-x{desc.scale}" if not cfg.name.endswith(f"x{desc.scale}") else cfg.name
    sha = save_checkpoint(weights, join_uri(out, MODEL_FILE), architecture=desc.architecture, hparams=desc.hparams,
                          name=name, extra_metadata={"srbatch.model_card": CARD_JSON},
                          storage_options=storage_options)  # fmt: skip
    seconds = float(state.get("train_seconds") or 0.0)
    card: dict[str, Any] = {
        "name": name,
        "file": MODEL_FILE,
        "sha256": sha,
        "architecture": desc.architecture,
        "hparams": desc.hparams,
        "scale": desc.scale,
        "channels": desc.info.in_channels,
        "temporal_radius": desc.info.temporal_radius,
        "color_space": desc.info.color_space,
        "parameters": sum(p.numel() for p in weights.values() if p.is_floating_point()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "srbatch_version": __version__,
        "data": {
            "uri": cfg.data,
            "train_images": len(plan["train"]),
            "val_images": len(plan["val"]),
            "val_uri": cfg.val_data,
            "lr_uri": cfg.lr_data,
            "provenance": plan.get("provenance"),
            "clips": bool(plan.get("clips")),
        },
        "init": cfg.init,
        "recipe": {
            "preset": cfg.preset,
            "stage": cfg.stage,
            "loss": cfg.loss if cfg.stage == "psnr" else None,
            "gan": cfg.recipe() if cfg.stage == "gan" else None,
            "degradation": cfg.degradation_config().model_dump(),
            "video_crf": list(cfg.video_crf) if getattr(cfg, "video_crf", None) else None,
            "crop_size": cfg.crop_size,
            "batch_size_per_worker": cfg.batch_size,
            "workers": cfg.workers,
            "lr": cfg.lr,
            "lr_schedule": cfg.lr_schedule,
            "ema": cfg.ema,
            "seed": cfg.seed,
        },
        "training": {
            "steps": int(state.get("step") or 0),
            "exported": f"{cfg.export} (step {exported_step})",
            "samples": int(state.get("samples") or 0),
            "train_seconds": seconds,
            "samples_per_s": (int(state.get("samples") or 0) / seconds) if seconds > 0 else None,
            "restarts": int(state.get("restarts") or 0),
        },
        "validation": {
            "convention": CONVENTION,
            "bicubic": state.get("bicubic"),
            "initial": state.get("initial"),
            "final": final,
            "gain_vs_bicubic": _gain(final, state.get("bicubic")),
            "gain_vs_initial": _gain(final, state.get("initial")),
        },
    }
    write_bytes(join_uri(out, CARD_JSON), json.dumps(card, indent=2, default=str).encode(), storage_options)
    write_bytes(join_uri(out, CARD_MD), render_card(card).encode(), storage_options)
    write_history(state.get("history") or [], join_uri(out, HISTORY_FILE), storage_options)
    return card


def read_card(output: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``model_card.json`` of an export folder."""
    return json.loads(read_bytes(join_uri(output, CARD_JSON), storage_options))


def _fmt(m: Mapping[str, float] | None) -> str:
    return f"{m['psnr_y']:.2f} dB / {m['ssim_y']:.4f}" if m else "n/a"


def render_card(card: Mapping[str, Any]) -> str:
    """The Markdown model card."""
    v, t, r, d = card["validation"], card["training"], card["recipe"], card["data"]
    gb, gi = v.get("gain_vs_bicubic"), v.get("gain_vs_initial")
    lines = [
        f"# {card['name']}",
        "",
        f"`{card['architecture']}` x{card['scale']}, {card['channels']} channel(s) ({card['color_space']}), "
        f"{card['parameters']:,} parameters; file `{card['file']}` (sha256 `{card['sha256']}`). "
        f"Trained with srbatch {card['srbatch_version']} on {card['created']}.",
        "",
        "## Data",
        f"- training images: {d['train_images']} from `{d['uri']}`" + (f" (LR: `{d['lr_uri']}`)" if d["lr_uri"] else ""),
        f"- validation images: {d['val_images']}" + (f" from `{d['val_uri']}`" if d["val_uri"] else " held out"),
    ]
    if d.get("provenance"):
        lines.append(f"- provenance: {d['provenance']}")
    lines += [
        "",
        "## Recipe",
        f"- initial weights: {card['init'] or 'random initialisation'}; preset: {r['preset'] or 'none'}",
        f"- stage: {r['stage']}" + (f", pixel loss {r['loss']}" if r["loss"] else "")
        + (f", GAN recipe {json.dumps(r['gan'])}" if r["gan"] else ""),
        f"- LR synthesis: {r['degradation']['kind']} ({json.dumps(r['degradation'])})",
        f"- crops {r['crop_size']} px HR, batch {r['batch_size_per_worker']} x {r['workers']} worker(s), Adam lr "
        f"{r['lr']:g} ({r['lr_schedule']}), EMA {r['ema']:g}, seed {r['seed']}",
        f"- steps: {t['steps']}, exported: {t['exported']}, samples: {t['samples']:,}, "
        f"{(t['samples_per_s'] or 0):.1f} samples/s over {t['train_seconds']:.0f} s, restarts: {t['restarts']}",
        "",
        "## Validation (PSNR_Y / SSIM_Y)",
        "",
        "| model | PSNR_Y / SSIM_Y |",
        "|---|---|",
        f"| {'degraded input' if card['scale'] == 1 else 'bicubic'} | {_fmt(v.get('bicubic'))} |",
        f"| initial weights | {_fmt(v.get('initial'))} |",
        f"| this model | {_fmt(v.get('final'))} |",
        "",
        f"Gain over {'the input' if card['scale'] == 1 else 'bicubic'}: {gb['psnr_y_db']:+.2f} dB; over the initial weights: {gi['psnr_y_db']:+.2f} dB."
        if gb and gi else "",
        "",
        f"Convention: {v['convention']}.",
        "",
    ]
    return "\n".join(lines)
