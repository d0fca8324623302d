"""Configs of the transformer, the text encoder and the VAE inferred from tensor shapes, for files that carry none.

The only value the shapes cannot give is the transformer's attention head split (q/k/v are width x width and the
qk-norms have no weights); AuraFlow's heads are 256 wide, and files written by this pack record theirs."""
from __future__ import annotations

import logging
import math

from ..errors import LoadError, shown
from .layouts import key_name

log = logging.getLogger(__name__)

MAX_CONFIG_SIZE = 1 << 20  # any width, count of heads, channels or tokens in a config (AuraFlow's largest: 32768)
MAX_CONFIG_LAYERS = 1000
MAX_GRID = 256 * 256  # positions of the transformer's position table (AuraFlow v0.3 / Pony V7: 96 x 96)
TRANSFORMER_SIZES = ("sample_size", "patch_size", "in_channels", "out_channels", "attention_head_dim",
                     "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pos_embed_max_size")
TRANSFORMER_LAYERS = ("num_mmdit_layers", "num_single_dit_layers")
T5_SIZES = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "relative_attention_num_buckets")
VAE_SIZES = ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups")

# safetensors / GGUF metadata key for the one config value the shapes cannot give (files this pack writes have it)
HEAD_DIM_KEY = "aura_flow.attention_head_dim"
# config.json keys of diffusers' and transformers' own bookkeeping, ignored without a warning
BOOKKEEPING = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "_commit_hash",
               "architectures", "transformers_version", "model_type", "torch_dtype", "dtype"}


MAX_BLOCK_INDEX = 99999  # a block index in a key name (AuraFlow has 36 blocks)


def count_blocks(keys, prefix, source="the file"):
    """How many distinct blocks ``prefix<N>.…`` the keys hold; LoadError naming ``source`` and the key when N is not
    a whole number in 0..MAX_BLOCK_INDEX (a damaged or hostile key name)."""
    n = set()
    for k in keys:
        if k.startswith(prefix):
            index = k[len(prefix):].split(".", 1)[0]
            if not (index.isascii() and index.isdigit() and len(index) <= 5):
                raise LoadError(f"{source}: key {shown(k)} has block index {shown(index)}, expected a whole number "
                                f"0..{MAX_BLOCK_INDEX}; the file is damaged or of another model. Download it again")
            n.add(int(index))
    return len(n)


def shape_of(sd: dict, key: str, source, ndim: int) -> tuple[int, ...]:
    """The shape of tensor ``key`` (a tensor or a shape tuple) when it has ``ndim`` dimensions, none of size 0;
    else LoadError naming the file, the tensor and what was expected."""
    if key not in sd:
        raise LoadError(f"{source}: no {key} tensor found; this is not a complete model of the expected kind.")
    value = sd[key]
    shape = tuple(int(d) for d in (value if isinstance(value, tuple) else value.shape))
    if len(shape) != ndim or not all(shape):
        raise LoadError(f"{source}: tensor {key} has shape {shape}, expected {ndim} dimensions, none of size 0; the "
                        "file is damaged or of another model. Download it again")
    return shape


