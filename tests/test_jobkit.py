"""srbatch.jobkit, the skeleton under the three jobs: the actor-pool runner on a real local Ray cluster (every item
ends with exactly one row: duplicates of retried batches dropped, lost items given a failed row), the CLI's exit
codes, and the shared config base."""

from __future__ import annotations

import argparse
import sys

import pyarrow as pa
import pytest

from srbatch.errors import ConfigError, SrbatchError
from srbatch.jobkit.cli import ExitCode, run_cli
from srbatch.jobkit.config import ActorPoolConfig, JobConfig, Location, config_from_args, job_parser
from srbatch.jobkit.pool import LOST_RESULT, run_actor_pool
from srbatch.jobkit.resources import ActorResources


class EchoActor:
    """Answers each item with a row, except: items named ``lost*`` get no row, ``dup*`` get two rows (as a retried
    batch would), and ``bad*`` get a failed row."""

    def __init__(self, tag: str, torch_threads: int | None = None) -> None:
        self.tag = tag

    def __call__(self, batch: dict) -> pa.Table:
        rows = []
        for key in batch["key"]:
            key = str(key)
            if key.startswith("lost"):
                continue
            row = {"key": key, "status": "failed" if key.startswith("bad") else "ok", "tag": self.tag}
            rows.extend([row, {**row, "tag": "duplicate"}] if key.startswith("dup") else [row])
        return pa.Table.from_pylist(rows, schema=pa.schema([("key", pa.string()), ("status", pa.string()),
                                                           ("tag", pa.string())]))  # fmt: skip


@pytest.mark.slow
def test_actor_pool_gives_every_item_exactly_one_row(ray_cluster):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test module is not importable by workers
    items = [{"key": k} for k in ("a", "dup1", "b", "lost1", "bad1", "c", "lost2")]
    rows: list[dict] = []
    run_actor_pool(
        items, key="key", actor=EchoActor, actor_kwargs={"tag": "first"},
        resources=ActorResources(actors=1, max_actors=1, gpus_per_actor=0, cpus_per_actor=0.5, torch_threads=1),
        batch_size=2, on_row=rows.append, progress=False,
        lost_row=lambda it, error_type, message: {"key": it["key"], "status": "failed", "tag": error_type,
                                                  "message": message},
    )  # fmt: skip
    by_key = {r["key"]: r for r in rows}
    assert len(rows) == len(items) == len(by_key)  # one row each: no duplicate, none missing
    assert {k: r["tag"] for k, r in by_key.items()} == {
        "a": "first", "dup1": "first", "b": "first", "bad1": "first", "c": "first",
        "lost1": LOST_RESULT, "lost2": LOST_RESULT,
    }  # fmt: skip
    assert "rerun" in by_key["lost1"]["message"]
    assert [by_key[k]["status"] for k in ("a", "bad1", "lost1")] == ["ok", "failed", "failed"]


def test_actor_pool_refuses_items_with_the_same_key():
    with pytest.raises(ValueError, match="not unique"):
        run_actor_pool([{"k": 1}, {"k": 1}], key="k", actor=EchoActor, actor_kwargs={}, batch_size=1,
                       resources=ActorResources(1, 1, 0, 1, 1), on_row=print, lost_row=lambda *a: {})  # fmt: skip


class _Job(ActorPoolConfig):
    images: Location
    output: Location = "out"
    scale: int = 4


def _cli(argv, run):
    def parser(prog: str) -> argparse.ArgumentParser:
        return job_parser(prog, _Job, description="d", epilog="e", positional="images")

    return run_cli(argv, prog="job", parser=parser, make_config=lambda a: config_from_args(a, _Job), run=run,
                   logger="srbatch.test", failed_errors=(RuntimeError,))  # fmt: skip


class _Failed(SrbatchError, RuntimeError):
    pass


def test_cli_exit_codes(capsys):
    seen = []
    assert _cli(["in/", "--scale", "2"], lambda cfg: seen.append(cfg) or 0) == ExitCode.OK
    assert (seen[0].images, seen[0].scale, seen[0].output) == ("in/", 2, "out")
    assert _cli(["in/"], lambda cfg: 1) == ExitCode.FAILED  # what the job decided
    assert _cli(["--scale", "2"], lambda cfg: 0) == ExitCode.CONFIG  # images missing
    assert "images: required; give --images" in capsys.readouterr().err
    assert _cli(["   "], lambda cfg: 0) == ExitCode.CONFIG  # an empty location
    assert "must not be empty" in capsys.readouterr().err
    assert _cli(["a/", "--images", "b/"], lambda cfg: 0) == ExitCode.CONFIG
    assert "given twice" in capsys.readouterr().err

    def interrupted(cfg):
        raise KeyboardInterrupt

    def failed(cfg):
        raise _Failed("the training diverged")

    def config_error(cfg):
        raise ConfigError("--model x: unknown")

    assert _cli(["in/"], interrupted) == ExitCode.INTERRUPTED == 130
    assert _cli(["in/"], failed) == ExitCode.FAILED
    assert _cli(["in/"], config_error) == ExitCode.CONFIG
    assert "job: error: --model x: unknown" in capsys.readouterr().err


def test_shared_fields_come_last_in_help_and_secrets_are_redacted():
    help_text = job_parser("job", _Job, description="d", epilog="e").format_help()
    own, pool, shared = help_text.index("--scale"), help_text.index("--actors"), help_text.index("--ray-address")
    assert own < pool < shared
    cfg = _Job(images="x", storage_options={"secret": "s3cr3t", "key": "k", "region": "eu"}, endpoint_url="http://e")
    assert cfg.redacted()["storage_options"] == {"secret": "***", "key": "***", "region": "eu"}
    assert cfg.fs_options()["client_kwargs"] == {"endpoint_url": "http://e"}
    assert issubclass(_Job, JobConfig) and _Job.model_config["frozen"] and _Job.model_config["extra"] == "forbid"
    with pytest.raises(ValueError, match="max_actors"):
        _Job(images="x", actors=3, max_actors=2)
