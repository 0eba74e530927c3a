"""The actor-pool runner every model job uses: stream small work items through a pool of Ray Data actors, hand each
item's first result row to the job, and make sure every item ends with exactly one row.

Ray Data restarts dead actors and retries their batches (``max_restarts=-1``, ``max_task_retries=-1`` by default), so
an item can come back twice: the second row is dropped. An item that never comes back (the pipeline finished or broke
without it) gets a failed row from the job's ``lost_row``: never a missing row.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from srbatch.jobkit.resources import ActorResources

__all__ = ["run_actor_pool", "LOST_RESULT", "CpuStage"]

#: ``error_type`` of the row of an item the pipeline finished without.
LOST_RESULT = "LostResult"


MAX_BLOCKS = 200
"""Ray Data blocks per pipeline at most (or 8 per actor on a larger pool): large inputs get blocks of many items, each
handed to an actor in ``batch_size`` pieces. Every block costs the driver an object and Ray Data a task: measured with
`jobs/benchmark.py handoff`, 20k tasks took 31 s in 1250 blocks and 18 s in 200 on 2 loaded cores."""


@dataclass(frozen=True)
class CpuStage:
    """A CPU stage of a pipeline around the model actors: ``fn(batch, **kwargs) -> table`` run as Ray tasks of
    ``num_cpus`` each on batches of ``batch_size`` items, as many at once as the cluster's CPUs allow. ``fn`` must
    never raise (an item's exception is its row), or Ray Data fails the whole pipeline."""

    fn: Callable[..., Any]
    kwargs: Mapping[str, Any]
    batch_size: int
    num_cpus: float = 1.0
    memory: int = 512 * 1024**2
    """Bytes of memory each task reserves with Ray's scheduler. Also keeps Ray Data from fusing the stage into the
    actors next to it (it fuses map steps whose resource requests are equal), which would put the CPU work back on
    the model actors."""

    def apply(self, ds: Any) -> Any:
        """``ds`` with this stage appended (Ray tasks, numpy batches)."""
        return ds.map_batches(self.fn, fn_kwargs=dict(self.kwargs), batch_size=self.batch_size, batch_format="numpy",
                              num_cpus=self.num_cpus, memory=self.memory)  # fmt: skip


def _constructor_kwargs(actor: Any, kwargs: Mapping[str, Any], resources: ActorResources) -> dict[str, Any]:
    """``kwargs`` plus the pool's ``torch_threads``, and its ``memory_share`` for actors that take one."""
    import inspect

    out = {**kwargs, "torch_threads": resources.torch_threads}
    params = inspect.signature(actor.__init__).parameters
    if "memory_share" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        out["memory_share"] = resources.memory_share
    return out


def run_actor_pool(
    items: pa.Table | Sequence[Mapping[str, Any]],
    *,
    key: str,
    actor: type,
    actor_kwargs: Mapping[str, Any],
    resources: ActorResources,
    batch_size: int,
    on_row: Callable[[dict[str, Any]], None],
    lost_row: Callable[[Mapping[str, Any], str, str], dict[str, Any]],
    progress: bool = True,
    desc: str = "",
    log: logging.Logger | None = None,
    on_batch: Callable[[pa.Table], None] | None = None,
    before: Sequence[CpuStage] = (),
    after: Sequence[CpuStage] = (),
) -> None:
    """Run ``actor`` (a callable class for ``Dataset.map_batches``, built once per actor with ``actor_kwargs`` and
    ``torch_threads``) over ``items`` (an Arrow table, or a few small dicts: keys and URIs, never pixels) on Ray,
    calling ``on_row`` once per item with its first result row (rows are matched to items by the column ``key``).

    The dataset is built from Arrow slices of ``items`` (never one Python object per item on the driver); the driver
    keeps only the set of keys that came back. Items without a result get ``lost_row(item, error_type, message)``
    passed to ``on_row``: error type :data:`LOST_RESULT` when the pipeline finished without them, the exception's type
    when the pipeline itself broke (which is logged, not raised). ``KeyboardInterrupt`` propagates; the rows handed
    over so far stay handed over.

    With ``on_batch``, the result rows are handed over as Arrow tables (one per batch that came back, duplicates
    removed) instead of one dict per row: the driver then does no Python work per row but a set lookup of its key.
    Lost items still go through ``on_row``.

    ``before`` and ``after`` are CPU stages (:class:`CpuStage`) run as Ray tasks before and after the actors, on every
    CPU of the cluster: the actors then get what the last ``before`` stage returns, and the rows are what the last
    ``after`` stage returns.
    """
    import pyarrow.compute as pc
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    log = log or logging.getLogger("srbatch")
    table = items if isinstance(items, pa.Table) else pa.Table.from_pylist([dict(it) for it in items])
    n = table.num_rows
    if n == 0:
        return
    keys = table[key].cast(pa.string())
    if pc.count_distinct(keys).as_py() != n:
        raise ValueError(f"run_actor_pool: the items' {key!r} values are not unique")
    seen: set[str] = set()

    def lose(error_type: str, message: str) -> None:
        missing = table.filter(pc.invert(pc.is_in(keys, value_set=pa.array(list(seen), pa.string()))))
        for start in range(0, missing.num_rows, 10_000):  # a few Python dicts at a time
            for item in missing.slice(start, 10_000).to_pylist():
                on_row(lost_row(item, error_type, message))
                seen.add(str(item[key]))

    try:
        if not log.isEnabledFor(logging.INFO):
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False
        per_block = max(batch_size, math.ceil(n / max(MAX_BLOCKS, 8 * resources.max_actors)))
        blocks = [table.slice(i, per_block) for i in range(0, n, per_block)]
        ds = ray.data.from_arrow(blocks)
        for st in before:
            ds = st.apply(ds)
        ds = ds.map_batches(
            actor,
            fn_constructor_kwargs=_constructor_kwargs(actor, actor_kwargs, resources),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(min_size=resources.actors, max_size=resources.max_actors),
            **resources.remote_args(),
        )
        for st in after:
            ds = st.apply(ds)
        del blocks
        bar = tqdm(total=n, unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 10.0, desc=desc)  # fmt: skip
        ok = failed = 0
        with bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                if on_batch is not None:
                    got = batch[key].to_pylist()
                    fresh = [str(k) not in seen for k in got]
                    seen.update(str(k) for k in got)
                    if not all(fresh):  # a retried batch's duplicates: their first rows already count
                        batch = batch.filter(pa.array(fresh))
                    if batch.num_rows:
                        on_batch(batch)
                        n_ok = pc.sum(pc.equal(batch["status"], "ok")).as_py() or 0
                        ok, failed = ok + n_ok, failed + batch.num_rows - n_ok
                        bar.update(batch.num_rows)
                        bar.set_postfix(ok=ok, failed=failed, refresh=False)
                    continue
                for row in batch.to_pylist():
                    k = str(row[key])
                    if k in seen:
                        continue  # a retried batch's duplicate: its first row already counts
                    seen.add(k)
                    on_row(row)
                    if row.get("status") == "ok":
                        ok += 1
                    else:
                        failed += 1
                    bar.update(1)
                    bar.set_postfix(ok=ok, failed=failed, refresh=False)
        if len(seen) < n:
            lose(LOST_RESULT, "the pipeline finished without a result for this input; rerun the job to retry it")
    except KeyboardInterrupt:
        raise
    except Exception as e:  # the pipeline itself broke: every unfinished item still gets its row
        log.error("the Ray pipeline failed: %s: %s", type(e).__name__, e)
        lose(type(e).__name__, f"the job's Ray pipeline failed before this input: {e}"[:2000])