def _patch_embedding(sd: dict, source) -> tuple[int, int]:
    """(width, patch size) from AuraFlow's linear patch embedding ``pos_embed.proj.weight`` (width, 4·patch²)."""
    key = "pos_embed.proj.weight"
    if key in sd and len(sd[key].shape) == 4:
        raise LoadError(f"{source}: {key} is a 4-D convolution {tuple(sd[key].shape)}: the patch embedding of a Stable "
                        "Diffusion 3 / PixArt / DiT-like transformer, not AuraFlow's linear one (width x 4·patch²). "
                        "Load that model with its own loader, or pick an AuraFlow checkpoint.", found="sd3")
    width, in_pp = shape_of(sd, key, source, 2)
    patch = math.isqrt(in_pp // 4)
    if in_pp % 4 or patch * patch * 4 != in_pp:
        raise LoadError(f"{source}: {key} has {in_pp} inputs, expected 4 latent channels x patch² (16 for AuraFlow's "
                        "2x2 patches); the file is damaged or of another model.")
    return width, patch


def infer_transformer_config(sd: dict, metadata: dict | None = None, source="the file") -> dict:
    """Config of a diffusers-keyed AuraFlow transformer state dict from its tensor shapes (tensors, or meta
    tensors), every shape checked first: LoadError naming ``source`` and the tensor."""
    width, patch = _patch_embedding(sd, source)
    _one, max_size, grid_width = shape_of(sd, "pos_embed.pos_embed", source, 3)
    caption_dim, text_dim = shape_of(sd, "context_embedder.weight", source, 2)
    out_rows, _ = shape_of(sd, "proj_out.weight", source, 2)
    if out_rows != 4 * patch * patch or grid_width != width or caption_dim != width:
        raise LoadError(f"{source}: proj_out.weight has {out_rows} rows, pos_embed.pos_embed is {grid_width} wide and "
                        f"context_embedder.weight gives {caption_dim}, expected 4 channels x patch² = "
                        f"{4 * patch * patch} rows and the width {width} (from pos_embed.proj.weight); the tensors are "
                        "of different models or damaged.")
    # The head split cannot be read from shapes (q/k/v are width x width, the qk-norms have no weights). AuraFlow
    # uses 256-wide heads; files written by this pack record theirs in the metadata.
    head_dim = recorded_head_dim(metadata, width, source) or (256 if width % 256 == 0 else None)
    if head_dim is None:
        head_dim = next(d for d in (128, 64, 32, 16, 8, 4, 2, 1) if width % d == 0)
        log.warning("transformer width %d is not AuraFlow's; guessing attention head dim %d", width, head_dim)
    return dict(sample_size=int(math.isqrt(max_size)), patch_size=patch, in_channels=4,
                out_channels=out_rows // (patch * patch),
                num_mmdit_layers=count_blocks(sd, "joint_transformer_blocks.", source),
                num_single_dit_layers=count_blocks(sd, "single_transformer_blocks.", source),
                attention_head_dim=head_dim, num_attention_heads=width // head_dim, joint_attention_dim=text_dim,
                caption_projection_dim=caption_dim, pos_embed_max_size=max_size)


def infer_t5_config(sd: dict, source="the file"):
    from transformers import UMT5Config

    attn = "encoder.block.0.layer.0.SelfAttention."
    vocab, d_model = shape_of(sd, "shared.weight", source, 2)
    buckets, heads = shape_of(sd, attn + "relative_attention_bias.weight", source, 2)
    inner, _ = shape_of(sd, attn + "q.weight", source, 2)
    if inner % heads:
        raise LoadError(f"{source}: the text encoder's attention is {inner} wide with {heads} heads (from "
                        f"{attn}q.weight and relative_attention_bias.weight), which does not divide; the file is "
                        "damaged or of another model.")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    d_ff, _ = shape_of(sd, "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight", source,
                       2)
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff,
                      num_layers=count_blocks(sd, "encoder.block.", source), num_heads=heads,
                      relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0, is_encoder_decoder=False,
                      use_cache=False, pad_token_id=1, eos_token_id=2)


