"""Load AuraFlow from every layout users have, offline, lazily, one copy of the weights in memory.

Layouts (detected from the files themselves):
1. a diffusers folder (``model_index.json``; sharded ``transformer/``, ``*.fp16.safetensors`` variants too);
2. the all-in-one single file: transformer under ``model.`` (or ``model.diffusion_model.``) in the original key
   names, T5 under ``text_encoders.`` (ComfyUI: ``text_encoders.pile_t5xl.transformer.``), VAE under ``vae.`` in the
   original (ldm) key names;
3. a transformer-only file in the original or the diffusers key names, with the text encoder, tokenizer and VAE
   from separate files or folders.
Configs come from the folder's config.json files or are inferred from tensor shapes. Original key names are
converted with diffusers' own converters. Nothing here touches the network.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LoadError, ParameterError

log = logging.getLogger(__name__)

DTYPES = ("auto", "fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")
TOKENIZER_HINT = ("pass tokenizer=PATH: a Pile-T5 sentencepiece 'tokenizer.model' (ComfyUI ships one as "
                  "comfy/text_encoders/t5_pile_tokenizer/tokenizer.model) or a diffusers 'tokenizer' folder")


# ---------------------------------------------------------------- safetensors access
class _Reader:
    """Lazy access to one or more safetensors files: keys from the headers, tensors one at a time."""

    def __init__(self, files):
        from safetensors import safe_open

        self.files = [Path(f) for f in files]
        self._handles = {}
        self.key_file = {}
        self.metadata = {}
        for f in self.files:
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
                keys = list(h.keys())
            except Exception as exc:  # safetensors raises its own error types
                raise LoadError(f"{f}: not a readable safetensors file ({exc}); the file is truncated, corrupt or "
                                f"of another format. Download it again.") from None
            self._handles[f] = h
            self.metadata.update(h.metadata() or {})
            for k in keys:
                self.key_file[k] = f

    def keys(self):
        return self.key_file.keys()

    def get(self, key, dtype=None):
        t = self._handles[self.key_file[key]].get_tensor(key)
        if dtype is not None and t.dtype != dtype and t.is_floating_point():
            t = t.to(dtype)
        return t

    def take(self, prefix: str = "", dtype=None, strip: bool = True) -> dict:
        out = {}
        for k in list(self.key_file):
            if k.startswith(prefix):
                out[k[len(prefix):] if strip else k] = self.get(k, dtype)
        return out


# ---------------------------------------------------------------- what a file is
_ORIG_TRANSFORMER = ("double_layers.0.attn.w1q.weight", "cond_seq_linear.weight", "t_embedder.mlp.0.weight")
_DIFF_TRANSFORMER = ("context_embedder.weight", "pos_embed.pos_embed", "time_step_proj.linear_1.weight")
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


def _find_prefix(keys, suffixes) -> str | None:
    for k in keys:
        for s in suffixes:
            if k.endswith(s):
                return k[: len(k) - len(s)]
    return None


def _describe(path, keys) -> str:
    for frag, what, fix in _LOOKS_LIKE:
        if any(frag in k for k in keys):
            return f"{path}: no AuraFlow transformer keys found (it looks like {what}). {fix}."
    sample = ", ".join(sorted(keys)[:4])
    return f"{path}: no AuraFlow transformer keys found (first keys: {sample}). Is this an AuraFlow checkpoint?"


# ---------------------------------------------------------------- dtypes and devices
def resolve_device(device):
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError(f"device={device!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device={device!r}: this torch has no usable CUDA device; use auto or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ParameterError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ParameterError(f"device={device!r}: MPS is not available here; use auto or cpu")
    return dev


def resolve_dtypes(dtype: str, device):
    """-> (storage dtype, compute dtype) for the transformer; the text encoder uses the compute dtype."""
    import torch

    if dtype not in DTYPES:
        raise ParameterError(f"dtype={dtype!r} is not known; valid: {', '.join(DTYPES)}")
    if dtype == "auto":
        if device.type == "cuda":
            d = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif device.type == "mps":
            d = torch.float16
        else:
            d = torch.float32
        return d, d
    if dtype.startswith("fp8"):
        storage = torch.float8_e4m3fn if dtype == "fp8_e4m3fn" else torch.float8_e5m2
        compute = torch.bfloat16 if device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
        return storage, compute
    d = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    return d, d


# ---------------------------------------------------------------- config inference
def _count(keys, prefix):
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
    head_dim = int((metadata or {}).get("aura_flow.attention_head_dim", 0)) or (256 if width % 256 == 0 else None)
    if head_dim is None:
        head_dim = next(d for d in (128, 64, 32, 16, 8, 4, 2, 1) if width % d == 0)
        log.warning("transformer width %d is not AuraFlow's; guessing attention head dim %d", width, head_dim)
    return dict(sample_size=int(math.isqrt(max_size)), patch_size=patch, in_channels=4, out_channels=out_channels,
                num_mmdit_layers=_count(sd, "joint_transformer_blocks."),
                num_single_dit_layers=_count(sd, "single_transformer_blocks."), attention_head_dim=head_dim,
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
                      num_layers=_count(sd, "encoder.block."), num_heads=heads, relative_attention_num_buckets=buckets,
                      relative_attention_max_distance=128, feed_forward_proj="gated-gelu" if gated else "relu",
                      dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, pad_token_id=1, eos_token_id=2)


def infer_vae_config(sd: dict) -> dict:
    n = _count(sd, "encoder.down_blocks.")
    channels = [sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n)]
    return dict(in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                block_out_channels=channels, layers_per_block=_count(sd, "encoder.down_blocks.0.resnets."),
                latent_channels=sd["decoder.conv_in.weight"].shape[1],
                norm_num_groups=32 if all(c % 32 == 0 for c in channels) else math.gcd(*channels),
                sample_size=1024, scaling_factor=0.13025, force_upcast=True,
                use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd)


# ---------------------------------------------------------------- module construction
def _materialize(cls_or_factory, sd: dict, what: str, source):
    """Build a module on the meta device and assign the loaded tensors (no random init, no second copy)."""
    import torch

    with torch.device("meta"):
        module = cls_or_factory()
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
        log.debug("%s: ignoring %d unexpected %s keys (e.g. %s)", source, len(unexpected), what, unexpected[:3])
        sd = {k: v for k, v in sd.items() if k in expected}
    for k in list(sd):
        ref = module.state_dict()[k]
        if tuple(sd[k].shape) != tuple(ref.shape):
            raise LoadError(f"{source}: {what} weight {k} has shape {tuple(sd[k].shape)}, expected {tuple(ref.shape)}")
    module.load_state_dict(sd, strict=False, assign=True)
    if what == "text encoder":
        module.encoder.embed_tokens = module.shared
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            raise LoadError(f"{source}: {what} weight {name} was not loaded")
    return module.eval().requires_grad_(False)


def build_transformer(sd: dict, config: dict, source, storage_dtype, compute_dtype):
    from diffusers import AuraFlowTransformer2DModel

    from .weights.linear import PatchableLinear, make_patchable

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}

    def factory():
        model = AuraFlowTransformer2DModel(**cfg)
        make_patchable(model)  # same keys; the layers take LoRA patches and stored dtypes other than the compute one
        return model

    model = _materialize(factory, sd, "transformer", source)
    if storage_dtype != compute_dtype:  # fp8 storage: each layer casts its weight to the compute dtype as it runs
        for layer in model.modules():
            if isinstance(layer, PatchableLinear):
                layer.weight.data = layer.weight.data.to(storage_dtype)
    return model


def build_text_encoder(sd: dict, config, source):
    from transformers import UMT5EncoderModel

    return _materialize(lambda: UMT5EncoderModel(config), sd, "text encoder", source)


def build_vae(sd: dict, config: dict, source):
    from diffusers import AutoencoderKL

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    return _materialize(lambda: AutoencoderKL(**cfg), sd, "VAE", source)


# ---------------------------------------------------------------- component sources
def _folder_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of one diffusers component folder, preferring full precision over the fp16 variant."""
    for variant in ("", ".fp16"):
        index = folder / f"{stem}.safetensors.index{variant}.json"
        if index.exists():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / n for n in names]
        single = folder / f"{stem}{variant}.safetensors"
        if single.exists():
            return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    bins = sorted(folder.glob("*.bin"))
    hint = " (only .bin files: convert them to safetensors)" if bins else ""
    raise LoadError(f"{folder}: no {stem}*.safetensors weights found{hint}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path}: cannot read the config ({exc})") from None


