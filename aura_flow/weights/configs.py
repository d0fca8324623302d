"""Configs of the transformer, the text encoder and the VAE inferred from tensor shapes, for files that carry none.

The only value the shapes cannot give is the transformer's attention head split (q/k/v are width x width and the
qk-norms have no weights); AuraFlow's heads are 256 wide, and files written by this pack record theirs."""
from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

# safetensors / GGUF metadata key for the one config value the shapes cannot give (files this pack writes have it)
HEAD_DIM_KEY = "aura_flow.attention_head_dim"


def count_blocks(keys, prefix):
    n = set()
    for k in keys:
        if k.startswith(prefix):
            n.add(int(k[len(prefix):].split(".")[0]))
    return len(n)


def infer_transformer_config(sd: dict, metadata: dict | None = None) -> dict:
    """Config of a diffusers-keyed AuraFlow transformer state dict from its tensor shapes."""
    width, in_pp = sd["pos_embed.proj.weight"].shape
    patch = int(round(math.sqrt(in_pp / 4)))  # AuraFlow latents have 4 channels
    max_size = sd["pos_embed.pos_embed"].shape[1]
    caption_dim, text_dim = sd["context_embedder.weight"].shape
    out_channels = sd["proj_out.weight"].shape[0] // (patch * patch)
    # The head split cannot be read from shapes (q/k/v are width x width, the qk-norms have no weights). AuraFlow
    # uses 256-wide heads; files written by this pack record theirs in the metadata.
    head_dim = int((metadata or {}).get(HEAD_DIM_KEY, 0)) or (256 if width % 256 == 0 else None)
    if head_dim is None:
        head_dim = next(d for d in (128, 64, 32, 16, 8, 4, 2, 1) if width % d == 0)
        log.warning("transformer width %d is not AuraFlow's; guessing attention head dim %d", width, head_dim)
    return dict(sample_size=int(math.isqrt(max_size)), patch_size=patch, in_channels=4, out_channels=out_channels,
                num_mmdit_layers=count_blocks(sd, "joint_transformer_blocks."),
                num_single_dit_layers=count_blocks(sd, "single_transformer_blocks."), attention_head_dim=head_dim,
                num_attention_heads=width // head_dim, joint_attention_dim=text_dim,
                caption_projection_dim=caption_dim, pos_embed_max_size=max_size)


def infer_t5_config(sd: dict):
    from transformers import UMT5Config

    vocab, d_model = sd["shared.weight"].shape
    buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    d_ff = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0]
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff,
                      num_layers=count_blocks(sd, "encoder.block."), num_heads=heads, relative_attention_num_buckets=buckets,
                      relative_attention_max_distance=128, feed_forward_proj="gated-gelu" if gated else "relu",
                      dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, pad_token_id=1, eos_token_id=2)


def infer_vae_config(sd: dict) -> dict:
    n = count_blocks(sd, "encoder.down_blocks.")
    channels = [sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n)]
    return dict(in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                block_out_channels=channels, layers_per_block=count_blocks(sd, "encoder.down_blocks.0.resnets."),
                latent_channels=sd["decoder.conv_in.weight"].shape[1],
                norm_num_groups=32 if all(c % 32 == 0 for c in channels) else math.gcd(*channels),
                sample_size=1024, scaling_factor=0.13025, force_upcast=True,
                use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd)


