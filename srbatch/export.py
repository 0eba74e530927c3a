"""Export a model to ONNX, with its srbatch descriptor in the file, checked by onnxruntime before it is written.

``srbatch export --model M --format onnx -o model.onnx`` (:func:`export_model`). The exporter is ``torch.onnx.export``
with ``dynamo=True`` (torch.export + onnxscript), not the TorchScript tracer: the tracer records the sizes of the
sample input wherever a forward computes with Python integers (MATLAB bicubic's polyphase plan, attention masks),
silently; torch.export either proves the graph valid for symbolic batch/height/width or refuses. Every export is
still run by onnxruntime at two more input sizes (odd, ``H != W``, batch 2) against PyTorch before anything is
written, so a graph that baked a size in is refused with a :class:`~srbatch.errors.ConfigError` rather than shipped.

The graph takes what the module takes: ``(N, C, H, W)`` float32 in ``[0, 1]`` in the model's colour space (input
``input``, output ``output``; batch, height and width dynamic). The descriptor (architecture, name, scale, colour space,
input_upsampled, size_multiple, halo, hparams, ...) is stored as ``srbatch.*`` entries of the ONNX ``metadata_props``
(:func:`onnx_metadata`), so a runner (:mod:`srbatch.models.onnx_runner`) can feed it correctly.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from srbatch.errors import ConfigError
from srbatch.models.descriptor import ArchInfo, ModelDescriptor

__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "META_PREFIX",
    "VERIFY_TOLERANCE",
    "OnnxExport",
    "export_model",
    "onnx_metadata",
    "probe_shapes",
    "resolve_model",
    "to_onnx",
    "trt_facts",
    "verify_onnx",
]

log = logging.getLogger("srbatch.export")

FORMATS: tuple[str, ...] = ("onnx",)
DEFAULT_OPSET = 18
"""The opset torch.onnx's dynamo exporter (onnxscript's torchlib) is written for; onnxruntime >= 1.14 reads it. Other
opsets go through the ONNX version converter (``--opset 17``, for TensorRT 8.6's parser, is tested on FSRCNN)."""
META_PREFIX = "srbatch."
VERIFY_TOLERANCE = 1e-3
"""Largest |onnxruntime - PyTorch| accepted at export time (outputs live in [0, 1]; float32 reordering gives ~1e-6, a
graph that baked in a size or dropped an op gives 1e-1 or a wrong shape)."""


# ------------------------------------------------------------------------------------------------ the model


def resolve_model(
    model: str,
    *,
    scale: int | None = None,
    model_args: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ModelDescriptor:
    """``model`` as :func:`~srbatch.load_model` reads it; a registry name (architecture or variant) that needs weights
    is built untrained (random weights) with ``model_args``, which only registry names take."""
    from srbatch.models.loader import build_model, load_model
    from srbatch.models.registry import architectures, variants

    args = dict(model_args or {})
    if model in architectures() or model in variants():
        if scale is not None:
            args["scale"] = int(scale)
        return build_model(model, **args)
    if args:
        raise ConfigError(
            f"--model-args apply to registry names (untrained builds), not to the checkpoint {model}: its "
            "hyper-parameters come from the file; drop --model-args"
        )
    return load_model(model, scale=scale, storage_options=storage_options)


def probe_shapes(info: ArchInfo, batch: int = 1) -> list[tuple[int, int, int, int]]:
    """Three input shapes: the export sample and two check sizes (odd where allowed, ``H != W``, one of batch 2), all
    multiples of ``info.size_multiple``."""
    m = max(int(info.size_multiple), 1)

    def up(v: int) -> int:
        return m * max(1, -(-v // m))

    c = info.in_channels * (2 * int(info.temporal_radius) + 1)  # a temporal model's frames, packed on channels
    return [(batch, c, up(20), up(28)), (batch, c, up(23), up(17)), (2, c, up(13), up(30))]


# ------------------------------------------------------------------------------------------------ metadata


def onnx_metadata(desc: ModelDescriptor, opset: int) -> dict[str, str]:
    """The ``srbatch.*`` metadata_props of an export: the descriptor, the tensor contract and the exporter."""
    info = desc.info
    out_hw = "H, W" if info.input_upsampled else f"{info.scale}*H, {info.scale}*W"
    meta = {
        "architecture": desc.architecture,
        "name": desc.name,
        "scale": str(info.scale),
        "in_channels": str(info.in_channels),
        "out_channels": str(info.out_channels),
        "color_space": str(info.color_space),
        "input_upsampled": json.dumps(bool(info.input_upsampled)),
        "size_multiple": str(int(info.size_multiple)),
        "halo": str(int(info.receptive_halo)),
        "tile_hint": json.dumps(info.tile_hint),
        "local": json.dumps(info.local),
        "hparams": json.dumps(desc.hparams, sort_keys=True, default=_jsonable),
        "source": desc.source or "",
        "sha256": desc.sha256 or "",
        "temporal_radius": str(int(info.temporal_radius)),
        "input": (f"input: (N, {info.in_channels}, H, W) float32 in [0, 1], colour space {info.color_space}"
                  if not info.temporal_radius else
                  f"input: (N, {2 * info.temporal_radius + 1}*{info.in_channels}, H, W) float32 in [0, 1], colour "
                  f"space {info.color_space}: frames t-{info.temporal_radius}..t+{info.temporal_radius} packed on "
                  "channels, in time order; the output is frame t's")
        + (", bicubic-upscaled to the output size" if info.input_upsampled else ""),
        "output": f"output: (N, {info.out_channels}, {out_hw}) float32, about [0, 1], not clamped",
        "opset": str(int(opset)),
        "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=True)",
    }
    return {META_PREFIX + k: v for k, v in meta.items()}


def _jsonable(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


# ------------------------------------------------------------------------------------------------ export


def _reason(e: BaseException) -> str:
    """The innermost cause's first line (torch.onnx wraps the real reason in several layers of advice)."""
    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[0] if text else ''}"[:400]


def to_onnx(desc: ModelDescriptor, *, opset: int = DEFAULT_OPSET) -> Any:
    """``desc.module`` as an ``onnx.ModelProto`` (float32, dynamic N/H/W) with :func:`onnx_metadata`; not yet checked.

    A :class:`ConfigError` naming the architecture and the exporter's reason when torch.onnx cannot export it.
    """
    import onnx

    if not isinstance(opset, int) or isinstance(opset, bool) or not 7 <= opset <= 25:
        raise ConfigError(f"--opset: expected an ONNX opset between 7 and 25 (default {DEFAULT_OPSET}); got {opset!r}")
    module = desc.module.float().eval()
    # batch 2: torch.export specialises dimensions of size 0 and 1
    sample = torch.rand(probe_shapes(desc.info, batch=2)[0], generator=torch.Generator().manual_seed(0))
    dyn = torch.export.Dim.DYNAMIC
    what = f"{desc.architecture} ({desc.name or 'unnamed'})"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            # one non-strict torch.export (torch.onnx would retry strict and draft modes on failure: 10x slower)
            program = torch.export.export(module, (sample,), dynamic_shapes=({0: dyn, 2: dyn, 3: dyn},), strict=False)
            onnx_program = torch.onnx.export(
                program, (sample,), None, dynamo=True, opset_version=opset, input_names=["input"],
                output_names=["output"], verbose=False, external_data=False,
            )  # fmt: skip
        proto = onnx_program.model_proto
    except Exception as e:
        raise ConfigError(
            f"{what}: torch.onnx (dynamo exporter, opset {opset}) cannot export this model with dynamic height and "
            f"width: {_reason(e)}. Run it in PyTorch (srbatch upscale) instead"
        ) from e
    proto.doc_string = f"srbatch export of {what}"
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, onnx_metadata(desc, opset))
    return proto


def verify_onnx(
    model_bytes: bytes, module: torch.nn.Module, inputs: Sequence[torch.Tensor]
) -> list[tuple[tuple[int, ...], float]]:
    """``(input shape, max |onnxruntime - PyTorch|)`` for each input (float32 ``(N, C, H, W)``), on the CPU.

    A wrong output shape counts as an infinite difference.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = []
    for x in inputs:
        x = x.float().cpu().contiguous()
        with torch.inference_mode():
            ref = module(x).float().numpy()
        try:
            got = sess.run(None, {name: x.numpy()})[0]
        except Exception as e:  # a graph that baked a size in may fail to broadcast at another size
            log.info("onnxruntime failed at %s: %s", tuple(x.shape), e)
            out.append((tuple(x.shape), float("inf")))
            continue
        diff = float(abs(got - ref).max()) if got.shape == ref.shape else float("inf")
        out.append((tuple(x.shape), diff))
    return out


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_model` wrote and how it was checked."""

    uri: str
    architecture: str
    name: str
    opset: int
    checks: tuple[tuple[tuple[int, ...], float], ...]
    """(input shape, max |onnxruntime - PyTorch|) on random inputs at sizes other than the export sample."""
    ops: tuple[str, ...]
    """Distinct ONNX op types in the graph."""
    trt: dict[str, Any]
    """:func:`trt_facts` of the graph."""
    nbytes: int
    sha256: str
    seconds: float

    @property
    def max_abs_diff(self) -> float:
        return max(d for _, d in self.checks)

    def summary(self) -> str:
        sizes = ", ".join("x".join(map(str, s)) for s, _ in self.checks)
        return (
            f"wrote {self.uri} ({self.nbytes / 1e6:.2f} MB, sha256 {self.sha256[:12]}...): {self.architecture} "
            f"({self.name}), ONNX opset {self.opset}, dynamic batch/height/width; onnxruntime vs PyTorch max abs "
            f"difference {self.max_abs_diff:.2e} at {sizes}; ops: {', '.join(self.ops)}"
            + (f"; TensorRT: {'; '.join(self.trt['notes'])}" if self.trt["notes"] else "")
        )


def export_model(
    model: str | ModelDescriptor,
    output: str,
    *,
    format: str = "onnx",
    opset: int = DEFAULT_OPSET,
    scale: int | None = None,
    model_args: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    tolerance: float = VERIFY_TOLERANCE,
) -> OnnxExport:
    """Export ``model`` (a descriptor, or anything :func:`resolve_model` reads) to ``output`` (local path or fsspec
    URI), after onnxruntime reproduced PyTorch within ``tolerance`` at two input sizes other than the sample's.

    :class:`ConfigError` for an unknown format, an unwritable output, a model torch.onnx cannot export or an export
    onnxruntime does not reproduce; :class:`~srbatch.errors.StorageError` if writing fails.
    """
    from srbatch.io.storage import write_bytes

    if format != "onnx":
        raise ConfigError(f"--format: unknown export format {format!r}; supported: {', '.join(FORMATS)}")
    _check_writable(output)
    t0 = time.perf_counter()
    desc = model if isinstance(model, ModelDescriptor) else resolve_model(
        model, scale=scale, model_args=model_args, storage_options=storage_options
    )  # fmt: skip
    if desc.architecture.startswith("onnx:"):
        raise ConfigError(f"{desc.source or desc.name} is already an ONNX file; export the original checkpoint instead")
    proto = to_onnx(desc, opset=opset)
    data = proto.SerializeToString()
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.rand(s, generator=gen) for s in probe_shapes(desc.info)[1:]]
    checks = verify_onnx(data, desc.module, inputs)
    worst = max(d for _, d in checks)
    if not worst <= tolerance:
        raise ConfigError(
            f"{desc.architecture} ({desc.name or 'unnamed'}): the ONNX graph does not reproduce PyTorch at other input "
            f"sizes (max abs difference {worst:.3g} > {tolerance:g} at {[s for s, d in checks if d > tolerance]}): the "
            "forward computes with the sample's size in Python, so it cannot be exported with dynamic height and "
            "width; nothing was written"
        )
    write_bytes(output, data, storage_options)
    return OnnxExport(
        uri=output, architecture=desc.architecture, name=desc.name, opset=opset, checks=tuple(checks),
        ops=tuple(sorted({n.op_type for n in proto.graph.node})), trt=trt_facts(proto), nbytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(), seconds=time.perf_counter() - t0,
    )  # fmt: skip


def _check_writable(output: str) -> None:
    """Refuse a local output whose folder cannot be created or written, before the slow export."""
    if not output or output.endswith(("/", os.sep)):
        raise ConfigError(f"-o/--output: expected a file path or URI such as model.onnx; got {output!r}")
    if "://" in output and not output.startswith("file://"):
        return  # object storage: write_bytes reports failures with the URI
    path = os.path.abspath(output.removeprefix("file://"))
    if os.path.isdir(path):
        raise ConfigError(f"-o/--output: {output} is a folder; give a file name such as {output.rstrip('/')}/m.onnx")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"-o/--output: cannot write {output}: {parent} is not a writable folder; choose another path")


# ------------------------------------------------------------------------------------------------ TensorRT facts


def trt_facts(proto: Any) -> dict[str, Any]:
    """Facts about a graph that decide whether TensorRT's ONNX parser takes it, read from the graph (TensorRT itself
    is not run): op types, the largest tensor rank (shape inference), Reshapes whose target shape is computed at run
    time from ``Shape`` (TensorRT builds those as shape-tensor shuffles; the pixel_unshuffle pattern), and notes."""
    import onnx

    g = onnx.shape_inference.infer_shapes(proto).graph
    ranks = [len(v.type.tensor_type.shape.dim) for v in list(g.value_info) + list(g.output) + list(g.input)
             if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")]  # fmt: skip
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    ops = sorted({n.op_type for n in g.node})
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in g.value_info if v.type.HasField("tensor_type")}
    runtime_reshapes = [n.name for n in g.node if n.op_type == "Reshape" and n.input[1] not in consts]
    high_rank = sorted({n.op_type for n in g.node if any(rank.get(o, 0) >= 6 for o in n.output)})
    notes = []
    if high_rank:
        notes.append(f"6-D tensors from {'/'.join(high_rank)} (pixel_unshuffle's reshape-transpose-reshape, or a "
                     "6-D broadcast)")
    if runtime_reshapes:
        notes.append(f"{len(runtime_reshapes)} Reshape(s) with run-time shapes (dynamic-shape profiles needed)")
    data_dependent = sorted(set(ops) & {"Loop", "If", "NonZero", "Scan", "Unique"})
    if data_dependent:
        notes.append(f"control flow / data-dependent ops {data_dependent}")
    return {"ops": ops, "max_rank": max(ranks, default=0), "runtime_reshapes": len(runtime_reshapes),
            "six_d_ops": high_rank, "notes": notes}  # fmt: skip
