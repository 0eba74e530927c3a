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

import pyarrow as pa
import pyarrow.compute as pc

from srbatch.errors import ConfigError
from srbatch.io.storage import filesystem, list_files, list_images
from srbatch.upscale.config import UpscaleConfig
from srbatch.upscale.manifest import MANIFEST_DIR, TMP_PREFIX
from srbatch.upscale.state import CONTROL_DIR

__all__ = ["Task", "Plan", "input_root", "relative_key", "output_key", "fingerprint", "make_plan"]

_EXT = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "TIFF": ".tif"}


@dataclass(frozen=True)
class Task:
    """One input to process: where it is read from and where its output goes (None when its key is unsafe)."""

    input_uri: str
    output_uri: str | None
    error: str | None = None


@dataclass
class Plan:
    """What a run will do: ``todo`` (input_uri, output_uri) goes to the actors, ``done`` are the inputs already done
    (skipped: their latest outcome is carried over), ``rejected`` failed before any work (unsafe keys)."""

    todo: pa.Table = field(default_factory=lambda: TODO_SCHEMA.empty_table())
    done: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
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
    if parts[0] in (MANIFEST_DIR, CONTROL_DIR) or any(p.startswith(TMP_PREFIX) for p in parts):
        raise ConfigError(
            f"input key {rel!r} clashes with srbatch's own files ({MANIFEST_DIR}/, {CONTROL_DIR}/, {TMP_PREFIX}*)"
        )
    return posixpath.splitext(key)[0] + _EXT[fmt]


