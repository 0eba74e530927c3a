"""The configuration every job shares: a frozen pydantic base with the storage and Ray fields, read from YAML and
overridden by command-line flags generated from the fields.

Every field is a flag (``tile_overlap`` -> ``--tile-overlap``) documented in ``--help`` from the field's description,
so a job's YAML file and its command line cannot drift apart.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from srbatch.errors import ConfigError

__all__ = [
    "JobConfig", "ActorPoolConfig", "Location", "load_model_config", "parse_storage_options", "add_field_flags", "job_parser", "flag_overrides",
    "fold_storage_options", "redact", "non_empty_location", "default_run_id",
]  # fmt: skip

_SECRET = re.compile(r"secret|password|token|passwd|credential|(^|_)key$", re.IGNORECASE)


class JobConfig(BaseModel):
    """Base of the jobs' configurations: frozen, unknown fields are errors, and the fields every job has (object
    storage options and the Ray cluster to use)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options (KEY=VALUE, repeatable); credentials are best left to the standard "
        "AWS_* environment variables and are never logged",
    )
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint, e.g. http://127.0.0.1:8333 [AWS_ENDPOINT_URL]"
    )
    anonymous: bool = Field(False, description="read/write object storage without credentials (public buckets)")
    ray_address: str | None = Field(
        None, description="Ray cluster to use ('auto' for a local `ray start` head); unset: $RAY_ADDRESS, else a "
        "new local cluster"
    )

    def fs_options(self) -> dict[str, Any]:
        """fsspec storage options, with ``endpoint_url`` and ``anonymous`` folded in."""
        return fold_storage_options(self.storage_options, self.endpoint_url, self.anonymous)

    def redacted(self) -> dict[str, Any]:
        """The configuration as a dict with every credential-like value replaced by ``***`` (safe to log)."""
        return redact(self.model_dump())


class ActorPoolConfig(JobConfig):
    """Base of the jobs that run a model on a pool of Ray actors (upscale, compare): how many actors, what each
    reserves, and the progress bar. :func:`srbatch.jobkit.resources.plan_actors` turns these into a pool."""

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
    max_memory: str | None = Field(
        None,
        description="memory one image may take in an actor beyond the loaded model (e.g. 4GiB, 512MB); larger images "
        "are run in regions that fit and streamed to PNG/TIFF; unset: half of the memory the node has available, "
        "shared among the actors on it",
    )
    progress: bool = Field(True, description="show a progress bar on stderr")

    @field_validator("max_memory", mode="before")
    @classmethod
    def _max_memory(cls, v: Any) -> str | None:
        from srbatch.inference.memory import parse_bytes

        if v is None or (isinstance(v, str) and v.strip().lower() == "auto"):
            return None
        parse_bytes(v, field="max_memory")  # raises with the accepted forms
        return str(v).strip()

    def max_memory_bytes(self) -> int | None:
        """``max_memory`` in bytes (None: automatic)."""
        from srbatch.inference.memory import parse_bytes

        return parse_bytes(self.max_memory)

    @model_validator(mode="after")
    def _check_pool(self) -> ActorPoolConfig:
        if self.max_actors is not None and self.actors is not None and self.max_actors < self.actors:
            raise ValueError(f"max_actors ({self.max_actors}) is smaller than actors ({self.actors}); raise it")
        return self


def default_run_id() -> str:
    """A run id from the current UTC time, e.g. ``20261123T101500Z``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def non_empty_location(v: str) -> str:
    """Validator body shared by the jobs' configs: a folder, glob or URI, stripped, never empty."""
    if not v.strip():
        raise ValueError("must not be empty; give a folder, glob or URI")
    return v.strip()


#: A config field holding a folder, glob or URI: stripped, never empty.
Location = Annotated[str, AfterValidator(non_empty_location)]


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


# ------------------------------------------------------------------ YAML + overrides -> validated config


