"""AuraFlow Remote Generate: the one-node generator, run by the hosted Aura Flow API instead of the local engine.

The API key is never an input: it comes from ``SEGMIND_API_KEY`` or ``<ComfyUI user dir>/auraflow/segmind_api_key``
(see aura_flow.remote), so it never reaches a workflow, the queue, /history or an image's metadata.
"""
from __future__ import annotations

import logging

from ..aura_flow import remote as remote_api
from ..aura_flow.images import write_new_file
from ..aura_flow.plan import plan_generation
from .comfyui import devices, folders, progress
from .routes import key_file_path
from .widgets import generation_inputs

log = logging.getLogger(__name__)

REJECTED_SUBFOLDER = "auraflow_remote_rejected"


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
        inputs["hidden"] = {"unique_id": "UNIQUE_ID"}  # for progress text only
        return inputs

    def generate(self, prompt, negative_prompt, cfg, seed, shift, steps, width, height, sampler, scheduler,
                 number_of_images, output_format, output_quality, unique_id=None, client=None):
        params = dict(prompt=prompt, negative_prompt=negative_prompt, cfg=cfg, seed=seed, shift=shift, steps=steps,
                      width=width, height=height, sampler=sampler, scheduler=scheduler,
                      number_of_images=number_of_images, output_format=output_format,
                      output_quality=output_quality)
        plan = plan_generation(params, remote=True)  # parameter errors before the key is looked up
        client = client or remote_api.RemoteClient.from_environment(key_file=key_file_path())
        bar = progress.Progress(plan.number_of_images)  # a ProgressBar in ComfyUI; it also raises on Cancel

        def on_progress(done, total, text):
            bar(done, total)
            progress.send_text(text, unique_id)

        try:
            with progress.interruptible(remote_api.RemoteInterrupted):
                result = client.generate(plan, should_stop=progress.should_stop(), on_progress=on_progress)
        except remote_api.RemoteError as exc:
            kept = keep_rejected(exc.result)
            if kept:
                raise remote_api.RemoteError(f"{exc}; the billed bytes are kept as {', '.join(kept.values())}",
                                             status=exc.status) from None
            raise
        report = self._report(result, keep_rejected(result))
        if result.failures:
            log.warning("AuraFlow Remote Generate: %s", report)
        images = _images_to_tensor(result.images).to(devices.intermediate_device())
        return (images, result.seed, result.remaining_credits or "", report)

    @staticmethod
    def _report(result, kept: dict) -> str:
        n = result.params["number_of_images"]
        parts = [f"{len(result.images)} of {n} image(s) received"]
        for failure in result.failures:
            saved = f" (saved as {kept[failure.index]})" if failure.index in kept else ""
            parts.append(f"image {failure.index + 1} failed: {failure}{saved}")
        costs = [im.headers.get("x-cost") for im in result.images if im.headers.get("x-cost")]
        if costs:
            parts.append(f"cost {', '.join(costs)}")
        if result.remaining_credits is not None:
            parts.append(f"remaining credits {result.remaining_credits}")
        return "; ".join(parts)
