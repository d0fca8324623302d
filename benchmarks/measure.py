"""Measuring one run: peak memory (RSS on the CPU, the allocator's peak on CUDA), resident library code, and a
`Contender`: one way of making the benchmark's image, timed over warm-up and repeated runs."""
from __future__ import annotations

import math
import statistics
import time


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss() -> int:
    value = _status_bytes("VmRSS")
    if value is not None:
        return value
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: the best there is


def library_bytes() -> int:
    """Resident bytes of this process's shared-library mappings (code pages: they stay once used)."""
    total, library = 0, False
    try:
        with open("/proc/self/smaps") as fh:
            for line in fh:
                head = line.split()
                if head and not head[0].endswith(":"):  # a mapping's header line: range perms offset dev inode path
                    library = len(head) > 5 and (head[5].endswith(".so") or ".so." in head[5])
                elif library and head[0] == "Rss:":
                    total += int(head[1]) * 1024
    except OSError:
        pass
    return total


class Peak:
    """Peak memory of a block: RSS on the CPU (Linux resets the high-water mark through clear_refs), else the
    CUDA allocator's peak."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                pass
            self.base = rss()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = _status_bytes("VmHWM") or rss()
        self.added = max(0, self.peak - self.base)


# ---------------------------------------------------------------- model and probes

class Contender:
    """One way of making the image; ``run()`` -> (image (H, W, 3) float32 in [0, 1], per-step timestamps)."""

    def __init__(self, name: str, run):
        self.name = name
        self.run = run
        self.times: list[float] = []
        self.step_times: list[float] = []
        self.peaks: list[int] = []
        self.image = None
        self.warmup_seconds = None

    def measure(self, device: str, warmup: bool = False):
        with Peak(device) as peak:
            t0 = time.perf_counter()
            image, stamps = self.run()
            seconds = time.perf_counter() - t0
        if warmup:
            self.warmup_seconds = seconds
            return
        self.times.append(seconds)
        if len(stamps) > 1:
            self.step_times.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
        self.peaks.append(peak.added)
        self.image = image

    def summary(self) -> dict:
        return {"seconds_per_image": min(self.times), "seconds_per_image_median": statistics.median(self.times),
                "seconds_per_step": min(self.step_times) if self.step_times else math.nan,
                "seconds_per_step_median": statistics.median(self.step_times) if self.step_times else math.nan,
                "peak_memory_bytes": max(self.peaks), "warmup_seconds": self.warmup_seconds,
                "runs": len(self.times)}
