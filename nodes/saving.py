"""AuraFlow Save Image: webp / jpg / png into ComfyUI's output folder, with the prompt and workflow embedded."""
from __future__ import annotations

import logging
import os

from ..aura_flow import params as P
from ..aura_flow.errors import ParameterError, shown
from ..aura_flow.images import EXT, check_output_folder, encode_image, write_first_free
from .comfyui import folders
from .records import REMOTE_KEY, parameters_of, record_of, remote_of
from .words import node_words

log = logging.getLogger(__name__)

NAME_MAX = 255  # bytes of one file or folder name on the usual file systems (ext4, btrfs, xfs, APFS, NTFS's 255 chars)


def name_max(folder=None) -> int:
    """The longest file name, in bytes, ``folder``'s file system takes (`NAME_MAX` where it cannot say)."""
    try:
        found = os.pathconf(folder, "PC_NAME_MAX") if folder is not None else None
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or the folder is not there yet
        found = None
    return min(found, NAME_MAX) if isinstance(found, int) and found > 0 else NAME_MAX


def _bytes(name: str) -> int:
    return len(name.encode("utf-8", "surrogateescape"))


def file_name(base: str, counter: int, fmt: str) -> str:
    """The name a saved image gets: ``<base>_<counter, 5 digits or more>_.<ext>``, as ComfyUI's Save Image names."""
    return f"{base}_{counter:05}_{EXT[fmt]}"


def check_prefix(prefix, fmt: str = "png") -> str:
    """A filename prefix that can name files: text without NUL; each folder name at most `NAME_MAX` bytes, and the
    last part short enough that the image's whole file name (counter and extension added) is too."""
    if not isinstance(prefix, str) or not prefix.strip() or "\0" in prefix:
        raise ParameterError(f"filename_prefix={shown(prefix)}: give a file name (no NUL character), such as "
                             "'AuraFlow' or 'AuraFlow/cat'")
    bad = next((i for i, c in enumerate(prefix) if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0), None)
    if bad is not None:  # a CR/LF or escape in a file name breaks listings, logs and the editor's image links
        raise ParameterError(f"filename_prefix={shown(prefix)}: character {bad + 1} is a control character "
                             f"({ord(prefix[bad]):#04x}), which a file name should not hold; give plain text")
    try:
        prefix.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: no file system can store it
        raise ParameterError(f"filename_prefix={shown(prefix)}: character {exc.start + 1} is a lone surrogate "
                             f"{ord(prefix[exc.start]):#x}, which no file name can hold; give valid text") from None
    *folders_, stem = prefix.replace("\\", "/").split("/")
    for name in folders_:
        if _bytes(name) > NAME_MAX:
            raise ParameterError(f"filename_prefix: the folder name {name[:40]!r}… is {_bytes(name)} bytes long; at "
                                 f"most {NAME_MAX} (file and folder names are limited to {NAME_MAX} bytes)")
    check_file_name(stem, 1, fmt, "filename_prefix")
    return prefix


def check_file_name(base: str, counter: int, fmt: str, name: str, folder=None) -> None:
    """ParameterError when `file_name` (``base``, ``counter``, ``fmt``) is longer than the file system takes."""
    final, limit = file_name(base, counter, fmt), name_max(folder)
    if _bytes(final) > limit:
        room = limit - _bytes(file_name("", counter, fmt))
        raise ParameterError(f"{name}: the name {base[:40]!r}… is {_bytes(base)} bytes long; at most {room} (the file "
                             f"name {final[:20]!r}…{final[-12:]!r} would be {_bytes(final)} bytes, and file names are "
                             f"limited to {limit} bytes)")


