"""AuraFlow Remote Generate: the one-node generator, run by the hosted Aura Flow API instead of the local engine.

The API key is never an input: it comes from ``SEGMIND_API_KEY`` or ``<ComfyUI user dir>/auraflow/segmind_api_key``
(see aura_flow.remote), so it never reaches a workflow, the queue, /history or an image's metadata. The request ids
do: they are shown as progress text, listed in the report, and added to the prompt's ``extra_pnginfo`` (the dict
ComfyUI hands every node of one prompt), so the Save nodes embed them in the image files.
"""
from __future__ import annotations

import logging

from ..aura_flow import remote as remote_api
from ..aura_flow.images import write_new_file
from ..aura_flow.plan import plan_generation
from .comfyui import devices, folders, progress
from .routes import key_file_path
from .widgets import generation_inputs
from .words import check_prompts

log = logging.getLogger(__name__)

REJECTED_SUBFOLDER = "auraflow_remote_rejected"
METADATA_KEY = "auraflow_remote"  # in the saved images: api version, seeds and request ids, never the key
API_VERSION_INPUT = (["auto", *remote_api.API_VERSIONS], {
    "default": "auto",
    "tooltip": "auto: $SEGMIND_API_VERSION if set, else v2. v2: the async queue (submit, then poll; a dropped "
               "connection never pays twice). v1: the sync API (one connection held for the whole generation)."})


def rejected_folder() -> str:
    """Where images that arrived but cannot join the batch (wrong size) are kept: output/auraflow_remote_rejected."""
    return f"{folders.output_directory()}/{REJECTED_SUBFOLDER}"


def keep_rejected(result) -> dict:
    """Write the bytes of images that arrived (and were billed) but cannot join the batch; {index: path}."""
    kept = {}
    for failure in (result.failures if result is not None else ()):
        if failure.data:
            kept[failure.index] = str(write_new_file(rejected_folder(), f"image_{failure.index + 1}", failure.data))
    return kept


def _images_to_tensor(images):
    import numpy as np
    import torch

    return torch.from_numpy(np.stack([np.asarray(im.image, dtype=np.float32) / 255.0 for im in images]))


class AuraFlowRemoteGenerate:
    """The hosted-API twin of the local one-node generator: same widgets, same order, same defaults."""

    DESCRIPTION = ("Generates images with the hosted Aura Flow API (Segmind), using the API key from SEGMIND_API_KEY "
                   "or <ComfyUI user dir>/auraflow/segmind_api_key, never from the graph.")
    SEARCH_ALIASES = ["aura flow", "segmind", "api", "cloud", "remote"]
    CATEGORY = "AuraFlow/remote"
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE", "INT", "STRING", "STRING")
    RETURN_NAMES = ("images", "seed", "remaining_credits", "report")
    OUTPUT_TOOLTIPS = (
        "The images that arrived, as one batch (fewer than number_of_images if some failed; see report).",
        "The seed the service used for the first image (image i used seed + i).",
        "Credits left on the account as the service reported them (empty if it did not).",
        "One line per run: images received, failures and why, cost.",
    )

    # A run asks the service again only when an input changed (ComfyUI's cache), so a re-queue is not re-billed.
    @classmethod
    def INPUT_TYPES(cls):
        inputs = generation_inputs(remote=True)
        inputs["optional"] = {"api_version": API_VERSION_INPUT}  # optional: workflows saved before it still run
        inputs["hidden"] = {"unique_id": "UNIQUE_ID", "extra_pnginfo": "EXTRA_PNGINFO"}  # progress text, metadata
        return inputs

    def generate(self, prompt, negative_prompt, cfg, seed, shift, steps, width, height, sampler, scheduler,
                 number_of_images, output_format, output_quality, api_version="auto", unique_id=None,
                 extra_pnginfo=None, client=None):
        params = dict(prompt=prompt, negative_prompt=negative_prompt, cfg=cfg, seed=seed, shift=shift, steps=steps,
                      width=width, height=height, sampler=sampler, scheduler=scheduler,
                      number_of_images=number_of_images, output_format=output_format,
                      output_quality=output_quality)
        check_prompts(params)
        plan = plan_generation(params, remote=True)  # parameter errors before the key is looked up
        client = client or remote_api.RemoteClient.from_environment(key_file=key_file_path(), api_version=api_version)
        bar = progress.Progress(plan.number_of_images)  # a ProgressBar in ComfyUI; it also raises on Cancel

        def on_progress(done, total, text):
            bar(done, total)
            progress.send_text(text, unique_id)

        try:
            result = client.generate(plan, should_stop=progress.should_stop(), on_progress=on_progress)
        except remote_api.RemoteInterrupted as exc:
            log.warning("AuraFlow Remote Generate: %s", exc)  # which request ids may still complete
            progress.raise_if_cancelled()  # ComfyUI's own interrupt: Cancel reads as a cancel, not an error
            raise
        except remote_api.RemoteError as exc:
            kept = keep_rejected(exc.result)
            if kept:
                raise remote_api.RemoteError(f"{exc}; the billed bytes are kept as {', '.join(kept.values())}",
                                             status=exc.status) from None
            raise
        if isinstance(extra_pnginfo, dict):  # shared by the prompt's nodes: the Save nodes embed it
            extra_pnginfo[METADATA_KEY] = result.metadata()
        report = self._report(result, keep_rejected(result))
        if result.failures:
            log.warning("AuraFlow Remote Generate: %s", report)
        images = _images_to_tensor(result.images).to(devices.intermediate_device())
        return (images, result.seed, result.remaining_credits or "", report)

    @staticmethod
    def _report(result, kept: dict) -> str:
        n = result.params["number_of_images"]
        parts = [f"{len(result.images)} of {n} image(s) received ({result.api_version})"]
        ids = [rid for rid in result.request_ids if rid]
        if ids:
            parts.append(f"request ids {', '.join(ids)}")
        for failure in result.failures:
            saved = f" (saved as {kept[failure.index]})" if failure.index in kept else ""
            parts.append(f"image {failure.index + 1} failed: {failure}{saved}")
        costs = [im.headers.get("x-cost") for im in result.images if im.headers.get("x-cost")]
        if costs:
            parts.append(f"cost {', '.join(costs)}")
        if result.remaining_credits is not None:
            parts.append(f"remaining credits {result.remaining_credits}")
        return "; ".join(parts)
