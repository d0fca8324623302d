"""What a checkpoint file is, from its keys: the AuraFlow transformer in the original or the diffusers key names, or
something else (another model, a LoRA, a lone VAE or text encoder), said in words the user can act on."""
from __future__ import annotations

ORIGINAL_TRANSFORMER_KEYS = ("double_layers.0.attn.w1q.weight", "cond_seq_linear.weight", "t_embedder.mlp.0.weight")
DIFFUSERS_TRANSFORMER_KEYS = ("context_embedder.weight", "pos_embed.pos_embed", "time_step_proj.linear_1.weight")
_LOOKS_LIKE = [  # (key fragment, what it is, what to do instead)
    ("model.diffusion_model.input_blocks.", "a Stable Diffusion / SDXL UNet checkpoint", "Load it with Load Checkpoint"),
    ("double_blocks.0.img_attn", "a Flux transformer", "Load it with Load Diffusion Model"),
    ("joint_blocks.0.", "a Stable Diffusion 3 MMDiT", "Load it with Load Checkpoint"),
    ("lora_", "a LoRA", "Apply it with a LoRA loader, on a loaded model"),
    ("encoder.down.0.block.0.conv1.weight", "a VAE only", "pass it as vae="),
    ("encoder.down_blocks.0.resnets.0.conv1.weight", "a VAE only (diffusers keys)", "pass it as vae="),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 text encoder only", "pass it as text_encoder="),
    ("text_model.encoder.layers.0.", "a CLIP text encoder", "AuraFlow uses Pile-T5-XL; pick that text encoder"),
]


TRANSFORMER_KEYS = ORIGINAL_TRANSFORMER_KEYS + DIFFUSERS_TRANSFORMER_KEYS


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


def describe(path, keys) -> str:
    for frag, what, fix in _LOOKS_LIKE:
        if any(frag in k for k in keys):
            return f"{path}: no AuraFlow transformer keys found (it looks like {what}). {fix}."
    sample = ", ".join(sorted(keys)[:4])
    return f"{path}: no AuraFlow transformer keys found (first keys: {sample}). Is this an AuraFlow checkpoint?"