def _t5_from_sd(sd: dict, source, config=None):
    """``sd`` already holds the tensors in their target dtype (`_Reader.take(dtype=...)`)."""
    keys = list(sd)
    prefix = _find_prefix(keys, ("encoder.block.0.layer.0.SelfAttention.q.weight",))
    if prefix is None:
        raise LoadError(f"{source}: no T5 encoder weights found (expected encoder.block.N.layer... keys)")
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd.pop("encoder.embed_tokens.weight")
    sd.pop("encoder.embed_tokens.weight", None)
    if config is None:
        config = infer_t5_config(sd)
    return build_text_encoder(sd, config, source)


def _vae_from_sd(sd: dict, source, config=None):
    """``sd`` already holds fp32 tensors (`_Reader.take(dtype=torch.float32)`)."""
    if not any(k.startswith("encoder.down_blocks.") for k in sd):
        prefix = _find_prefix(list(sd), ("encoder.down.0.block.0.conv1.weight",))
        if prefix is None:
            raise LoadError(f"{source}: no VAE weights found (expected encoder.down... or encoder.down_blocks... keys)")
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        ldm = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        n = _count(ldm, "encoder.down.")
        sd = convert_ldm_vae_checkpoint(ldm, {"down_block_types": ["DownEncoderBlock2D"] * n,
                                              "up_block_types": ["UpDecoderBlock2D"] * n})
    if config is None:
        config = infer_vae_config(sd)
    return build_vae(sd, config, source)


