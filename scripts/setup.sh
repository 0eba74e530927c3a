#!/usr/bin/env bash
# Create .venv and install srbatch with its test tools. Idempotent: a second run only checks.
# torch is installed first and pinned (constraints.txt), so no other package can swap in a multi-GB build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "srbatch setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "srbatch setup: installing torch==2.14.1 torchvision==0.29.1"
  pip_install -c constraints.txt torch==2.14.1 torchvision==0.29.1
fi
echo "srbatch setup: installing srbatch and its dependencies"
pip_install -c constraints.txt -e ".[test]"
# The NIQE tests' reference: BasicSR's own niqe.py (sdist only; its declared dependencies, tb-nightly and a second
# torch build, are not needed by that file, so it is installed without them; tests/_niqe_reference.py loads it).
if ! .venv/bin/python -c "import importlib.util as u; assert u.find_spec('basicsr')" 2>/dev/null; then
  pip_install --no-deps --no-build-isolation basicsr-fixed==1.4.2
fi
# The comparison report's browser test drives Debian's Chromium (headless) through chromedriver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "srbatch setup: installing Debian's chromium and chromium-driver (for the report's browser test)"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "srbatch setup: no apt-get: install chromium and chromedriver yourself for the report's browser test" >&2
  fi
fi
.venv/bin/python -c "import torch, torchvision, spandrel, ray, srbatch; print('srbatch setup: ok (torch', torch.__version__ + ', ray', ray.__version__ + ')')"