def _explain(err: ValidationError, source: str, cls: type[BaseModel]) -> ConfigError:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(config)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown field; the known fields are: {', '.join(cls.model_fields)}"
        elif e["type"] == "missing":
            msg = f"required; give --{field.replace('_', '-')} or set `{field}:` in the YAML file"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {field}: {msg}")
    return ConfigError(f"invalid configuration ({source}):\n" + "\n".join(lines))


M = typing.TypeVar("M", bound=BaseModel)


def load_model_config(
    cls: type[M], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> M:
    """Validate a config model ``cls`` from a YAML file (any fsspec URI; optional) overridden by ``overrides``.

    ``storage_options`` dictionaries are merged, other fields replaced. Errors name the field and the fix
    (:class:`~srbatch.errors.ConfigError`).
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


# ------------------------------------------------------------------ fields -> flags


def parse_storage_options(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``--storage-option KEY=VALUE`` pairs -> fsspec storage options (``endpoint_url`` goes to ``client_kwargs``;
    ``true``/``false`` become booleans)."""
    out: dict[str, Any] = {}
    for p in pairs or []:
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


def _yaml_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def add_field_flags(
    p: argparse.ArgumentParser, cls: type[BaseModel], short: Mapping[str, Sequence[str]] | None = None
) -> None:
    """One flag per field of ``cls`` (``tile_overlap`` -> ``--tile-overlap``), its description as help text; the
    job's own fields first, then the shared ones of :class:`ActorPoolConfig` and :class:`JobConfig`.

    Flags default to "not given" so that YAML values survive; booleans get ``--x/--no-x``; ``storage_options`` is
    ``--storage-option KEY=VALUE`` (repeatable); Literal fields list their choices.
    """
    short = short or {}
    shared = [n for n in ActorPoolConfig.model_fields if n not in JobConfig.model_fields] + [*JobConfig.model_fields]
    names = [n for n in cls.model_fields if n not in shared] + [n for n in shared if n in cls.model_fields]
    for name in names:
        f = cls.model_fields[name]
        if f.json_schema_extra and isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("no_flag"):
            continue
        flags = ["--" + name.replace("_", "-"), *short.get(name, [])]
        typ = _base_type(f.annotation)
        default = None if f.default_factory is not None or f.is_required() else f.default
        help_ = (f.description or "") + ("" if default is None else f" [{default}]")
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


def job_parser(
    prog: str,
    cls: type[BaseModel],
    *,
    description: str,
    epilog: str,
    short: Mapping[str, Sequence[str]] | None = None,
    positional: str | None = None,
) -> argparse.ArgumentParser:
    """A job's argument parser: an optional positional alias of the field ``positional``, ``--config YAML``, one flag
    per field of ``cls`` and ``-v/--verbose``."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    if positional:
        p.add_argument("positional_" + positional, nargs="?", metavar=positional.upper(), help=f"same as --{positional}")
    p.add_argument("--config", "-c", metavar="YAML", help="YAML file (path or URI) with any of the fields below")
    add_field_flags(p, cls, short)
    p.add_argument("-v", "--verbose", action="store_true", default=False, help="log decisions (INFO level)")
    return p


def flag_overrides(args: argparse.Namespace, cls: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (parsed by :func:`add_field_flags`), ``--storage-option``
    pairs turned into a mapping, and a positional alias (``positional_<field>``) folded into its field: the
    ``overrides`` of :func:`load_model_config`."""
    given = {k: v for k, v in vars(args).items() if k in cls.model_fields}
    if "storage_options" in given:
        given["storage_options"] = parse_storage_options(given["storage_options"])
    for key, value in vars(args).items():
        name = key.removeprefix("positional_")
        if key.startswith("positional_") and value:
            if name in given and given[name] != value:
                raise ConfigError(f"the {name} is given twice ({name.upper()} and --{name}) with different values; "
                                  "keep one")  # fmt: skip
            given[name] = value
    return given


def config_from_args(args: argparse.Namespace, cls: type[M]) -> M:
    """A job's config from parsed arguments: the YAML file of ``--config`` first, then the flags that were given."""
    return load_model_config(cls, getattr(args, "config", None), flag_overrides(args, cls))