def infer_vae_config(sd: dict, source="the file") -> dict:
    n = count_blocks(sd, "encoder.down_blocks.", source)
    channels = [shape_of(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", source, 4)[0] for i in range(n)]
    if not channels:
        raise LoadError(f"{source}: no encoder.down_blocks.N tensors: not a complete VAE.")
    return dict(in_channels=shape_of(sd, "encoder.conv_in.weight", source, 4)[1],
                out_channels=shape_of(sd, "decoder.conv_out.weight", source, 4)[0],
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                block_out_channels=channels, layers_per_block=count_blocks(sd, "encoder.down_blocks.0.resnets.", source),
                latent_channels=shape_of(sd, "decoder.conv_in.weight", source, 4)[1],
                norm_num_groups=32 if all(c % 32 == 0 for c in channels) else math.gcd(*channels),
                sample_size=1024, scaling_factor=0.13025, force_upcast=True,
                use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd)


def recorded_head_dim(metadata: dict | None, width: int, source="the file") -> int | None:
    """The head dim a file records in its metadata (None when it records none); LoadError naming the file and the
    key unless it is a whole number that divides the width."""
    text = (metadata or {}).get(HEAD_DIM_KEY)
    if text is None:
        return None
    value = int(text) if isinstance(text, str) and text.strip().isascii() and text.strip().isdigit() \
        and len(text.strip()) <= 7 else 0
    if value <= 0 or width % value:
        raise LoadError(f"{source}: its metadata {HEAD_DIM_KEY}={shown(text)} is not a whole number that divides the "
                        f"transformer width {width} (AuraFlow: 256); the file is damaged. Download or convert it "
                        "again")
    return value


def _whole(config: dict, name: str, source, lo: int, hi: int) -> None:
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise LoadError(f"{source}: {name}={value!r} makes no model (allowed: whole numbers {lo}..{hi}); the config "
                        "is damaged or of another model. Download it again")


def check_floats(sd: dict, what: str, source) -> None:
    """LoadError naming the file and the tensor when a weight is not floating point (an integer or bool tensor
    would load and then fail inside the first matrix product of a run)."""
    bad = [k for k, v in sd.items() if not v.is_floating_point()]
    if bad:
        raise LoadError(f"{source}: {len(bad)} {what} weights are not floating point (e.g. {key_name(bad[0])}: "
                        f"{str(sd[bad[0]].dtype).replace('torch.', '')}); the file is damaged or of another format. "
                        "Download it again.")


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
    if grid is not None and grid > MAX_GRID:
        side = math.isqrt(MAX_GRID)
        raise LoadError(f"{source}: pos_embed_max_size={grid:,} positions is over {MAX_GRID:,} (a {side}x{side} grid, "
                        "4096 px; AuraFlow's: 9216); the position table would take gigabytes. The file or config is "
                        "damaged")
    if grid is not None and math.isqrt(grid) ** 2 != grid:
        raise LoadError(f"{source}: pos_embed_max_size={grid} is not a square number of positions (AuraFlow: 1024, a "
                        "32x32 grid); the config is damaged. Download it again")
    width = config.get("attention_head_dim", 1) * config.get("num_attention_heads", 1)
    if width > MAX_CONFIG_SIZE:
        raise LoadError(f"{source}: attention_head_dim x num_attention_heads is over {MAX_CONFIG_SIZE}; the config "
                        "is damaged")
    if config.get("caption_projection_dim", width) != width:
        raise LoadError(f"{source}: caption_projection_dim={config['caption_projection_dim']} is not the width "
                        f"attention_head_dim x num_attention_heads = {width}: AuraFlow's text and image streams are "
                        "equally wide. The config is damaged or of another model")
    if config.get("in_channels", 4) != config.get("out_channels", 4):
        raise LoadError(f"{source}: in_channels={config.get('in_channels', 4)} and out_channels="
                        f"{config.get('out_channels', 4)} differ; AuraFlow predicts in its own latent space (4 and 4). "
                        "The config is damaged or of another model")
    name = config.get("_class_name")
    if name is not None and name != "AuraFlowTransformer2DModel":
        raise LoadError(f"{source}: _class_name={shown(name)}: the config of another model, not an AuraFlow "
                        "transformer (AuraFlowTransformer2DModel). Load it with its own loader", found=_family(name))
    return config


def _family(class_name) -> str | None:
    """The `LoadError.found` name of a diffusers class name (SD3Transformer2DModel -> "sd3"), or None."""
    text = str(class_name).lower()
    return next((found for found, mark in (("sd3", "sd3"), ("flux", "flux"), ("unet", "unet"), ("dit", "pixart"),
                                           ("dit", "dit"), ("vae", "autoencoder")) if mark in text), None)


def check_t5_config(config: dict, source) -> dict:
    check_config(config, source, sizes=T5_SIZES, layers=("num_layers",))
    return config


def check_vae_config(config: dict, source) -> dict:
    check_config(config, source, sizes=VAE_SIZES, lists=("block_out_channels",))
    name = config.get("_class_name")
    if name is not None and name != "AutoencoderKL":
        raise LoadError(f"{source}: _class_name={shown(name)}: not the config of a VAE (AutoencoderKL); the VAE is "
                        "the SDXL one (give it as vae=PATH)")
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
    check_types(config, {k: p.default for k, p in params.items()}, cls.__name__, source)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {k: v for k, v in config.items() if not k.startswith("_")}
    warn_unknown(config, params, cls.__name__, source)
    return {k: v for k, v in config.items() if k in params and k != "self"}


def _of_type(value, default) -> bool:
    """Whether a config value has the type of the constructor's default (no check for a default of None)."""
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return True


def check_types(config: dict, defaults: dict, taker: str, source) -> None:
    """LoadError naming the file, the key and the value when a config value is not of the type ``taker``'s default
    for it has (a flag given as a number, a width as text, a NaN factor): it would build another model or fail
    inside it."""
    for key, value in config.items():
        if key in defaults and key not in BOOKKEEPING and not _of_type(value, defaults[key]):
            kind = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text",
                    list: "a list", tuple: "a list"}.get(type(defaults[key]), type(defaults[key]).__name__)
            raise LoadError(f"{source}: {key}={shown(value)} is not {kind}, as {taker} takes it; the config is "
                            "damaged. Download it again")


def warn_unknown(config: dict, known, taker: str, source) -> list[str]:
    """Warn naming the keys of ``config`` that ``known`` lacks (the bookkeeping names diffusers and transformers
    write are expected); -> those keys."""
    unknown = sorted(k for k in config if k not in known and k != "self" and k not in BOOKKEEPING)
    if unknown:
        names = ", ".join(k if k.isidentifier() and len(k) <= 40 else shown(k, 40) for k in unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8
                                                                else "")
        log.warning("%s: ignoring config values %s, which %s does not take", source, names, taker)
    return unknown


def check_layer_counts(config: dict, keys, source) -> None:
    """A diffusers transformer config's block counts against the blocks its weights hold (from the file headers,
    before any tensor is read): a mismatch would build another model and drop or miss weights."""
    for name, prefix in (("num_mmdit_layers", "joint_transformer_blocks."),
                         ("num_single_dit_layers", "single_transformer_blocks.")):
        held = count_blocks(keys, prefix, source)
        if name in config and config[name] != held:
            raise LoadError(f"{source}: {name}={config[name]}, but the weights hold {held} of those blocks: the "
                            "config does not match the weights. Use the config.json that came with them")

