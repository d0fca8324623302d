"""What each fal model takes, and the node's widgets mapped onto it: a value the user set that the model cannot
honour is refused before any request, naming the widget (or flag) and the provider; a widget left at its default is
simply not sent, so the model's own default applies.

Verified on 2026-12-04 against fal's model pages and its JS client's endpoint types (``@fal-ai/client``,
libs/client/src/types: ``AuraFlowInput``/``AuraFlowOutput``; the pony-v7 model page's input/output schema):

- ``fal-ai/aura-flow`` input: ``prompt`` (required), ``num_images`` (default 1), ``seed``, ``guidance_scale``
  (default 3.5), ``num_inference_steps`` (default 50; 20-50 per the task's brief, not in the types), ``expand_prompt``
  (default **true** upstream: it rewrites the prompt, so this client always sends it, false unless asked). No
  negative prompt, size, sampler, scheduler, shift, output format or quality. Output: ``images`` [{url, width,
  height, content_type}], ``seed``, ``prompt`` (the expanded prompt).
- ``fal-ai/pony-v7`` input: ``prompt``, ``image_size`` (a preset, default ``square_hd`` = 1024x1024, or
  ``{width, height}``), ``num_images`` 1-2 (default 1), ``seed``, ``guidance_scale`` 0-20 (default 3.5),
  ``num_inference_steps`` 20-50 (default 40), ``noise_source`` gpu|cpu (default gpu), ``sync_mode``,
  ``enable_safety_checker`` (default false), ``output_format`` jpeg|png (default jpeg). Output: ``images``,
  ``timings``, ``seed``, ``has_nsfw_concepts`` (one per image), ``prompt``.
- A custom ``{width, height}`` (fal's shared ``ImageSize`` schema, used by pony-v7): integers, each at most 14142
  (``z.int().lte(14142)``, default 512), with no minimum and no multiple stated (``@fal-ai/client``'s generated zod
  schemas, ``zImageSize``, checked 2026-12-04). The node's own 512-2048 lie inside; `FAL_SIZE` is checked anyway, so a
  wider local range can never send what fal refuses. Not verified: the bounds of ``seed``.

One request is one image (``num_images`` 1) with seed ``seed + i``, as for Segmind, so image i is reproduced alone
and ``number_of_images`` (up to 10) is never bound by a model's ``num_images`` limit.
"""
from __future__ import annotations

from ..errors import ParameterError, shown
from ..params import DEFAULTS

MODEL_PATHS = {"aura-flow": "fal-ai/aura-flow", "pony-v7": "fal-ai/pony-v7"}
STEPS = (20, 50)  # num_inference_steps, both models
GUIDANCE = (0.0, 20.0)  # pony-v7's guidance_scale
FAL_SIZE = (1, 14142)  # pony-v7's custom image_size width and height (fal's ImageSize: int, lte 14142)
NOISE_SOURCES = ("gpu", "cpu")
# fal-only options, at the values that mean "not asked" (expand_prompt False is still sent: fal's default is true)
OPTION_DEFAULTS = {"expand_prompt": False, "noise_source": "default", "enable_safety_checker": False}
_FORMATS = {"jpg": "jpeg", "png": "png"}  # the node's output_format -> pony-v7's

_NOT_TAKEN = {  # parameter -> why, per model
    "aura-flow": {"negative_prompt": "takes no negative prompt", "width": "makes 1024x1024 images only",
                  "height": "makes 1024x1024 images only", "sampler": "has no sampler choice",
                  "scheduler": "has no scheduler choice", "shift": "has no shift setting",
                  "output_format": "has no output format choice", "output_quality": "has no quality setting",
                  "noise_source": "has no noise source choice",
                  "enable_safety_checker": "has no safety checker switch"},
    "pony-v7": {"negative_prompt": "takes no negative prompt", "sampler": "has no sampler choice",
                "scheduler": "has no scheduler choice", "shift": "has no shift setting",
                "output_quality": "has no quality setting (jpeg at its own quality, or png)",
                "expand_prompt": "has no prompt expansion"},
}


