"""The reference NIQE for tests: BasicSR's own ``basicsr/metrics/niqe.py``, loaded from the installed package.

BasicSR (XPixelGroup/BasicSR v1.4.2, Apache-2.0, on PyPI as the sdist ``basicsr-fixed==1.4.2``) documents that its
``niqe`` reproduces MATLAB R2021a's ``niqe`` on its test image to about 1e-6 (5.7295763 vs 5.72957338).
``scripts/setup.sh`` installs it for the tests with ``--no-deps --no-build-isolation``: its declared dependencies
(tb-nightly, a second torch build) are not needed by the NIQE code, and ``import basicsr`` itself fails with current
torchvision. So the package ``__init__`` files are skipped: the parent packages are registered as empty modules whose
``__path__`` is the installed folder, and exactly the files the NIQE code uses are imported from there
(``utils/color_util.py``, ``utils/registry.py``, ``utils/matlab_functions.py``, ``metrics/metric_util.py``,
``metrics/niqe.py``), unmodified. Not part of srbatch; never imported by the package.

``basicsr_niqe`` is that module; its attributes are BasicSR's: ``niqe(img, mu_pris_param, cov_pris_param, gaussian_window, ...)``,
``compute_feature(block)``, ``estimate_aggd_param(block)`` and ``imresize(img, scale, antialiasing=True)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest


def _load() -> types.ModuleType:
    spec = importlib.util.find_spec("basicsr")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the NIQE reference is missing: run `bash scripts/setup.sh` (it installs basicsr-fixed==1.4.2 "
                    "with --no-deps --no-build-isolation for the tests)")  # fmt: skip
    root = Path(next(iter(spec.submodule_search_locations)))
    saved = {k: v for k, v in sys.modules.items() if k == "basicsr" or k.startswith("basicsr.")}
    try:
        for name, folder in (("basicsr", root), ("basicsr.utils", root / "utils"), ("basicsr.metrics", root / "metrics")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(folder)]
            sys.modules[name] = pkg
        sys.modules["basicsr.utils"].bgr2ycbcr = importlib.import_module("basicsr.utils.color_util").bgr2ycbcr
        sys.modules["basicsr.utils"].__path__ = [str(root / "utils")]
        return importlib.import_module("basicsr.metrics.niqe")
    finally:  # leave no half-imported basicsr behind for other tests
        for k in [k for k in sys.modules if k == "basicsr" or k.startswith("basicsr.")]:
            del sys.modules[k]
        sys.modules.update(saved)


basicsr_niqe = _load()
"""BasicSR's ``basicsr.metrics.niqe`` module (patch its ``imresize`` attribute to change the resize it uses)."""
