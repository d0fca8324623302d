"""The ``local`` batch backend: the in-process engine. The model loads once (in ``check``); LoRA sets switch between
jobs without reloading; each image is encoded exactly as the ``generate`` command encodes it (same bytes)."""
from __future__ import annotations

import logging
import platform
import time

from ..errors import Interrupted, LoadError, NumericError, ParameterError
from ..params import DTYPES, check_choice, check_noise_device
from ..pipeline import modes

log = logging.getLogger(__name__)


class LocalBackend:
    """Runs jobs one after another on one loaded `AuraFlowPipeline` (``pipe`` given, or loaded from
    ``checkpoint`` with ``tokenizer``/``text_encoder``/``vae``/``dtype``/``device`` as ``aura_flow.load`` takes
    them). ``speed``, ``noise_device``: as ``generate``'s."""

    name = "local"
    remote = False
    accepts_sets = False
    checks_lora_files = True

    def __init__(self, checkpoint=None, *, tokenizer=None, text_encoder=None, vae=None, dtype="auto",
                 device="auto", speed="auto", noise_device="cpu", pipe=None):
        self.load_args = dict(checkpoint=checkpoint, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                              dtype=check_choice("dtype", dtype, DTYPES), device=device)
        self.speed = modes.check(speed)
        self.noise_device = check_noise_device(noise_device)
        self.pipe, self._owned = pipe, pipe is None
        self._loras = None  # the LoRA list now set on the pipeline

    def check(self) -> None:
        """Load the model (once): a bad file is a LoadError before any job runs."""
        if self.pipe is None:
            from ..pipeline.pipeline import load

            if not self.load_args["checkpoint"]:
                raise ParameterError("checkpoint is required for the local backend; give checkpoint=PATH (a "
                                     "diffusers folder or .safetensors)")
            self.pipe = load(**self.load_args)

    def _set_loras(self, loras) -> None:
        if self._loras != loras:
            self.pipe.set_loras(list(loras))  # prepared once per file version: switching reads nothing again
            self._loras = loras

    def run_one(self, job, stop):
        """The job's encoded images (bytes), exactly as ``generate`` writes them."""
        from ..images import encode_image
        from ..plan import plan_generation

        plan = plan_generation(dict(job.params), speed=self.speed, noise_device=self.noise_device)
        self._set_loras(job.loras)
        result = self.pipe.generate(plan, should_stop=stop.is_set)
        return [encode_image(img, plan.output_format, plan.output_quality, metadata=result.metadata())
                for img in result.images]

    def run(self, jobs, sink, stop) -> None:
        self.check()
        where = {"worker": f"{platform.node()}/{self.pipe.device}"}
        for job in jobs:
            if stop.is_set():
                return
            sink.started(job, where)
            t0 = time.perf_counter()
            try:
                images = self.run_one(job, stop)
            except Interrupted:
                return  # stop was set within the job: it stays unfinished, a rerun does it
            except (ParameterError, LoadError, NumericError) as exc:
                log.warning("line %d: %s", job.line, exc)
                sink.failed(job, str(exc), where=where, seconds=time.perf_counter() - t0)
                continue
            sink.done(job, images, where=where, seconds=time.perf_counter() - t0)

    def close(self) -> None:
        if self._owned:
            self.pipe = None  # the loaded model goes with the backend; a pipeline given stays the caller's


def make(**options) -> LocalBackend:
    return LocalBackend(**options)


__all__ = ["LocalBackend", "make"]
