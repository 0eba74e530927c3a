"""Read TensorFlow frozen graphs (``.pb`` GraphDef) without TensorFlow.

The GraphDef is parsed with the protobuf schema the ``tensorboard`` wheel ships (``tensorboard.compat.proto``), the
same messages TensorFlow writes. :func:`read_tf_graph` returns a :class:`TFGraph`: the nodes in execution order with
their ``Const`` tensors decoded to numpy and every op checked against :data:`SUPPORTED_OPS`; anything else is refused
with a :class:`~srbatch.errors.ConfigError` that names each unsupported op and its node. Running the graph is
:mod:`srbatch.models.tf_import`'s job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from srbatch.errors import ChecksumMismatchError, ConfigError, WeightsError

__all__ = ["SUPPORTED_OPS", "TFGraph", "TFNode", "parse_tf_graph", "read_tf_graph"]

SUPPORTED_OPS: frozenset[str] = frozenset(
    {
        "Placeholder", "Const", "Identity", "NoOp",
        "Conv2D", "Conv2DBackpropInput", "DepthToSpace",
        "BiasAdd", "Add", "AddV2", "Sub", "Mul", "RealDiv", "Maximum", "Minimum",
        "Relu", "Relu6", "LeakyRelu", "Tanh", "Sigmoid", "Abs", "Neg",
        "Transpose",
    }
)  # fmt: skip
"""Ops a graph may contain. PReLU appears in frozen graphs as ops (``Relu``, ``Abs``, ``Sub``, ``Mul``, ``Add``);
``Conv2DBackpropInput`` is what ``tf.nn.conv2d_transpose`` freezes to."""

# DataType enum values of tensorflow/core/framework/types.proto that Const tensors may hold here.
_DTYPES: dict[int, tuple[np.dtype, str]] = {
    1: (np.dtype("<f4"), "float_val"),
    2: (np.dtype("<f8"), "double_val"),
    3: (np.dtype("<i4"), "int_val"),
    9: (np.dtype("<i8"), "int64_val"),
}


@dataclass(frozen=True)
class TFNode:
    """One GraphDef node: ``op``, its data inputs (control inputs ``^x`` dropped, ``x:0`` -> ``x``) and attributes
    decoded to Python values (``value`` of a ``Const`` is a numpy array)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TFGraph:
    """A validated graph: ``nodes`` in execution order (every input before its consumer), one ``Placeholder``
    (``input``) and one result node (``output``)."""

    nodes: tuple[TFNode, ...]
    input: str
    output: str
    source: str = ""
    sha256: str = ""

    def node(self, name: str) -> TFNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


def read_tf_graph(
    uri: str, *, sha256: str | None = None, storage_options: Mapping[str, Any] | None = None
) -> TFGraph:
    """Read and validate the frozen graph at ``uri`` (local path or any fsspec URL, e.g. ``s3://b/ESPCN_x4.pb``).

    Raises :class:`WeightsError` when the file cannot be read or parsed (errors name the file),
    :class:`ChecksumMismatchError` when ``sha256`` is given and differs, :class:`ConfigError` for unsupported ops.
    """
    from srbatch.weights.checkpoint import read_uri

    data = read_uri(uri, storage_options)
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest.lower() != sha256.lower().strip():
        raise ChecksumMismatchError(
            f"refused {uri}: sha256 is {digest}, expected {sha256.strip()}; the file is not the one you asked for"
        )
    return parse_tf_graph(data, source=uri, sha256=digest)


def parse_tf_graph(data: bytes, *, source: str = "<bytes>", sha256: str = "") -> TFGraph:
    """Parse GraphDef bytes into a validated :class:`TFGraph` (see :func:`read_tf_graph`)."""
    try:
        from google.protobuf.message import DecodeError
        from tensorboard.compat.proto import graph_pb2
    except ImportError as e:  # a runtime dependency; only a broken install lands here
        raise WeightsError(f"{source}: reading TensorFlow graphs needs the 'tensorboard' package ({e})") from e
    gd = graph_pb2.GraphDef()
    try:
        gd.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise WeightsError(
            f"{source}: not a readable TensorFlow GraphDef ({type(e).__name__}: {e}); the file may be truncated or "
            "not a frozen graph (.pb written by tf.io.write_graph / freeze_graph). Re-download or re-export it."
        ) from None
    if not gd.node:
        raise WeightsError(f"{source}: the GraphDef has no nodes; the file is empty, truncated or not a frozen graph")
    unknown = [(n.op, n.name) for n in gd.node if n.op not in SUPPORTED_OPS]
    if unknown:
        listed = "; ".join(f"{op} (node {name!r})" for op, name in unknown[:20])
        more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        raise ConfigError(
            f"{source}: unsupported TensorFlow op(s): {listed}{more}. srbatch runs graphs built from "
            f"{', '.join(sorted(SUPPORTED_OPS))} (ESPCN/FSRCNN-style super-resolution graphs); convert the model "
            "to a supported form or load it as a PyTorch checkpoint instead."
        )
    nodes = {n.name: _decode_node(n, source) for n in gd.node}
    if len(nodes) != len(gd.node):
        raise WeightsError(f"{source}: the GraphDef has duplicate node names; the file is not a valid frozen graph")
    return _validate(nodes, source, sha256)


