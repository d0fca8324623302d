"""AuraFlow Remote Generate: the one-node generator, run by a hosted API (Segmind, or fal's aura-flow and pony-v7)
instead of the local engine.

The API key is never an input: it comes from ``SEGMIND_API_KEY`` / ``FAL_KEY`` or ``<ComfyUI user
dir>/auraflow/segmind_api_key`` / ``fal_key`` (see aura_flow.remote), so it never reaches a workflow, the queue,
/history or an image's metadata. The request ids do: they are shown as progress text, listed in the report, and added
to the prompt's ``extra_pnginfo`` (the dict ComfyUI hands every node of one prompt), so the Save nodes embed them in
the image files.

The node's function (`AuraFlowRemoteGenerate.run`) is a coroutine: ComfyUI (execution.py) runs such a node as an
asyncio task and goes on with the prompt's other nodes, so several remote nodes wait for their services together.
The blocking HTTP client runs on a worker thread (``asyncio.to_thread``, which carries ComfyUI's current-node context
for the progress bar) and polls the service there; the coroutine only awaits it. ComfyUI's Cancel, or the task being
cancelled, stops the client within its poll interval, and the client asks fal to drop the unfinished requests.
`generate` is the same work, synchronous, for callers outside an event loop.
"""
from __future__ import annotations

import logging
import threading

from ..aura_flow import remote as remote_api
from ..aura_flow.images import write_new_file
from ..aura_flow.plan import plan_generation
from .comfyui import devices, folders, progress
from .records import REMOTE_KEY, attach
from .routes import key_file_path
from .widgets import generation_inputs
from .words import check_prompts

log = logging.getLogger(__name__)

REJECTED_SUBFOLDER = "auraflow_remote_rejected"
METADATA_KEY = REMOTE_KEY  # in the saved images: api version, seeds and request ids, never the key
NODES_METADATA_KEY = "auraflow_remote_nodes"  # {node id: its record}, for a prompt with several remote nodes
API_VERSION_INPUT = (["auto", *remote_api.API_VERSIONS], {
    "default": "auto",
    "tooltip": "auto: $SEGMIND_API_VERSION if set, else v2. v2: the async queue (submit, then poll; a dropped "
               "connection never pays twice). v1: the sync API (one connection held for the whole generation)."})