def _transformer_from_sd(sd: dict, source, metadata, storage, compute, config=None):
    """``sd`` already holds the tensors in the compute dtype (`_Reader.take(dtype=compute)`)."""
    keys = list(sd)
    prefix = _find_prefix(keys, _ORIG_TRANSFORMER)
    if prefix is not None:
        from diffusers.loaders.single_file_utils import convert_auraflow_transformer_checkpoint_to_diffusers

        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        sd = convert_auraflow_transformer_checkpoint_to_diffusers(sd)
        sd = {k: v for k, v in sd.items() if v is not None}
    else:
        prefix = _find_prefix(keys, _DIFF_TRANSFORMER)
        if prefix is None:
            raise LoadError(_describe(source, keys))
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if config is None:
        config = infer_transformer_config(sd, metadata)
    return build_transformer(sd, config, source, storage, compute)


@dataclass
class Components:
    transformer: object = None
    text_encoder: object = None
    tokenizer: object = None
    vae: object = None
    sources: dict = field(default_factory=dict)


def _load_text_encoder_path(path: Path, dtype):
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists() and (path / "text_encoder").is_dir():
            path, cfg_file = path / "text_encoder", path / "text_encoder" / "config.json"
        from transformers import UMT5Config

        config = UMT5Config(**{k: v for k, v in _read_json(cfg_file).items() if k not in ("architectures",)}) \
            if cfg_file.exists() else None
        reader = _Reader(_folder_files(path, "model"))
        return _t5_from_sd(reader.take(dtype=dtype), path, config)
    return _t5_from_sd(_Reader([path]).take(dtype=dtype), path)


def _load_vae_path(path: Path):
    import torch

    if path.is_dir():
        if not (path / "config.json").exists() and (path / "vae").is_dir():
            path = path / "vae"
        config = _read_json(path / "config.json") if (path / "config.json").exists() else None
        return _vae_from_sd(_Reader(_folder_files(path, "diffusion_pytorch_model")).take(dtype=torch.float32), path,
                            config)
    return _vae_from_sd(_Reader([path]).take(dtype=torch.float32), path)


def comfyui_tokenizer_path() -> Path | None:
    """ComfyUI's bundled Pile-T5 tokenizer, when running inside ComfyUI (never imports ComfyUI itself)."""
    comfy = sys.modules.get("comfy")
    roots = [Path(p) for p in getattr(comfy, "__path__", [])] if comfy is not None else []
    for root in roots:
        p = root / "text_encoders" / "t5_pile_tokenizer" / "tokenizer.model"
        if p.exists():
            return p
    return None


def _check_path(name, value) -> Path | None:
    if value is None:
        return None
    p = Path(os.fspath(value)).expanduser()
    if not p.exists():
        raise LoadError(f"{name}={str(p)!r} does not exist")
    return p


