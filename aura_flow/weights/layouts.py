"""What a checkpoint file is, from its keys: the AuraFlow transformer in the original or the diffusers key names, or
something else (another model, a LoRA, a lone VAE or text encoder), said in words the user can act on.

The words are the engine's own (parameters as ``vae=PATH``); the command line turns them into flags, the nodes into
their node and input names and add where ComfyUI loads such a file (`LoadError.found` says what was found).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LoadError, shown

ORIGINAL_TRANSFORMER_KEYS = ("double_layers.0.attn.w1q.weight", "cond_seq_linear.weight", "t_embedder.mlp.0.weight")
DIFFUSERS_TRANSFORMER_KEYS = ("context_embedder.weight", "pos_embed.pos_embed", "time_step_proj.linear_1.weight")
TRANSFORMER_KEYS = ORIGINAL_TRANSFORMER_KEYS + DIFFUSERS_TRANSFORMER_KEYS
# keys only AuraFlow has (the others above are shared with SD3, Flux or DiT-like models)
AURAFLOW_ONLY_KEYS = ("double_layers.0.attn.w1q.weight", "cond_seq_linear.weight", "register_tokens",
                      "time_step_proj.linear_1.weight", "joint_transformer_blocks.0.attn.to_q.weight")


@dataclass(frozen=True)
class Other:
    """A kind of file that is not an AuraFlow transformer: ``keys`` all present (as whole key names or after a dot;
    ``"lora_"`` anywhere) means it; ``found`` is its short name, ``what`` it in words, ``fix`` the engine's advice."""

    found: str
    keys: tuple
    what: str
    fix: str = ""


LOOKS_LIKE = (  # first match wins: the lone VAE and text encoders before the models that hold one
    Other("vae", ("encoder.down.0.block.0.conv1.weight",), "a VAE only",
          "give it as vae=PATH, with an AuraFlow transformer as checkpoint=PATH"),
    Other("vae", ("encoder.down_blocks.0.resnets.0.conv1.weight",), "a VAE only (diffusers keys)",
          "give it as vae=PATH, with an AuraFlow transformer as checkpoint=PATH"),
    Other("text_encoder", ("encoder.block.0.layer.0.SelfAttention.q.weight",), "a T5 text encoder only",
          "give it as text_encoder=PATH, with an AuraFlow transformer as checkpoint=PATH"),
    Other("clip", ("text_model.encoder.layers.0.",), "a CLIP text encoder",
          "AuraFlow uses Pile-T5-XL; give that as text_encoder=PATH"),
    Other("lora", ("lora_",), "a LoRA", "apply it to a loaded AuraFlow model as a LoRA"),
    Other("sdxl", ("model.diffusion_model.input_blocks.",), "a Stable Diffusion / SDXL UNet checkpoint"),
    Other("unet", ("down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"), "a Stable Diffusion / SDXL UNet in "
          "diffusers keys"),
    Other("flux", ("double_blocks.0.img_attn",), "a Flux transformer"),
    Other("flux", ("transformer_blocks.0.attn.add_q_proj", "x_embedder."), "a Flux transformer in diffusers keys"),
    Other("sd3", ("joint_blocks.0.",), "a Stable Diffusion 3 MMDiT"),
    Other("sd3", ("transformer_blocks.0.attn.add_q_proj", "pos_embed.proj."), "a Stable Diffusion 3 MMDiT in diffusers "
          "keys"),
    Other("dit", ("transformer_blocks.0.attn1.", "pos_embed.proj."), "a PixArt / DiT-like transformer"),
)


def key_name(key: str) -> str:
    """A tensor name from a file, for a message: as it is when short and printable, else cut (`shown`)."""
    return key if len(key) <= 120 and key.isprintable() else shown(key)


def find_prefix(keys, suffixes) -> str | None:
    """What stands before one of ``suffixes`` in ``keys`` ('', 'model.', 'model.diffusion_model.'...), or None: the
    suffix must be a whole key or follow a dot."""
    for k in keys:
        for s in suffixes:
            if k.endswith(s) and (k == s or k[-len(s) - 1] == "."):
                return k[: len(k) - len(s)]
    return None


def is_gguf(path) -> bool:
    """Whether ``path`` is a GGUF file (by its first four bytes, whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
def _has(keys, fragment: str) -> bool:
    if fragment == "lora_":
        return any(fragment in k for k in keys)
    return any(k.startswith(fragment) or f".{fragment}" in k for k in keys)


def looks_like(keys) -> Other | None:
    """The kind of file ``keys`` belong to when they are no AuraFlow transformer's, else None."""
    keys = list(keys)
    if find_prefix(keys, AURAFLOW_ONLY_KEYS) is not None:
        return None
    return next((o for o in LOOKS_LIKE if all(_has(keys, f) for f in o.keys)), None)


def describe(path, keys) -> str:
    other = looks_like(keys)
    if other is not None:
        return f"{path}: no AuraFlow transformer keys found: this is {other.what}, not AuraFlow." + \
            (f" To use it, {other.fix}." if other.fix else "")
    sample = ", ".join(key_name(k) for k in sorted(keys)[:4])
    return f"{path}: no AuraFlow transformer keys found (first keys: {sample}). Is this an AuraFlow checkpoint?"


def transformer_prefix(path, keys) -> str:
    """The prefix of the AuraFlow transformer's keys in a file (see `find_prefix`); LoadError naming what the file is
    instead, with ``found`` set, when it holds another model."""
    keys = list(keys)
    other = looks_like(keys)
    prefix = find_prefix(keys, TRANSFORMER_KEYS)
    if other is not None or prefix is None:
        raise LoadError(describe(path, keys), found=other.found if other else None)
    return prefix
