"""What the batch tests share: a manifest's records, and the batch command run in a subprocess that gets a signal
once its manifest shows a given state (a Ctrl-C or a crash at a chosen moment)."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from aura_flow.batch.manifest import read_records


def records(out) -> list[dict]:
    """The manifest's records in ``out`` ([] while there is none)."""
    path = Path(out) / "manifest.jsonl"
    return [r for _, r in read_records(path)] if path.exists() else []


def signal_when(cmd, out, ready, sig, *, env=None, cwd=None, timeout: float = 240.0) -> tuple[int, str, str]:
    """Run ``cmd``; once ``ready(records(out))`` holds, send it ``sig``. Returns (returncode, stdout, stderr).

    Fails (AssertionError with its stderr) when the command ends first or ``timeout`` passes; the process never
    outlives the call."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready(records(out)):
            if proc.poll() is not None or time.monotonic() >= deadline:
                proc.kill()
                raise AssertionError(f"the command ended or stalled before the manifest was ready:\n"
                                     f"{proc.communicate()[1][-3000:]}")
            time.sleep(0.02)
        os.kill(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout, stderr
