"""Planning a run on the driver: input listing, output keys, parameter fingerprint, and what a rerun can skip."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from srbatch.errors import ConfigError
from srbatch.io.storage import filesystem, list_files, list_images
from srbatch.upscale.config import UpscaleConfig
from srbatch.upscale.manifest import MANIFEST_DIR, SCHEMA
from srbatch.upscale.state import CONTROL_DIR

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
    """What a run will do: ``todo`` (input_uri, output_uri) goes to the actors, ``skipped`` are the manifest rows of
    inputs already done (their latest outcome carried over), ``rejected`` failed before any work (unsafe keys)."""

    todo: pa.Table = field(default_factory=lambda: TODO_SCHEMA.empty_table())
    skipped: pa.Table = field(default_factory=lambda: SCHEMA.empty_table())
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
    run_id: str,
    outputs: list[str] | None = None,
) -> Plan:
    """List the inputs and decide, per input, process / skip / reject, in Arrow (no Python object per input).

    An input is skipped when its latest outcome in ``state`` (see :mod:`srbatch.upscale.state`) is ``ok`` with the
    same fingerprint and output key, and its output is still there (``outputs``: the output listing, listed here
    when not given). Unsafe or clashing keys are rejected.
    """
    so = cfg.fs_options()
    uris = list_images(cfg.input, so)
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
    out_uris = pc.binary_join_element_wise(out_base, keys, "/")
    table = pa.table({"input_uri": inputs, "output_uri": out_uris}, schema=TODO_SCHEMA)
    if ok_mask is not None:
        table = table.filter(ok_mask)
    if cfg.force or state is None or state.num_rows == 0:
        plan.todo = table
        return plan
    have = existing_outputs(cfg.output, so) if outputs is None else outputs
    out_fs, _ = filesystem(cfg.output, so)
    path_base = out_fs._strip_protocol(cfg.output).rstrip("/")
    out_paths = pc.binary_join_element_wise(path_base, pc.replace_substring(table["output_uri"], out_base + "/", "",
                                                                            max_replacements=1), "/")  # fmt: skip
    exists = pc.is_in(out_paths, value_set=pa.array(have, pa.string()))
    del have
    prev = state.select(["input_uri", "status", "fingerprint", "output_uri"]).rename_columns(
        ["input_uri", "prev_status", "prev_fingerprint", "prev_output_uri"]
    )
    joined = table.append_column("exists", exists).join(prev, "input_uri", join_type="left outer")
    done = pc.and_kleene(
        pc.and_kleene(pc.equal(joined["prev_status"], "ok"), pc.equal(joined["prev_fingerprint"], fp)),
        pc.and_kleene(pc.equal(joined["prev_output_uri"], joined["output_uri"]), joined["exists"]),
    ).fill_null(False)
    plan.todo = joined.filter(pc.invert(done)).select(TODO_SCHEMA.names).sort_by("input_uri")
    done_uris = joined.filter(done)["input_uri"]
    plan.skipped = skipped_rows(state.filter(pc.is_in(state["input_uri"], value_set=done_uris)), run_id)
    return plan


def skipped_rows(prev: pa.Table, run_id: str) -> pa.Table:
    """The manifest rows of inputs carried over from their latest outcome ``prev``: this run's id, status
    ``skipped``, no timings, no actor, no error; ``finished_at`` is now."""
    n = prev.num_rows
    t = prev.sort_by("input_uri")
    now = pa.scalar(datetime.now(timezone.utc), SCHEMA.field("finished_at").type)
    for name in ("actor_id", "read_s", "decode_s", "infer_s", "encode_s", "write_s", "total_s", "error_type",
                 "error_message"):  # fmt: skip
        t = t.set_column(t.schema.get_field_index(name), SCHEMA.field(name), pa.nulls(n, SCHEMA.field(name).type))
    for name, value in (("run_id", pa.scalar(run_id, pa.string())), ("status", pa.scalar("skipped", pa.string())),
                        ("finished_at", now)):  # fmt: skip
        col = pa.repeat(value, n) if n else pa.array([], value.type)
        t = t.set_column(t.schema.get_field_index(name), SCHEMA.field(name), col)
    return t
