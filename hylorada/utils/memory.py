"""The one peak-memory probe (`PeakMemory`): CUDA's allocator peak, or the CPU resident set."""
from __future__ import annotations

import gc
import re
import sys
from pathlib import Path
from typing import Any

import torch


def _proc_status_kb(field_name: str) -> int | None:
    """A `kB` field (VmRSS, VmHWM) of /proc/self/status; None where there is no /proc."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def _malloc_trim() -> None:
    """glibc keeps freed memory in its arenas (RSS stays high); malloc_trim returns it to the OS."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block, in MiB (`mb`) and how it was measured (`kind`): CUDA
    max_memory_allocated ("cuda_max_allocated"), or on CPU the peak resident set size above the
    RSS at the start (after gc and malloc_trim; Linux: VmHWM reset through /proc/self/clear_refs,
    "cpu_peak_rss_delta"; elsewhere the growth of the process's lifetime peak ru_maxrss, a lower
    bound, "cpu_maxrss_growth")."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.kind = "none"
        self.mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
            return self
        gc.collect()
        _malloc_trim()  # give freed heap memory back, so that the RSS baseline is what is in use
        self._rss0 = _proc_status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.kind = "cpu_peak_rss_delta"
        except OSError:
            import resource

            self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.kind = "cpu_maxrss_growth"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind == "cpu_peak_rss_delta":
            hwm = _proc_status_kb("VmHWM")
            if hwm is not None and self._rss0 is not None:
                self.mb = max(0, hwm - self._rss0) / 1024
        elif self.kind == "cpu_maxrss_growth":
            import resource

            grow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._maxrss0
            self.mb = max(0, grow) / (2**20 if sys.platform == "darwin" else 1024)
