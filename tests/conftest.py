"""Shared fixtures. Reference data lives in ../shared/refs beside the checkout and is never copied here."""

from __future__ import annotations

import os
from pathlib import Path

# Read by Ray at import: every Ray port of the test session's clusters binds to 127.0.0.1 (../shared/ENVIRONMENT.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFS = Path(os.environ.get("SRBATCH_REFS", ROOT.parent / "shared" / "refs"))
"""The one place tests find the reference data: ``$SRBATCH_REFS``, else ../shared/refs beside the checkout."""

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def refs_or_skip(what: str = "EXPECTED.md") -> Path:
    """``REFS`` when ``REFS / what`` exists. Otherwise skip with the reason, or fail when ``SRBATCH_REQUIRE_REFS=1``
    (CI sets it, so that missing reference data is an error there instead of a row of silent skips)."""
    if (REFS / what).exists():
        return REFS
    msg = (
        f"reference data not found: {REFS / what} is missing (expected ../shared/refs beside the checkout, "
        "or set SRBATCH_REFS to its path)"
    )
    if os.environ.get("SRBATCH_REQUIRE_REFS") == "1":
        pytest.fail(f"SRBATCH_REQUIRE_REFS=1 and {msg}", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def refs() -> Path:
    """The shared reference folder (see :func:`refs_or_skip`): skipped when absent, a failure under
    ``SRBATCH_REQUIRE_REFS=1``."""
    return refs_or_skip()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint over HTTP on 127.0.0.1 (moto's server), with the standard AWS_* variables pointing at it.

    Yields the endpoint URL. Nothing listens beyond loopback; the metadata service is disabled.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the local S3 server; yields its name."""
    import re

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    fs.invalidate_cache()
    yield name


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the session (2 CPUs, loopback only), started after the S3 server so that its workers
    inherit the AWS_* variables pointing at it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()
