"""Things of this machine: the sample images bundled with the package (the upscale job's embedded default input)."""

from __future__ import annotations

from importlib import resources

SAMPLES = "samples"


def sample_images_dir() -> str:
    """Folder of the sample images bundled with the package (CC0/public domain, see their PROVENANCE.md)."""
    return str(resources.files("srbatch") / "data" / SAMPLES)
