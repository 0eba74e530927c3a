"""Starting or joining the Ray cluster, the same way for every job."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["NEVER_DEDUP_LOG_REGEX", "is_loopback_address", "ray_env_defaults", "ensure_ray", "ray_session"]

#: Ray's driver folds log lines that differ only in numbers into one "[repeated Nx across cluster]" line, printed
#: seconds later or never (when the job ends first). Each actor's start-up line ("srbatch actor <id> (pid N): model
#: ... on cuda:0 ...") names the device it got, and each training worker's lines (progress, resume, validation)
#: carry its own step and figures, so those are always printed in full.
NEVER_DEDUP_LOG_REGEX = r"srbatch actor |srbatch train: |__ray_testing_never_deduplicate__"


def is_loopback_address(address: str | None) -> bool:
    """True for a Ray address on this machine's loopback interface (``127.0.0.1:6379``, ``localhost:6379``,
    ``ray://[::1]:10001``, ``http://127.0.0.1:8265``)."""
    if not address:
        return False
    from urllib.parse import urlsplit

    host = urlsplit(address if "://" in address else f"//{address}").hostname or ""
    return host == "localhost" or host == "::1" or host.startswith("127.")


def ray_env_defaults(address: str | None = None) -> None:
    """Set srbatch's defaults for environment variables Ray reads when it is imported (call before ``import ray``;
    a variable already set wins).

    - Never fold the actors' and training workers' own lines (:data:`NEVER_DEDUP_LOG_REGEX`).
    - With no ``address`` (a new single-machine cluster), bind every port to 127.0.0.1 (see
      ../shared/ENVIRONMENT.md) instead of the machine's network address. With a loopback ``address`` (a head
      started with ``ray start --head --node-ip-address 127.0.0.1``), keep that address as given: otherwise Ray
      rewrites 127.0.0.1 to the machine's network address, where such a head does not listen, and the driver
      waits for the GCS forever.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", NEVER_DEDUP_LOG_REGEX)
    if not address or is_loopback_address(address):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def ensure_ray(cfg: Any, *, dashboard: bool = False) -> bool:
    """Connect to the cluster at ``cfg.ray_address``, ``$RAY_ADDRESS``, or start a local one on 127.0.0.1 (with the
    dashboard, on 127.0.0.1 too, when ``dashboard``: Ray Train's state queries need it). Returns True when this call
    started Ray (so the caller shuts it down); :func:`ray_session` does both."""
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if "ray" not in sys.modules:
        ray_env_defaults(address)
    import ray

    if ray.is_initialized():
        return False
    if address:
        print(f"srbatch: joining the Ray cluster at {address}", file=sys.stderr, flush=True)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=True,
                 configure_logging=False)  # fmt: skip
    return True


@contextmanager
def ray_session(cfg: Any, *, dashboard: bool = False) -> Iterator[Any]:
    """``with ray_session(cfg) as ray:`` Ray connected as :func:`ensure_ray` does; on the way out a cluster this
    block started is shut down and one it joined is disconnected from (a connection made before is left alone)."""
    started = ensure_ray(cfg, dashboard=dashboard)
    import ray

    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
