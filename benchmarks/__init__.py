"""Benchmarks of the pack against diffusers (and ComfyUI): ``python -m benchmarks.run --help``."""