def check_images(images) -> None:
    """An IMAGE batch that can be saved: (batch, height, width, channels) with finite values."""
    import torch

    if not isinstance(images, torch.Tensor) or images.ndim != 4 or min(images.shape[1:3], default=0) < 1 or \
            images.shape[3] not in (1, 3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ParameterError(f"images: expected an IMAGE (batch, height, width, 3), got {shape}")
    if not torch.isfinite(images).all():
        raise ParameterError("images hold NaN or infinite values, so nothing was saved: the sampling's numbers "
                             "overflowed upstream. Lower cfg, use another sampler or weight_dtype fp32")


class AuraFlowSaveImage:
    def __init__(self):
        self.output_dir = folders.output_directory()
        self.type = "output"

    @classmethod
    def INPUT_TYPES(cls):
        quality = P.RANGES["output_quality"]
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {
                    "default": "AuraFlow",
                    "tooltip": "File name prefix, optionally with sub-folders ('AuraFlow/cat') and ComfyUI's "
                               "%date:...% / %Node.widget% variables; it must stay inside the output folder."}),
                "format": (list(P.OUTPUT_FORMATS), {"default": P.DEFAULTS["output_format"],
                                                    "tooltip": "File format: webp, jpg or png (lossless)."}),
                "quality": ("INT", {"default": quality.default, "min": int(quality.lo), "max": int(quality.hi),
                                    "step": 1, "tooltip": "webp/jpg quality, 0 worst to 100 best (png ignores it)."}),
                "embed_workflow": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Embed the prompt and workflow in the file (PNG text, or EXIF for webp/jpg) so "
                               "dropping it on ComfyUI restores the graph, with an 'auraflow' entry naming the "
                               "model files (and short hashes), dtype, LoRAs and settings that made the image. "
                               "ComfyUI's --disable-metadata turns this off for every image."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The same images, passed through.",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "AuraFlow/image"
    DESCRIPTION = "Saves images as webp, jpg or png to the output folder, with the workflow embedded."
    SEARCH_ALIASES = ["aura flow", "save image", "webp", "jpg"]

    def save(self, images, filename_prefix="AuraFlow", format="webp", quality=80, embed_workflow=True, prompt=None,
             extra_pnginfo=None):
        import numpy as np
        from PIL import Image

        fmt = P.check_choice("format", format, P.OUTPUT_FORMATS)
        with node_words({"output_quality": "quality"}):
            quality = P.check_range("output_quality", quality)
        check_prefix(filename_prefix, fmt)
        check_images(images)
        if not isinstance(embed_workflow, bool) and embed_workflow not in (0, 1):
            raise ParameterError(f"embed_workflow={shown(embed_workflow)} is not true or false")
        for hidden, value in (("prompt", prompt), ("extra_pnginfo", extra_pnginfo)):
            if value is not None and not isinstance(value, dict):
                raise ParameterError(f"{hidden}: expected ComfyUI's {hidden.upper()} (a dict), got "
                                     f"{type(value).__name__}")
        P.check_format_size(fmt, int(images.shape[2]), int(images.shape[1]), "format")
        metadata = None
        if embed_workflow and not folders.metadata_disabled():
            metadata = {}
            if prompt is not None:
                metadata["prompt"] = prompt
            for key, value in (extra_pnginfo or {}).items():
                metadata[key] = value
            if record_of(images) is not None:  # from an AuraFlow run upstream (nodes/records.py)
                metadata["auraflow"] = record_of(images)
            if remote_of(images) is not None:  # this image's remote node, not the last one to write the shared dict
                metadata[REMOTE_KEY] = remote_of(images)
            if parameters_of(images) is not None:  # AuraFlow Generate's prompt, seed... (the CLI's entry too)
                metadata["parameters"] = parameters_of(images)
        height, width = int(images.shape[1]), int(images.shape[2])
        check_output_folder(self.output_dir, "the output folder")  # $AURAFLOW_OUTPUT_DIR outside ComfyUI: any path
        folder, stem, counter, subfolder = folders.save_image_path(filename_prefix, self.output_dir, width, height)
        for batch_number in range(len(images)):  # the real names (ComfyUI's %date%-style variables may have made
            # the stem longer, the counter may have more digits): all checked before the first file is written
            check_file_name(stem.replace("%batch_num%", str(batch_number)), counter + batch_number, fmt,
                            "filename_prefix", folder)
        real_out = os.path.realpath(self.output_dir)
        if os.path.commonpath((real_out, os.path.realpath(folder))) != real_out:  # a link out of the folder
            raise ParameterError(f"filename_prefix={filename_prefix!r}: {folder} leads outside the output folder "
                                 f"{self.output_dir} through a link; use a sub-folder that is inside it")
        results = []
        for batch_number, image in enumerate(images):
            pixels = (image.detach().float().cpu().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
            if pixels.shape[-1] == 1:  # a one-channel IMAGE (from a mask): grey
                pixels = pixels[..., 0]
            data = encode_image(Image.fromarray(pixels), fmt, quality, metadata)
            base = stem.replace("%batch_num%", str(batch_number))
            # the counter ComfyUI gave, or the next free one when another save took it meanwhile: never replaced
            path = write_first_free(folder, data, (file_name(base, n, fmt) for n in range(counter, counter + 100000)))
            counter = int(path.name[len(base) + 1:].split("_", 1)[0]) + 1
            results.append({"filename": path.name, "subfolder": subfolder, "type": self.type})
        log.debug("saved %d %s image(s) to %s", len(results), fmt, folder)
        return {"ui": {"images": results}, "result": (images,)}
