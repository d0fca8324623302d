"""The engine's SDXL VAE behind ComfyUI's VAE interface, and the two AuraFlow VAE nodes.

`AuraFlowVAE` offers what ComfyUI's core nodes call on a ``VAE`` (VAE Decode / Encode and their tiled forms,
inpaint encoding): ``decode(latent) -> (B, H, W, 3)``, ``encode(pixels) -> latent``, ``vae_encode_crop_pixels``,
``spacial_compression_decode/encode``, ``temporal_compression_decode``, ``downscale_ratio`` and friends.
Latents are raw VAE space (ComfyUI's LATENT convention); images are float32 in [0, 1].
"""
from __future__ import annotations

import contextlib
import logging

from ..aura_flow.errors import ParameterError
from ..aura_flow.weights.devices import module_bytes
from .comfyui import devices, memory
from .records import attach, record_of
from .words import VAE, check_connected

log = logging.getLogger(__name__)

SCALE = 8  # the SDXL VAE's spatial compression
DEFAULT_TILE, DEFAULT_OVERLAP = 512, 64  # pixels, for tiled runs without sizes (as ComfyUI's fallback)


class AuraFlowVAE:
    """ComfyUI's ``comfy.sd.VAE`` interface over an `AuraFlowPipeline`'s VAE (decoding one image at a time)."""

    downscale_ratio = SCALE
    upscale_ratio = SCALE
    latent_channels = 4
    latent_dim = 2
    output_channels = 3
    crop_input = True
    pad_channel_value = None

    def __init__(self, pipeline):
        self.pipeline = pipeline

    @property
    def first_stage_model(self):
        return self.pipeline.vae

    @property
    def patcher(self):
        """ComfyUI's ModelPatcher holding this VAE (None outside ComfyUI), as on ComfyUI's own VAE objects."""
        return memory.patcher(self.pipeline, "vae")

    def throw_exception_if_invalid(self):
        if self.pipeline.vae is None:
            raise RuntimeError("AuraFlow VAE: this model was loaded without a VAE; pick one in AuraFlow Loader's "
                               "vae input (the SDXL VAE in models/vae)")

    def spacial_compression_decode(self):
        return SCALE

    def spacial_compression_encode(self):
        return SCALE

    def temporal_compression_decode(self):
        return None

    def vae_output_dtype(self):
        import torch

        return torch.float32

    def model_size(self) -> int:
        return module_bytes(self.pipeline.vae)

    def get_sd(self):
        return self.pipeline.vae.state_dict()

    def is_dynamic(self):
        return False

    def vae_encode_crop_pixels(self, pixels):
        """Centre-crop (B, H, W, C) images to multiples of 8 and keep the first 3 channels; never in place."""
        h, w = pixels.shape[1] // SCALE * SCALE, pixels.shape[2] // SCALE * SCALE
        top, left = (pixels.shape[1] - h) // 2, (pixels.shape[2] - w) // 2
        return pixels[:, top:top + h, left:left + w, :self.output_channels]

    def decode(self, samples_in, vae_options=None):
        """Raw latent (B, 4, h, w) -> images (B, 8h, 8w, 3) float32 in [0, 1] on ComfyUI's intermediate device.

        Like ComfyUI's own VAE, it falls back to tiled decoding when the device runs out of memory.
        """
        from ..aura_flow.sampling.loop import check_latent  # torch: when a node runs

        self.throw_exception_if_invalid()
        check_latent(samples_in, "samples")  # a (batch, 4, h, w) latent, no size 0, no NaN: a ParameterError
        return attach(self._run(self.pipeline.decode, samples_in, DEFAULT_TILE // SCALE, DEFAULT_OVERLAP / DEFAULT_TILE),
                      record_of(samples_in))

    def encode(self, pixel_samples):
        """Images (B, H, W, C) in [0, 1] -> raw latent (B, 4, H/8, W/8) (centre-cropped to multiples of 8)."""
        self.throw_exception_if_invalid()
        if getattr(pixel_samples, "ndim", 0) != 4:
            raise ParameterError(f"pixels: expected (batch, height, width, 3) images, got shape "
                                 f"{tuple(getattr(pixel_samples, 'shape', ()))}")
        pixels = self.vae_encode_crop_pixels(pixel_samples)
        if pixels.ndim != 4 or pixels.shape[0] == 0 or pixels.shape[1] < SCALE or pixels.shape[2] < SCALE or \
                pixels.shape[-1] != 3:
            raise ParameterError(f"pixels: expected (batch, height, width, 3) images, at least one of at least 8x8, "
                                 f"got shape {tuple(pixel_samples.shape)}")
        return self._run(self.pipeline.encode, pixels, DEFAULT_TILE // SCALE, DEFAULT_OVERLAP / DEFAULT_TILE)

    # VAE Decode (Tiled) passes tile sizes in latent units, VAE Encode (Tiled) in pixels.
    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        tile = min(tile_x or DEFAULT_TILE // SCALE, tile_y or tile_x or DEFAULT_TILE // SCALE)
        return attach(self._run(self.pipeline.decode, samples, tile, (overlap or 0) / tile, tiled=True),
                      record_of(samples))

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        tile = min(tile_x or DEFAULT_TILE, tile_y or tile_x or DEFAULT_TILE)
        pixels = self.vae_encode_crop_pixels(pixel_samples)
        return self._run(self.pipeline.encode, pixels, tile // SCALE, (overlap or 0) / tile, tiled=True)

    def _run(self, fn, batch, tile_latent: int, overlap: float, tiled: bool = False):
        """``fn`` one image at a time on ComfyUI's device; tiled (diffusers' VAE tiling with ``tile_latent``-sized
        latent tiles overlapping by the fraction ``overlap``) when asked or after running out of memory."""
        import torch

        out_of_memory = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError  # torch < 2.5
        if batch.ndim != 4 or batch.shape[0] == 0:
            raise ParameterError(f"AuraFlow VAE: an empty batch (shape {tuple(batch.shape)}); give at least one image "
                                 "or latent")
        memory.load_vae(self.pipeline, batch[:1].shape, decode=fn == self.pipeline.decode)
        out = []
        for i in range(batch.shape[0]):
            item = batch[i:i + 1]
            if not tiled:
                try:
                    out.append(fn(item))
                    continue
                except out_of_memory:
                    log.warning("AuraFlow VAE: out of memory; retrying with tiles of %d px", tile_latent * SCALE)
                    devices.empty_cache()
            with self._tiling(tile_latent, overlap):
                out.append(fn(item))
        return torch.cat(out).to(devices.intermediate_device())

    @contextlib.contextmanager
    def _tiling(self, tile_latent: int, overlap: float):
        vae = self.pipeline.vae
        names = ("use_tiling", "tile_latent_min_size", "tile_sample_min_size", "tile_overlap_factor")
        saved = {name: getattr(vae, name) for name in names}
        vae.use_tiling = True
        vae.tile_latent_min_size = max(1, int(tile_latent))
        vae.tile_sample_min_size = vae.tile_latent_min_size * SCALE
        vae.tile_overlap_factor = min(max(float(overlap), 0.0), 0.5)
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(vae, name, value)


class AuraFlowVAEDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latent to decode (raw SDXL VAE space, as AuraFlow Sampler gives)."}),
            "vae": ("VAE", {"tooltip": "The VAE from AuraFlow Loader (or any SDXL VAE)."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded images, float32 in [0, 1].",)
    FUNCTION = "decode"
    CATEGORY = "AuraFlow/latent"
    DESCRIPTION = "Decodes an AuraFlow latent into images with the SDXL VAE."
    SEARCH_ALIASES = ["aura flow", "pony", "vae decode"]

    def decode(self, samples, vae):
        check_connected("vae", vae, "decode", VAE)
        if not isinstance(samples, dict):
            raise ParameterError("samples: expected a LATENT (from AuraFlow Sampler or VAE Encode)")
        if samples.get("noise_mask") is not None:
            log.debug("AuraFlow VAE Decode: the latent's noise_mask does not affect decoding")
        return (vae.decode(samples.get("samples")),)


class AuraFlowVAEEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The images to encode; sizes are centre-cropped to multiples of 8."}),
            "vae": ("VAE", {"tooltip": "The VAE from AuraFlow Loader (or any SDXL VAE)."}),
        }}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The latent (raw SDXL VAE space), for AuraFlow Sampler with denoise below 1.",)
    FUNCTION = "encode"
    CATEGORY = "AuraFlow/latent"
    DESCRIPTION = "Encodes images into an AuraFlow (SDXL VAE) latent, the start of image-to-image."
    SEARCH_ALIASES = ["aura flow", "pony", "vae encode", "img2img"]

    def encode(self, pixels, vae):
        check_connected("vae", vae, "encode", VAE)
        return ({"samples": vae.encode(pixels)},)
