#!/usr/bin/env bash
# The GPU check of issue #16, in one script that finishes in under 8 minutes on one GPU.
#
#   bash scripts/gpu-check.sh --prepare   # here (registry access): download into .gpu-wheels/ the wheels the GPU
#                                         # machine lacks (pydantic, pytest and their dependencies; a few MB)
#   bash scripts/gpu-check.sh             # on the GPU machine (no registry): install them from .gpu-wheels/ into a
#                                         # target folder, then run `python -m srbatch.benchmark.gpu` and the
#                                         # gpu-marked tests; exit status non-zero if any part failed
#   bash scripts/gpu-check.sh --dry-run   # anywhere: the same on the CPU (the benchmark's --dry-run; gpu tests skip)
#
# srbatch is imported from this checkout (PYTHONPATH), not installed: no setuptools or `pip install -e` is needed.
# The GPU machine has torch, pyarrow, pillow, fsspec, tifffile, safetensors but no Ray, pydantic, s3fs or spandrel:
# nothing here needs Ray (the engine and the job's actor class run in-process); see srbatch/benchmark/gpu.py.
# Environment: PYTHON (interpreter), GPU_CHECK_SITE (install target), GPU_CHECK_PYTHONS (--prepare: versions).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WHEELS="$ROOT/.gpu-wheels"
MODE=run
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --dry-run) MODE=dry ;;
  "") ;;
  -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
  *) echo "gpu-check: unknown argument ${1}; use --prepare, --dry-run or nothing" >&2; exit 2 ;;
esac

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ "$MODE" != run ] && [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"
else PY=$(command -v python3 || command -v python); fi
[ -n "$PY" ] || { echo "gpu-check: no python3 on PATH; set PYTHON" >&2; exit 2; }

# The packages the check needs beyond the GPU machine's image, pinned to this checkout's venv when it has them.
PKGS="pydantic pydantic-core annotated-types typing-extensions typing-inspection pytest pluggy iniconfig packaging pygments pytest-timeout"

if [ "$MODE" = prepare ]; then
  PIN=$("$PY" - "$PKGS" <<'EOF'
import sys
from importlib import metadata
out = []
for name in sys.argv[1].split():
    try:
        out.append(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        out.append(name)
print(" ".join(out))
EOF
)
  mkdir -p "$WHEELS"
  for v in ${GPU_CHECK_PYTHONS:-3.10 3.11 3.12 3.13}; do
    echo "gpu-check: downloading for CPython $v manylinux2014 x86_64: $PIN"
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version "$v" \
      --implementation cp --platform manylinux2014_x86_64 -d "$WHEELS" $PIN || { echo "gpu-check: download failed" >&2; exit 1; }
  done
  ls -l "$WHEELS"
  total=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
  echo "gpu-check: $(ls "$WHEELS"/*.whl | wc -l) wheels, $((total / 1024)) KiB in .gpu-wheels/ (the device machine takes 64 MiB per call)"
  exit 0
fi

DRY=()
[ "$MODE" = dry ] && DRY=(--dry-run)
TO() { if command -v timeout >/dev/null 2>&1; then timeout --kill-after=10 "$@"; else shift; "$@"; fi; }
FAILED=()
START=$(date +%s)

echo "== gpu-check ($MODE): $PY, repo $ROOT"
SITE="${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/srbatch-gpu-site}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if "$PY" -c "import pydantic, pytest, pytest_timeout, sys; sys.exit(int(pydantic.VERSION.split('.')[0]) < 2)" 2>/dev/null; then
  echo "gpu-check: pydantic 2, pytest and pytest-timeout already importable: nothing to install"
elif [ -d "$WHEELS" ]; then
  echo "gpu-check: installing pydantic, pytest, pytest-timeout from .gpu-wheels/ into $SITE (no registry)"
  mkdir -p "$SITE"
  if "$PY" -m pip --version >/dev/null 2>&1; then
    TO 60 "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" --target "$SITE" \
      --upgrade pydantic pytest pytest-timeout || FAILED+=("install")
  else  # no pip: a wheel is a zip of the installed files; unpack those for this interpreter
    echo "gpu-check: no pip here: unpacking the wheels for this interpreter"
    "$PY" - "$WHEELS" "$SITE" <<'EOF' || FAILED+=("install")
import sys, zipfile
from pathlib import Path
tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    parts = whl.stem.split("-")
    if parts[-3] in ("py3", "py2.py3") or parts[-3] == tag:
        zipfile.ZipFile(whl).extractall(sys.argv[2])
        print("  unpacked", whl.name)
EOF
  fi
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
else
  echo "gpu-check: pydantic or pytest missing and no .gpu-wheels/ (run 'bash scripts/gpu-check.sh --prepare' where a registry is reachable and carry .gpu-wheels)" >&2
  FAILED+=("install")
fi
echo "gpu-check: PYTHONPATH=$PYTHONPATH"

echo "== environment"
"$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "torchvision", "numpy", "pyarrow", "PIL", "fsspec", "tifffile", "safetensors", "pydantic",
             "pytest", "setuptools", "ray", "s3fs", "spandrel", "srbatch"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:12} {getattr(m, '__version__', getattr(m, 'VERSION', '?'))}  {getattr(m, '__file__', '')}")
    except Exception as e:
        print(f"  {name:12} missing ({type(e).__name__})")
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
EOF
if command -v nvidia-smi >/dev/null 2>&1; then TO 20 nvidia-smi; else echo "no nvidia-smi here"; fi

# Time: the whole script stays under GPU_CHECK_SECONDS (470); pytest keeps 140 s of it, the benchmark gets the rest
# (its --budget 45 s less, for the part in progress at its deadline; `timeout` then stops it with SIGTERM, and it
# still prints what it measured).
TOTAL=${GPU_CHECK_SECONDS:-470}
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
BENCH_T=$(( $(left) - 140 )); [ $BENCH_T -ge 60 ] || BENCH_T=60
echo "== benchmark: python -m srbatch.benchmark.gpu ${DRY[*]} --budget $((BENCH_T - 45)) (stopped after ${BENCH_T} s)"
TO "$BENCH_T" "$PY" -m srbatch.benchmark.gpu "${DRY[@]}" --budget $((BENCH_T - 45))
rc=$?
[ $rc -eq 0 ] || FAILED+=("benchmark (exit $rc$([ $rc -eq 124 ] && echo ': timed out'))")

echo "== pytest -m gpu"
mapfile -t FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py)
if [ ${#FILES[@]} -eq 0 ]; then
  echo "gpu-check: no test file under tests/ has the gpu marker" >&2
  FAILED+=("pytest -m gpu (no gpu-marked tests found)")
else
  echo "gpu-marked test files: ${FILES[*]}"
  PYTEST_T=$(( $(left) - 5 )); [ $PYTEST_T -ge 60 ] || PYTEST_T=60
  TIMEOUT_OPT=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT=(--timeout 120)
  echo "(stopped after ${PYTEST_T} s; 120 s per test)"
  TO "$PYTEST_T" "$PY" -m pytest -m gpu -q -p no:cacheprovider "${TIMEOUT_OPT[@]}" "${FILES[@]}"
  rc=$?
  [ $rc -eq 0 ] || FAILED+=("pytest -m gpu (exit $rc$([ $rc -eq 124 ] && echo ': timed out'))")
fi

echo "== gpu-check ($MODE) took $(( $(date +%s) - START )) s"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'gpu-check: FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "gpu-check: every part passed"
