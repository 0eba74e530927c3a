"""The kit every srbatch job is built from, so that the upscale, comparison and training jobs read alike:

- :mod:`~srbatch.jobkit.config`: the frozen pydantic base (:class:`JobConfig`: storage and Ray fields;
  :class:`ActorPoolConfig`: the actor pool's fields), YAML + overrides -> validated config, one flag per field;
- :mod:`~srbatch.jobkit.cluster`: start or join Ray (:func:`ray_session`);
- :mod:`~srbatch.jobkit.resources`: size the actor pool for the cluster (:func:`plan_actors`);
- :mod:`~srbatch.jobkit.pool`: stream items through the model actors, de-duplicate retried batches, give every lost
  item its failed row (:func:`run_actor_pool`);
- :mod:`~srbatch.jobkit.actor`: the model actor's base (:class:`ModelActor`, :func:`error_fields`);
- :mod:`~srbatch.jobkit.cli`: the command line and the exit codes (:func:`run_cli`, :class:`ExitCode`).

A job supplies only what differs: its config fields, its plan, its actor's work on one item, its rows and summary.
Importing this package does not import Ray or torch.
"""

from srbatch.jobkit.cli import ExitCode, run_cli
from srbatch.jobkit.cluster import ensure_ray, ray_env_defaults, ray_session
from srbatch.jobkit.config import (
    ActorPoolConfig,
    JobConfig,
    config_from_args,
    default_run_id,
    job_parser,
    load_model_config,
    non_empty_location,
)
from srbatch.jobkit.resources import ActorResources, plan_actors

__all__ = [
    "ActorPoolConfig", "ActorResources", "ExitCode", "JobConfig", "config_from_args", "default_run_id",
    "ensure_ray", "job_parser", "load_model_config", "non_empty_location", "plan_actors", "ray_env_defaults",
    "ray_session", "run_cli",
]  # fmt: skip
