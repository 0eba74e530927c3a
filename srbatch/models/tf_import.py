"""Run TensorFlow frozen graphs (``.pb``) of ESPCN/FSRCNN-style models as PyTorch modules.

Why a graph runner and not the native :mod:`~srbatch.models.archs.espcn` / :mod:`~srbatch.models.archs.fsrcnn`:
the graphs OpenCV's ``dnn_superres`` runs are different networks from those papers' reference layouts. The ESPCN
graphs (fannymonori) use ReLU in the body and ``tanh`` after the sub-pixel layer (ours: ``tanh`` in the body, no
output activation); the FSRCNN graphs (Saafke) put a PReLU after every mapping convolution and upscale with a 1x1
convolution + ``DepthToSpace`` + bias instead of a 9x9 deconvolution. Mapping them onto the native modules would
change their output, so :class:`TFGraphModule` executes the graph's own op sequence, in TensorFlow's NHWC layout
(so every broadcast is TensorFlow's), with the ``Const`` tensors as parameters (they can be fine-tuned).

The scale, input channels and output layout are read from the graph by running it once on a tiny 7x5 probe
(``DepthToSpace`` block sizes and deconvolution strides decide the scale; a ``Transpose`` to NCHW at the end, as in
these files, is recognised from the probe's output shape).

Colour: 1-channel graphs take and return the Y of OpenCV's full-range YCrCb in [0, 1] (colour space ``Y-OpenCV``,
see :mod:`srbatch.inference.colorspace`); 3-channel graphs are assumed to be RGB in [0, 1].
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from srbatch.errors import ConfigError, WeightsError
from srbatch.models.descriptor import ArchInfo, ModelDescriptor
from srbatch.weights.tfgraph import TFGraph, TFNode, read_tf_graph

__all__ = [
    "TF_ARCHITECTURE", "TFGraphModule", "graph_from_json", "graph_to_json", "load_tf_model", "tf_model_from_state"
]

TF_ARCHITECTURE = "tfgraph"
"""``ModelDescriptor.architecture`` of models imported from a TensorFlow graph."""

_UNARY = {
    "Relu": torch.relu,
    "Relu6": lambda t: t.clamp(0.0, 6.0),
    "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid,
    "Abs": torch.abs,
    "Neg": torch.neg,
}
_BINARY = {
    "BiasAdd": torch.add,
    "Add": torch.add,
    "AddV2": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "RealDiv": torch.div,
    "Maximum": torch.maximum,
    "Minimum": torch.minimum,
}


def _key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "__", name)


class TFGraphModule(nn.Module):
    """A validated :class:`~srbatch.weights.tfgraph.TFGraph` as a module: ``(N, C, H, W)`` -> ``(N, C', sH, sW)``.

    Float constants are parameters (``consts.<node name with '/' -> '__'>``, TensorFlow's layouts: HWIO filters);
    integer constants (transpose permutations, shapes) are fixed. ``output_nchw`` tells whether the graph's result
    is already NCHW (the probe in :func:`load_tf_model` decides); otherwise it is transposed from NHWC.
    """

    def __init__(self, graph: TFGraph, *, output_nchw: bool = True) -> None:
        super().__init__()
        self.graph_source = graph.source
        self.output_nchw = output_nchw
        self.consts = nn.ParameterDict()
        self._ints: dict[str, tuple[int, ...]] = {}
        self._program: list[tuple[str, str, tuple[str, ...], dict[str, Any]]] = []
        self._input, self._output = graph.input, graph.output
        for n in graph.nodes:
            if n.op == "Const":
                v = n.attrs.get("value")
                if not isinstance(v, np.ndarray):
                    raise WeightsError(f"{graph.source}: Const node {n.name!r} has no value")
                if v.dtype.kind == "f":
                    self.consts[_key(n.name)] = nn.Parameter(torch.from_numpy(v.astype(np.float32)))
                else:
                    self._ints[n.name] = tuple(int(i) for i in v.reshape(-1))
                continue
            if n.op in ("Placeholder", "NoOp"):
                continue
            self._program.append((n.name, n.op, n.inputs, self._check_attrs(n.name, n.op, n.attrs, graph.source)))
        last: dict[str, int] = {}
        for i, (_, _, inputs, _) in enumerate(self._program):
            for name in inputs:
                last[name] = i
        self._free_after = [
            [name for name in set(inputs) if last.get(name) == i and name != self._output]
            for i, (_, _, inputs, _) in enumerate(self._program)
        ]

    @staticmethod
    def _check_attrs(name: str, op: str, attrs: dict[str, Any], source: str) -> dict[str, Any]:
        where = f"{source}: node {name!r} ({op})"
        fmt = attrs.get("data_format", "NHWC")
        if fmt != "NHWC":
            raise ConfigError(f"{where}: data_format {fmt!r} is not supported; srbatch runs NHWC graphs")
        out: dict[str, Any] = {}
        if op in ("Conv2D", "Conv2DBackpropInput"):
            strides, dil = attrs.get("strides", [1, 1, 1, 1]), attrs.get("dilations", [1, 1, 1, 1])
            if strides[0] != 1 or strides[3] != 1 or dil[0] != 1 or dil[3] != 1:
                raise ConfigError(f"{where}: strides {strides} / dilations {dil} over batch or channels")
            pad = attrs.get("padding", "SAME")
            if pad not in ("SAME", "VALID"):
                raise ConfigError(f"{where}: padding {pad!r} is not supported (SAME or VALID)")
            out = {"stride": (strides[1], strides[2]), "dilation": (dil[1], dil[2]), "padding": pad}
            if op == "Conv2DBackpropInput" and out["dilation"] != (1, 1):
                raise ConfigError(f"{where}: dilated transposed convolutions are not supported")
        elif op == "DepthToSpace":
            out = {"block": int(attrs.get("block_size", 0))}
            if out["block"] < 2:
                raise ConfigError(f"{where}: block_size {out['block']} (expected >= 2)")
        elif op == "LeakyRelu":
            out = {"alpha": float(attrs.get("alpha", 0.2))}
        return out

    def _value(self, name: str, vals: dict[str, torch.Tensor]) -> torch.Tensor:
        if name in vals:
            return vals[name]
        k = _key(name)
        if k in self.consts:
            return self.consts[k]
        raise ConfigError(f"{self.graph_source}: node {name!r} is used as a tensor but holds integers")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> the graph's result as ``(N, C', H', W')``."""
        vals: dict[str, torch.Tensor] = {self._input: x.permute(0, 2, 3, 1)}
        for i, (name, op, inputs, attrs) in enumerate(self._program):
            if op in _UNARY:
                y = _UNARY[op](self._value(inputs[0], vals))
            elif op in _BINARY:
                y = _BINARY[op](self._value(inputs[0], vals), self._value(inputs[1], vals))
            elif op == "Identity":
                y = self._value(inputs[0], vals)
            elif op == "LeakyRelu":
                y = F.leaky_relu(self._value(inputs[0], vals), attrs["alpha"])
            elif op == "Conv2D":
                y = _conv2d_nhwc(self._value(inputs[0], vals), self._value(inputs[1], vals), **attrs)
            elif op == "Conv2DBackpropInput":
                y = _deconv2d_nhwc(self._value(inputs[2], vals), self._value(inputs[1], vals), **attrs)
            elif op == "DepthToSpace":
                y = _depth_to_space_nhwc(self._value(inputs[0], vals), attrs["block"])
            elif op == "Transpose":
                perm = self._ints.get(inputs[1])
                if perm is None:
                    raise ConfigError(f"{self.graph_source}: Transpose {name!r} needs a constant permutation")
                y = self._value(inputs[0], vals).permute(*perm)
            else:  # parse_tf_graph refused it already
                raise ConfigError(f"{self.graph_source}: op {op} (node {name!r}) is not supported")
            vals[name] = y
            for dead in self._free_after[i]:
                vals.pop(dead, None)
        out = vals[self._output]
        return out if self.output_nchw else out.permute(0, 3, 1, 2)


def _same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _conv2d_nhwc(
    x: torch.Tensor, w: torch.Tensor, *, stride: tuple[int, int], dilation: tuple[int, int], padding: str
) -> torch.Tensor:
    """TensorFlow ``Conv2D`` (NHWC input, HWIO filter, SAME = TensorFlow's asymmetric padding) via ``F.conv2d``."""
    xc = x.permute(0, 3, 1, 2)
    wt = w.permute(3, 2, 0, 1)
    kh, kw = int(w.shape[0]), int(w.shape[1])
    if padding == "SAME":
        (t, b), (le, r) = (_same_pads(int(xc.shape[-2]), kh, stride[0], dilation[0]),
                           _same_pads(int(xc.shape[-1]), kw, stride[1], dilation[1]))  # fmt: skip
        if t == b and le == r:
            y = F.conv2d(xc, wt, stride=stride, dilation=dilation, padding=(t, le))
        else:
            y = F.conv2d(F.pad(xc, (le, r, t, b)), wt, stride=stride, dilation=dilation)
    else:
        y = F.conv2d(xc, wt, stride=stride, dilation=dilation)
    return y.permute(0, 2, 3, 1)


def _deconv2d_nhwc(
    x: torch.Tensor, w: torch.Tensor, *, stride: tuple[int, int], dilation: tuple[int, int], padding: str
) -> torch.Tensor:
    """TensorFlow ``Conv2DBackpropInput`` (``conv2d_transpose``; filter ``[h, w, out, in]``) with the output size
    TensorFlow infers: ``in * stride`` for SAME (the full transposed output cropped by SAME's leading pad),
    ``in * stride + max(k - stride, 0)`` for VALID. The graph's constant output-shape input is not used, so any
    image size runs."""
    del dilation
    xc = x.permute(0, 3, 1, 2)
    y = F.conv_transpose2d(xc, w.permute(3, 2, 0, 1), stride=stride)
    if padding == "SAME":
        h, wd = int(xc.shape[-2]) * stride[0], int(xc.shape[-1]) * stride[1]
        t = max(int(w.shape[0]) - stride[0], 0) // 2
        le = max(int(w.shape[1]) - stride[1], 0) // 2
        y = y[..., t : t + h, le : le + wd]
    return y.permute(0, 2, 3, 1)


def _depth_to_space_nhwc(x: torch.Tensor, block: int) -> torch.Tensor:
    """TensorFlow ``DepthToSpace`` (NHWC, DCR order: channel ``(i * block + j) * C + c`` -> pixel offset (i, j))."""
    n, h, w, c = (int(v) for v in x.shape)
    if c % (block * block):
        raise ConfigError(f"DepthToSpace: {c} channels are not divisible by block_size^2 = {block * block}")
    co = c // (block * block)
    return x.reshape(n, h, w, block, block, co).permute(0, 1, 3, 2, 4, 5).reshape(n, h * block, w * block, co)


def _in_channels(graph: TFGraph) -> int:
    aliases = {graph.input}
    for n in graph.nodes:
        if n.op == "Identity" and n.inputs and n.inputs[0] in aliases:
            aliases.add(n.name)
        if n.op == "Conv2D" and n.inputs[0] in aliases:
            w = graph.node(n.inputs[1]).attrs.get("value")
            if isinstance(w, np.ndarray) and w.ndim == 4:
                return int(w.shape[2])
    raise ConfigError(
        f"{graph.source}: cannot tell the input channels (no Conv2D with a constant filter reads the input "
        f"{graph.input!r}); srbatch imports convolutional SR graphs only"
    )


def _halo(graph: TFGraph) -> int:
    """Input pixels of context: the sum of the convolutions' half-widths (conservative: counted in input pixels)."""
    halo = 0
    for n in graph.nodes:
        if n.op in ("Conv2D", "Conv2DBackpropInput"):
            w = graph.node(n.inputs[1]).attrs.get("value")
            d = n.attrs.get("dilations", [1, 1, 1, 1])
            if isinstance(w, np.ndarray) and w.ndim == 4:
                halo += math.ceil(max((int(w.shape[0]) - 1) * d[1], (int(w.shape[1]) - 1) * d[2]) / 2)
    return halo


def _graph_scale(graph: TFGraph) -> int:
    """Product of ``DepthToSpace`` block sizes and transposed-convolution strides (divided by strided convs)."""
    s = 1.0
    for n in graph.nodes:
        if n.op == "DepthToSpace":
            s *= int(n.attrs.get("block_size", 1))
        elif n.op == "Conv2DBackpropInput":
            s *= int(n.attrs.get("strides", [1, 1, 1, 1])[1])
        elif n.op == "Conv2D":
            s /= int(n.attrs.get("strides", [1, 1, 1, 1])[1])
    return int(round(s))


def graph_to_json(graph: TFGraph) -> dict[str, Any]:
    """The graph without its float constants (those are the module's parameters), as JSON-able data; stored in the
    ``hparams`` of an imported model so :func:`~srbatch.save_model` writes a checkpoint that rebuilds it."""
    nodes = []
    for n in graph.nodes:
        attrs = {k: v for k, v in n.attrs.items() if not isinstance(v, np.ndarray)}
        v = n.attrs.get("value")
        if isinstance(v, np.ndarray) and v.dtype.kind != "f":
            attrs["value"] = {"ints": [int(i) for i in v.reshape(-1)], "shape": list(v.shape)}
        nodes.append([n.name, n.op, list(n.inputs), attrs])
    return {"input": graph.input, "output": graph.output, "nodes": nodes}


def graph_from_json(data: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *, source: str) -> TFGraph:
    """Inverse of :func:`graph_to_json`: float constants come from ``state_dict`` (``consts.<key>``)."""
    nodes = []
    try:
        for name, op, inputs, attrs in data["nodes"]:
            attrs = dict(attrs)
            if op == "Const":
                v = attrs.get("value")
                if isinstance(v, dict):
                    attrs["value"] = np.asarray(v["ints"], dtype=np.int64).reshape(v["shape"])
                else:
                    t = state_dict.get(f"consts.{_key(name)}")
                    if t is None:
                        raise WeightsError(f"{source}: tensor 'consts.{_key(name)}' (constant {name!r}) is missing")
                    attrs["value"] = t.detach().cpu().to(torch.float32).numpy()
            nodes.append(TFNode(name=name, op=op, inputs=tuple(inputs), attrs=attrs))
        return TFGraph(nodes=tuple(nodes), input=data["input"], output=data["output"], source=source)
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{source}: the stored TensorFlow graph description is malformed ({e})") from e


def tf_model_from_state(
    hparams: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *, scale: int | None, source: str,
    name: str, sha256: str | None = None,
) -> ModelDescriptor:
    """An imported graph re-saved by :func:`~srbatch.save_model` (architecture ``tfgraph``), e.g. after fine-tuning."""
    graph = graph_from_json(hparams.get("graph") or {}, state_dict, source=source)
    desc = _describe(graph, scale=scale, source=source, name=name, sha256=sha256)
    sd = dict(state_dict)
    missing, unexpected = desc.module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"{source}: tensors do not match the stored graph: missing {missing}, unexpected {unexpected}"
        )
    return desc


def load_tf_model(
    uri: str,
    *,
    scale: int | None = None,
    sha256: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ModelDescriptor:
    """A TensorFlow frozen graph at ``uri`` (local path or fsspec URL) as a :class:`ModelDescriptor`.

    The scale comes from the graph; a different ``scale`` is a :class:`ConfigError` (the graph cannot run at another
    scale; use ``--scale <graph scale>`` or resize its output with ``--outscale``). ``save_model`` of the result
    writes an ordinary srbatch safetensors checkpoint (architecture ``tfgraph``, the op sequence in its metadata).
    """
    graph = read_tf_graph(uri, sha256=sha256, storage_options=storage_options)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return _describe(graph, scale=scale, source=uri, name=name, sha256=graph.sha256)


def _describe(graph: TFGraph, *, scale: int | None, source: str, name: str, sha256: str | None) -> ModelDescriptor:
    uri = source
    cin = _in_channels(graph)
    module = TFGraphModule(graph, output_nchw=True)
    module.eval()
    ph, pw = 7, 5
    with torch.no_grad():
        try:
            out = module(torch.rand(1, cin, ph, pw, generator=torch.Generator().manual_seed(0)))
        except (RuntimeError, ValueError, IndexError) as e:
            raise WeightsError(
                f"{uri}: the graph does not run on a {cin}-channel {ph}x{pw} probe image ({type(e).__name__}: {e}); "
                "it is not an image-to-image super-resolution graph srbatch can import"
            ) from e
    shp = tuple(int(v) for v in out.shape)
    if len(shp) == 4 and shp[2] % ph == 0 and shp[3] % pw == 0 and shp[2] // ph == shp[3] // pw:
        s, cout = shp[2] // ph, shp[1]
    elif len(shp) == 4 and shp[1] % ph == 0 and shp[2] % pw == 0 and shp[1] // ph == shp[2] // pw:
        module.output_nchw = False
        s, cout = shp[1] // ph, shp[3]
    else:
        raise WeightsError(
            f"{uri}: a {ph}x{pw} input gives an output of shape {shp}; expected an integer upscale of the input "
            "(NCHW or NHWC)"
        )
    if s != _graph_scale(graph):
        raise WeightsError(f"{uri}: the graph's ops imply x{_graph_scale(graph)} but it produced x{s}")
    if s < 2:
        raise ConfigError(f"{uri}: the graph does not upscale (x{s}); srbatch imports super-resolution graphs")
    if scale is not None and int(scale) != s:
        raise ConfigError(
            f"{uri}: the graph is a x{s} model but scale {scale} was asked for; use --scale {s} "
            f"(or --outscale {scale} to resize its output)"
        )
    if cin != cout or cin not in (1, 3):
        raise ConfigError(f"{uri}: the graph takes {cin} and returns {cout} channels; expected 1 -> 1 or 3 -> 3")
    info = ArchInfo(
        scale=s,
        in_channels=cin,
        out_channels=cout,
        color_space="Y-OpenCV" if cin == 1 else "RGB",
        input_upsampled=False,
        receptive_halo=_halo(graph),
        tile_hint=None,
        local=True,
    )
    hparams = {"scale": s, "channels": cin, "format": "tensorflow-graphdef", "graph": graph_to_json(graph)}
    return ModelDescriptor(
        module=module, architecture=TF_ARCHITECTURE, info=info, hparams=hparams, name=name, source=uri,
        sha256=sha256,
    )
