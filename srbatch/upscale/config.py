"""Configuration of the upscale job: one frozen pydantic model, read from YAML and overridden by command-line flags.

Every field is a flag (``tile_overlap`` -> ``--tile-overlap``) documented in ``--help`` from the field's description,
so the YAML file and the command line cannot drift apart.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from srbatch.errors import ConfigError

__all__ = [
    "UpscaleConfig", "load_config", "load_model_config", "add_field_flags", "build_parser", "config_from_args",
    "default_run_id", "redact",
]  # fmt: skip

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")
_SECRET = re.compile(r"secret|password|token|passwd|credential|(^|_)key$", re.IGNORECASE)


def default_run_id() -> str:
    """A run id from the current UTC time, e.g. ``20261123T101500Z``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


class UpscaleConfig(BaseModel):
    """Everything the upscale job needs. Frozen; unknown fields are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    input: str = Field(
        description="images to upscale: a folder/prefix (recursive), a file, or a glob such as "
        "'s3://photos/raw/**/*.jpg' (quote it so the shell leaves it alone)"
    )
    output: str = Field(
        description="output folder/prefix; images keep their path relative to the input root and the manifest goes "
        "to <output>/_manifest/"
    )
    model: str = Field("bicubic", description="model name (see `srbatch models`) or checkpoint path/URI")
    scale: int = Field(4, ge=1, le=16, description="upscaling factor of the model (2, 3, 4, 8; 1 for restoration)")
    outscale: float | None = Field(
        None, gt=0, description="final scale when different from the model's (output resized with MATLAB bicubic)"
    )
    sha256: str | None = Field(None, description="refuse the checkpoint unless its sha256 matches")
    tile: int | None = Field(
        None, ge=0, description="tile size in input pixels; unset: the model's hint; 0: never tile"
    )
    tile_overlap: int | None = Field(
        None, ge=0, description="context pixels around each tile; unset: the model's receptive halo, capped at 32"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="compute dtype; half precision is used on CUDA only, with an fp32 retry on bad output"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when the actor sees a GPU, else CPU"
    )
    format: Literal["PNG", "JPEG", "WEBP", "TIFF"] = Field("PNG", description="output image format")
    quality: int | None = Field(None, ge=1, le=100, description="JPEG/WebP quality [95]")
    actors: int | None = Field(
        None, ge=1, description="number of model actors (the minimum with --max-actors); unset: one per GPU, or 1 on CPU"
    )
    max_actors: int | None = Field(None, ge=1, description="let the actor pool grow up to this many actors")
    gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs reserved by each actor; unset: 1 when the cluster has GPUs, else 0"
    )
    cpus_per_actor: float | None = Field(
        None, gt=0, description="CPUs reserved by each actor (fractions allowed); unset: 0.5 with GPUs, else 1"
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per CPU actor; unset: the cluster's CPUs divided by the actors"
    )
    batch_size: int = Field(4, ge=1, description="images handed to an actor per call")
    io_threads: int = Field(4, ge=1, le=64, description="threads per actor that read and upload while the model runs")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options (KEY=VALUE, repeatable); credentials are best left to the standard "
        "AWS_* environment variables and are never logged",
    )
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint, e.g. http://127.0.0.1:8333 [AWS_ENDPOINT_URL]"
    )
    anonymous: bool = Field(False, description="read/write object storage without credentials (public buckets)")
    reference: Literal["none", "self"] = Field(
        "none",
        description="self: also downscale each input by the scale (MATLAB bicubic), upscale it and record PSNR/SSIM "
        "against the original (a quality audit)",
    )
    max_failed_fraction: float = Field(
        0.0, ge=0, le=1, description="exit 1 when more than this fraction of processed images failed (0: any failure)"
    )
    force: bool = Field(False, description="redo every input, even those with an ok row and output")
    run_id: str = Field(default_factory=default_run_id, description="run id recorded in the manifest [UTC time]")
    ray_address: str | None = Field(
        None, description="Ray cluster to use ('auto' for a local `ray start` head); unset: $RAY_ADDRESS, else a "
        "new local cluster"
    )
    progress: bool = Field(True, description="show a progress bar on stderr")
    manifest_flush_seconds: float = Field(
        30.0, gt=0, description="write the manifest rows gathered so far at least this often"
    )

    @field_validator("input", "output")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        return non_empty_location(v)

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str) -> str:
        if not _RUN_ID.match(v):
            raise ValueError("use letters, digits and . _ : + - only (it becomes a folder name), e.g. 2026-11-23T10")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("must be 64 hexadecimal digits (the output of `sha256sum`)")
        return v.lower() if v else v

    @model_validator(mode="after")
    def _pool(self) -> UpscaleConfig:
        if self.max_actors is not None and self.actors is not None and self.max_actors < self.actors:
            raise ValueError(f"max_actors ({self.max_actors}) is smaller than actors ({self.actors}); raise it")
        if self.quality is not None and self.format not in ("JPEG", "WEBP"):
            raise ValueError(f"quality applies to JPEG and WEBP only, not {self.format}; drop it or change format")
        return self

    def fs_options(self) -> dict[str, Any]:
        """fsspec storage options, with ``endpoint_url`` and ``anonymous`` folded in."""
        return fold_storage_options(self.storage_options, self.endpoint_url, self.anonymous)

    def redacted(self) -> dict[str, Any]:
        """The configuration as a dict with every credential-like value replaced by ``***`` (safe to log)."""
        return redact(self.model_dump())


def fold_storage_options(
    storage_options: Mapping[str, Any], endpoint_url: str | None, anonymous: bool
) -> dict[str, Any]:
    """fsspec storage options with an S3 ``endpoint_url`` (as ``client_kwargs``) and ``anonymous`` (``anon``) added."""
    so = dict(storage_options)
    if endpoint_url:
        so["client_kwargs"] = {**dict(so.get("client_kwargs") or {}), "endpoint_url": endpoint_url}
    if anonymous:
        so["anon"] = True
    return so


def redact(obj: Any) -> Any:
    """``obj`` with the values of secret-looking keys (``secret``, ``token``, ``password``, ``*_key``) masked."""
    if isinstance(obj, Mapping):
        return {k: ("***" if _SECRET.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    return obj


def _explain(err: ValidationError, source: str, cls: type[BaseModel] | None = None) -> ConfigError:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(config)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            known = ", ".join((cls or UpscaleConfig).model_fields)
            msg = f"unknown field; the known fields are: {known}"
        elif e["type"] == "missing":
            msg = f"required; give --{field.replace('_', '-')} or set `{field}:` in the YAML file"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {field}: {msg}")
    return ConfigError(f"invalid configuration ({source}):\n" + "\n".join(lines))


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> UpscaleConfig:
    """Read ``path`` (YAML; any fsspec URI) if given, apply ``overrides`` (fields set on the command line) and
    validate. Errors name the field and the fix (:class:`ConfigError`)."""
    return load_model_config(UpscaleConfig, path, overrides)


M = typing.TypeVar("M", bound=BaseModel)


def load_model_config(
    cls: type[M], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> M:
    """Validate a config model ``cls`` from a YAML file (any fsspec URI; optional) overridden by ``overrides``.

    Shared by the jobs' configurations; ``storage_options`` dictionaries are merged, other fields replaced.
    """
    import yaml

    data: dict[str, Any] = {}
    source = "command line"
    if path:
        from srbatch.io.storage import read_bytes

        try:
            loaded = yaml.safe_load(read_bytes(str(path)).decode("utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of field: value, got {type(loaded).__name__}")
        data.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
        source = f"{path} + command line"
    for k, v in (overrides or {}).items():
        if k == "storage_options" and v:
            data["storage_options"] = {**dict(data.get("storage_options") or {}), **v}
        else:
            data[k] = v
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _explain(e, source, cls) from None


def _parse_kv(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"--storage-option expects KEY=VALUE; got {p!r}")
        k, v = p.split("=", 1)
        if k == "endpoint_url":
            out.setdefault("client_kwargs", {})["endpoint_url"] = v
        else:
            out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out


def _base_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def build_parser(prog: str = "jobs/upscale.py") -> argparse.ArgumentParser:
    """The job's argument parser: ``INPUT`` (optional positional), ``--config``, and one flag per config field."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Upscale a whole image dataset on a Ray cluster: model actors (one per GPU, or on CPU) stream images "
        "from object storage, write the upscaled images under --output with the same relative paths, and record one "
        "manifest row per input in <output>/_manifest/ (Parquet). Reruns skip inputs already done with the same model "
        "and parameters and retry failed ones. With no arguments at all, python jobs/upscale.py upscales the bundled "
        "sample images.",
        epilog="Every flag can also be set in the YAML file given with --config (field names with underscores); flags "
        "win. Exit codes: 0 done, 1 more failures than --max-failed-fraction, 2 configuration error, 130 interrupted.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("positional_input", nargs="?", metavar="INPUT", help="same as --input")
    p.add_argument("--config", "-c", metavar="YAML", help="YAML file (path or URI) with any of the fields below")
    add_field_flags(p, UpscaleConfig, {"input": ["-i"], "output": ["-o"], "model": ["-m"]})
    p.add_argument("-v", "--verbose", action="store_true", default=False, help="log decisions (INFO level)")
    # ArgumentDefaultsHelpFormatter would print "==SUPPRESS==": defaults are in the help texts instead.
    p.formatter_class = argparse.HelpFormatter
    return p


