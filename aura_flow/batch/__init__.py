"""Many images from a job file, exactly once each, resumable: ``python -m aura_flow batch JOBS --out DIR``.

- `model`: the shared vocabulary (Job, Sink, Backend).
"""
