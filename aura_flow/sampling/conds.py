"""Conditioning with ComfyUI's options: several prompts, areas, masks, strengths and timestep ranges.

A `Cond` is one entry of a ComfyUI CONDITIONING list: a context tensor plus the options ComfyUI's own sampler honours
for this model (``area``, ``strength``, ``mask``, ``mask_strength``, ``set_area_to_bounds``, ``start_percent``,
``end_percent``). `CondDenoiser` predicts x0 from lists of them exactly as ComfyUI's ``comfy.samplers`` does for
AuraFlow, number for number:

- once per run (``process_conds``): percentage areas become latent units, masks are resized bilinearly to the
  latent, ``set_area_to_bounds`` turns a mask into its bounding box (at least 8x8), start/end percents become sigmas
  with the run's shift, and every entry with an area gets a twin in the other list (same options, the context of
  the smallest entry there that encloses it), so cond and uncond cover the same regions;
- each model call (``_calc_cond_batch``): an entry is skipped outside its sigma range; the model runs on the
  entry's area crop; its x0 is weighted by ``mask * mask_strength * strength`` (with an area and no mask, edges
  that do not touch the border fade over ``min(8, size // 4)`` latent pixels); the sum is divided by the summed
  weights (plus 1e-37), so where no entry applies the prediction is 0;
- CFG on x0: ``uncond + (cond - uncond) * cfg``; at cfg 1 the uncond list is not run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..errors import Interrupted, ParameterError
from .guidance import CFGDenoiser, _rows

__all__ = ["Cond", "CondDenoiser", "as_conds", "has_options", "resolve_conds"]


@dataclass(frozen=True)
class Cond:
    """One conditioning entry: ``context`` (1 or B, tokens, width) and ComfyUI's options (None: not set)."""

    context: torch.Tensor
    area: tuple | None = None  # (h, w, y, x) in latent pixels, or ("percentage", h, w, y, x) as fractions
    strength: float = 1.0
    mask: torch.Tensor | None = None  # (H, W) or (B, H, W), any size; resized to the latent
    mask_strength: float = 1.0
    set_area_to_bounds: bool = False
    start_percent: float | None = None
    end_percent: float | None = None
    # filled by resolve_conds: the sigma range the entry applies in
    sigma_start: float | None = field(default=None, compare=False)
    sigma_end: float | None = field(default=None, compare=False)

    @property
    def plain(self) -> bool:
        """No option set: the entry is just its context."""
        return (self.area is None and self.mask is None and self.strength == 1.0 and self.start_percent is None
                and self.end_percent is None)


def as_conds(value, name: str) -> list[Cond]:
    """A context tensor, a `Cond` or a list of them -> a list of `Cond`."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = [item if isinstance(item, Cond) else Cond(item) for item in items]
    if not out:
        raise ParameterError(f"{name}: no conditioning entries")
    for c in out:
        if not isinstance(c.context, torch.Tensor) or c.context.ndim != 3:
            raise ParameterError(f"{name} must hold (1, tokens, width) context tensors, got "
                                 f"{tuple(getattr(c.context, 'shape', ()))}")
    return out


def has_options(*values) -> bool:
    """True unless every value is a single plain entry (a bare context): those take the engine's batched CFG path."""
    for value in values:
        items = value if isinstance(value, (list, tuple)) else [value]
        if len(items) != 1 or (isinstance(items[0], Cond) and not items[0].plain):
            return True
    return False


# ------------------------------------------------------------------------------------------------ once per run
def _mask_box(mask: torch.Tensor) -> tuple:
    """``set_area_to_bounds``: the (h, w, y, x) box of the mask's non-zero pixels over the batch, at least 8x8."""
    bounds = mask.abs().max(dim=0).values
    if not bool((bounds != 0).any()):
        return (8, 8, 0, 0)
    ys, xs = torch.where(bounds != 0)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    return (max(8, y1 - y0 + 1), max(8, x1 - x0 + 1), y0, x0)


def _resolve(c: Cond, dims: tuple, model_sampling, device) -> Cond:
    changes = {}
    area = c.area
    if area is not None and area[0] == "percentage":
        a = area[1:]
        area = tuple(max(1, round(a[d] * dims[d])) for d in range(2)) + tuple(round(a[d + 2] * dims[d])
                                                                               for d in range(2))
        changes["area"] = area
    if c.mask is not None:
        mask = c.mask.to(device)
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if tuple(mask.shape[1:]) != tuple(dims):
            mask = F.interpolate(mask.unsqueeze(1), size=tuple(dims), mode="bilinear").squeeze(1)
        if c.set_area_to_bounds:
            changes["area"] = _mask_box(mask)
        changes["mask"] = mask
    if c.start_percent is not None:
        changes["sigma_start"] = model_sampling.percent_to_sigma(c.start_percent)
    if c.end_percent is not None:
        changes["sigma_end"] = model_sampling.percent_to_sigma(c.end_percent)
    return replace(c, **changes) if changes else c


def _inside(a: tuple, outer: tuple) -> bool:
    return a[2] >= outer[2] and a[3] >= outer[3] and a[0] + a[2] <= outer[0] + outer[2] and \
        a[1] + a[3] <= outer[1] + outer[3]


