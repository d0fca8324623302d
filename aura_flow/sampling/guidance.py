"""The guided x0 predictor the samplers call: classifier-free guidance over a velocity model (ComfyUI's CFG for a
CONST flow model: x0 = x - sigma * v, then ``uncond + (cond - uncond) * cfg``)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import Interrupted, ParameterError

__all__ = ["CFGDenoiser"]


def _rows(context: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if context.ndim != 3:
        raise ParameterError(f"{name} must be a (1, tokens, width) context tensor, got shape {tuple(context.shape)}")
    if context.shape[0] == n:
        return context
    if context.shape[0] == 1:
        return context.expand(n, -1, -1)
    raise ParameterError(f"{name} has {context.shape[0]} rows for a batch of {n}; give 1 row or one per image")


class CFGDenoiser:
    """Turns a velocity model into the guided x0 predictor that k-diffusion style samplers call.

    Cond and uncond run as one batched forward when their token counts match. ``last_uncond`` holds the
    unconditional x0 of the latest call (CFG++ samplers read it). With cfg == 1 the uncond pass is skipped unless
    a sampler needs it.
    """

    def __init__(self, model, positive, negative, cfg: float, *, need_uncond: bool = False,
                 should_stop: Callable[[], bool] | None = None, model_sampling=None):
        self.model = model
        self.model_sampling = model_sampling  # the shift's ModelSampling; a few log-SNR samplers read it
        self.positive = positive
        self.negative = negative
        self.cfg = float(cfg)
        self.use_uncond = need_uncond or not math.isclose(self.cfg, 1.0)
        self.should_stop = should_stop
        self.last_uncond = None
        self.calls = 0

    def _velocity(self, x, sigma, context):
        self.calls += x.shape[0]
        return self.model(x, sigma, context)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_extra) -> torch.Tensor:
        if self.should_stop is not None and self.should_stop():
            raise Interrupted("sampling was cancelled")
        n = x.shape[0]
        sigma = sigma.to(x.dtype).reshape(-1).expand(n) if sigma.numel() == 1 else sigma.to(x.dtype)
        pos = _rows(self.positive, n, "positive").to(device=x.device)
        sig4 = sigma.view(n, 1, 1, 1)
        if not self.use_uncond:
            self.last_uncond = None
            return x - self._velocity(x, sigma, pos).to(x.dtype) * sig4
        neg = _rows(self.negative, n, "negative").to(device=x.device)
        if pos.shape[1:] == neg.shape[1:]:
            v = self._velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([pos, neg])).to(x.dtype)
            v_cond, v_uncond = v[:n], v[n:]
        else:
            v_cond = self._velocity(x, sigma, pos).to(x.dtype)
            v_uncond = self._velocity(x, sigma, neg).to(x.dtype)
        cond = x - v_cond * sig4
        uncond = x - v_uncond * sig4
        self.last_uncond = uncond
        return uncond + (cond - uncond) * self.cfg
