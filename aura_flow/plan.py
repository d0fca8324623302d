"""One validated plan per run: every parameter is checked once, before any heavy work, into a frozen object that
the pipeline, the sampler, the nodes and the remote client take as it is, without checking again.

- `plan_generation(params, remote=False, speed="auto")` -> `GenerationPlan`: the hosted API's parameters with the
  seed resolved (None draws one, once), and for a local run its `SamplingPlan`.
- `plan_sampling(seed=..., steps=..., cfg=..., sampler=..., scheduler=..., shift=..., denoise=1.0, speed=None)`
  -> `SamplingPlan`: ComfyUI's KSampler settings with their schedule (exactly ComfyUI's sigmas) and the speed mode.
- `sigmas(scheduler, steps, shift=..., denoise=..., sampler=...)`: the schedule alone (``aura_flow.sigmas``).

The error messages are the checks' own (aura_flow.params): they name the parameter, the value and what is allowed.
Torch is imported only to compute a schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ParameterError
from .params import (DEFAULTS, Range, check_choice, check_noise_device, check_range, check_seed, check_shift,
                     validate_generation)
from .pipeline import modes
from .sampling.registry import SCHEDULER_NAMES, get_sampler

# ComfyUI's own step limit. It also bounds the schedule that denoise < 1 asks for (int(steps / denoise) steps, of
# which the last ``steps`` run), so a tiny denoise cannot ask for millions of sigmas.
MAX_SCHEDULE_STEPS = 10000
STEPS_ANY = Range(1, MAX_SCHEDULE_STEPS, 25, int, "number of sampling steps")


@dataclass(frozen=True)
class SamplingPlan:
    """Checked sampler settings and the schedule they make."""

    seed: int
    steps: int
    cfg: float
    sampler: str
    scheduler: str
    shift: float
    denoise: float = 1.0
    sigmas: tuple = ()  # float32 values, steps+1 of them ending in 0 (empty at denoise 0): what the sampler runs
    speed: object = None  # None (exact), "auto", a mode name or a SpeedOptions; resolved for the device at run time
    noise_device: str = "cpu"  # "cpu": ComfyUI's start noise; "gpu": drawn on the device the sampling runs on

    @property
    def sampler_info(self):
        return get_sampler(self.sampler)

    def sigmas_tensor(self):
        import torch

        return torch.tensor(self.sigmas, dtype=torch.float32)


@dataclass(frozen=True)
class GenerationPlan:
    """The hosted API's parameters of one text-to-image run, checked; ``sampling`` for a local run."""

    prompt: str
    negative_prompt: str
    cfg: float
    seed: int
    shift: float
    steps: int
    width: int
    height: int
    sampler: str
    scheduler: str
    number_of_images: int
    output_format: str
    output_quality: int
    remote: bool = False
    sampling: SamplingPlan | None = None

    def params(self) -> dict:
        """The parameters as the hosted API names them (what validate_generation returns)."""
        return {name: getattr(self, name) for name in DEFAULTS}

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return self.number_of_images, 4, self.height // 8, self.width // 8


def check_schedule_length(steps: int, denoise: float) -> None:
    from .sampling.schedules import schedule_length

    # steps / 1e-320 is inf, which int() cannot take: such lengths are only named
    n = schedule_length(steps, denoise) if denoise <= 0.0 or steps / denoise < 1e15 else steps / denoise
    if n > MAX_SCHEDULE_STEPS:
        raise ParameterError(f"denoise={denoise!r} with steps={steps} asks for a schedule of {n} steps (ComfyUI runs "
                             f"the last {steps} of int(steps / denoise)); at most {MAX_SCHEDULE_STEPS}: raise denoise "
                             f"to at least {steps / MAX_SCHEDULE_STEPS:.4g} or lower steps")


def _schedule(scheduler: str, steps: int, shift: float, denoise: float, sampler: str | None) -> tuple:
    """The schedule of checked settings, as a tuple of floats; ParameterError when ComfyUI's formula gives NaN."""
    import math

    from .sampling.schedules import ModelSampling, schedule

    discard = get_sampler(sampler).discard_penultimate if sampler is not None else False
    values = tuple(schedule(ModelSampling(shift), scheduler, steps, denoise=denoise,
                            discard_penultimate=discard).tolist())
    if any(math.isnan(v) for v in values):  # ComfyUI samples these into a NaN (black) image; say why instead
        raise ParameterError(f"scheduler={scheduler!r} gives no usable schedule for steps={steps} "
                             f"(ComfyUI's formula yields NaN); use at least 2 steps or another scheduler")
    return values


