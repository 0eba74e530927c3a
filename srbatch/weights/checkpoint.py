"""Safe checkpoint reading and writing.

- safetensors first; ``.pth``/``.pt`` only through ``torch.load(weights_only=True)``; there is no unsafe fallback.
- :func:`canonicalize` unwraps the containers and prefixes the field uses (``params_ema``, ``state_dict``, ``module.``).
- Checkpoints srbatch writes carry the architecture name and builder arguments in the safetensors metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import re
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch

from srbatch.errors import ChecksumMismatchError, UnsafeCheckpointError, WeightsError

log = logging.getLogger("srbatch.weights")

META_FORMAT = "srbatch.format"
META_ARCH = "srbatch.architecture"
META_HPARAMS = "srbatch.hparams"
META_NAME = "srbatch.name"
FORMAT_VERSION = "1"

# Containers seen in the field, most preferred first (EMA weights beat raw ones: BasicSR/Real-ESRGAN convention).
_WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model_state_dict", "netG", "generator", "model", "net", "g")
# Prefixes added by DataParallel/DDP, torch.compile and GAN wrappers.
_PREFIXES = ("module.", "_orig_mod.", "netG.", "generator.")


@dataclass
class Checkpoint:
    """The tensors of a checkpoint, its srbatch metadata (may be empty) and where it came from."""

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    source: str = ""

    @property
    def architecture(self) -> str | None:
        """Architecture name stored by srbatch, or None for foreign checkpoints."""
        return self.metadata.get(META_ARCH)

    @property
    def hparams(self) -> dict[str, Any] | None:
        """Builder arguments stored by srbatch, or None for foreign checkpoints."""
        raw = self.metadata.get(META_HPARAMS)
        return json.loads(raw) if raw else None


def read_uri(uri: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """All bytes of ``uri`` (any fsspec URL or local path). Errors name the URI."""
    try:
        with fsspec.open(uri, "rb", **dict(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError:
        raise WeightsError(f"checkpoint not found: {uri}; check the path or URI (and credentials for s3://)") from None
    except Exception as e:  # fsspec backends raise many types; name the URI and re-raise typed
        raise WeightsError(f"could not read checkpoint {uri}: {type(e).__name__}: {e}") from e


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


_GLOBAL_RE = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def _refuse_pickle(uri: str, err: Exception) -> UnsafeCheckpointError:
    msg = str(err)
    m = _GLOBAL_RE.search(msg)
    what = f"the Python object {m.group(1)!r}" if m else "Python objects or pickle instructions other than tensors"
    return UnsafeCheckpointError(
        f"refused {uri}: it is a pickle that references {what}, so loading it would run arbitrary code "
        "(for example a whole pickled model instead of a state dict). Nothing from it was executed. Fix: in a trusted "
        "environment with the original code, export the weights only, e.g. "
        "`torch.save(torch.load(path, weights_only=False).state_dict(), 'weights.pth')` "
        "or save them with safetensors (`safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')`)."
    )


def _not_a_checkpoint(uri: str, data: bytes) -> WeightsError:
    """The error for bytes that are neither safetensors nor ``torch.save`` output (a zip, or a pickle from protocol 2
    on): a TensorFlow graph, an ONNX file, an image, text ..."""
    name = uri.rsplit("/", 1)[-1].lower()
    kind = ""
    if name.endswith(".pb"):
        kind = (" It looks like a TensorFlow graph (.pb): load it with srbatch.load_model / --model, which imports "
                "frozen GraphDefs (srbatch.models.tf_import), not with load_checkpoint.")  # fmt: skip
    elif name.endswith(".onnx"):
        kind = " It looks like an ONNX model: srbatch loads PyTorch and safetensors weights, not ONNX graphs."
    return WeightsError(
        f"could not read {uri}: it is neither a safetensors file nor a PyTorch checkpoint (torch.save writes a zip or a "
        f"pickle; this file starts with {data[:8]!r}).{kind}"
    )


def _torch_load_safely(data: bytes, uri: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refuse_pickle(uri, e) from None
    except (RuntimeError, EOFError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise WeightsError(
            f"could not read {uri} as a PyTorch or safetensors checkpoint ({type(e).__name__}: {e}); "
            "the file may be truncated or in another format"
        ) from None


def canonicalize(obj: Any, *, source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` state dict from the containers found in the field.

    Unwraps ``params_ema`` (preferred), ``params``, ``state_dict``, ``model``, ``netG`` ... and strips ``module.``,
    ``_orig_mod.``, ``netG.``, ``generator.`` prefixes when every key has them. Non-tensor entries are dropped.
    """
    seen = 0
    while isinstance(obj, Mapping) and seen < 4:
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping) and obj[k]), None)
        if tensors and (inner is None or len(tensors) >= len(obj) // 2):
            obj = tensors
            break
        if inner is None:
            break
        obj = inner
        seen += 1
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"{source}: expected a state dict (a mapping of parameter names to tensors); found {type(obj).__name__}"
        )
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightsError(
            f"{source}: no tensors found; top-level keys are {list(obj)[:10]}. Expected a state dict with keys like "
            "'body.0.rdb1.conv1.weight', or a dict holding one under 'params_ema', 'params' or 'state_dict'"
        )
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                changed = True
    return sd


def load_checkpoint(
    uri: str, *, sha256: str | None = None, storage_options: Mapping[str, Any] | None = None
) -> Checkpoint:
    """Read a checkpoint safely from any fsspec URI and return its canonical state dict.

    Raises :class:`ChecksumMismatchError` when ``sha256`` is given and differs, :class:`UnsafeCheckpointError` for
    pickles that reference code, :class:`WeightsError` for anything else unreadable.
    """
    data = read_uri(uri, storage_options)
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest.lower() != sha256.lower().strip():
        raise ChecksumMismatchError(
            f"refused {uri}: sha256 is {digest}, expected {sha256.strip()}; the file is not the one you asked for "
            "(corrupt download or a different release). Re-download it or correct the expected hash."
        )
    metadata: dict[str, str] = {}
    if _is_safetensors(data):
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        try:
            raw: Any = st_load(data)
            metadata = _safetensors_metadata(data)
        except (SafetensorError, ValueError, json.JSONDecodeError) as e:
            raise WeightsError(f"{uri}: invalid safetensors file ({e}); the file may be truncated") from None
    elif not data.startswith(b"PK\x03\x04") and not data.startswith(b"\x80"):
        raise _not_a_checkpoint(uri, data)
    else:
        raw = _torch_load_safely(data, uri)
    sd = canonicalize(raw, source=uri) if not metadata.get(META_ARCH) else dict(raw)
    return Checkpoint(state_dict=sd, metadata=metadata, sha256=digest, source=uri)


def save_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    uri: str,
    *,
    architecture: str,
    hparams: Mapping[str, Any],
    name: str = "",
    extra_metadata: Mapping[str, str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write a self-describing safetensors checkpoint to ``uri``; returns its sha256.

    The metadata holds the architecture name and the JSON of its builder arguments, so :func:`srbatch.load_model`
    rebuilds the module without guessing.
    """
    from safetensors.torch import save as st_save

    meta = {META_FORMAT: FORMAT_VERSION, META_ARCH: architecture, META_HPARAMS: json.dumps(dict(hparams))}
    if name:
        meta[META_NAME] = name
    meta.update(dict(extra_metadata or {}))
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    data = st_save(tensors, metadata=meta)
    with fsspec.open(uri, "wb", **dict(storage_options or {})) as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()