def check_options(options, names: dict | None = None) -> dict:
    """The fal-only options (``expand_prompt``, ``noise_source``, ``enable_safety_checker``) with their defaults
    filled in, each checked for its type; a ParameterError names the option as the caller's user spells it."""
    names = names or {}
    given = dict(options or {})
    unknown = sorted(set(given) - set(OPTION_DEFAULTS))
    if unknown:
        raise ParameterError(f"unknown fal option(s) {', '.join(unknown)}; known: {', '.join(OPTION_DEFAULTS)}")
    out = {**OPTION_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    for name in ("expand_prompt", "enable_safety_checker"):
        if not isinstance(out[name], bool):
            raise ParameterError(f"{names.get(name, name)}={shown(out[name])} is not a boolean; use true or false")
    if out["noise_source"] not in ("default", *NOISE_SOURCES):
        raise ParameterError(f"{names.get('noise_source', 'noise_source')}={shown(out['noise_source'])} is not "
                             f"known; use default, {' or '.join(NOISE_SOURCES)}")
    return out


def is_set(name: str, value) -> bool:
    """Whether the user changed ``name`` from the node's default (a default is not sent)."""
    default = DEFAULTS.get(name, OPTION_DEFAULTS.get(name))
    return value != default


def fal_body(params: dict, model: str, options: dict, names: dict | None = None) -> tuple[dict, dict]:
    """``(body, expect)``: the JSON body of one request (without ``seed``) for ``model`` from the plan's ``params``
    and the fal ``options``, and the size/format the answer is checked against (None where not asked); a
    ParameterError, before any request, for a set value the model cannot honour."""
    names = names or {}
    say = lambda name: names.get(name, name)  # noqa: E731
    where = f"{say('provider')}=fal with {say('model')}={model}"
    values = {**params, **options}
    for name, why in _NOT_TAKEN[model].items():
        if is_set(name, values[name]):
            default = DEFAULTS.get(name, OPTION_DEFAULTS.get(name))
            raise ParameterError(f"{say(name)}={shown(values[name])} cannot be honoured by {where}: fal's {model} "
                                 f"{why}; leave it at {shown(default)}" +
                                 (" or use the segmind provider" if name not in OPTION_DEFAULTS else ""))
    body = {"prompt": params["prompt"], "num_images": 1}
    if is_set("steps", params["steps"]):
        if not STEPS[0] <= params["steps"] <= STEPS[1]:
            raise ParameterError(f"{say('steps')}={shown(params['steps'])} is out of range for {where}: fal takes "
                                 f"{STEPS[0]}..{STEPS[1]} steps (or leave it at {DEFAULTS['steps']} for fal's own "
                                 "default)")
        body["num_inference_steps"] = params["steps"]
    if is_set("cfg", params["cfg"]):
        if model == "pony-v7" and not GUIDANCE[0] <= params["cfg"] <= GUIDANCE[1]:
            raise ParameterError(f"{say('cfg')}={shown(params['cfg'])} is out of range for {where}: fal takes a "
                                 f"guidance scale of {GUIDANCE[0]:g}..{GUIDANCE[1]:g}")
        body["guidance_scale"] = params["cfg"]
    expect = {"width": None, "height": None, "output_format": None}
    if model == "aura-flow":
        body["expand_prompt"] = bool(options["expand_prompt"])  # fal's default is true: off unless asked
        return body, expect
    if is_set("width", params["width"]) or is_set("height", params["height"]):
        for name in ("width", "height"):
            value = params[name]
            if isinstance(value, bool) or not isinstance(value, int) or not FAL_SIZE[0] <= value <= FAL_SIZE[1]:
                raise ParameterError(f"{say(name)}={shown(value)} is out of range for {where}: fal takes a whole "
                                     f"number of pixels, {FAL_SIZE[0]}..{FAL_SIZE[1]}")
        body["image_size"] = {"width": params["width"], "height": params["height"]}
        expect.update(width=params["width"], height=params["height"])
    if is_set("output_format", params["output_format"]):
        if params["output_format"] not in _FORMATS:
            raise ParameterError(f"{say('output_format')}={shown(params['output_format'])} cannot be honoured by "
                                 f"{where}: it makes jpeg or png; choose jpg or png")
        body["output_format"] = _FORMATS[params["output_format"]]
        expect["output_format"] = params["output_format"]
    if options["noise_source"] != "default":
        body["noise_source"] = options["noise_source"]
    if options["enable_safety_checker"]:
        body["enable_safety_checker"] = True
    return body, expect
