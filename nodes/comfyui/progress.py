"""Progress and Cancel inside ComfyUI: the progress bar with latent previews, progress text on a node, and
ComfyUI's own interrupt for the engine's cancellations. Outside ComfyUI progress is only logged."""
from __future__ import annotations

import contextlib
import logging

from ...aura_flow.errors import Interrupted

log = logging.getLogger(__name__)


class Progress:
    """A sampling callback ``(step, total, x0)`` that steps ComfyUI's progress bar with a latent preview.

    The preview uses ComfyUI's own previewer for SDXL latents (so the user's --preview-method, TAESD included,
    applies); ProgressBar updates also raise ComfyUI's interrupt exception when Cancel was pressed. Outside
    ComfyUI it only logs at debug level.
    """

    def __init__(self, total: int):
        self.total = int(total)
        try:
            import comfy.utils as utils
        except ImportError:
            utils = None
        self.bar = utils.ProgressBar(self.total) if utils is not None else None
        self.previewer = _previewer() if self.bar is not None else None

    def __call__(self, step: int, total: int, x0=None):
        if self.bar is None:
            log.debug("step %d/%d", step, total)
            return
        preview = None
        if self.previewer is not None and x0 is not None:
            try:
                preview = self.previewer.decode_latent_to_preview_image("JPEG", x0)
            except Exception as exc:  # a preview must never stop the sampling
                log.debug("latent preview failed: %s", exc)
                self.previewer = None
        self.bar.update_absolute(step, total, preview)


def _previewer():
    try:
        import comfy.latent_formats as formats
        import comfy.model_management as mm
        import latent_preview
    except ImportError:
        return None
    try:
        return latent_preview.get_previewer(mm.get_torch_device(), formats.SDXL())
    except Exception as exc:
        log.debug("no latent previews: %s", exc)
        return None


def send_text(text: str, node_id) -> None:
    """Progress text under a node (newer ComfyUI only; nothing elsewhere)."""
    try:
        import server
    except ImportError:
        return
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if node_id is not None and hasattr(instance, "send_progress_text"):
        instance.send_progress_text(text, node_id)


def should_stop():
    """A ``should_stop`` for the engine: true once the user pressed Cancel in ComfyUI; None outside it."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return None
    return mm.processing_interrupted


def raise_if_cancelled() -> None:
    """Raise ComfyUI's own interrupt when the user pressed Cancel (nothing outside ComfyUI)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


@contextlib.contextmanager
def interruptible():
    """Turn the engine's ``Interrupted`` into ComfyUI's own interrupt, so Cancel reads as a cancel, not an error."""
    try:
        yield
    except Interrupted:
        raise_if_cancelled()
        raise
