"""Build models from the registry and load checkpoints into descriptors."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from srbatch.errors import ConfigError, UnknownArchitectureError, WeightsError
from srbatch.models.arch_api import Detection, layout_diff
from srbatch.models.descriptor import ModelDescriptor
from srbatch.models.registry import architectures, get_architecture, variants
from srbatch.models.spandrel_adapter import spandrel_descriptor
from srbatch.weights.checkpoint import META_NAME, load_checkpoint

log = logging.getLogger("srbatch.models")


def build_model(name: str, /, **hparams: Any) -> ModelDescriptor:
    """A freshly initialised model (random weights; bicubic has none) from an architecture or variant name.

    ``build_model("edsr-baseline", scale=4)``, ``build_model("rrdbnet", num_block=6, scale=4)``. Keyword arguments
    override the variant's. The module is in eval mode.
    """
    var = variants()
    if name in var:
        arch_name, base = var[name]
        args = {**dict(base), **hparams}
    elif name in architectures():
        arch_name, args = name, dict(hparams)
    else:
        names = sorted(set(architectures()) | set(var))
        raise ConfigError(f"unknown model {name!r}; known architectures and variants: {', '.join(names)}")
    arch = get_architecture(arch_name)
    try:
        module = arch.build(**args)
    except TypeError as e:
        raise ConfigError(f"invalid arguments for architecture {arch_name!r}: {e}") from e
    module.eval()
    return ModelDescriptor(module=module, architecture=arch_name, info=arch.info(args), hparams=args, name=name)


def _substitute_scale(hparams: dict[str, Any], scale: int | None, source: str) -> dict[str, Any]:
    hp = dict(hparams)
    have = hp.get("scale")
    if have is None:
        if scale is None:
            raise ConfigError(
                f"{source}: this model is scale-agnostic (its weights do not fix the scale); pass the scale, "
                "e.g. --scale 4"
            )
        hp["scale"] = int(scale)
    elif scale is not None and int(scale) != int(have):
        options = hp.get("scales")
        if options and int(scale) in [int(s) for s in options]:
            hp["scale"] = int(scale)
        else:
            raise ConfigError(
                f"{source}: the checkpoint is a x{have} model but scale {scale} was asked for; "
                f"use --scale {have} (or --outscale {scale} to resize its output)"
            )
    return hp


def _load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], arch: str, source: str) -> None:
    diff = layout_diff(module, sd)
    if diff.wrong_shape:
        k, found, expected = diff.wrong_shape[0]
        raise WeightsError(
            f"{source}: tensor {k!r} has shape {found} but architecture {arch!r} with these "
            f"hyper-parameters expects {expected}; the file does not match its metadata or layout"
        )
    if diff:
        missing, unexpected = list(diff.missing), list(diff.unexpected)
        raise WeightsError(
            f"{source}: state dict does not match architecture {arch!r}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    # BN counters may be missing (checkpoints before PyTorch 0.4.1): BatchNorm fills them, strict loading passes.
    module.load_state_dict(dict(sd), strict=True)


def detect_architecture(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, Detection]]:
    """Every native architecture whose ``detect`` recognises ``state_dict`` (normally zero or one)."""
    found = []
    for name, arch in architectures().items():
        if not arch.needs_weights:
            continue
        det = arch.detect(state_dict)
        if det is not None:
            found.append((name, det))
    return found


def load_model(
    model: str,
    *,
    scale: int | None = None,
    sha256: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ModelDescriptor:
    """Load a model by name or from a checkpoint URI and describe it.

    ``model`` is a parameter-free model name (``bicubic``), ``default`` (the shipped x2/x4 models), the output folder
    of the training job, or a checkpoint at any fsspec URI or local path
    (``.safetensors``, ``.pth``, ``.pt``; ``s3://``, ``memory://``, ...), or a TensorFlow frozen graph (``.pb``, see
    :mod:`srbatch.models.tf_import`; its scale comes from the graph). Checkpoints are read safely (see
    :func:`srbatch.weights.load_checkpoint`), recognised by srbatch metadata, then by the native architectures'
    ``detect``, then by spandrel. ``scale`` is required for scale-agnostic weights (VDSR, SRCNN, FSRCNN) and must
    match the checkpoint otherwise. ``sha256``, when given, must match the file's bytes.
    """
    if model == "default":  # the shipped models trained by jobs/train.py (x2 and x4)
        from srbatch.local import default_model_path

        model = default_model_path(scale)
    archs = architectures()
    var = variants()
    if model in var or model in archs:
        arch_name = var[model][0] if model in var else model
        if not archs[arch_name].needs_weights:
            base = dict(var[model][1]) if model in var else {}
            if scale is None and base.get("scale") is None:
                raise ConfigError(f"model {model!r} needs a scale; pass e.g. --scale 4")
            return build_model(model, **({"scale": int(scale)} if scale is not None else {}))
        raise ConfigError(
            f"{model!r} is an architecture, not a set of weights; give a checkpoint path or URI "
            f"(e.g. --model path/to/{model}_x4.safetensors), or build an untrained one with build_model({model!r})"
        )
    if model.lower().endswith(".pb"):  # a TensorFlow frozen graph (ESPCN/FSRCNN as OpenCV's dnn_superres runs them)
        from srbatch.models.tf_import import load_tf_model

        return load_tf_model(model, scale=scale, sha256=sha256, storage_options=storage_options)
    if model.lower().endswith(".onnx"):  # written by `srbatch export`: runs through onnxruntime
        from srbatch.models.onnx_runner import load_onnx

        return load_onnx(model, scale=scale, sha256=sha256, storage_options=storage_options)
    model = _resolve_export_folder(model, storage_options)
    ckpt = load_checkpoint(model, sha256=sha256, storage_options=storage_options)
    display = model.rstrip("/").rsplit("/", 1)[-1]

    def build_loaded(arch_name: str, hparams: dict[str, Any], sd: Mapping[str, torch.Tensor], name: str):
        arch = get_architecture(arch_name)
        hp = _substitute_scale(hparams, scale, model)
        module = arch.build(**hp)
        _load_strict(module, sd, arch_name, model)
        module.eval()
        return ModelDescriptor(
            module=module, architecture=arch_name, info=arch.info(hp), hparams=hp, name=name, source=model,
            sha256=ckpt.sha256,
        )

    if ckpt.architecture == "tfgraph":  # an imported TensorFlow graph saved by save_model (e.g. fine-tuned)
        from srbatch.models.tf_import import tf_model_from_state

        return tf_model_from_state(ckpt.hparams or {}, ckpt.state_dict, scale=scale, source=model,
                                   name=ckpt.metadata.get(META_NAME) or display, sha256=ckpt.sha256)  # fmt: skip
    if ckpt.architecture:
        name = ckpt.metadata.get(META_NAME) or display
        return build_loaded(ckpt.architecture, ckpt.hparams or {}, ckpt.state_dict, name)
    found = detect_architecture(ckpt.state_dict)
    if len(found) > 1:
        log.warning("%s matches several architectures %s; using %s", model, [f[0] for f in found], found[0][0])
    if found:
        arch_name, det = found[0]
        return build_loaded(arch_name, det.hparams, det.state_dict, display)
    desc = spandrel_descriptor(ckpt.state_dict, name=display, source=model, sha256=ckpt.sha256)
    if desc is not None:
        if scale is not None and int(scale) != desc.scale:
            raise ConfigError(
                f"{model}: the checkpoint is a x{desc.scale} model ({desc.architecture}) but scale {scale} was asked "
                f"for; use --scale {desc.scale} (or --outscale {scale})"
            )
        return desc
    keys = list(ckpt.state_dict)[:6]
    raise UnknownArchitectureError(
        f"{model}: no known architecture matches this state dict (first keys: {keys}). Native architectures: "
        f"{', '.join(a for a in archs if archs[a].needs_weights)}; spandrel did not recognise it either. "
        "If it is one of these with renamed keys, rename them; otherwise open an issue with the key list."
    )


_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin", ".pkl")


def _resolve_export_folder(model: str, storage_options: Mapping[str, Any] | None) -> str:
    """A folder written by the training job (``model.safetensors`` + model card) stands for its model file."""
    if model.lower().rstrip("/").endswith(_CHECKPOINT_SUFFIXES):
        return model
    from srbatch.io.storage import filesystem, join_uri

    try:
        fs, path = filesystem(model, storage_options)
        if not fs.isdir(path):
            return model
        has_model = fs.exists(path.rstrip("/") + "/model.safetensors")
    except Exception:  # the checkpoint reader reports unreadable URIs with the right message
        return model
    if not has_model:
        raise WeightsError(
            f"{model} is a folder without model.safetensors; give a checkpoint file, or the --output folder of "
            "jobs/train.py"
        )
    return join_uri(model, "model.safetensors")


def save_model(desc: ModelDescriptor, uri: str, *, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``desc`` as a self-describing safetensors file (architecture + hyper-parameters in its metadata).

    Returns the file's sha256. Models loaded through spandrel are saved by their original checkpoint instead.
    """
    from srbatch.weights.checkpoint import save_checkpoint

    if desc.architecture.startswith(("spandrel:", "onnx:")):
        raise ConfigError(f"{desc.name}: spandrel and ONNX models cannot be re-saved by srbatch; keep the original file")
    return save_checkpoint(
        desc.module.state_dict(),
        uri,
        architecture=desc.architecture,
        hparams=desc.hparams,
        name=desc.name,
        storage_options=storage_options,
    )
