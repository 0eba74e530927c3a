"""What every model actor shares: load the model once per actor onto its device, report where it runs, run I/O on a
thread pool, and turn each input's exception into that input's failed row (never a failed batch)."""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from srbatch.errors import SrbatchError

__all__ = ["ModelActor", "error_fields", "ray_identity"]


def error_fields(e: BaseException) -> dict[str, str]:
    """A result row's ``error_type`` and ``error_message`` for ``e`` (capped at 2,000 characters); an exception that
    is not one of srbatch's own is marked "unexpected"."""
    name = type(e).__name__
    msg = str(e) or repr(e)
    if not isinstance(e, SrbatchError):
        msg = f"unexpected {name}: {msg}"
    return {"error_type": name, "error_message": msg[:2000]}


def ray_identity() -> tuple[str, list[str]]:
    """``(actor id, Ray GPU ids)`` of the calling actor; ``("pid-N", [])`` outside Ray (unit tests, local use).

    Outside Ray means no Ray connection in this process: the runtime context is then never asked for, since asking
    starts a whole local Ray cluster (seconds, and processes left behind) just to learn there is no actor."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return f"pid-{os.getpid()}", []
    try:
        ctx = ray.get_runtime_context()
        actor = ctx.get_actor_id() or f"pid-{os.getpid()}"
        gpus = [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]
        return actor, gpus
    except Exception:  # noqa: BLE001 - outside Ray
        return f"pid-{os.getpid()}", []


class ModelActor:
    """Base of the jobs' callable classes for ``Dataset.map_batches``: one instance per actor, one model per instance.

    A subclass's ``__init__`` validates its config, calls :meth:`_start_model`, and its ``__call__`` turns a batch of
    items into a table of rows, settling each item's upload with :meth:`_settle`.
    """

    job = "srbatch"

    def _start_model(
        self,
        spec: str,
        *,
        scale: int,
        storage_options: dict[str, Any],
        device: str = "auto",
        dtype: str = "float32",
        tiling: Any = None,
        outscale: float | None = None,
        sha256: str | None = None,
        torch_threads: int | None = None,
        io_threads: int = 4,
        label: str | None = None,
        max_memory: int | None = None,
        memory_share: float = 0.5,
        paper: bool = False,
        engine: dict[str, Any] | None = None,
    ) -> None:
        """Load ``spec`` once, build the :class:`~srbatch.inference.Upscaler` on the actor's device (``auto``: CUDA
        when torch sees a GPU) with ``tiling`` (a ``TilingConfig``, or a function of the loaded model's descriptor
        returning one; None: the Upscaler's default), ``engine``: further :class:`~srbatch.inference.Upscaler` options
        (``device_batch``, ``channels_last``, ``compile``), start the I/O thread pool and print the start-up line (which names the device, the
        Ray GPU ids and ``CUDA_VISIBLE_DEVICES``; Ray's log deduplication never folds it)."""
        import torch

        from srbatch.inference import Upscaler
        from srbatch.models.loader import load_model

        self.actor_id, self.gpu_ids = ray_identity()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        t0 = time.perf_counter()
        self.desc = load_model(spec, scale=scale, sha256=sha256, storage_options=storage_options)
        if paper:  # figures in the paper convention: the MATLAB-exact bicubic, as `srbatch evaluate`
            from srbatch.evaluate import paper_model

            self.desc = paper_model(self.desc)
        if callable(tiling):
            tiling = tiling(self.desc)
        self.up = Upscaler(self.desc, device=device, dtype=dtype, tiling=tiling, outscale=outscale,
                           max_memory=max_memory, memory_share=memory_share, **(engine or {}))
        self.device = str(self.up.device)
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix=f"srbatch-{self.job}-io")
        name = label or self.desc.name or self.desc.architecture
        print(
            f"srbatch actor {self.actor_id[:12]} (pid {os.getpid()}): {self.job} model {name} x{self.desc.scale} on "
            f"{self.device} ({str(self.up.dtype).removeprefix('torch.')}, Ray GPU ids {self.gpu_ids or 'none'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}, torch threads "
            f"{torch.get_num_threads()}), loaded in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )  # fmt: skip

    @staticmethod
    def _settle(row: dict[str, Any], upload: Future[Any] | None, **on_ok: Any) -> None:
        """Wait for ``row``'s upload: then ``status`` ok (and ``on_ok``), or the upload's error and no output."""
        if upload is None:
            return
        try:
            upload.result()
            row.update(status="ok", **on_ok)
        except Exception as e:  # noqa: BLE001 - one failed upload is one failed row
            row.update(error_fields(e), output_uri=None)
