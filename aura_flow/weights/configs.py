"""Configs of the transformer, the text encoder and the VAE inferred from tensor shapes, for files that carry none.

The only value the shapes cannot give is the transformer's attention head split (q/k/v are width x width and the
qk-norms have no weights); AuraFlow's heads are 256 wide, and files written by this pack record theirs."""
from __future__ import annotations

import logging
import math

from ..errors import LoadError

log = logging.getLogger(__name__)

MAX_CONFIG_SIZE = 1 << 20  # any width, count of heads, channels or tokens in a config (AuraFlow's largest: 32768)
MAX_CONFIG_LAYERS = 1000
TRANSFORMER_SIZES = ("sample_size", "patch_size", "in_channels", "out_channels", "attention_head_dim",
                     "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pos_embed_max_size")
TRANSFORMER_LAYERS = ("num_mmdit_layers", "num_single_dit_layers")
T5_SIZES = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "relative_attention_num_buckets")
VAE_SIZES = ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups")

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
    head_dim = _recorded_head_dim(metadata, width) or (256 if width % 256 == 0 else None)
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


def _recorded_head_dim(metadata: dict | None, width: int) -> int | None:
    """The head dim a file records in its metadata, when it is a whole number that divides the width."""
    text = (metadata or {}).get(HEAD_DIM_KEY)
    if text is None:
        return None
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value <= 0 or width % value:
        log.warning("the file's %s=%r does not divide the transformer width %d; ignored", HEAD_DIM_KEY, text, width)
        return None
    return value


def _whole(config: dict, name: str, source, lo: int, hi: int) -> None:
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise LoadError(f"{source}: {name}={value!r} makes no model (allowed: whole numbers {lo}..{hi}); the config "
                        "is damaged or of another model. Download it again")


def check_config(config: dict, source, *, sizes=(), layers=(), lists=()) -> dict:
    """``config`` (a config.json's values) when the numbers that shape the model make sense; else LoadError naming
    the file, the key and the value. ``layers``: block counts, of which at least one block in all."""
    for name in sizes:
        if name in config:
            _whole(config, name, source, 1, MAX_CONFIG_SIZE)
    for name in layers:
        if name in config:
            _whole(config, name, source, 0, MAX_CONFIG_LAYERS)
    if layers and all(config.get(name, 1) == 0 for name in layers):
        raise LoadError(f"{source}: {' and '.join(f'{n}=0' for n in layers)}: a model without layers; the config is "
                        "damaged. Download it again")
    for name in lists:
        value = config.get(name)
        if value is None:
            continue
        if not isinstance(value, list) or not value:
            raise LoadError(f"{source}: {name}={value!r} must be a list of whole numbers; the config is damaged")
        for item in value:
            _whole({name: item}, name, source, 1, MAX_CONFIG_SIZE)
    return config


def check_transformer_config(config: dict, source) -> dict:
    check_config(config, source, sizes=TRANSFORMER_SIZES, layers=TRANSFORMER_LAYERS)
    grid = config.get("pos_embed_max_size")
    if grid is not None and math.isqrt(grid) ** 2 != grid:
        raise LoadError(f"{source}: pos_embed_max_size={grid} is not a square number of positions (AuraFlow: 1024, a "
                        "32x32 grid); the config is damaged. Download it again")
    if config.get("attention_head_dim", 1) * config.get("num_attention_heads", 1) > MAX_CONFIG_SIZE:
        raise LoadError(f"{source}: attention_head_dim x num_attention_heads is over {MAX_CONFIG_SIZE}; the config "
                        "is damaged")
    return config


def check_t5_config(config: dict, source) -> dict:
    check_config(config, source, sizes=T5_SIZES, layers=("num_layers",))
    return config


def check_vae_config(config: dict, source) -> dict:
    check_config(config, source, sizes=VAE_SIZES, lists=("block_out_channels",))
    groups = config.get("norm_num_groups")
    channels = config.get("block_out_channels") or []
    if groups and any(c % groups for c in channels):
        raise LoadError(f"{source}: norm_num_groups={groups} does not divide block_out_channels={channels}; the config "
                        "is damaged. Download it again")
    return config


def constructor_config(cls, config: dict, source) -> dict:
    """The values of ``config`` that ``cls.__init__`` takes: the ``_``-names diffusers writes are dropped quietly,
    other unknown ones (another version's, or another model's) with a warning naming them."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(k for k in config if k not in params and not k.startswith("_"))
    if unknown:
        log.warning("%s: ignoring config values %s, which %s does not take", source, ", ".join(unknown[:5]),
                    cls.__name__)
    return {k: v for k, v in config.items() if k in params and k != "self"}


def check_layer_counts(config: dict, keys, source) -> None:
    """A diffusers transformer config's block counts against the blocks its weights hold (from the file headers,
    before any tensor is read): a mismatch would build another model and drop or miss weights."""
    for name, prefix in (("num_mmdit_layers", "joint_transformer_blocks."),
                         ("num_single_dit_layers", "single_transformer_blocks.")):
        held = count_blocks(keys, prefix)
        if name in config and config[name] != held:
            raise LoadError(f"{source}: {name}={config[name]}, but the weights hold {held} of those blocks: the "
                            "config does not match the weights. Use the config.json that came with them")