def load_components(checkpoint, *, tokenizer=None, text_encoder=None, vae=None, dtype="auto", device="auto"):
    """Read every component from disk onto the CPU (the caller moves them); see `load` for the arguments.

    Tensors are converted to their target dtype as they are read, so a component is never held twice."""
    import torch

    from .prompts import PromptTokenizer

    dev = resolve_device(device)
    storage, compute = resolve_dtypes(dtype, dev)
    ckpt = _check_path("checkpoint", checkpoint)
    if ckpt is None:
        raise LoadError("checkpoint is required: a diffusers folder, an all-in-one .safetensors or a transformer file")
    tok_path = _check_path("tokenizer", tokenizer)
    te_path = _check_path("text_encoder", text_encoder)
    vae_path = _check_path("vae", vae)
    c = Components()

    if ckpt.is_dir():
        if not (ckpt / "model_index.json").exists():
            if (ckpt / "config.json").exists():  # a bare diffusers transformer folder
                reader = _Reader(_folder_files(ckpt, "diffusion_pytorch_model"))
                c.transformer = _transformer_from_sd(reader.take(dtype=compute), ckpt, reader.metadata, storage, compute,
                                                     _read_json(ckpt / "config.json"))
            else:
                raise LoadError(f"{ckpt}: a folder without model_index.json or config.json; expected a diffusers "
                                f"AuraFlow folder (like fal/AuraFlow-v0.3)")
        else:
            tdir = ckpt / "transformer"
            if not tdir.is_dir():
                raise LoadError(f"{ckpt}: diffusers folder without transformer/")
            reader = _Reader(_folder_files(tdir, "diffusion_pytorch_model"))
            c.transformer = _transformer_from_sd(reader.take(dtype=compute), tdir, reader.metadata, storage, compute,
                                                 _read_json(tdir / "config.json"))
            if te_path is None and (ckpt / "text_encoder").is_dir():
                te_path = ckpt / "text_encoder"
            if vae_path is None and (ckpt / "vae").is_dir():
                vae_path = ckpt / "vae"
            if tok_path is None and (ckpt / "tokenizer").is_dir():
                tok_path = ckpt / "tokenizer"
    else:
        reader = _Reader([ckpt])
        keys = list(reader.keys())
        t_prefix = _find_prefix(keys, _ORIG_TRANSFORMER + _DIFF_TRANSFORMER)
        if t_prefix is None:
            raise LoadError(_describe(ckpt, keys))
        c.transformer = _transformer_from_sd(reader.take(t_prefix, strip=False, dtype=compute), ckpt,
                                             reader.metadata, storage, compute)
        if te_path is None and any(k.startswith("text_encoders.") for k in keys):
            te_sd = reader.take("text_encoders.", dtype=compute)
            spiece = next((k for k in te_sd if k.endswith("spiece_model")), None)
            if spiece is not None:  # ComfyUI serializes the tokenizer into the checkpoint
                blob = te_sd.pop(spiece)
                if tok_path is None:
                    c.tokenizer = PromptTokenizer.from_sentencepiece_bytes(blob.numpy().tobytes(), f"{ckpt}:{spiece}")
                    c.sources["tokenizer"] = c.tokenizer.source
            c.text_encoder = _t5_from_sd(te_sd, ckpt)
            c.sources["text_encoder"] = str(ckpt)
        if vae_path is None and any(k.startswith(("vae.", "first_stage_model.")) for k in keys):
            c.vae = _vae_from_sd(reader.take("vae." if any(k.startswith("vae.") for k in keys)
                                             else "first_stage_model.", dtype=torch.float32), ckpt)
            c.sources["vae"] = str(ckpt)
        del reader
    c.sources["transformer"] = str(ckpt)

    if c.text_encoder is None:
        if te_path is None:
            raise LoadError(f"{ckpt}: has no text encoder; pass text_encoder=PATH (a Pile-T5-XL .safetensors or a "
                            f"diffusers text_encoder folder; in ComfyUI put it in models/text_encoders)")
        c.text_encoder = _load_text_encoder_path(te_path, compute)
        c.sources["text_encoder"] = str(te_path)
    if c.vae is None:
        if vae_path is None:
            raise LoadError(f"{ckpt}: has no VAE; pass vae=PATH (the SDXL VAE .safetensors or a diffusers vae "
                            f"folder; in ComfyUI put it in models/vae)")
        c.vae = _load_vae_path(vae_path)
        c.sources["vae"] = str(vae_path)
    if c.tokenizer is None:
        if tok_path is None and te_path is not None and te_path.is_dir():
            for cand in (te_path / "tokenizer", te_path.parent / "tokenizer", te_path / "tokenizer.model"):
                if cand.exists():
                    tok_path = cand
                    break
        if tok_path is None and not ckpt.is_dir() and (ckpt.parent / "tokenizer.model").exists():
            tok_path = ckpt.parent / "tokenizer.model"
        if tok_path is None:
            tok_path = comfyui_tokenizer_path()
        if tok_path is None:
            raise LoadError(f"{ckpt}: no tokenizer found; {TOKENIZER_HINT}, or put tokenizer.model next to the "
                            f"checkpoint")
        c.tokenizer = PromptTokenizer.load(tok_path)
        c.sources["tokenizer"] = str(tok_path)
    return c, dev, storage, compute