def _check_schedule_settings(scheduler, steps, shift, denoise, sampler):
    steps = check_range("steps", steps, STEPS_ANY)
    shift = check_shift(shift)
    denoise = check_range("denoise", denoise)
    if sampler is not None:
        get_sampler(sampler)
    check_choice("scheduler", scheduler, SCHEDULER_NAMES)
    check_schedule_length(steps, denoise)
    return steps, shift, denoise


def sigmas(scheduler: str, steps: int, *, shift: float = 1.73, denoise: float = 1.0, sampler: str | None = None):
    """Exactly ``comfy.samplers.KSampler(...).sigmas`` for AuraFlow patched with ``ModelSamplingAuraFlow(shift)``.

    ``sampler`` matters only for the samplers that drop the penultimate sigma (dpm_2, dpm_2_ancestral, uni_pc,
    uni_pc_bh2). Returns a float32 CPU tensor of steps+1 values ending in 0 (empty when denoise is 0).
    """
    import torch

    from .sampling.schedules import ModelSampling, schedule

    steps, shift, denoise = _check_schedule_settings(scheduler, steps, shift, denoise, sampler)
    discard = get_sampler(sampler).discard_penultimate if sampler is not None else False
    return schedule(ModelSampling(shift), scheduler, steps, denoise=denoise, discard_penultimate=discard) \
        .to(torch.float32)


def plan_sampling(*, seed, steps: int, cfg: float, sampler: str, scheduler: str, shift: float, denoise: float = 1.0,
                  speed=None, sigmas=None, noise_device: str = "cpu") -> SamplingPlan:
    """Check ComfyUI KSampler settings once and compute their schedule. ``seed=None`` draws one.

    ``sigmas`` (a 1-D sequence or tensor) replaces the schedule the settings make; ``speed`` is None (exact),
    "auto", a name of `aura_flow.pipeline.modes.MODES` or a `SpeedOptions`; ``noise_device``: "cpu" or "gpu"
    (`aura_flow.sampling.loop.prepare_noise`).
    """
    seed = check_seed(seed)
    cfg = check_range("cfg", cfg)
    get_sampler(sampler)
    check_choice("scheduler", scheduler, SCHEDULER_NAMES)
    shift = check_shift(shift)
    speed = modes.check(speed)
    noise_device = check_noise_device(noise_device)
    if sigmas is not None:
        return SamplingPlan(seed, int(steps), cfg, sampler, scheduler, shift, float(denoise),
                            _given_sigmas(sigmas), speed, noise_device)
    steps, shift, denoise = _check_schedule_settings(scheduler, steps, shift, denoise, sampler)
    return SamplingPlan(seed, steps, cfg, sampler, scheduler, shift, denoise,
                        _schedule(scheduler, steps, shift, denoise, sampler), speed, noise_device)


def _given_sigmas(values) -> tuple:
    import math

    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ParameterError("sigmas must be a 1-D sequence of finite numbers of 0 or more (a schedule ending in 0)")

    if len(values) > MAX_SCHEDULE_STEPS + 1:  # len() first: a million sigmas are refused before they are read
        raise ParameterError(f"sigmas: {len(values):,} values; at most {MAX_SCHEDULE_STEPS + 1} (a schedule of "
                             f"{MAX_SCHEDULE_STEPS} steps)")
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 for v in values):
        raise ParameterError("sigmas must be a 1-D sequence of finite numbers of 0 or more (a schedule ending in 0)")
    return tuple(float(v) for v in values)


def plan_generation(params: dict | None = None, *, remote: bool = False, speed="auto",
                    noise_device: str = "cpu") -> GenerationPlan:
    """Check the hosted API's parameters once (missing ones take their defaults; a typo is refused) into a plan.

    remote: the hosted service's ranges and names, and no schedule (the service makes its own).
    speed, noise_device: as `AuraFlowPipeline.generate`'s, for a local run.
    """
    p = validate_generation(params or {}, remote=remote)
    if remote:
        return GenerationPlan(**p, remote=True)
    speed = modes.check(speed)
    noise_device = check_noise_device(noise_device)
    check_schedule_length(p["steps"], 1.0)
    sampling = SamplingPlan(p["seed"], p["steps"], p["cfg"], p["sampler"], p["scheduler"], p["shift"], 1.0,
                            _schedule(p["scheduler"], p["steps"], p["shift"], 1.0, p["sampler"]), speed,
                            noise_device)
    return GenerationPlan(**p, sampling=sampling)


__all__ = ["SamplingPlan", "GenerationPlan", "plan_sampling", "plan_generation", "sigmas", "MAX_SCHEDULE_STEPS"]
