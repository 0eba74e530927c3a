"""A real crash of a Ray Train worker, from outside the training loop (test helper, imported by the training tests).

``kill_a_training_worker(run_dir, after="checkpoint_00000002")`` watches the run's folder from a thread of the test
process (the Ray driver). Once Ray Train has *committed* that checkpoint (its checkpoint manager snapshot,
``<run_dir>/checkpoint_manager_snapshot.json``, lists it) it SIGKILLs one live ``RayTrainWorker`` process of this
driver's Ray cluster: no code in the loop knows about it. The process ids come from the cluster's own actor table
(GCS), so only this cluster's workers can be hit, and the process's command line is checked before the signal.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

WORKER_CLASS = "RayTrainWorker"
SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass
class Kill:
    """What the watcher did: the killed pid (None: it never fired) and the checkpoints committed at that moment."""

    pid: int | None = None
    committed: tuple[str, ...] = ()
    error: str | None = None


def committed_checkpoints(run_dir: Path) -> tuple[str, ...]:
    """The checkpoint folder names Ray Train has registered for the run (empty while there is no snapshot)."""
    try:
        snap = json.loads((run_dir / SNAPSHOT).read_text())
    except (OSError, ValueError):  # absent, or caught mid-write
        return ()
    return tuple(r["checkpoint_dir_name"] for r in snap.get("checkpoint_results") or [])


def _live_worker_pids() -> list[int]:
    from ray._private import state

    rows = state.actors(actor_state_name="ALIVE").values()
    return sorted(int(a["Pid"]) for a in rows if a["ActorClassName"] == WORKER_CLASS and a["Pid"])


def _is_train_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return WORKER_CLASS.encode() in f.read()
    except OSError:
        return False


@contextmanager
def kill_a_training_worker(run_dir: Path, *, after: str, poll_s: float = 0.02) -> Iterator[Kill]:
    """SIGKILL the highest-pid live Ray Train worker once checkpoint ``after`` of ``run_dir`` is committed."""
    kill, stop = Kill(), threading.Event()

    def watch() -> None:
        try:
            while not stop.is_set():
                done = committed_checkpoints(run_dir)
                if after in done:
                    pids = [p for p in _live_worker_pids() if _is_train_worker(p)]
                    if pids:
                        os.kill(pids[-1], signal.SIGKILL)
                        kill.pid, kill.committed = pids[-1], done
                        return
                time.sleep(poll_s)
        except Exception as e:  # reported by the test, not lost in the thread
            kill.error = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=watch, name="kill-a-training-worker", daemon=True)
    t.start()
    try:
        yield kill
    finally:
        stop.set()
        t.join(timeout=10)