# what sampling and a fp32 VAE decode of a 1024x1024 image need besides the weights (the decode dominates)
WORKING_MEMORY = 4 * 2**30


def text_encoder_should_wait(free_bytes: int, part_bytes: dict) -> bool:
    """Whether the text encoder should wait on the CPU between prompts: when the device's free memory cannot hold
    every part (``part_bytes``: name -> bytes) plus `WORKING_MEMORY`. The text encoder is only needed to encode a
    prompt (cached afterwards), so it is the part to release before sampling."""
    if not part_bytes.get("text_encoder"):
        return False
    return sum(part_bytes.values()) + WORKING_MEMORY > free_bytes


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (0 for None or anything that is not a module)."""
    if module is None or not hasattr(module, "parameters"):
        return 0
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def load(checkpoint, *, tokenizer=None, text_encoder=None, vae=None, dtype="auto", device="auto",
         offload_text_encoder="auto"):
    """Load AuraFlow from ``checkpoint`` and return an `AuraFlowPipeline`.

    checkpoint: a diffusers folder, an all-in-one .safetensors, or a transformer-only .safetensors (original or
    diffusers key names). tokenizer / text_encoder / vae: separate files or folders, overriding what the
    checkpoint carries. dtype: auto, fp32, fp16, bf16, fp8_e4m3fn or fp8_e5m2 (fp8 is storage only; compute
    runs in bf16/fp16); the VAE always runs in fp32. device: auto, cpu, cuda, cuda:N, mps.
    offload_text_encoder: True keeps the text encoder on the CPU between prompts (it visits the device only to
    encode one); "auto" does so on a CUDA device whose free memory is short (`text_encoder_should_wait`).
    """
    import time

    import torch

    from .pipeline.pipeline import AuraFlowPipeline

    if offload_text_encoder not in ("auto", True, False):
        raise ParameterError(f"offload_text_encoder={offload_text_encoder!r}: give True, False or 'auto'")
    t0 = time.perf_counter()
    c, dev, storage, compute = load_components(checkpoint, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                               dtype=dtype, device=device)
    if offload_text_encoder == "auto":
        offload_text_encoder = False
        if dev.type == "cuda":
            free, _total = torch.cuda.mem_get_info(dev)
            parts = {name: module_bytes(getattr(c, name)) for name in ("transformer", "text_encoder", "vae")}
            offload_text_encoder = text_encoder_should_wait(free, parts)
            if offload_text_encoder:
                log.info("%.1f GiB free on %s for %.1f GiB of weights: the text encoder waits on the CPU between "
                         "prompts", free / 2**30, dev, sum(parts.values()) / 2**30)
    pipe = AuraFlowPipeline(c.transformer, c.text_encoder, c.tokenizer, c.vae, device=dev, compute_dtype=compute,
                            sources=c.sources, offload_text_encoder=offload_text_encoder)
    cfg = c.transformer.config
    log.info("AuraFlow loaded from %s: %d+%d blocks, width %d, %s on %s in %.1fs", checkpoint, cfg.num_mmdit_layers,
             cfg.num_single_dit_layers, cfg.num_attention_heads * cfg.attention_head_dim, dtype, dev,
             time.perf_counter() - t0)
    return pipe
