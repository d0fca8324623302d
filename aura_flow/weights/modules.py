"""Modules built from state dicts on the meta device, so no random initialisation runs and no second copy of the
weights is made: the transformer (its linears `PatchableLinear`), the Pile-T5 text encoder and the SDXL VAE, from
either key naming."""
from __future__ import annotations

import logging

from ..errors import LoadError
from .configs import (check_floats, check_vae_config, constructor_config, count_blocks, infer_t5_config,
                      infer_vae_config)
from .layouts import find_prefix, transformer_prefix
from .reader import real

log = logging.getLogger(__name__)


def _materialize(cls_or_factory, sd: dict, what: str, source, deferred: bool = False):
    """Build a module on the meta device and assign the loaded tensors (no random init, no second copy). ``sd``'s
    values may be `LazyTensor`s: every shape is checked before any is read, and only the module's own are read.
    deferred: ``(the module on the meta device, finish)``, nothing read; ``finish()`` reads and returns it."""
    from .assemble import build_on_meta, check_unexpected

    check_floats(sd, what, source)
    module = build_on_meta(cls_or_factory, what, source)
    expected = set(module.state_dict().keys())
    missing = sorted(expected - set(sd))
    # tied / derived weights the files leave out
    if what == "text encoder" and "encoder.embed_tokens.weight" in missing and "shared.weight" in sd:
        missing.remove("encoder.embed_tokens.weight")
    unexpected = sorted(set(sd) - expected)
    if missing:
        raise LoadError(f"{source}: the {what} is missing {len(missing)} weights (e.g. {', '.join(missing[:3])}); "
                        f"the file is incomplete or of another model.")
    if unexpected:
        check_unexpected(module, unexpected, what, source)
        sd = {k: v for k, v in sd.items() if k in expected}
    for k in list(sd):
        ref = module.state_dict()[k]
        if tuple(sd[k].shape) != tuple(ref.shape):
            raise LoadError(f"{source}: {what} weight {k} has shape {tuple(sd[k].shape)}, expected {tuple(ref.shape)}")
    def finish():
        module.load_state_dict({k: real(v) for k, v in sd.items()}, strict=False, assign=True)
        if what == "text encoder":
            module.encoder.embed_tokens = module.shared
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_meta:
                raise LoadError(f"{source}: {what} weight {name} was not loaded")
        return module.eval().requires_grad_(False)

    return (module, finish) if deferred else finish()


def build_text_encoder(sd: dict, config, source, deferred: bool = False):
    """UMT5's encoder, its linears `PatchableLinear`s (the same state-dict keys), as the transformer's: their float32
    CPU GEMMs go through oneDNN where that is faster, and a host's memory manager can stream them (nearly all of the
    encoder's bytes) when it is larger than free memory (aura_flow.weights.linear)."""
    from transformers import UMT5EncoderModel

    from .linear import make_patchable

    def build():
        model = UMT5EncoderModel(config)
        make_patchable(model)
        return model

    return _materialize(build, sd, "text encoder", source, deferred)


def build_vae(sd: dict, config: dict, source, deferred: bool = False):
    from diffusers import AutoencoderKL

    cfg = constructor_config(AutoencoderKL, check_vae_config(dict(config), source), source)
    return _materialize(lambda: AutoencoderKL(**cfg), sd, "VAE", source, deferred)


def text_encoder_from_sd(sd: dict, source, config=None, deferred: bool = False):
    """``sd`` holds the tensors in their target dtype (`SafetensorsReader.lazy(dtype=...)`)."""
    keys = list(sd)
    prefix = find_prefix(keys, ("encoder.block.0.layer.0.SelfAttention.q.weight",))
    if prefix is None:
        raise LoadError(f"{source}: no T5 encoder weights found (expected encoder.block.N.layer... keys)")
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd.pop("encoder.embed_tokens.weight")
    sd.pop("encoder.embed_tokens.weight", None)
    if config is None:
        config = infer_t5_config(sd, source)
    return build_text_encoder(sd, config, source, deferred)


def vae_from_sd(sd: dict, source, config=None, deferred: bool = False):
    """``sd`` holds fp32 tensors (`SafetensorsReader.lazy(dtype=torch.float32)`)."""
    if not any(k.startswith("encoder.down_blocks.") for k in sd):
        prefix = find_prefix(list(sd), ("encoder.down.0.block.0.conv1.weight",))
        if prefix is None:
            raise LoadError(f"{source}: no VAE weights found (expected encoder.down... or encoder.down_blocks... keys)")
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        ldm = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        n = count_blocks(ldm, "encoder.down.", source)
        try:
            sd = convert_ldm_vae_checkpoint(ldm, {"down_block_types": ["DownEncoderBlock2D"] * n,
                                                  "up_block_types": ["UpDecoderBlock2D"] * n})
        except (KeyError, ValueError, IndexError, RuntimeError) as exc:
            raise LoadError(f"{source}: the VAE's weights cannot be mapped ({exc.__class__.__name__}: "
                            f"{str(exc)[:200]}); the file is incomplete or of another model. Download it again") \
                from None
    absent = sorted(k for k, v in sd.items() if v is None)  # the converter's .get() of a tensor the file lacks
    if absent:
        raise LoadError(f"{source}: the VAE is missing {len(absent)} weights (e.g. {', '.join(absent[:3])}, in "
                        "diffusers' names); the file is incomplete or of another model. Download it again")
    if config is None:
        config = infer_vae_config(sd, source)
    return build_vae(sd, config, source, deferred)


def transformer_from_sd(sd: dict, source, metadata, storage, compute, config=None, deferred: bool = False):
    """The transformer from one file's (or folder's) tensors under any prefix, in the original or the diffusers key
    names (`SafetensorsReader.lazy(dtype=compute, keep_fp8=True)`): dense tensors already in the compute dtype, fp8
    ones as stored. A scaled-fp8 or fp8 file keeps its fp8 weights; dense linears are stored in ``storage`` when
    that is an fp8 dtype (dtype="fp8_*"), else in the compute dtype."""
    from .assemble import Dense, assemble_transformer
    from .fp8 import has_fp8_weights, is_scaled_fp8, load_fp8_transformer

    if is_scaled_fp8(sd, metadata) or has_fp8_weights(sd):
        return load_fp8_transformer(sd, source, compute, metadata, config, deferred)
    prefix = transformer_prefix(source, sd)
    check_floats({k: v for k, v in sd.items() if k.startswith(prefix)}, "transformer", source)
    stored = {k[len(prefix):]: Dense(v, storage) for k, v in sd.items() if k.startswith(prefix)}
    return assemble_transformer(stored, source, compute, metadata, config, deferred)
