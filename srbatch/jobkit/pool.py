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
from typing import Any

from srbatch.jobkit.resources import ActorResources

__all__ = ["run_actor_pool", "LOST_RESULT"]

#: ``error_type`` of the row of an item the pipeline finished without.
LOST_RESULT = "LostResult"


def run_actor_pool(
    items: Sequence[Mapping[str, Any]],
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
) -> None:
    """Run ``actor`` (a callable class for ``Dataset.map_batches``, built once per actor with ``actor_kwargs`` and
    ``torch_threads``) over ``items`` (small dicts: keys and URIs, never pixels) on Ray, calling ``on_row`` once per
    item with its first result row (rows are matched to items by the column ``key``).

    Items without a result get ``lost_row(item, error_type, message)`` passed to ``on_row``: error type
    :data:`LOST_RESULT` when the pipeline finished without them, the exception's type when the pipeline itself broke
    (which is logged, not raised). ``KeyboardInterrupt`` propagates; the rows handed over so far stay handed over.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    log = log or logging.getLogger("srbatch")
    pending = {str(it[key]): it for it in items}
    if len(pending) != len(items):
        raise ValueError(f"run_actor_pool: the items' {key!r} values are not unique")
    if not items:
        return
    try:
        if not log.isEnabledFor(logging.INFO):
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False
        blocks = max(1, min(len(items), math.ceil(len(items) / batch_size)))
        ds = ray.data.from_items([dict(it) for it in items], override_num_blocks=blocks).map_batches(
            actor,
            fn_constructor_kwargs={**actor_kwargs, "torch_threads": resources.torch_threads},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(min_size=resources.actors, max_size=resources.max_actors),
            **resources.remote_args(),
        )
        bar = tqdm(total=len(items), unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 10.0, desc=desc)  # fmt: skip
        ok = failed = 0
        with bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                for row in batch.to_pylist():
                    if pending.pop(str(row[key]), None) is None:
                        continue  # a retried batch's duplicate: its first row already counts
                    on_row(row)
                    if row.get("status") == "ok":
                        ok += 1
                    else:
                        failed += 1
                    bar.update(1)
                    bar.set_postfix(ok=ok, failed=failed, refresh=False)
        for item in list(pending.values()):
            on_row(lost_row(item, LOST_RESULT, "the pipeline finished without a result for this input; rerun the job "
                                               "to retry it"))  # fmt: skip
        pending.clear()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # the pipeline itself broke: every unfinished item still gets its row
        log.error("the Ray pipeline failed: %s: %s", type(e).__name__, e)
        for item in list(pending.values()):
            on_row(lost_row(item, type(e).__name__, f"the job's Ray pipeline failed before this input: {e}"[:2000]))
        pending.clear()
