"""The engine's messages in ComfyUI's words: parameters named as the node's own inputs, files as AuraFlow Loader's
inputs and the model folders ComfyUI keeps them in, and, for a file that is another model, the ComfyUI node that
loads it. The engine itself speaks neutrally (``vae=PATH``, "this is an SDXL checkpoint, not AuraFlow"); the
command line has its own wording (aura_flow/cli/flags.py)."""
from __future__ import annotations

import contextlib
import re

from ..aura_flow.errors import LoadError, NumericError, ParameterError, reword, shown

LOADER = "AuraFlow Loader"
# a file parameter of the engine -> the loader input that gives it and where ComfyUI keeps such files
FILE_INPUTS = {
    "checkpoint": "models/checkpoints, models/diffusion_models or models/diffusers",
    "text_encoder": "models/text_encoders",
    "vae": "models/vae",
    "tokenizer": "tokenizer.model under models/text_encoders",
}
# what a file is instead of AuraFlow (LoadError.found) -> where ComfyUI loads it
LOAD_IT_WITH = {
    "sdxl": "Load it with Load Checkpoint.",
    "unet": "Load it with Load Checkpoint or Load Diffusion Model.",
    "flux": "Load it with Load Diffusion Model.",
    "sd3": "Load it with Load Checkpoint.",
    "dit": "Load it with its own model's loader.",
    "lora": "Apply it with a LoRA loader node to the loaded AuraFlow model.",
    "vae": f"Pick it in {LOADER}'s vae input (files in models/vae), with an AuraFlow model as checkpoint.",
    "text_encoder": f"Pick it in {LOADER}'s text_encoder input (files in models/text_encoders).",
    "clip": f"AuraFlow uses Pile-T5-XL: pick that in {LOADER}'s text_encoder input.",
}
# the loader's weight precision, as the nodes downstream of it see it
WEIGHT_DTYPE = f"{LOADER}'s weight_dtype"


def in_node_words(message: str, renames: dict | None = None, found: str | None = None) -> str:
    """``message`` with ``renames`` ({engine parameter: node input}) applied, file parameters said as the loader's
    inputs, and for a file that is another model (``found``) the ComfyUI way to load it instead of the engine's."""
    if found in LOAD_IT_WITH:
        message = re.sub(r" To use it, .*$", "", message) + " " + LOAD_IT_WITH[found]
    message = re.sub(r"(?<![\w\-.'])(checkpoint|text_encoder|vae|tokenizer)=PATH",
                     lambda m: f"{LOADER}'s {m.group(1)} input ({FILE_INPUTS[m.group(1)]})", message)
    return reword(message, renames or {})


@contextlib.contextmanager
def node_words(renames: dict | None = None):
    """Re-raise the engine's ParameterError, LoadError and NumericError in the words of the node that runs it (the
    same exception, type and traceback; only its message changes)."""
    try:
        yield
    except (ParameterError, LoadError, NumericError) as exc:
        exc.args = (in_node_words(str(exc), renames, getattr(exc, "found", None)),) + exc.args[1:]
        raise


# ------------------------------------------------------------------------------------------ inputs of the wrong type
# An API prompt (or another pack's node) can hand a node anything: None, a number for text, a string for a model.
# Each is refused naming the node's input and what it takes, before any work.
_PLAIN = (type(None), bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set)


def check_text(name: str, value, fix: str) -> str:
    """``value`` when it is text (a STRING input or a file name from a list), else ParameterError naming ``name``."""
    if not isinstance(value, str):
        raise ParameterError(f"{name}={shown(value)} is not text ({type(value).__name__}); {fix}")
    return value


# what a socket takes -> (its type in words, the output to connect)
MODEL = ("an AURAFLOW_MODEL", f"{LOADER}'s model output (or an AuraFlow LoRA Loader's)")
SAMPLER_MODEL = ("an AURAFLOW_MODEL or a ComfyUI MODEL holding AuraFlow",
                 f"{LOADER}'s model output, or Load Checkpoint's / Load Diffusion Model's with an AuraFlow file")
TEXT_ENCODER = ("an AURAFLOW_TEXT_ENCODER", f"{LOADER}'s text_encoder output")
VAE = ("a VAE", f"{LOADER}'s vae output (or Load VAE's)")


def check_connected(name: str, value, method: str, socket: tuple[str, str]):
    """``value`` when it is an object offering ``method`` (what the node that makes it gives), else ParameterError:
    ``name: expected <type>, got <what came>; connect <output>``."""
    if isinstance(value, _PLAIN) or not callable(getattr(value, method, None)):
        wanted, connect = socket
        raise ParameterError(f"{name}: expected {wanted}, got {type(value).__name__}; connect {connect}")
    return value


def check_prompts(params: dict) -> None:
    """The one-node generators' text and seed widgets: text (not None, not a number), a seed given."""
    for name in ("prompt", "negative_prompt"):
        if name in params:
            check_text(name, params[name], "give the prompt as text ('' for none)")
    if "seed" in params:
        check_given(seed=params["seed"])


def check_given(**inputs) -> None:
    """ParameterError for the first of ``inputs`` that is None: a widget always has a value (an API prompt's null
    is none), and None would otherwise mean "pick one" (a random seed, an empty prompt)."""
    for name, value in inputs.items():
        if value is None:
            raise ParameterError(f"{name}=None: this input needs a value")
