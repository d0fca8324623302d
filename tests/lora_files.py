"""LoRA files for the tiny models, written the way trainers write them (keys by hand, random factors, seeded), for
the tests that need a LoRA file rather than the format checks of test_lora.py: kohya (``lora_unet_<diffusers
name with _>``, with ``.alpha``) and diffusers/PEFT (``transformer.<name>.lora_A/lora_B``)."""
from __future__ import annotations

from pathlib import Path

import torch

# layers two test LoRAs patch; they overlap on purpose (stacking adds on the same layers)
LAYERS_A = ("joint_transformer_blocks.0.attn.to_q", "joint_transformer_blocks.0.attn.add_k_proj",
            "joint_transformer_blocks.0.ff.linear_1", "single_transformer_blocks.0.attn.to_v", "context_embedder",
            "proj_out")
LAYERS_B = ("joint_transformer_blocks.0.attn.to_q", "joint_transformer_blocks.0.norm1.linear",
            "single_transformer_blocks.0.ff.out_projection", "time_step_proj.linear_1", "pos_embed.proj")


def linear_shapes(preset: str = "tiny") -> dict[str, tuple[int, int]]:
    """{diffusers layer name: (out_features, in_features)} of a preset's transformer (built on the meta device)."""
    from diffusers import AuraFlowTransformer2DModel

    from aura_flow.tiny import transformer_config

    with torch.device("meta"):
        model = AuraFlowTransformer2DModel(**transformer_config(preset))
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def write_lora(path, layers=LAYERS_A, *, seed: int = 0, rank: int = 3, alpha: float = 1.5, style: str = "kohya",
               preset: str = "tiny") -> Path:
    """A LoRA .safetensors for ``layers`` of ``preset``'s transformer; ``style`` "kohya" or "peft"."""
    from safetensors.torch import save_file

    shapes = linear_shapes(preset)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in layers:
        out_f, in_f = shapes[name]
        down, up = torch.randn(rank, in_f, generator=g) * 0.3, torch.randn(out_f, rank, generator=g) * 0.3
        if style == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            sd.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                       f"{stem}.alpha": torch.tensor(alpha)})
        else:
            sd.update({f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up,
                       f"transformer.{name}.alpha": torch.tensor(alpha)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path
