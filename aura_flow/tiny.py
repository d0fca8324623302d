"""Tiny random-weight AuraFlow models written to disk in every layout the loader reads.

Used by ``python -m aura_flow demo``, the tests and the benchmarks: real diffusers / transformers modules with
random weights, saved as real safetensors files, so the whole loading and generation path runs without the
16 GB of real weights. Presets: "tiny" (tests, demo), "medium" (small CPU benchmarks), "wide" (the real widths with
one block of each kind: the benchmark's default), "full" (the real shapes), and "pony": tiny, with Pony V7's config
values (AuraFlow v0.3's architecture with its 96x96 position grid, ``pos_embed_max_size`` 9216, so sizes up to
1536x1536 need no interpolation; a diffusers folder that names ``UMT5EncoderModel`` and ``LlamaTokenizerFast``, as
purplesmartai/pony-v7-base does).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .weights.configs import HEAD_DIM_KEY
from .weights.keymap import transformer_to_original, vae_to_original  # noqa: F401  (re-exported)

# Every preset is a real AuraFlow layout; only sizes differ.
PRESETS = {
    "tiny": dict(transformer=dict(num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
                                  num_attention_heads=4, pos_embed_max_size=256),
                 t5=dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
                 vae=dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1)),
    # medium: one 256x256 image with 16 steps and CFG takes a few seconds on 2 CPU cores (benchmarks/run.py)
    "medium": dict(transformer=dict(num_mmdit_layers=2, num_single_dit_layers=4, attention_head_dim=32,
                                    num_attention_heads=4, pos_embed_max_size=1024),
                   t5=dict(d_model=256, d_kv=32, d_ff=512, num_layers=4, num_heads=8),
                   vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1)),
    # wide: AuraFlow's real widths (12 heads x 256, 2048-wide text, the 96x96 position grid, the real VAE) with one
    # block of each kind, so a step costs exactly what one joint plus one single block of the real model costs
    "wide": dict(transformer=dict(num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=256,
                                  num_attention_heads=12, pos_embed_max_size=9216),
                 t5=dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=2, num_heads=32),
                 vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)),
    "full": dict(transformer=dict(num_mmdit_layers=4, num_single_dit_layers=32, attention_head_dim=256,
                                  num_attention_heads=12, pos_embed_max_size=9216),
                 t5=dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),
                 vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)),
    # Pony V7 (purplesmartai/pony-v7-base): AuraFlow v0.3's layout and grid; its tokenizer folder is a
    # LlamaTokenizerFast over Pile-T5's vocabulary, and its trainers use prompts up to 768 tokens
    "pony": dict(transformer=dict(num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
                                  num_attention_heads=4, pos_embed_max_size=9216),
                 t5=dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
                 vae=dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
                 tokenizer_class="LlamaTokenizerFast", max_tokens=768),
}
PONY_GRID = 96  # position-grid side of Pony V7 (and AuraFlow v0.3): 96 patches of 16 px = 1536 px
LAYOUTS = ("diffusers", "single_file", "transformer_only", "transformer_only_diffusers")

_CORPUS = ("a photo of a cat sitting on a mat. the quick brown fox jumps over the lazy dog. happy birthday, "
           "purple and pink gradient, stars, rainbow, hearts, ukiyo-e, graffiti, 3d render, dark fantasy, "
           "portrait, landscape, mountains, river, city at night, neon lights, watercolor painting\n") * 40


def transformer_config(preset="tiny", text_dim=None):
    p = PRESETS[preset]["transformer"]
    width = p["attention_head_dim"] * p["num_attention_heads"]
    grid = int(p["pos_embed_max_size"] ** 0.5)
    return dict(sample_size=grid, patch_size=2, in_channels=4, out_channels=4,
                joint_attention_dim=text_dim or PRESETS[preset]["t5"]["d_model"], caption_projection_dim=width, **p)


def t5_config(preset="tiny", vocab_size=32128):
    from transformers import UMT5Config

    return UMT5Config(vocab_size=vocab_size, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
                      pad_token_id=1, eos_token_id=2, **PRESETS[preset]["t5"])


def vae_config(preset="tiny"):
    p = PRESETS[preset]["vae"]
    n = len(p["block_out_channels"])
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(p["block_out_channels"]),
                layers_per_block=p["layers_per_block"], latent_channels=4, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.13025, force_upcast=True)


# ---------------------------------------------------------------- tokenizer
def build_tokenizer(dest: Path, tokenizer_class: str | None = None, max_tokens: int = 256) -> tuple[Path, Path]:
    """Train a small sentencepiece model (pad 1, end 2, like Pile-T5's) and save it twice: as ComfyUI ships it
    (``tokenizer.model``) and as a transformers fast-tokenizer folder (the diffusers layout), whose config names
    ``tokenizer_class`` when given (Pony V7's folder names LlamaTokenizerFast)."""
    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    corpus = dest / "corpus.txt"
    corpus.write_text(_CORPUS)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(dest / "sp"), vocab_size=96,
                                   model_type="unigram", pad_id=1, eos_id=2, unk_id=0, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", minloglevel=2, hard_vocab_limit=False)
    corpus.unlink()
    (dest / "sp.vocab").unlink(missing_ok=True)
    sp_file = dest / "tokenizer.model"
    os.replace(dest / "sp.model", sp_file)
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    tk = Tokenizer(models.Unigram([(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())], unk_id=0))
    tk.normalizer = normalizers.Sequence([normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=max_tokens)
    folder = dest / "hf"
    fast.save_pretrained(folder)
    if tokenizer_class:
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["tokenizer_class"] = tokenizer_class
        config_file.write_text(json.dumps(config, indent=2))
    return sp_file, folder


# ---------------------------------------------------------------- building
def build_modules(preset="tiny", seed=0, vocab_size=96, device=None):
    """Random-weight transformer, text encoder and VAE (fp32), seeded, built on ``device`` (default the CPU; a GPU
    initialises the full preset's 8 billion values in seconds, where the CPU takes minutes; its random numbers are
    other than the CPU's)."""
    import contextlib

    from diffusers import AuraFlowTransformer2DModel, AutoencoderKL
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        transformer = AuraFlowTransformer2DModel(**transformer_config(preset))
        # diffusers zero-initialises nothing here, but make the output layers non-trivial anyway
        text_encoder = UMT5EncoderModel(t5_config(preset, vocab_size))
        vae = AutoencoderKL(**vae_config(preset))
    for m in (transformer, text_encoder, vae):
        m.eval()
    return transformer, text_encoder, vae


def _save(sd: dict, path: Path, metadata: dict | None = None):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)


def _save_sharded(sd: dict, folder: Path, stem: str, shards: int, variant: str | None):
    """Save like diffusers' save_pretrained with max_shard_size: numbered shards plus an index json."""
    keys = sorted(sd)
    per = -(-len(keys) // shards)
    weight_map = {}
    ext = f".{variant}" if variant else ""
    for n in range(shards):
        name = f"{stem}{ext}-{n + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[n * per:(n + 1) * per]}
        _save(part, folder / name, {"format": "pt"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index{ext}.json").write_text(json.dumps(index, indent=2))


def build_tiny(dest, layout: str = "diffusers", *, preset: str = "tiny", seed: int = 0, variant: str | None = None,
               shards: int = 2, device=None, dtype: torch.dtype | None = None) -> Path:
    """Write a random-weight AuraFlow in ``layout`` under ``dest`` and return what to pass to ``aura_flow.load``.

    - "diffusers": a folder like fal/AuraFlow-v0.3 (sharded transformer; ``variant="fp16"`` writes the fp16 files).
    - "single_file": one all-in-one .safetensors (transformer under ``model.`` in the original key names, T5 under
      ``text_encoders.pile_t5xl.transformer.``, VAE under ``vae.`` in the original key names).
    - "transformer_only" / "transformer_only_diffusers": a transformer .safetensors in the original / diffusers key
      names, with ``text_encoder.safetensors``, ``vae.safetensors`` (original VAE keys) and ``tokenizer.model``
      beside it in ``dest`` for the separate-file options.
    The same seed gives the same weights in every layout. device: where the modules are built (`build_modules`);
    dtype: the dtype every file holds (default fp32, or fp16 with ``variant="fp16"``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; valid: {', '.join(LAYOUTS)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    extra = PRESETS[preset]
    sp_file, tok_folder = build_tokenizer(dest / "tokenizer_src", extra.get("tokenizer_class"),
                                          extra.get("max_tokens", 256))
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(sp_file)).vocab_size()
    transformer, text_encoder, vae = build_modules(preset, seed, vocab, device)

    def saved(module):  # on the CPU, in the dtype to write, one part at a time
        if device is None and dtype is None:
            return module.state_dict()
        return {k: v.to(device="cpu", dtype=dtype) for k, v in module.state_dict().items()}

    tsd = saved(transformer)
    esd = {k: v for k, v in saved(text_encoder).items() if k != "encoder.embed_tokens.weight"}
    vsd = saved(vae)
    head_meta = {HEAD_DIM_KEY: str(transformer.config.attention_head_dim)}
    nblocks = len(vae.config.block_out_channels)

    if layout == "diffusers":
        root = dest / "diffusers"
        dtype = torch.float16 if variant == "fp16" else dtype

        def cast(sd):
            return {k: v.to(dtype) for k, v in sd.items()} if dtype else sd

        (root / "transformer").mkdir(parents=True, exist_ok=True)
        (root / "transformer" / "config.json").write_text(json.dumps(dict(transformer.config), indent=2))
        _save_sharded(cast(tsd), root / "transformer", "diffusion_pytorch_model", shards, variant)
        (root / "text_encoder").mkdir(parents=True, exist_ok=True)
        text_encoder.config.architectures = ["UMT5EncoderModel"]
        (root / "text_encoder" / "config.json").write_text(text_encoder.config.to_json_string())
        _save(cast(esd), root / "text_encoder" / (f"model.{variant}.safetensors" if variant else "model.safetensors"),
              {"format": "pt"})
        (root / "vae").mkdir(parents=True, exist_ok=True)
        (root / "vae" / "config.json").write_text(json.dumps(dict(vae.config), indent=2))
        _save(cast(vsd), root / "vae" / (f"diffusion_pytorch_model.{variant}.safetensors" if variant
                                          else "diffusion_pytorch_model.safetensors"), {"format": "pt"})
        import shutil

        shutil.copytree(tok_folder, root / "tokenizer", dirs_exist_ok=True)
        (root / "scheduler").mkdir(exist_ok=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.73}))
        (root / "model_index.json").write_text(json.dumps({
            "_class_name": "AuraFlowPipeline", "_diffusers_version": "0.30.0",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", extra.get("tokenizer_class", "PreTrainedTokenizerFast")],
            "transformer": ["diffusers", "AuraFlowTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
        return root

    if layout == "single_file":
        sd = {f"model.{k}": v for k, v in transformer_to_original(tsd).items()}
        sd.update({f"text_encoders.pile_t5xl.transformer.{k}": v for k, v in esd.items()})
        sd.update({f"vae.{k}": v for k, v in vae_to_original(vsd, nblocks).items()})
        path = dest / "aura_flow_tiny.safetensors"
        _save(sd, path, head_meta)
        os.replace(sp_file, dest / "tokenizer.model")
        return path

    # transformer-only layouts, with the other parts as separate files beside it
    _save(esd, dest / "text_encoder.safetensors")
    _save(vae_to_original(vsd, nblocks), dest / "vae.safetensors")
    os.replace(sp_file, dest / "tokenizer.model")
    if layout == "transformer_only":
        path = dest / "aura_flow_tiny_transformer.safetensors"
        _save(transformer_to_original(tsd), path, head_meta)
    else:
        path = dest / "aura_flow_tiny_transformer_diffusers.safetensors"
        _save(tsd, path, head_meta)
    return path