def add_field_flags(
    p: argparse.ArgumentParser, cls: type[BaseModel], short: Mapping[str, Sequence[str]] | None = None
) -> None:
    """One flag per field of ``cls`` (``tile_overlap`` -> ``--tile-overlap``), its description as help text.

    Flags default to "not given" so that YAML values survive; booleans get ``--x/--no-x``; ``storage_options`` is
    ``--storage-option KEY=VALUE`` (repeatable); Literal fields list their choices.
    """
    short = short or {}
    for name, f in cls.model_fields.items():
        if f.json_schema_extra and isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("no_flag"):
            continue
        flags = ["--" + name.replace("_", "-"), *short.get(name, [])]
        typ = _base_type(f.annotation)
        default = None if f.default_factory is not None or f.is_required() else f.default
        help_ = f.description + ("" if default is None else f" [{default}]")
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_.replace("%", "%%")}
        if typ is bool:
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif name == "storage_options":
            p.add_argument("--storage-option", action="append", metavar="KEY=VALUE", **kw)
        elif typing.get_origin(typ) is Literal:
            p.add_argument(*flags, choices=list(typing.get_args(typ)), **kw)
        elif typ in (int, float, str):
            p.add_argument(*flags, type=typ, metavar=name.upper(), **kw)
        else:  # unions, tuples, mappings: YAML syntax on the command line, e.g. --blur-sigma '[0.2, 3.0]'
            p.add_argument(*flags, type=_yaml_value, metavar=name.upper(), **kw)


def _yaml_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def flag_overrides(args: argparse.Namespace, cls: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (parsed by :func:`add_field_flags`), ``--storage-option``
    pairs turned into a mapping: the ``overrides`` of :func:`load_model_config`."""
    given = {k: v for k, v in vars(args).items() if k in cls.model_fields}
    if "storage_options" in given:
        given["storage_options"] = _parse_kv(given["storage_options"] or [])
    return given


def non_empty_location(v: str) -> str:
    """Validator body shared by the jobs' configs: a folder, glob or URI, stripped, never empty."""
    if not v.strip():
        raise ValueError("must not be empty; give a folder, glob or URI")
    return v.strip()


def config_from_args(args: argparse.Namespace) -> UpscaleConfig:
    """Build the config from parsed arguments: YAML first, then the flags that were given."""
    given = flag_overrides(args, UpscaleConfig)
    if getattr(args, "positional_input", None):
        if "input" in given and given["input"] != args.positional_input:
            raise ConfigError("the input is given twice (INPUT and --input) with different values; keep one")
        given["input"] = args.positional_input
    return load_config(getattr(args, "config", None), given)
