"""The ``srbatch`` command: ``models``, ``evaluate``, ``upscale`` (the Ray job of :mod:`srbatch.upscale`), ``manifest``
(its manifest's operations, :mod:`srbatch.upscale.manifest_cli`), ``compare`` (:mod:`srbatch.compare`), ``train`` (the
Ray Train job of :mod:`srbatch.train`), ``export`` (ONNX, :mod:`srbatch.export`)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

from srbatch.errors import SrbatchError
from srbatch.jobkit.config import parse_storage_options


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present) [auto]")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="compute dtype; half precision is used on CUDA only, with an fp32 retry on NaN/black output [float32]",
    )
    p.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="fsspec storage option, repeatable (e.g. anon=true, endpoint_url=http://127.0.0.1:8333); "
        "credentials are best left to the standard AWS_* environment variables",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and decisions")


def _shipped_models() -> list[dict]:
    import json as _json
    from importlib import resources

    out = []
    for scale in (2, 4):
        card = resources.files("srbatch") / "data" / "models" / f"default-x{scale}" / "model_card.json"
        if card.is_file():
            c = _json.loads(card.read_text())
            v = c["validation"]
            out.append({"scale": scale, "architecture": c["architecture"], "hparams": c["hparams"],
                        "parameters": c["parameters"], "psnr_y": (v.get("final") or {}).get("psnr_y", float("nan")),
                        "bicubic_psnr_y": (v.get("bicubic") or {}).get("psnr_y", float("nan"))})  # fmt: skip
    return out


def _cmd_models(args: argparse.Namespace) -> int:
    from srbatch.models.registry import architectures, variants

    archs = architectures()
    var = variants()
    rows = []
    for name, arch in archs.items():
        names = [v for v, (a, _) in var.items() if a == name and v != name]
        rows.append(
            {
                "architecture": name,
                "variants": names,
                "needs_weights": arch.needs_weights,
                "paper": arch.paper,
            }
        )
    spandrel_names: list[str] = []
    try:
        from spandrel import MAIN_REGISTRY

        spandrel_names = sorted({a.architecture.name for a in MAIN_REGISTRY.architectures()})
    except Exception as e:  # spandrel missing or broken: still list native models
        logging.getLogger("srbatch").warning("spandrel unavailable: %s", e)
    shipped = _shipped_models()
    if args.json:
        print(json.dumps({"native": rows, "shipped": shipped, "spandrel": spandrel_names}, indent=2))
        return 0
    print("Shipped weights (`--model default --scale 2|4`; trained by jobs/train.py on CC0 images):")
    for m in shipped:
        print(f"  default x{m['scale']}: {m['architecture']} {m['hparams']}, {m['parameters']:,} parameters, "
              f"validation {m['psnr_y']:.2f} dB PSNR_Y (bicubic {m['bicubic_psnr_y']:.2f} dB) on held-out images")
    print("Native architectures (load the authors' checkpoints; `--model <checkpoint path or URI>`):")
    for r in rows:
        extra = f" variants: {', '.join(r['variants'])}" if r["variants"] else ""
        weights = "" if r["needs_weights"] else "  [no weights: use `--model " + r["architecture"] + "`]"
        print(f"  {r['architecture']:<10} {r['paper']}{weights}{extra}")
    if spandrel_names:
        print(f"\nThrough spandrel (any checkpoint it detects): {', '.join(spandrel_names)}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from srbatch.evaluate import evaluate, write_parquet
    from srbatch.models.loader import load_model

    so = parse_storage_options(args.storage_option)
    desc = load_model(args.model, scale=args.scale, sha256=args.sha256, storage_options=so)

    def progress(row: Any) -> None:
        if not args.json:
            lp = f", LPIPS {row.lpips:.4f}" if row.lpips is not None else ""
            print(f"  {row.image}: PSNR_Y {row.psnr_y:.3f} dB, SSIM_Y {row.ssim_y:.4f}{lp} ({row.seconds:.2f} s)",
                  file=sys.stderr)

    res = evaluate(
        desc,
        scale=args.scale,
        hr=args.hr,
        lr=args.lr,
        storage_options=so,
        device=args.device,
        dtype=args.dtype,
        tile=args.tile,
        crop_border=args.crop_border,
        self_ensemble=args.self_ensemble,
        precision=args.precision,
        progress=progress,
        grey_as_rgb=args.grey_as_rgb,
        noise_sigma=args.noise_sigma,
        lpips_weights=args.lpips_weights,
    )
    if args.output:
        path = write_parquet(res, args.output, so)
        print(f"per-image rows written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(res.summary(), default=lambda o: None if isinstance(o, float) and math.isinf(o) else o))
    else:
        print(res.table())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from srbatch.errors import ConfigError
    from srbatch.export import export_model

    model_args: dict[str, Any] = {}
    if args.model_args:
        import yaml

        try:
            model_args = yaml.safe_load(args.model_args)
        except yaml.YAMLError as e:
            raise ConfigError(f"--model-args: not YAML ({e}); expected a mapping such as '{{num_block: 8}}'") from None
        if not isinstance(model_args, dict):
            raise ConfigError(f"--model-args: expected a mapping such as '{{num_block: 8}}'; got {args.model_args!r}")
    so = parse_storage_options(args.storage_option)
    res = export_model(args.model, args.output, format=args.format, opset=args.opset, scale=args.scale,
                       model_args=model_args, storage_options=so)  # fmt: skip
    if args.json:
        print(json.dumps({"uri": res.uri, "architecture": res.architecture, "name": res.name, "opset": res.opset,
                          "max_abs_diff": res.max_abs_diff, "checks": [[list(s), d] for s, d in res.checks],
                          "ops": list(res.ops), "tensorrt": res.trt, "bytes": res.nbytes, "sha256": res.sha256,
                          "seconds": round(res.seconds, 2)}))  # fmt: skip
    else:
        print(res.summary())
    return 0


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0..255 units), e.g. 25; got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0..255 units), e.g. 25; got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``srbatch`` command."""
    parser = argparse.ArgumentParser(
        prog="srbatch", description="Super-resolve, measure and compare image super-resolution models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the available architectures and model names")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser(
        "evaluate",
        help="PSNR/SSIM of a model on an image set, in the paper convention",
        description="Upscale LR images (given, or made from HR with MATLAB bicubic) and measure PSNR/SSIM against HR "
        "on the Y channel of MATLAB rgb2ycbcr with `scale` border pixels shaved (the convention of published tables).",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model name (bicubic) or checkpoint path/URI (.safetensors/.pth; a TensorFlow .pb of ESPCN/FSRCNN; an "
        ".onnx written by `srbatch export`)",
    )
    p.add_argument("--scale", type=int, required=True, help="upscaling factor (2, 3, 4, ...)")
    p.add_argument("--hr", required=True, help="HR images: folder, glob or URI (s3://bucket/set5/*_HR.png)")
    p.add_argument(
        "--lr",
        help="LR images: folder, glob or URI; paired with HR by name once the tokens HR/LR are removed "
        "(img_001_SRF_4_HR.png <-> img_001_SRF_4_LR.png). Default: made from HR with MATLAB bicubic",
    )
    p.add_argument("--output", help="write per-image rows as Parquet (a .parquet file or a folder/prefix)")
    p.add_argument("--json", action="store_true", help="print one JSON object (model, scale, n_images, psnr_y, ...)")
    p.add_argument("--crop-border", type=int, help="pixels shaved from each border before measuring [scale]")
    p.add_argument("--tile", type=int, default=0, help="tile size in input pixels; 0 = whole image [0]")
    p.add_argument("--self-ensemble", action="store_true", help="x8 geometric self-ensemble (as EDSR+)")
    p.add_argument("--sha256", help="refuse the checkpoint unless its sha256 matches")
    p.add_argument(
        "--precision",
        choices=["auto", "uint8", "float"],
        default="auto",
        help="uint8: measure the 8-bit SR image, Y rounded as MATLAB does (benchmark tables); float: Y-channel models "
        "measured on their float Y output, nothing rounded (Y-only PyTorch releases, e.g. VDSR); "
        "auto: float for Y-channel models, uint8 otherwise [auto]",
    )
    p.add_argument(
        "--grey-as-rgb",
        action="store_true",
        help="convert grey images (HR and LR) to RGB before the model and the measuring, as test scripts that read "
        "every image with OpenCV as 3-channel do (IMDN's, many PyTorch repositories'): Y then spans 16-235 and a grey "
        "image's PSNR_Y rises by about 20*log10(255/219) = 1.32 dB. Default: grey images measured as they are "
        "(Y = the grey values), as the MATLAB benchmark tables do",
    )
    p.add_argument(
        "--noise-sigma",
        type=_non_negative_float,
        default=0.0,
        metavar="S",
        help="add Gaussian noise of standard deviation S (0..255 units) to each LR image (made or given), seeded by "
        "the image's name so every model and every rerun see the same noise; rounded and clipped; measured against "
        "the clean HR (a denoising test at --scale 1) [0]",
    )
    p.add_argument(
        "--lpips-weights",
        metavar="URI",
        help="also measure LPIPS v0.1 (lower is better) with this weights file (path or s3://; torchvision "
        "AlexNet/VGG16 trunk + LPIPS linear heads in one safetensors file, made with "
        "`python -m srbatch.metrics.lpips make`; nothing is downloaded): on the RGB SR vs HR, integers scaled to "
        "[-1, 1], --crop-border shaved as for PSNR, grey images replicated to RGB",
    )
    _add_common(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch/height/width, descriptor in the metadata), checked by "
        "onnxruntime",
        description="Export a model with torch.onnx (dynamo exporter). The graph takes (N, C, H, W) float32 in [0, 1] "
        "in the model's colour space; the srbatch descriptor is stored in the ONNX metadata_props (srbatch.*). Before "
        "writing, onnxruntime must reproduce PyTorch within 1e-3 at two input sizes other than the export sample.",
    )
    p.add_argument("--model", required=True, help="model name (untrained build for architectures/variants), "
                   "checkpoint path/URI or training output folder")  # fmt: skip
    p.add_argument("--format", default="onnx", help="export format; only onnx [onnx]")
    p.add_argument("-o", "--output", required=True, help="output file: local path or URI (s3://bucket/m.onnx)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset [18]")
    p.add_argument("--scale", type=int, help="upscaling factor (for scale-agnostic weights and registry names)")
    p.add_argument("--model-args", help="hyper-parameters of a registry name, YAML: '{num_block: 8, num_feat: 32}'")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", help="fsspec storage option, repeatable")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and decisions")
    p.set_defaults(func=_cmd_export)

    sub.add_parser(
        "upscale",
        help="the upscale job on Ray: images from object storage, upscaled outputs, Parquet manifest "
        "(see `srbatch upscale --help`)",
        add_help=False,
    )
    sub.add_parser(
        "compare",
        help="the comparison job on Ray: several models on your images, an HTML report with crops and a Parquet "
        "table (see `srbatch compare --help`)",
        add_help=False,
    )
    sub.add_parser(
        "train",
        help="the training job on Ray Train: fine-tune a model for a domain, export it (see `srbatch train --help`)",
        add_help=False,
    )
    sub.add_parser(
        "manifest",
        help="inspect and maintain the upscale job's manifest: summary of runs, failures, one input's history, "
        "compaction of old runs (see `srbatch manifest --help`)",
        add_help=False,
    )
    sub.add_parser(
        "benchmark",
        help="bare model throughput vs the upscale job end to end, on the same images and device (see `srbatch "
        "benchmark --help`)",
        add_help=False,
    )
    return parser


#: Subcommands that are whole jobs: the package whose ``main(argv, prog=...)`` runs each.
_JOBS = {"upscale": "srbatch.upscale", "compare": "srbatch.compare", "train": "srbatch.train",
         "benchmark": "srbatch.benchmark", "manifest": "srbatch.upscale.manifest_cli"}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``srbatch`` console script. Exit codes: 0 ok, 1 some inputs failed, 2 usage/config error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _JOBS:  # each job has its own parser (one flag per config field)
        import importlib

        job_main = importlib.import_module(_JOBS[argv[0]]).main
        return int(job_main(argv[1:], prog=f"srbatch {argv[0]}"))
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except SrbatchError as e:
        print(f"srbatch {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
