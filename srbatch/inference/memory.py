"""Memory figures for the engine's budget: sizes like ``4GiB``, the memory the machine can still give, and the peak
memory of a piece of work measured on the real process (Linux ``VmHWM``) or the CUDA allocator.

Measuring beats guessing here: activation memory depends on the architecture (and on spandrel models we know nothing
about), so :class:`~srbatch.inference.Upscaler` runs its own region pipeline on two small probe regions and fits
``bytes = a + b * pixels`` (see :func:`measure_peak`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from srbatch.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the job's CPU steps parse sizes without loading it
    import torch

__all__ = ["available_memory", "bound_heap", "format_bytes", "measure_peak", "parse_bytes", "peak_rss", "rss"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: str | int | float | None, *, field: str = "max_memory") -> int | None:
    """``"4GiB"``, ``"512MB"``, ``"2.5G"``, ``1073741824`` -> bytes; None or ``"auto"`` -> None.

    Decimal units (k, M, G, T, with or without B) are powers of 1000; KiB, MiB, GiB, TiB powers of 1024.
    Anything else -> :class:`ConfigError` naming ``field``.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{field}: expected a size such as 4GiB or 512MB, or 'auto'; got {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        text = str(value).strip()
        if text.lower() == "auto":
            return None
        m = _SIZE.match(text)
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS:
            raise ConfigError(
                f"{field}: expected a size such as 4GiB, 512MB or 2.5G (or 'auto'); got {value!r}"
            )
        n = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(n) or n < 16 * 1024**2:
        raise ConfigError(f"{field}: {value!r} is below the smallest workable budget of 16 MiB; give at least 16MiB")
    return int(n)


def format_bytes(n: float) -> str:
    """``1288490188`` -> ``'1.20 GiB'``."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int:
    """Bytes this process can still allocate: ``MemAvailable`` of ``/proc/meminfo``, capped by the cgroup's
    (v2 or v1) limit minus its usage, as in a container or a Kubernetes pod. 4 GiB when nothing can be read."""
    candidates: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):  # fmt: skip
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            candidates.append(max(limit - usage, 0))
    return min(candidates) if candidates else 4 * 1024**3


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss() -> int | None:
    """Resident set size of this process in bytes (``VmRSS``), None off Linux."""
    return _status_kib("VmRSS")


_PEAK_BEFORE_RESET = 0


def peak_rss() -> int | None:
    """Peak resident set size of this process in bytes over its whole life (``VmHWM``, and the highest value it had
    before :func:`measure_peak` reset it), None off Linux."""
    hwm = _status_kib("VmHWM")
    return None if hwm is None else max(hwm, _PEAK_BEFORE_RESET)


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), remembering the old
    peak for :func:`peak_rss`."""
    global _PEAK_BEFORE_RESET
    _PEAK_BEFORE_RESET = max(_PEAK_BEFORE_RESET, _status_kib("VmHWM") or 0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


_LIBC: ctypes.CDLL | None | bool = False


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``), so a later peak counts new memory only."""
    global _LIBC
    if _LIBC is False:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else None
            if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):
                _LIBC = None
        except OSError:
            _LIBC = None
    if _LIBC:
        _LIBC.malloc_trim(0)


_HEAP_BOUND = False


def bound_heap() -> None:
    """Make glibc return large freed blocks to the system at once (``mallopt(M_MMAP_THRESHOLD, 1 MiB)``, which also
    stops glibc raising that threshold as blocks are freed). Without it, regions of slightly different sizes leave
    freed blocks on the heap that later ones cannot reuse, and the peak RSS of a long tiled image creeps 20-30% over
    the plan. Process-wide, once; a no-op off glibc. Large allocations then cost an mmap each: negligible next to a
    region's compute."""
    global _HEAP_BOUND
    if _HEAP_BOUND:
        return
    _HEAP_BOUND = True
    _trim_heap()  # loads libc
    if _LIBC and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD


def measure_peak(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory ``fn()`` added, in bytes: on CUDA the allocator's peak over what was allocated before; on CPU the
    process's peak RSS over its RSS before (heap trimmed first). None when it cannot be measured (not Linux)."""
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(int(torch.cuda.max_memory_allocated(device)) - int(base), 0)
    _trim_heap()
    before = rss()
    if before is None or not _reset_peak_rss():
        return None
    fn()
    peak = _status_kib("VmHWM")
    return None if peak is None else max(peak - before, 0)
