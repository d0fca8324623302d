"""Sampling: the registry of sampler and scheduler names, the noise schedules, the sampling loop (ComfyUI's
KSampler semantics) and the solvers, which mirror k-diffusion's function by function."""
