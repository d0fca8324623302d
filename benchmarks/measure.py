"""Measuring one run: peak memory (RSS on the CPU, the allocator's peak on CUDA), resident library code, the other
load on the machine while it ran (`OtherLoad`), and a `Contender`: one way of making the benchmark's image, timed
over warm-up and repeated runs. Also the probes that run in a fresh interpreter (`probe`, `run_probe`: loading and
importing) and what both pipelines need to load the same weights (`load_diffusers`, `torch_dtype`, `weight_bytes`)."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat (None where there is none)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


class OtherLoad:
    """How busy the machine was with other work while a block ran, in CPU cores: all CPUs' busy time (/proc/stat)
    minus this process's own CPU time, over the wall time. 0 on a quiet machine; on 2 cores, 1.0 means another
    process took a whole core for the whole run. ``cores`` is None where /proc/stat is missing."""

    def __enter__(self):
        self.t0, self.own0, self.cpu0 = time.perf_counter(), _own_cpu(), _cpu_jiffies()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        cpu1 = _cpu_jiffies()
        self.cores = None
        if self.cpu0 is not None and cpu1 is not None and wall > 0:
            busy = (cpu1[0] - self.cpu0[0]) / os.sysconf("SC_CLK_TCK")
            self.cores = max(0.0, (busy - (_own_cpu() - self.own0)) / wall)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def machine() -> dict:
    """The machine a result comes from: CPU model, cores, load averages now."""
    model = None
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "loadavg": list(os.getloadavg())}


# ---------------------------------------------------------------- loading the same weights, and fresh-interpreter probes
def weight_bytes(root: Path, itemsize: int = 4) -> int:
    """Bytes of the weights once loaded: transformer and text encoder at ``itemsize`` bytes an element, the VAE
    at 4 (both pipelines run it in fp32)."""
    from safetensors import safe_open

    total = 0
    for part in ("transformer", "text_encoder", "vae"):
        for f in (root / part).glob("*.safetensors"):
            with safe_open(f, "pt") as fh:
                n = sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
            total += n * (4 if part == "vae" else itemsize)
    return total


def torch_dtype(name: str, device: str):
    """The dtype the pack's loader picks for ``name`` (auto: fp32 on the CPU, bf16 or fp16 on CUDA)."""
    import torch

    from aura_flow.weights.devices import resolve_dtypes

    return resolve_dtypes(name, torch.device(device))[1]


def load_diffusers(root, device: str, dtype: str):
    """diffusers' AuraFlowPipeline in ``dtype``, its VAE in fp32 as the pack's (its decode casts the latents)."""
    import torch
    from diffusers import AuraFlowPipeline

    dpipe = AuraFlowPipeline.from_pretrained(root, local_files_only=True, torch_dtype=torch_dtype(dtype, device))
    dpipe.vae.to(torch.float32)
    return dpipe.to(device)


def probe(kind: str, arg: str, device: str = "cpu", dtype: str = "auto"):
    """Run in a fresh interpreter by `_subprocess`: prints one JSON line."""
    if kind == "import":  # exactly how ComfyUI imports a custom node folder (nodes.load_custom_node)
        import importlib.util

        path = Path(arg)
        name = str(path).replace(".", "_x_")
        t0 = time.perf_counter()
        spec = importlib.util.spec_from_file_location(name, str(path / "__init__.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        seconds = time.perf_counter() - t0
        print(json.dumps({"seconds": seconds, "torch_imported": "torch" in sys.modules}))
        return
    import torch  # noqa: F401  (imports are not part of the load)
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, AutoencoderKL  # noqa: F401
    from transformers import UMT5EncoderModel  # noqa: F401

    import aura_flow
    import aura_flow.pipeline.pipeline  # noqa: F401

    code = library_bytes()
    with Peak(device) as peak:
        t0 = time.perf_counter()
        if kind == "load-pack":
            model = aura_flow.load(arg, device=device, dtype=dtype)
        else:
            model = load_diffusers(arg, device, dtype)
        seconds = time.perf_counter() - t0
        # read every weight once, so that weights still mapped from the file and not yet paged in count too
        for part in ("transformer", "text_encoder", "vae"):
            for t in getattr(model, part).state_dict().values():
                t.float().sum() if t.dtype.itemsize < 2 else t.sum()
    code = library_bytes() - code
    del model
    # the code pages of shared libraries first used while loading (libtorch, tokenizers: ~8 MiB, a third of the
    # small presets' weights) are not model memory; they are reported apart and left out of the peak on the CPU
    peak_bytes = peak.added if peak.cuda else max(0, peak.added - code)
    print(json.dumps({"seconds": seconds, "peak_bytes": peak_bytes, "library_code_bytes": code}))


def run_probe(kind: str, arg, device: str = "cpu", dtype: str = "auto") -> dict:
    """`probe` in a fresh interpreter -> its JSON line."""
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.measure import probe; "
            f"probe({kind!r}, {str(arg)!r}, {device!r}, {dtype!r})")
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} probe failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])



# ---------------------------------------------------------------- contenders

class Contender:
    """One way of making the image; ``run()`` -> (image (H, W, 3) float32 in [0, 1], per-step timestamps)."""

    def __init__(self, name: str, run):
        self.name = name
        self.run = run
        self.times: list[float] = []
        self.step_times: list[float] = []
        self.peaks: list[int] = []
        self.other_load: list[float] = []  # other work on the machine during each timed run, in cores
        self.image = None
        self.warmup_seconds = None

    def measure(self, device: str, warmup: bool = False):
        with Peak(device) as peak, OtherLoad() as other:
            t0 = time.perf_counter()
            image, stamps = self.run()
            seconds = time.perf_counter() - t0
        if warmup:
            self.warmup_seconds = seconds
            return
        self.times.append(seconds)
        if other.cores is not None:
            self.other_load.append(other.cores)
        if len(stamps) > 1:
            self.step_times.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
        self.peaks.append(peak.added)
        self.image = image

    def summary(self) -> dict:
        best = min(self.times)
        return {"seconds_per_image": best, "seconds_per_image_median": statistics.median(self.times),
                "seconds_per_image_max": max(self.times), "spread": max(self.times) / best - 1,
                "other_load_cores": statistics.mean(self.other_load) if self.other_load else None,
                "other_load_cores_max": max(self.other_load) if self.other_load else None,
                "seconds_per_step": min(self.step_times) if self.step_times else math.nan,
                "seconds_per_step_median": statistics.median(self.step_times) if self.step_times else math.nan,
                "peak_memory_bytes": max(self.peaks), "warmup_seconds": self.warmup_seconds,
                "runs": len(self.times)}
