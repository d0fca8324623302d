"""The engine's SDXL VAE behind ComfyUI's VAE interface, and the two AuraFlow VAE nodes.

`AuraFlowVAE` offers what ComfyUI's core nodes call on a ``VAE`` (VAE Decode / Encode and their tiled forms,
inpaint encoding): ``decode(latent) -> (B, H, W, 3)``, ``encode(pixels) -> latent``, ``vae_encode_crop_pixels``,
``spacial_compression_decode/encode``, ``temporal_compression_decode``, ``downscale_ratio`` and friends.
Latents are raw VAE space (ComfyUI's LATENT convention); images are float32 in [0, 1].
"""
from __future__ import annotations

import logging

from . import comfy_compat as compat

log = logging.getLogger(__name__)

SCALE = 8  # the SDXL VAE's spatial compression


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
        vae = self.pipeline.vae
        return sum(p.numel() * p.element_size() for p in vae.parameters()) if vae is not None else 0

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
        """Raw latent (B, 4, h, w) -> images (B, 8h, 8w, 3) float32 in [0, 1] on ComfyUI's intermediate device."""
        import torch

        self.throw_exception_if_invalid()
        if samples_in.ndim != 4 or samples_in.shape[1] != self.latent_channels:
            raise ValueError(f"AuraFlow VAE: expected a (batch, 4, height/8, width/8) SDXL latent, got shape "
                             f"{tuple(samples_in.shape)}; was this latent made for another model?")
        with compat.on_device(self.pipeline):
            out = [self.pipeline.decode(samples_in[i:i + 1]) for i in range(samples_in.shape[0])]
        return torch.cat(out).to(compat.intermediate_device())

    def encode(self, pixel_samples):
        """Images (B, H, W, C) in [0, 1] -> raw latent (B, 4, H/8, W/8) (centre-cropped to multiples of 8)."""
        import torch

        self.throw_exception_if_invalid()
        pixels = self.vae_encode_crop_pixels(pixel_samples)
        if pixels.shape[1] < SCALE or pixels.shape[2] < SCALE or pixels.shape[-1] != 3:
            raise ValueError(f"AuraFlow VAE: expected (batch, height, width, 3) images at least 8x8, got shape "
                             f"{tuple(pixel_samples.shape)}")
        with compat.on_device(self.pipeline):
            out = [self.pipeline.encode(pixels[i:i + 1]) for i in range(pixels.shape[0])]
        return torch.cat(out).to(compat.intermediate_device())

    # VAE Decode (Tiled) / VAE Encode (Tiled) call these; one image at a time already bounds the memory, so
    # the tile sizes are not needed.
    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        return self.decode(samples)

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        return self.encode(pixel_samples)


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

    def decode(self, samples, vae):
        if samples.get("noise_mask") is not None:
            log.debug("AuraFlow VAE Decode: the latent's noise_mask does not affect decoding")
        return (vae.decode(samples["samples"]),)


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

    def encode(self, pixels, vae):
        return ({"samples": vae.encode(pixels)},)