def fingerprint(cfg: UpscaleConfig, model_id: Mapping[str, Any]) -> str:
    """16 hex digits identifying everything that decides an output's bytes (and its metrics): the model's identity
    and weights, scale, outscale, dtype, tiling, format, quality, the codec settings (PNG level, lossless WebP, JPEG
    encoder) and the reference mode. Devices are not part of it."""
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
    if cfg.quality_metric != "none":  # only when set: earlier fingerprints stay valid; a rerun adds the column
        payload["quality_metric"] = cfg.quality_metric
    if cfg.tiff_pyramid and cfg.format == "TIFF":  # only when set: earlier fingerprints stay valid
        payload["tiff_pyramid"] = cfg.tiff_pyramid
    # Codec settings, each only where it changes the bytes and differs from what every earlier run used (PNG level 6,
    # lossy WebP, Pillow's JPEG), so earlier fingerprints stay valid for the same bytes. jpeg_encoder is recorded as
    # set: "auto" is fingerprinted as "auto" (it resolves to nvJPEG on CUDA actors, Pillow elsewhere; devices are
    # not part of the fingerprint).
    if cfg.format == "PNG" and cfg.png_compression != 6:
        payload["png_compression"] = cfg.png_compression
    if cfg.webp_lossless:
        payload["webp_lossless"] = True
    if cfg.format == "JPEG" and cfg.jpeg_encoder != "pillow":
        payload["jpeg_encoder"] = cfg.jpeg_encoder
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def existing_outputs(output: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    """Every file under the output prefix (outside ``_manifest/`` and ``_srbatch/``), as filesystem paths."""
    return list_files(output, storage_options, skip_top=(MANIFEST_DIR, CONTROL_DIR))


# Keys the vectorised path cannot decide alone: anything output_key might refuse or change (non-ASCII: NFC; dot files;
# backslashes and control characters; empty, '.', '..' parts; srbatch's own folders and temp files).
_SUSPECT = (
    r"[\\\x00-\x1f]|^/|//|/$|(^|/)\.|^(" + MANIFEST_DIR + "|" + CONTROL_DIR + r")(/|$)"
)


def output_keys(rel: pa.Array, fmt: str) -> tuple[pa.Array, dict[int, str]]:
    """:func:`output_key` of every relative key in ``rel``, vectorised (Python only for the rare keys that need a
    closer look). Returns the keys (null where refused) and {row: reason} of the refused ones."""
    ext = _EXT[fmt]
    keys = pc.replace_substring_regex(rel, r"(\.[^./]*)?$", ext, max_replacements=1)
    suspect = pc.or_(pc.invert(pc.string_is_ascii(rel)), pc.match_substring_regex(rel, _SUSPECT))
    refused: dict[int, str] = {}
    idx = pc.indices_nonzero(suspect).to_pylist()
    if idx:
        fixed = keys.to_pylist()
        for i, r in zip(idx, rel.take(idx).to_pylist()):
            try:
                fixed[i] = output_key(r, fmt)
            except ConfigError as e:
                fixed[i] = None
                refused[i] = str(e)
        keys = pa.array(fixed, pa.string())
    return keys, refused


TODO_SCHEMA = pa.schema([pa.field("input_uri", pa.string(), nullable=False), pa.field("output_uri", pa.string())])


def make_plan(
    cfg: UpscaleConfig,
    fp: str,
    state: pa.Table | None,
    *,
    outputs: list[str] | pa.Array | None = None,
    video_fp: str | None = None,
) -> Plan:
    """List the inputs and decide, per input, process / skip / reject, in Arrow (no Python object per input).

    An input is skipped when its latest outcome in ``state`` (the state's planning columns, see
    :mod:`srbatch.upscale.state`) is ``ok`` with the same fingerprint and output key, and its output is still there
    (``outputs``: the output listing, listed here when not given; not checked with ``check_outputs="trust"``).
    Unsafe or clashing keys are rejected.

    Videos (:data:`~srbatch.upscale.video.VIDEO_EXTENSIONS`) are listed too: their output key keeps the name with the
    video container's extension, and their fingerprint is ``video_fp`` (the image one plus the encoder settings).
    """
    from srbatch.io.storage import IMAGE_EXTENSIONS
    from srbatch.upscale.video import VIDEO_EXTENSIONS, video_container

    so = cfg.fs_options()
    uris = list_images(cfg.input, so, extensions=IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)
    root = input_root(cfg.input)
    if len(uris) == 1 and uris[0].rstrip("/") == cfg.input.rstrip("/"):
        root = posixpath.dirname(cfg.input.rstrip("/"))
    if "://" not in cfg.input:  # local listings come back as absolute paths
        root = os.path.abspath(root or ".")
    inputs = pa.array(uris, pa.string())
    del uris
    plan = Plan(total=len(inputs))
    root = root.rstrip("/")
    if root:
        under = pc.starts_with(inputs, root + "/")
        rel = pc.if_else(
            under,
            pc.replace_substring(inputs, root + "/", "", max_replacements=1),
            pc.replace_substring_regex(inputs, r"^.*/", "", max_replacements=1),
        )
    else:
        rel = pc.replace_substring_regex(inputs, r"^.*/", "", max_replacements=1)
    keys, refused = output_keys(rel, cfg.format)
    is_vid = pc.match_substring_regex(inputs, r"\.(mp4|mkv|mov|webm)$", ignore_case=True)
    vid_rows = pc.indices_nonzero(is_vid).to_pylist()
    if vid_rows:  # few: a Python loop
        fixed = keys.to_pylist()
        for i in vid_rows:
            if fixed[i] is not None:
                fixed[i] = posixpath.splitext(fixed[i])[0] + video_container(inputs[i].as_py(), cfg)
        keys = pa.array(fixed, pa.string())
    # two inputs with one output key (a.png and a.jpg): the first (in sorted order) keeps it
    counts = pc.value_counts(keys.drop_null())
    dup_keys = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(dup_keys):
        first: dict[str, str] = {}
        for i in pc.indices_nonzero(pc.is_in(keys, value_set=dup_keys)).to_pylist():
            k, u = keys[i].as_py(), inputs[i].as_py()
            if k in first:
                refused[i] = f"output key {k!r} is also the output of {first[k]}; rename one of them"
            else:
                first[k] = u
    for i, why in sorted(refused.items()):
        plan.rejected.append(Task(inputs[i].as_py(), None, why))
    ok_mask = pa.array([i not in refused for i in range(len(inputs))]) if refused else None
    out_base = cfg.output.rstrip("/")
    if cfg.force or state is None or state.num_rows == 0:
        table = pa.table({"input_uri": inputs, "output_uri": pc.binary_join_element_wise(out_base, keys, "/")},
                         schema=TODO_SCHEMA)  # fmt: skip
        plan.todo = table.filter(ok_mask) if ok_mask is not None else table
        return plan
    # does each output exist? compare keys with the output listing's keys (relative to the output prefix)
    if cfg.check_outputs == "trust":
        exists = pa.repeat(pa.scalar(True), len(keys))
    else:
        have = existing_outputs(cfg.output, so) if outputs is None else outputs
        have = have if isinstance(have, pa.Array) else pa.array(have, pa.string())
        out_fs, _ = filesystem(cfg.output, so)
        prefix = out_fs._strip_protocol(cfg.output).rstrip("/") + "/"
        have = pc.replace_substring(have.filter(pc.starts_with(have, prefix)), prefix, "", max_replacements=1)
        exists = pc.is_in(keys, value_set=have)
        del have
    # each input's latest outcome: a hash lookup into the state (no join, no copy of the state)
    at = pc.index_in(inputs, value_set=state["input_uri"])
    out_uris = pc.binary_join_element_wise(out_base, keys, "/")
    del keys
    done = pc.and_kleene(
        pc.and_kleene(pc.equal(state["status"].take(at), "ok"),
                      pc.equal(state["fingerprint"].take(at),
                               pc.if_else(is_vid, video_fp or fp, fp) if vid_rows else fp)),
        pc.and_kleene(pc.equal(state["output_uri"].take(at), out_uris), exists),
    ).fill_null(False)
    del at, exists
    if ok_mask is not None:
        done = pc.and_(done, ok_mask)
        todo_mask = pc.and_(pc.invert(done), ok_mask)
    else:
        todo_mask = pc.invert(done)
    plan.todo = pa.table({"input_uri": inputs.filter(todo_mask), "output_uri": out_uris.filter(todo_mask)},
                         schema=TODO_SCHEMA)  # fmt: skip
    plan.done = inputs.filter(done)
    return plan