# after api_version, in this order, so workflows saved before them still load (missing widgets take the defaults)
PROVIDER_INPUTS = {
    "provider": (list(remote_api.PROVIDER_NAMES), {
        "default": "segmind", "tooltip": "segmind: Segmind's Aura Flow API (key SEGMIND_API_KEY). fal: fal's queue "
                                         "(key FAL_KEY), for aura-flow or pony-v7. Widgets a model cannot honour "
                                         "are refused before any request; widgets left at their defaults are not "
                                         "sent."}),
    "model": (list(remote_api.MODEL_NAMES), {
        "default": "aura-flow", "tooltip": "aura-flow (both providers) or pony-v7 (fal only)"}),
    "expand_prompt": ("BOOLEAN", {
        "default": False, "tooltip": "fal aura-flow only: let fal rewrite the prompt (the prompt drawn is recorded "
                                     "in the report and the image metadata). Off unless you turn it on."}),
    "noise_source": (["default", *remote_api.NOISE_SOURCES], {
        "default": "default", "tooltip": "fal pony-v7 only: where the initial noise is made (default: fal's, gpu)"}),
    "enable_safety_checker": ("BOOLEAN", {
        "default": False, "tooltip": "fal pony-v7 only: fal's safety checker (has_nsfw_concepts is reported "
                                     "either way)"}),
}


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

    DESCRIPTION = ("Generates images with a hosted API: Segmind's Aura Flow, or fal's aura-flow and pony-v7, using "
                   "the API key from SEGMIND_API_KEY / FAL_KEY or the key file under <ComfyUI user dir>/auraflow/, "
                   "never from the graph. Several remote nodes in one prompt wait together.")
    SEARCH_ALIASES = ["aura flow", "segmind", "fal", "pony", "api", "cloud", "remote"]
    CATEGORY = "AuraFlow/remote"
    FUNCTION = "run"  # a coroutine: ComfyUI runs the node as a task, concurrently with other async nodes
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
        # optional: workflows saved before them still run
        inputs["optional"] = {"api_version": API_VERSION_INPUT, **PROVIDER_INPUTS}
        inputs["hidden"] = {"unique_id": "UNIQUE_ID", "extra_pnginfo": "EXTRA_PNGINFO"}  # progress text, metadata
        return inputs

    async def run(self, prompt, negative_prompt, cfg, seed, shift, steps, width, height, sampler, scheduler,
                  number_of_images, output_format, output_quality, api_version="auto", provider="segmind",
                  model="aura-flow", expand_prompt=False, noise_source="default", enable_safety_checker=False,
                  unique_id=None, extra_pnginfo=None, client=None):
        """The node's function in ComfyUI: `generate`'s work on a worker thread, awaited without holding the
        event loop; ComfyUI's Cancel and a cancelled task both stop the client (fal's requests are cancelled)."""
        import asyncio  # here: the pack's import stays light (ComfyUI has it loaded anyway)

        job = self._prepare(locals())  # parameter and key errors here, before any request
        stop = threading.Event()
        comfy_stop = progress.should_stop()
        job["should_stop"] = lambda: stop.is_set() or bool(comfy_stop and comfy_stop())
        work = asyncio.ensure_future(asyncio.to_thread(self._call, job))  # the thread gets this task's context
        try:
            result = await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()  # the client sees it within its poll interval, cancels fal's requests and returns
            await asyncio.wait({work})
            if work.exception() is not None:  # the interrupt it raised (which requests it cancelled, logged)
                log.info("AuraFlow Remote Generate: cancelled: %s", work.exception())
            raise
        return self._finish(result, job, extra_pnginfo)

    def generate(self, prompt, negative_prompt, cfg, seed, shift, steps, width, height, sampler, scheduler,
                 number_of_images, output_format, output_quality, api_version="auto", provider="segmind",
                 model="aura-flow", expand_prompt=False, noise_source="default", enable_safety_checker=False,
                 unique_id=None, extra_pnginfo=None, client=None):
        """`run`, synchronous (on the calling thread), for callers outside an event loop."""
        job = self._prepare(locals())
        job["should_stop"] = progress.should_stop()
        return self._finish(self._call(job), job, extra_pnginfo)

    @staticmethod
    def _prepare(args: dict) -> dict:
        """The checked plan, fal options and client of one run; every parameter error before any request."""
        params = {name: args[name] for name in ("prompt", "negative_prompt", "cfg", "seed", "shift", "steps", "width",
                                                 "height", "sampler", "scheduler", "number_of_images",
                                                 "output_format", "output_quality")}
        check_prompts(params)
        plan = plan_generation(params, remote=True)  # parameter errors before the key is looked up
        options = {name: args[name] for name in ("expand_prompt", "noise_source", "enable_safety_checker")}
        client = args["client"]
        if client is None:
            provider = remote_api.get_provider(args["provider"])
            client = remote_api.RemoteClient.from_environment(
                key_file=key_file_path(provider.name), api_version=args["api_version"], provider=provider.name,
                model=args["model"])
        # the model's own checks (fal) before the progress bar and before any request: a dry run of the mapping
        client.check(plan, options)
        return {"plan": plan, "options": options, "client": client, "unique_id": args["unique_id"]}

    @staticmethod
    def _call(job: dict):
        plan, client, unique_id = job["plan"], job["client"], job["unique_id"]
        bar = progress.Progress(plan.number_of_images)  # a ProgressBar in ComfyUI; it also raises on Cancel

        def on_progress(done, total, text):
            bar(done, total)
            progress.send_text(text, unique_id)

        try:
            return client.generate(plan, should_stop=job["should_stop"], on_progress=on_progress,
                                   options=job["options"])
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

    def _finish(self, result, job: dict, extra_pnginfo):
        metadata = result.metadata()
        if isinstance(extra_pnginfo, dict):  # one dict shared by the prompt's nodes: the Save nodes embed it
            extra_pnginfo[METADATA_KEY] = metadata  # the last remote node to finish (one node: its own record)
            if job["unique_id"] is not None:  # every remote node's, by node id, for ComfyUI's own Save Image
                nodes = extra_pnginfo.get(NODES_METADATA_KEY)
                extra_pnginfo[NODES_METADATA_KEY] = {**(nodes if isinstance(nodes, dict) else {}),
                                                     str(job["unique_id"]): metadata}
        report = self._report(result, keep_rejected(result))
        if result.failures:
            log.warning("AuraFlow Remote Generate: %s", report)
        images = _images_to_tensor(result.images).to(devices.intermediate_device())
        # on the images themselves too: AuraFlow Save Image embeds the record of the node that made them
        return (attach(images, None, remote=metadata), result.seed, result.remaining_credits or "", report)

    @staticmethod
    def _report(result, kept: dict) -> str:
        n = result.params["number_of_images"]
        api = result.api_version if result.provider == "segmind" else f"{result.provider} {result.model}"
        parts = [f"{len(result.images)} of {n} image(s) received ({api})"]
        ids = [rid for rid in result.request_ids if rid]
        if ids:
            parts.append(f"request ids {', '.join(ids)}")
        for im in result.images:
            if im.nsfw is not None:
                parts.append(f"image {im.index + 1} has_nsfw_concepts={str(im.nsfw).lower()}")
            if im.prompt_used is not None:
                parts.append(f"image {im.index + 1} drawn from the prompt {im.prompt_used!r}")
        for failure in result.failures:
            saved = f" (saved as {kept[failure.index]})" if failure.index in kept else ""
            parts.append(f"image {failure.index + 1} failed: {failure}{saved}")
        costs = [im.headers.get("x-cost") for im in result.images if im.headers.get("x-cost")]
        if costs:
            parts.append(f"cost {', '.join(costs)}")
        if result.remaining_credits is not None:
            parts.append(f"remaining credits {result.remaining_credits}")
        return "; ".join(parts)
