"""The comparison job: several models on the same images, measured (reference mode) and shown side by side in a
self-contained HTML report, with a Parquet table of every image x model (``jobs/compare.py``, ``srbatch compare``)."""

from srbatch.compare.cli import main
from srbatch.compare.config import CompareConfig, Crop, load_compare_config
from srbatch.compare.runner import CompareResult, run_compare

__all__ = ["CompareConfig", "CompareResult", "Crop", "load_compare_config", "main", "run_compare"]
