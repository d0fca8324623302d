"""Many images from a job file, exactly once each, resumable: ``python -m aura_flow batch JOBS --out DIR``.

- `model`: the shared vocabulary (Job, Sink, Backend).
- `jobs`: the job file (JSONL, CSV, text) read streaming into checked jobs, with ``--seeds`` / ``--grid``.
- `manifest`: ``DIR/manifest.jsonl``, the append-only record a rerun resumes from.
- `runner`: ``run(jobs_file, out, backend=...)`` -> `Summary`; the sink that writes images and manifest lines;
  `BACKENDS`, the registry of backends by name.
- `progress`: the bar on a terminal, log lines otherwise.
- `local`: the in-process engine backend.

``aura_flow.batch.run`` is `runner.run`, imported when first used.
"""


def run(jobs_file, out, **kwargs):
    """`aura_flow.batch.runner.run` (see there)."""
    from .runner import run as _run

    return _run(jobs_file, out, **kwargs)
