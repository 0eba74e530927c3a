"""Planning a run on the driver: input listing, output keys, parameter fingerprint, and what a rerun can skip."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from srbatch.errors import ConfigError, StorageError
from srbatch.io.storage import filesystem, join_uri, list_images
from srbatch.upscale.config import UpscaleConfig
from srbatch.upscale.manifest import MANIFEST_DIR

__all__ = ["Task", "Plan", "input_root", "relative_key", "output_key", "fingerprint", "make_plan"]

_EXT = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "TIFF": ".tif"}
TMP_PREFIX = ".srbatch-tmp-"


@dataclass(frozen=True)
class Task:
    """One input to process: where it is read from and where its output goes (None when its key is unsafe)."""

    input_uri: str
    output_uri: str | None
    error: str | None = None


@dataclass
class Plan:
    """What a run will do: ``todo`` goes to the actors, ``skipped`` are previous rows carried over, ``rejected``
    failed before any work (unsafe keys)."""

    todo: list[Task] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[Task] = field(default_factory=list)
    total: int = 0


def input_root(spec: str) -> str:
    """The part of an input spec that output keys are relative to: the folder of a file or the fixed prefix of a
    glob; a folder/prefix is its own root (decided by the caller, which knows whether ``spec`` is a file)."""
    if any(c in spec for c in "*?["):
        head = spec[: min(spec.index(c) for c in "*?[" if c in spec)]
        return head.rsplit("/", 1)[0] if "/" in head else ""
    return spec.rstrip("/")


def relative_key(uri: str, root: str) -> str:
    """``uri`` relative to ``root`` (its basename when it is not under ``root``)."""
    r = root.rstrip("/")
    if r and uri.startswith(r + "/"):
        return uri[len(r) + 1 :]
    return posixpath.basename(uri)


def output_key(rel: str, fmt: str) -> str:
    """The output key of relative input key ``rel``: NFC-normalised, extension of ``fmt``. Raises
    :class:`ConfigError` for keys that could escape the output prefix or clash with its control files."""
    if "\\" in rel or "\x00" in rel or any(ord(c) < 32 for c in rel):
        raise ConfigError(f"unsafe input key {rel!r}: backslashes and control characters are refused; rename the file")
    key = unicodedata.normalize("NFC", rel)
    parts = key.split("/")
    if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"unsafe input key {rel!r}: absolute, empty, '.' or '..' path parts are refused; rename it")
    if parts[0] == MANIFEST_DIR or any(p.startswith(TMP_PREFIX) for p in parts):
        raise ConfigError(f"input key {rel!r} clashes with srbatch's own files ({MANIFEST_DIR}/, {TMP_PREFIX}*)")
    return posixpath.splitext(key)[0] + _EXT[fmt]


def fingerprint(cfg: UpscaleConfig, model_id: Mapping[str, Any]) -> str:
    """16 hex digits identifying everything that decides an output's bytes (and its metrics): the model's identity
    and weights, scale, outscale, dtype, tiling, format, quality and the reference mode. Devices are not part of it."""
    payload = {
        "model": dict(model_id),
        "scale": cfg.scale,
        "outscale": cfg.outscale,
        "dtype": cfg.dtype,
        "tile": cfg.tile,
        "tile_overlap": cfg.tile_overlap,
        "format": cfg.format,
        "quality": cfg.quality,
        "reference": cfg.reference,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def existing_outputs(output: str, storage_options: Mapping[str, Any] | None) -> set[str]:
    """Every file under the output prefix, as filesystem paths (empty when the prefix does not exist yet)."""
    fs, path = filesystem(output, storage_options)
    try:
        fs.invalidate_cache()  # actors wrote here; the driver's cached listings are stale
        if not fs.exists(path):
            return set()
        return {p.rstrip("/") for p in fs.find(path)}
    except Exception as e:
        raise StorageError(f"could not list the output {output!r}: {type(e).__name__}: {e}") from e


def make_plan(
    cfg: UpscaleConfig,
    fp: str,
    latest: Mapping[str, Mapping[str, Any]],
    *,
    run_id: str,
) -> Plan:
    """List the inputs and decide, per input, process / skip (done before with the same fingerprint and its output
    still there) / reject (unsafe key)."""
    so = cfg.fs_options()
    uris = list_images(cfg.input, so)
    root = input_root(cfg.input)
    if len(uris) == 1 and uris[0].rstrip("/") == cfg.input.rstrip("/"):
        root = posixpath.dirname(cfg.input.rstrip("/"))
    if "://" not in cfg.input:  # local listings come back as absolute paths
        root = os.path.abspath(root or ".")
    out_fs, out_path = filesystem(cfg.output, so)
    have = existing_outputs(cfg.output, so) if not cfg.force else set()
    plan = Plan(total=len(uris))
    seen: dict[str, str] = {}
    for uri in uris:
        try:
            key = output_key(relative_key(uri, root), cfg.format)
        except ConfigError as e:
            plan.rejected.append(Task(uri, None, str(e)))
            continue
        out_uri = join_uri(cfg.output, key)
        if key in seen:
            plan.rejected.append(
                Task(uri, None, f"output key {key!r} is also the output of {seen[key]}; rename one of them")
            )
            continue
        seen[key] = uri
        prev = latest.get(uri)
        done = (
            not cfg.force
            and prev is not None
            and prev.get("status") in ("ok", "skipped")
            and prev.get("fingerprint") == fp
            and prev.get("output_uri") == out_uri
            and out_fs._strip_protocol(out_uri).rstrip("/") in have
        )
        if done:
            row = dict(prev)
            row.update(
                run_id=run_id, status="skipped", actor_id=None, read_s=None, decode_s=None, infer_s=None,
                encode_s=None, write_s=None, total_s=None, error_type=None, error_message=None,
            )  # fmt: skip
            plan.skipped.append(row)
        else:
            plan.todo.append(Task(uri, out_uri))
    return plan