def _add_twin(conds: list, c: Cond) -> None:
    """ComfyUI's create_cond_with_same_area_if_none: give ``conds`` an entry over ``c``'s area."""
    if c.area is None:
        return
    smallest = None
    for x in conds:
        if x.area is not None:
            if _inside(c.area, x.area):
                if smallest is None or smallest.area is None or \
                        math.prod(smallest.area[:2]) > math.prod(x.area[:2]):
                    smallest = x
        elif smallest is None:
            smallest = x
    if smallest is None or (smallest.area is not None and tuple(smallest.area) == tuple(c.area)):
        return
    conds.append(replace(c, context=smallest.context))


def resolve_conds(positive, negative, latent_shape, model_sampling, device) -> tuple[list, list]:
    """Both lists ready for `CondDenoiser`, as ComfyUI's process_conds leaves them (areas, masks, sigma ranges and
    the twin entries)."""
    dims = tuple(latent_shape[2:])
    lists = [[_resolve(c, dims, model_sampling, device) for c in as_conds(v, name)]
             for v, name in ((positive, "positive"), (negative, "negative"))]
    for k, mine in enumerate(lists):
        for c in mine:
            _add_twin(lists[1 - k], c)
    return lists[0], lists[1]


# ------------------------------------------------------------------------------------------------ each model call
def _area_and_mult(c: Cond, x: torch.Tensor, sigma: torch.Tensor):
    """(input crop, weight, area) of one entry at ``sigma`` (a 0-d tensor, compared in its dtype as ComfyUI does),
    or None when the entry does not apply then."""
    if c.sigma_start is not None and sigma > c.sigma_start:
        return None
    if c.sigma_end is not None and sigma < c.sigma_end:
        return None
    area = None
    crop = x
    if c.area is not None:
        area = list(c.area)
        for i in range(2):
            area[i] = min(x.shape[i + 2] - area[2 + i], area[i])
            crop = crop.narrow(i + 2, area[2 + i], area[i])
    if c.mask is not None:
        mask = c.mask[:crop.shape[0]]
        if area is not None:
            for i in range(2):
                mask = mask.narrow(i + 1, area[2 + i], area[i])
        mask = mask * c.mask_strength
        mult = mask.unsqueeze(1).repeat((crop.shape[0] // mask.shape[0], crop.shape[1], 1, 1))
    else:
        mult = torch.ones_like(crop)
    mult = mult * c.strength
    if c.mask is None and area is not None:  # feather the edges that do not touch the border
        for i in range(2):
            rr = min(8, mult.shape[2 + i] // 4)
            if area[2 + i] != 0:
                for t in range(rr):
                    mult.narrow(i + 2, t, 1).mul_((1.0 / rr) * (t + 1))
            if area[i] + area[2 + i] < x.shape[i + 2]:
                for t in range(rr):
                    mult.narrow(i + 2, area[i] - 1 - t, 1).mul_((1.0 / rr) * (t + 1))
    return crop, mult, area


class CondDenoiser(CFGDenoiser):
    """`CFGDenoiser` over lists of `Cond` (see the module docstring); same attributes, ComfyUI's arithmetic.

    Entries of both lists whose crop and context shapes match run as one batched forward, as ComfyUI batches them."""

    def _predict(self, lists, x, sigma):
        outs = [torch.zeros_like(x) for _ in lists]
        counts = [torch.ones_like(x) * 1e-37 for _ in lists]
        runs = [r + (c, k) for k, conds in enumerate(lists) for c in conds
                if (r := _area_and_mult(c, x, sigma[0])) is not None]
        while runs:
            first = runs[0]
            group = [r for r in runs if r[0].shape == first[0].shape and
                     r[3].context.shape[1:] == first[3].context.shape[1:]]
            runs = [r for r in runs if all(r is not g for g in group)]
            n = first[0].shape[0]
            xs = torch.cat([r[0] for r in group])
            ctx = torch.cat([_rows(r[3].context, n, "conditioning").to(x.device) for r in group])
            sig = sigma.repeat(len(group))
            v = self._velocity(xs, sig, ctx).to(x.dtype)
            x0 = (xs - v * sig.view(-1, 1, 1, 1)).chunk(len(group))
            for (_crop, mult, area, _c, k), pred in zip(group, x0):
                o, w = outs[k], counts[k]
                if area is not None:
                    for i in range(2):
                        o, w = o.narrow(i + 2, area[2 + i], area[i]), w.narrow(i + 2, area[2 + i], area[i])
                o += pred * mult
                w += mult
        return [o / w for o, w in zip(outs, counts)]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_extra) -> torch.Tensor:
        if self.should_stop is not None and self.should_stop():
            raise Interrupted("sampling was cancelled")
        n = x.shape[0]
        sigma = sigma.to(x.dtype).reshape(-1).expand(n) if sigma.numel() == 1 else sigma.to(x.dtype)
        if not self.use_uncond:
            self.last_uncond = None
            return self._predict([self.positive], x, sigma)[0]
        cond, uncond = self._predict([self.positive, self.negative], x, sigma)
        self.last_uncond = uncond
        return uncond + (cond - uncond) * self.cfg
