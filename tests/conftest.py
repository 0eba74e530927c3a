"""Shared fixtures. Reference data lives in ../shared/refs beside the checkout and is never copied here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFS = Path(os.environ.get("SRBATCH_REFS", ROOT.parent / "shared" / "refs"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def refs() -> Path:
    """The shared reference folder; tests using it skip with the reason when it is absent."""
    if not (REFS / "EXPECTED.md").is_file():
        pytest.skip(f"reference data not found at {REFS} (expected ../shared/refs beside the checkout, or set SRBATCH_REFS)")
    return REFS
