"""Key names: the diffusers names of the transformer and the VAE back to the original (fal / ComfyUI, ldm) ones.

The inverse of diffusers' converters (``convert_auraflow_transformer_checkpoint_to_diffusers``,
``convert_ldm_vae_checkpoint``): the tiny models are written with it in every layout, and LoRA keys in original
names are matched through it, so both agree with the converters the loader uses.
"""
from __future__ import annotations

import torch


def transformer_to_original(sd: dict) -> dict:
    """Diffusers AuraFlow keys -> the original (fal / ComfyUI) key names; inverse of diffusers' converter."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if k.startswith("joint_transformer_blocks."):
            i, rest = parts[1], ".".join(parts[2:])
            m = {"ff.linear_1": "mlpX.c_fc1", "ff.linear_2": "mlpX.c_fc2", "ff.out_projection": "mlpX.c_proj",
                 "ff_context.linear_1": "mlpC.c_fc1", "ff_context.linear_2": "mlpC.c_fc2",
                 "ff_context.out_projection": "mlpC.c_proj", "norm1.linear": "modX.1",
                 "norm1_context.linear": "modC.1", "attn.to_q": "attn.w2q", "attn.to_k": "attn.w2k",
                 "attn.to_v": "attn.w2v", "attn.to_out.0": "attn.w2o", "attn.add_q_proj": "attn.w1q",
                 "attn.add_k_proj": "attn.w1k", "attn.add_v_proj": "attn.w1v", "attn.to_add_out": "attn.w1o"}
            out[f"double_layers.{i}.{m[rest.rsplit('.', 1)[0]]}.{parts[-1]}"] = v
        elif k.startswith("single_transformer_blocks."):
            i, rest = parts[1], ".".join(parts[2:])
            m = {"ff.linear_1": "mlp.c_fc1", "ff.linear_2": "mlp.c_fc2", "ff.out_projection": "mlp.c_proj",
                 "norm1.linear": "modCX.1", "attn.to_q": "attn.w1q", "attn.to_k": "attn.w1k",
                 "attn.to_v": "attn.w1v", "attn.to_out.0": "attn.w1o"}
            out[f"single_layers.{i}.{m[rest.rsplit('.', 1)[0]]}.{parts[-1]}"] = v
        elif k == "norm_out.linear.weight":
            shift, scale = v.chunk(2, dim=0)  # diffusers keeps (scale, shift) after its swap
            out["modF.1.weight"] = torch.cat([scale, shift], dim=0)
        else:
            m = {"register_tokens": "register_tokens", "time_step_proj.linear_1.weight": "t_embedder.mlp.0.weight",
                 "time_step_proj.linear_1.bias": "t_embedder.mlp.0.bias",
                 "time_step_proj.linear_2.weight": "t_embedder.mlp.2.weight",
                 "time_step_proj.linear_2.bias": "t_embedder.mlp.2.bias",
                 "context_embedder.weight": "cond_seq_linear.weight", "proj_out.weight": "final_linear.weight",
                 "pos_embed.pos_embed": "positional_encoding", "pos_embed.proj.weight": "init_x_linear.weight",
                 "pos_embed.proj.bias": "init_x_linear.bias"}
            out[m[k]] = v
    return out


def vae_to_original(sd: dict, num_blocks: int) -> dict:
    """Diffusers AutoencoderKL keys -> the original (ldm) key names; inverse of diffusers' converter."""
    out = {}
    for k, v in sd.items():
        o = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        parts = o.split(".")
        if parts[1] == "down_blocks":
            i = parts[2]
            o = ".".join([parts[0], "down", i] + (["block"] + parts[4:] if parts[3] == "resnets"
                                                   else ["downsample"] + parts[5:]))
        elif parts[1] == "up_blocks":
            i = str(num_blocks - 1 - int(parts[2]))
            o = ".".join([parts[0], "up", i] + (["block"] + parts[4:] if parts[3] == "resnets"
                                                 else ["upsample"] + parts[5:]))
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                o = ".".join([parts[0], "mid", f"block_{int(parts[3]) + 1}"] + parts[4:])
            else:
                name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[parts[4]]
                o = ".".join([parts[0], "mid", "attn_1", name, parts[-1]])
                if v.ndim == 2:
                    v = v[:, :, None, None]
        out[o] = v
    return out
