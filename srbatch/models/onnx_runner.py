"""ONNX files written by ``srbatch export`` as models: an ``nn.Module`` running an onnxruntime session, described by
the ``srbatch.*`` metadata the export stored, so ``--model model.onnx`` works in the upscale job and ``evaluate``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from srbatch.errors import WeightsError
from srbatch.models.descriptor import ArchInfo, ModelDescriptor

__all__ = ["OnnxModule", "load_onnx"]

_PREFIX = "srbatch."


class OnnxModule(nn.Module):
    """Runs an ONNX graph with onnxruntime on ``(N, C, H, W)`` tensors: any dtype and device in, float32 converted back
    to the input's dtype and device out. CPU execution (CUDA when onnxruntime has it and the input is on CUDA).
    Picklable (the session is rebuilt from the bytes)."""

    def __init__(self, model_bytes: bytes) -> None:
        super().__init__()
        self._bytes = model_bytes
        self._sessions: dict[str, Any] = {}

    def _session(self, device: torch.device) -> Any:
        import onnxruntime as ort

        want = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
        if want not in ort.get_available_providers():
            want = "CPUExecutionProvider"
        if want not in self._sessions:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self._sessions[want] = ort.InferenceSession(self._bytes, opts, providers=[want])
        return self._sessions[want]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sess = self._session(x.device)
        feed = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = sess.run(None, {sess.get_inputs()[0].name: feed})[0]
        return torch.from_numpy(out).to(x.device, x.dtype)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sessions"] = {}
        return state


def _meta(meta: Mapping[str, str], key: str, source: str) -> str:
    try:
        return meta[_PREFIX + key]
    except KeyError:
        raise WeightsError(
            f"{source}: ONNX file without srbatch metadata ({_PREFIX}{key} missing); only files written by "
            "`srbatch export` describe their scale and colour space. Export the model with `srbatch export`"
        ) from None


def load_onnx(
    uri: str, *, scale: int | None = None, sha256: str | None = None, storage_options: Mapping[str, Any] | None = None
) -> ModelDescriptor:
    """A :class:`ModelDescriptor` over the ONNX file at ``uri`` (local or fsspec), from its ``srbatch.*`` metadata."""
    import onnx

    from srbatch.errors import ChecksumMismatchError, ConfigError
    from srbatch.io.storage import read_bytes

    data = read_bytes(uri, storage_options)
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and sha256.lower() != digest:
        raise ChecksumMismatchError(f"{uri}: sha256 {digest} differs from the expected {sha256}")
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:
        raise WeightsError(f"{uri}: not a readable ONNX file ({type(e).__name__}: {e})") from e
    meta = {p.key: p.value for p in proto.metadata_props}
    info = ArchInfo(
        scale=int(_meta(meta, "scale", uri)),
        in_channels=int(_meta(meta, "in_channels", uri)),
        out_channels=int(_meta(meta, "out_channels", uri)),
        color_space=_meta(meta, "color_space", uri),  # type: ignore[arg-type]
        input_upsampled=bool(json.loads(_meta(meta, "input_upsampled", uri))),
        size_multiple=int(_meta(meta, "size_multiple", uri)),
        receptive_halo=int(_meta(meta, "halo", uri)),
        tile_hint=json.loads(meta.get(_PREFIX + "tile_hint", "null")),
        local=json.loads(meta.get(_PREFIX + "local", "null")),
        dtypes=(torch.float32,),
        temporal_radius=int(meta.get(_PREFIX + "temporal_radius", "0")),
    )
    if scale is not None and int(scale) != info.scale:
        raise ConfigError(
            f"{uri}: the ONNX file is a x{info.scale} model but scale {scale} was asked for; use --scale {info.scale} "
            f"(or --outscale {scale})"
        )
    module = OnnxModule(data)
    module._session(torch.device("cpu"))  # fail here, not in the middle of a job, if onnxruntime cannot run it
    return ModelDescriptor(
        module=module.eval(),
        architecture=f"onnx:{_meta(meta, 'architecture', uri)}",
        info=info,
        hparams=json.loads(meta.get(_PREFIX + "hparams", "{}")),
        name=uri.rstrip("/").rsplit("/", 1)[-1],
        source=uri,
        sha256=digest,
    )
