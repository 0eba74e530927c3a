#!/usr/bin/env python
"""Export every registered architecture (and a few spandrel ones) to ONNX and compare onnxruntime (CPU) with PyTorch
on real Set5 crops at two sizes through the same file; print the per-model table.

Real checkpoints where ../shared/refs (or $SRBATCH_REFS) has them (IMDN, VDSR, SRGAN, SRCNN/FSRCNN/ESPCN of
nhat_thanh) and the shipped default models; random weights otherwise (sizes below). Usage:

    .venv/bin/python scripts/onnx_verify_all.py [--refs PATH] [--only NAME ...] [--json]

Columns: model, weights, scale, colour space, export seconds, max |onnxruntime - torch| over both crops (batch 1 at
64x48, batch 2 at 37x53, in the model's colour space), CPU ms per forward of the first crop (torch / onnxruntime,
median of 3 after a warm-up; both use all cores), the graph's ops and what the graph says about TensorRT
(srbatch.export.trt_facts).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from srbatch.errors import SrbatchError
from srbatch.export import export_model, resolve_model
from srbatch.inference.colorspace import to_model_space
from srbatch.models.registry import ARCHITECTURES

REAL = {  # registry architecture -> (path under refs/weights, scale)
    "srcnn": ("nhat_thanh/SRCNN-915.pt", 2),
    "fsrcnn": ("nhat_thanh/FSRCNN-x2.pt", 2),
    "espcn": ("nhat_thanh/ESPCN-x3.pt", 3),
    "vdsr": ("vdsr_twtygqyy/model_epoch_50.state_dict.safetensors", 2),
    "srresnet": ("srgan_leftthomas/netG_epoch_4_100.pth", 4),
    "imdn": ("imdn_official/IMDN_x4.pth", 4),
}
RANDOM = {  # random-weight builds: the papers' layouts, fewer blocks so that 2 CPU cores finish in minutes
    "bicubic": {"scale": 2}, "nearest": {"scale": 2},
    "edsr": {"scale": 2, "n_resblocks": 4, "n_feats": 64},
    "mdsr": {"scale": 3, "n_resblocks": 4, "n_feats": 64},
    "rrdbnet": {"scale": 4, "num_block": 2, "num_feat": 32, "num_grow_ch": 16},
    "rrdbnet x2 (pixel_unshuffle)": {"scale": 2, "num_block": 2, "num_feat": 32, "num_grow_ch": 16},
    "wdsr": {"scale": 2, "n_resblocks": 4, "n_feats": 32},
    "dbpn": {"scale": 2, "feat": 32, "base_filter": 16, "num_stages": 3},
    "srfbn": {"scale": 2, "num_features": 16, "num_steps": 2, "num_groups": 3},
    "vae": {"scale": 1},
}  # fmt: skip
SIZES = [(1, 64, 48), (2, 37, 53)]


def _crops(refs: Path | None, n: int, c: int, h: int, w: int, color_space: str, shift: int = 0) -> torch.Tensor:
    if refs is None:  # no reference images: a smooth synthetic image (stated in the table's weights column)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        rgb = torch.stack([yy, xx, (yy * xx) ** 0.5])[None].expand(n, 3, h, w)
        return to_model_space(rgb, color_space)[:, :c]
    names = sorted((refs / "sets/Set5/image_SRF_2").glob("*_HR.png"))
    out = []
    for i in range(n):
        rgb = np.asarray(Image.open(names[(i + shift) % len(names)]).convert("RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(rgb[60 : 60 + h, 70 : 70 + w]).permute(2, 0, 1)[None]
        out.append(to_model_space(t, color_space if color_space != "L" else "Y")[:, :c])
    return torch.cat(out)


def _ms(fn, x) -> float:
    fn(x)  # warm-up (allocator, onnxruntime's first-run optimisations)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _models(refs: Path | None) -> list[tuple[str, str, str, dict]]:
    """(row name, model spec, weights label, kwargs for resolve_model)."""
    rows = []
    for arch in [a.name for a in ARCHITECTURES]:
        if arch in REAL and refs is not None and (refs / "weights" / REAL[arch][0]).exists():
            path, scale = REAL[arch]
            rows.append((arch, str(refs / "weights" / path), path, {"scale": scale}))
        for name, args in RANDOM.items():
            if name.split()[0] == arch:
                rows.append((name, arch, "random", {"scale": args["scale"], "model_args": {
                    k: v for k, v in args.items() if k != "scale"}}))  # fmt: skip
        if arch not in REAL and arch not in RANDOM:
            rows.append((arch, arch, "random (defaults)", {"scale": 2}))
    for scale in (2, 4):
        rows.append((f"default x{scale}", "default", "shipped (srbatch/data/models)", {"scale": scale}))
    return rows


def _spandrel(tmp: str) -> list[tuple[str, str, str, dict]]:
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.SPAN import SPAN
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(0)
    nets = {"spandrel Compact": Compact(num_feat=32, num_conv=8, upscale=4),
            "spandrel SPAN": SPAN(num_in_ch=3, num_out_ch=3, feature_channels=24, upscale=4),
            "spandrel SwinIR": SwinIR(img_size=32, embed_dim=24, depths=[2], num_heads=[2], window_size=8, upscale=2,
                                      upsampler="pixelshuffledirect")}  # fmt: skip
    rows = []
    for name, net in nets.items():
        path = os.path.join(tmp, name.split()[1] + ".safetensors")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
        rows.append((name, path, "random", {}))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--refs", default=os.environ.get("SRBATCH_REFS", str(Path(__file__).resolve().parents[1].parent
                                                                         / "shared" / "refs")))  # fmt: skip
    ap.add_argument("--only", nargs="*", help="row names to run (e.g. imdn 'default x4')")
    ap.add_argument("--no-spandrel", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    refs = Path(args.refs) if (Path(args.refs) / "sets/Set5").is_dir() else None
    if refs is None:
        print(f"no Set5 under {args.refs}: random weights and synthetic images only", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        rows = _models(refs) + ([] if args.no_spandrel else _spandrel(tmp))
        for name, spec, weights, kw in rows:
            if args.only and name not in args.only:
                continue
            row = {"model": name, "weights": weights}
            try:
                torch.manual_seed(0)
                desc = resolve_model(spec, **kw)
                row.update(architecture=desc.architecture, scale=desc.scale, color_space=desc.color_space)
                res = export_model(desc, os.path.join(tmp, "m.onnx"))
                import onnxruntime as ort

                sess = ort.InferenceSession(os.path.join(tmp, "m.onnx"), providers=["CPUExecutionProvider"])
                m = max(desc.info.size_multiple, 1)
                diffs, ms = [], None
                for n, h, w in SIZES:
                    h, w = m * -(-h // m), m * -(-w // m)
                    frames = 2 * desc.info.temporal_radius + 1  # a temporal model: its window packed on channels
                    x = torch.cat([_crops(refs, n, desc.in_channels, h, w, desc.color_space, shift=k)
                                   for k in range(frames)], 1)  # fmt: skip
                    with torch.inference_mode():
                        ref = desc.module(x).numpy()
                    got = sess.run(None, {"input": x.numpy()})[0]
                    diffs.append(float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf"))
                    if ms is None:
                        with torch.inference_mode():
                            ms = (_ms(desc.module, x), _ms(lambda a: sess.run(None, {"input": a}), x.numpy()))
                row.update(opset=res.opset, export_s=round(res.seconds, 1), max_abs_diff=max(diffs),
                           torch_ms=round(ms[0], 1), ort_ms=round(ms[1], 1), ops=list(res.ops),
                           tensorrt=res.trt["notes"] or ["no known blocker in the graph"])  # fmt: skip
            except SrbatchError as e:
                row["error"] = str(e)
            results.append(row)
            if not args.json:
                _print_row(row)
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


def _print_row(r: dict) -> None:
    head = f"{r['model']:<30} {r['weights'][:44]:<44} x{r.get('scale', '?')} {r.get('color_space', '?'):<5}"
    if "error" in r:
        print(f"{head} REFUSED: {r['error'][:220]}", flush=True)
        return
    print(f"{head} opset {r['opset']} export {r['export_s']:5.1f} s  max|ort-torch| {r['max_abs_diff']:.2e}  "
          f"torch {r['torch_ms']:7.1f} ms  ort {r['ort_ms']:7.1f} ms  ops {','.join(r['ops'])}  "
          f"TensorRT: {'; '.join(r['tensorrt'])}", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