def _decode_node(n: Any, source: str) -> TFNode:
    inputs = tuple(i.split(":")[0] for i in n.input if not i.startswith("^"))
    bad = [i for i in n.input if ":" in i and i.split(":")[1] not in ("", "0")]
    if bad:
        raise ConfigError(f"{source}: node {n.name!r} ({n.op}) reads a second output {bad[0]!r}; not supported")
    attrs: dict[str, Any] = {}
    for key, v in n.attr.items():
        kind = v.WhichOneof("value")
        if kind == "tensor":
            attrs[key] = _decode_tensor(v.tensor, f"{source}: node {n.name!r}")
        elif kind == "list":
            attrs[key] = [int(i) for i in v.list.i] if v.list.i else [bytes(s).decode() for s in v.list.s]
        elif kind == "s":
            attrs[key] = bytes(v.s).decode()
        elif kind in ("i", "f", "b", "type"):
            attrs[key] = getattr(v, kind)
    return TFNode(name=n.name, op=n.op, inputs=inputs, attrs=attrs)


def _decode_tensor(t: Any, where: str) -> np.ndarray:
    if t.dtype not in _DTYPES:
        raise ConfigError(f"{where}: constant of TensorFlow dtype {t.dtype} is not supported (float32/64, int32/64)")
    dt, field_name = _DTYPES[t.dtype]
    shape = tuple(int(d.size) for d in t.tensor_shape.dim)
    count = int(np.prod(shape)) if shape else 1
    if t.tensor_content:
        arr = np.frombuffer(t.tensor_content, dtype=dt)
        if arr.size != count:
            raise WeightsError(f"{where}: constant has {arr.size} values for shape {shape}; the file is corrupt")
        return arr.reshape(shape).astype(dt.newbyteorder("="))
    vals = np.asarray(list(getattr(t, field_name)), dtype=dt.newbyteorder("="))
    if vals.size == count:
        return vals.reshape(shape)
    if vals.size >= 1:  # TensorFlow stores a repeated last value once
        return np.concatenate([vals, np.repeat(vals[-1:], count - vals.size)]).reshape(shape)
    return np.zeros(shape, dtype=dt.newbyteorder("="))


def _validate(nodes: dict[str, TFNode], source: str, sha256: str) -> TFGraph:
    for n in nodes.values():
        for i in n.inputs:
            if i not in nodes:
                raise WeightsError(
                    f"{source}: node {n.name!r} ({n.op}) reads {i!r}, which is not in the graph; the file is "
                    "truncated or not a complete frozen graph"
                )
    placeholders = [n.name for n in nodes.values() if n.op == "Placeholder"]
    if len(placeholders) != 1:
        raise ConfigError(f"{source}: expected exactly one Placeholder (the image input); found {placeholders}")
    used = {i for n in nodes.values() for i in n.inputs}
    sinks = [n.name for n in nodes.values() if n.name not in used and n.op not in ("Const", "NoOp")]
    if len(sinks) != 1:
        raise ConfigError(f"{source}: expected exactly one output node (consumed by no other node); found {sinks}")
    order: list[TFNode] = []
    state: dict[str, int] = {}

    def visit(name: str) -> None:  # iterative-safe depth is small for SR graphs; cycles are refused
        s = state.get(name, 0)
        if s == 2:
            return
        if s == 1:
            raise WeightsError(f"{source}: the graph has a cycle through node {name!r}; not a frozen inference graph")
        state[name] = 1
        for i in nodes[name].inputs:
            visit(i)
        state[name] = 2
        order.append(nodes[name])

    visit(sinks[0])
    if placeholders[0] not in state:
        raise ConfigError(f"{source}: the output node {sinks[0]!r} does not depend on the input {placeholders[0]!r}")
    return TFGraph(nodes=tuple(order), input=placeholders[0], output=sinks[0], source=source, sha256=sha256)
