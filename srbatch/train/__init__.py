"""The training job: Ray Train fine-tunes super-resolution models for a domain and exports them.

``run_training(TrainConfig(...))`` is what ``jobs/train.py`` calls; see :mod:`srbatch.train.config` for the fields
and presets, :mod:`srbatch.train.loop` for the per-worker loop, :mod:`srbatch.train.export` for the model card.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainConfig", "TrainResult", "run_training", "load_train_config", "PRESETS", "main"]


def __getattr__(name: str) -> Any:  # lazy: importing srbatch.train must not import Ray
    if name in ("TrainConfig", "load_train_config", "PRESETS"):
        from srbatch.train import config

        return getattr(config, name)
    if name in ("TrainResult", "run_training"):
        from srbatch.train import runner

        return getattr(runner, name)
    if name == "main":
        from srbatch.train.cli import main

        return main
    raise AttributeError(name)
