"""Things shipped in the package: the sample images (the upscale job's embedded default input) and the default models
(trained by the training job on CC0 images; see ``srbatch/data/models/PROVENANCE.md``)."""

from __future__ import annotations

from importlib import resources

SAMPLES = "samples"


def sample_images_dir() -> str:
    """Folder of the sample images bundled with the package (CC0/public domain, see their PROVENANCE.md)."""
    return str(resources.files("srbatch") / "data" / SAMPLES)


MODELS = "models"
DEFAULT_SCALES = (2, 4)


def default_model_path(scale: int | None) -> str:
    """The shipped ``default`` model for ``scale`` (x2 or x4): the folder holding ``model.safetensors`` and its card."""
    from srbatch.errors import ConfigError

    if scale is None:
        raise ConfigError("--model default needs a scale: --scale 2 or --scale 4 choose the shipped variant")
    if int(scale) not in DEFAULT_SCALES:
        raise ConfigError(
            f"the shipped default model exists for x2 and x4, not x{scale}; use --scale 2 or 4 (or --outscale "
            f"{scale} with --scale 4 to resize its output)"
        )
    path = resources.files("srbatch") / "data" / MODELS / f"default-x{int(scale)}"
    if not (path / "model.safetensors").is_file():
        raise ConfigError(f"the default x{scale} weights are missing from this installation ({path}); reinstall srbatch")
    return str(path)
