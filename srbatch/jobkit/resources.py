"""Sizing an actor pool: how many model actors, and what each reserves, on a cluster with given resources."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from srbatch.jobkit.config import ActorPoolConfig

__all__ = ["ActorResources", "plan_actors"]


@dataclass(frozen=True)
class ActorResources:
    """An actor pool: between ``actors`` and ``max_actors`` actors, each reserving ``gpus_per_actor`` GPUs and
    ``cpus_per_actor`` CPUs, running torch with ``torch_threads`` intra-op threads (None: torch's default)."""

    actors: int
    max_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    torch_threads: int | None
    actors_per_node: int = 1
    """Most actors one node runs (the pool's maximum spread over the cluster's nodes): they share its memory."""

    @property
    def memory_share(self) -> float:
        """Share of a node's available memory one actor's image may take when ``max_memory`` is unset."""
        return 0.5 / max(self.actors_per_node, 1)

    def remote_args(self) -> dict[str, Any]:
        """The Ray resource arguments of one actor (``num_cpus``, and ``num_gpus`` when it reserves GPUs)."""
        args: dict[str, Any] = {"num_cpus": self.cpus_per_actor}
        if self.gpus_per_actor > 0:
            args["num_gpus"] = self.gpus_per_actor
        return args

    def describe(self) -> str:
        """E.g. ``2-4 actor(s), 1 GPU and 0.5 CPU each`` (with the torch threads on CPU)."""
        span = f"{self.actors}-{self.max_actors}" if self.max_actors > self.actors else f"{self.actors}"
        text = f"{span} actor(s), {self.gpus_per_actor:g} GPU and {self.cpus_per_actor:g} CPU each"
        return text + (f", {self.torch_threads} torch threads" if self.gpus_per_actor == 0 else "")

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict (for logs and benchmark reports)."""
        return asdict(self)


def plan_actors(cfg: ActorPoolConfig, cluster: Mapping[str, float]) -> ActorResources:
    """The actor pool for ``cfg`` on a cluster with ``cluster`` resources (``ray.cluster_resources()``).

    With GPUs: one actor per GPU (``gpus_per_actor`` 1) reserving half a CPU each. Without: one actor reserving a CPU
    and using every CPU of the cluster for torch threads. Each explicit field of ``cfg`` wins.
    """
    gpus = float(cluster.get("GPU", 0))
    cpus = float(cluster.get("CPU", 1))
    gpa = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus > 0 else 0.0)
    if gpa > 0:
        actors = cfg.actors or max(1, int(gpus // gpa))
        cpa = cfg.cpus_per_actor if cfg.cpus_per_actor is not None else 0.5
        threads = cfg.torch_threads
    else:
        actors = cfg.actors or 1
        cpa = cfg.cpus_per_actor if cfg.cpus_per_actor is not None else 1.0
        threads = cfg.torch_threads or max(1, int(cpus // actors))
    nodes = max(sum(1 for k in cluster if k.startswith("node:") and not k.startswith("node:__")), 1)
    most = max(cfg.max_actors or actors, actors)
    return ActorResources(actors=actors, max_actors=most, gpus_per_actor=gpa, cpus_per_actor=cpa,
                          torch_threads=threads, actors_per_node=math.ceil(most / nodes))  # fmt: skip
