"""Everything the nodes need from ComfyUI, behind guarded imports, with plain fallbacks outside it.

Inside ComfyUI: model folders come from ``folder_paths``, images go to its output folder, models move to its torch
device (after asking it to free memory), every sampling step advances a ``comfy.utils.ProgressBar`` with a latent
preview, and Cancel stops the sampling within a step. Outside ComfyUI (tests, tools) the same calls take plain
paths, use ``$AURAFLOW_OUTPUT_DIR`` (default ``./output``), leave models where they are and report no progress.

Nothing here imports torch or ComfyUI at import time.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os

# The engine travels inside the pack. ComfyUI imports the pack folder as a package (custom_nodes/<pack> is not on
# sys.path), so the engine is ``<pack>.aura_flow`` and is reached relatively; the fallback serves tools that import
# ``nodes`` from the repository root, where ``aura_flow`` is top-level. Only an import of the package itself falls
# back, so a real error inside the engine still surfaces.
try:
    from .. import aura_flow as engine
except ImportError as _exc:
    if "relative import" not in str(_exc) and "no known parent" not in str(_exc):
        raise
    import aura_flow as engine

ParameterError = engine.ParameterError
log = logging.getLogger(__name__)


def engine_module(name: str):
    """An engine submodule (``"imageio"``, ``"sampling"``, ...), imported on first use."""
    return importlib.import_module(f"{engine.__name__}.{name}")


CHECKPOINT_FOLDERS = ("checkpoints", "diffusion_models")  # single files, searched in this order
DIFFUSERS_FOLDER = "diffusers"  # folders holding a model_index.json
TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "tokenizer.json")


def _comfy(module: str):
    """A ComfyUI module, or None outside ComfyUI (looked up on every call, so tests can stand fakes in)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# ------------------------------------------------------------------------------------------------ model folders
_ROUTES_ADDED: set[str] = set()


def add_routes(path: str, add) -> bool:
    """Call ``add(aiohttp.web, PromptServer.instance.routes)`` once per ``path`` inside a running ComfyUI.

    True when the routes are (or already were) added; False, and nothing done, in tests, tools, or ComfyUI's
    modules imported without its server started.
    """
    if path in _ROUTES_ADDED:
        return True
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    add(web, instance.routes)
    _ROUTES_ADDED.add(path)
    log.debug("AuraFlow: added %s", path)
    return True


def model_names(folder: str) -> list[str]:
    """File names ComfyUI lists in one of its model folders; [] outside ComfyUI."""
    fp = _comfy("folder_paths")
    if fp is None:
        return []
    try:
        return list(fp.get_filename_list(folder))
    except KeyError:  # an older ComfyUI without this folder name
        return []


def diffusers_names() -> list[str]:
    """Sub-folders of ComfyUI's ``models/diffusers`` folders that hold a ``model_index.json``."""
    fp = _comfy("folder_paths")
    if fp is None:
        return []
    names = []
    for base in _folder_paths(fp, DIFFUSERS_FOLDER):
        for root, dirs, files in os.walk(base, followlinks=True):
            if "model_index.json" in files:
                names.append(os.path.relpath(root, base).replace(os.sep, "/"))
                dirs.clear()  # a pipeline's own sub-folders are not models
    return sorted(set(names))


def tokenizer_names() -> list[str]:
    """Tokenizer files under ComfyUI's text_encoders folders (sentencepiece ``*.model`` or ``tokenizer.json``)."""
    fp = _comfy("folder_paths")
    if fp is None:
        return []
    names = []
    for base in _folder_paths(fp, "text_encoders"):
        for root, _dirs, files in os.walk(base, followlinks=True):
            names += [os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/")
                      for f in files if f in TOKENIZER_FILES]
    return sorted(set(names))


def _folder_paths(fp, folder: str) -> list[str]:
    try:
        return [p for p in fp.get_folder_paths(folder) if os.path.isdir(p)]
    except KeyError:
        return []


def resolve_model(name: str, folders: tuple[str, ...], *, what: str, diffusers: bool = False,
                  tokenizer: bool = False) -> str:
    """The full path of a model chosen in a loader widget.

    Inside ComfyUI ``name`` is looked up in ``folders`` (then the diffusers folders / tokenizer files when asked);
    outside it, and for names ComfyUI does not list, an existing plain path is accepted, so tests and headless
    prompts can name files directly.
    """
    fp = _comfy("folder_paths")
    if fp is not None:
        for folder in folders:
            try:
                path = fp.get_full_path(folder, name)
            except KeyError:
                path = None
            if path:
                return path
        bases = (_folder_paths(fp, DIFFUSERS_FOLDER) if diffusers else []) + \
            (_folder_paths(fp, "text_encoders") if tokenizer else [])
        for base in map(os.path.abspath, bases):
            path = os.path.abspath(os.path.join(base, name))
            if os.path.commonpath((base, path)) == base and os.path.exists(path):
                return path
    if os.path.exists(os.path.expanduser(name)):
        return os.path.expanduser(name)
    where = ", ".join(f"models/{f}" for f in folders + ((DIFFUSERS_FOLDER,) if diffusers else ()))
    raise FileNotFoundError(f"{what} {name!r} not found in {where if fp is not None else 'the file system'}. "
                            f"Put it in {where} and press R in the editor to refresh the list"
                            + ("" if fp is not None else ", or pass an existing path") + ".")


# ------------------------------------------------------------------------------------------------ output files
def output_directory() -> str:
    fp = _comfy("folder_paths")
    if fp is not None:
        return fp.get_output_directory()
    return os.path.abspath(os.environ.get("AURAFLOW_OUTPUT_DIR") or "output")


def save_image_path(prefix: str, output_dir: str, width: int, height: int) -> tuple[str, str, int, str]:
    """(folder, file stem, next counter, subfolder) for ``prefix`` under ``output_dir``; refuses escaping prefixes.

    Inside ComfyUI this is ``folder_paths.get_save_image_path`` (which also expands ``%date%``-style variables);
    outside it, a plain equivalent: the subfolder must stay inside ``output_dir``, and the counter continues after
    the highest ``<stem>_<NNNNN>_`` file already there.
    """
    escaping = ParameterError(f"filename_prefix={prefix!r} would save outside the output folder {output_dir}; "
                              "use a name or a relative sub-folder such as 'AuraFlow/cat'")
    fp = _comfy("folder_paths")
    if fp is not None:
        try:
            folder, stem, counter, subfolder, _prefix = fp.get_save_image_path(prefix, output_dir, width, height)
        except Exception as exc:  # ComfyUI raises a bare Exception (and logs it) for a prefix that leaves the folder
            if type(exc) is not Exception:
                raise
            raise escaping from None
        return folder, stem, counter, subfolder
    output_dir = os.path.abspath(output_dir)
    subfolder = os.path.dirname(os.path.normpath(prefix))
    stem = os.path.basename(os.path.normpath(prefix))
    folder = os.path.abspath(os.path.join(output_dir, subfolder))
    if os.path.commonpath((output_dir, folder)) != output_dir or not stem or stem in (".", ".."):
        raise escaping
    os.makedirs(folder, exist_ok=True)
    counter = 0
    head = stem + "_"
    for name in os.listdir(folder):
        digits = name[len(head):].split("_", 1)[0] if name.startswith(head) else ""
        if digits.isdigit():
            counter = max(counter, int(digits))
    return folder, stem, counter + 1, subfolder


def metadata_disabled() -> bool:
    """True when ComfyUI runs with ``--disable-metadata``."""
    cli_args = _comfy("comfy.cli_args")
    return bool(cli_args is not None and getattr(getattr(cli_args, "args", None), "disable_metadata", False))


# ------------------------------------------------------------------------------------------------ devices
def intermediate_device():
    """Where ComfyUI keeps LATENT / IMAGE / CONDITIONING tensors between nodes (the CPU unless --gpu-only)."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        return mm.intermediate_device()
    import torch

    return torch.device("cpu")


def load_placement() -> tuple[str, str]:
    """(device, dtype) to load with: ComfyUI's offload device and the dtype it would pick for a model on its GPU;
    ("auto", "auto") outside ComfyUI."""
    mm = _comfy("comfy.model_management")
    if mm is None:
        return "auto", "auto"
    device = mm.get_torch_device()
    if mm.should_use_bf16(device):
        dtype = "bf16"
    elif mm.should_use_fp16(device):
        dtype = "fp16"
    else:
        dtype = "fp32"
    return str(mm.unet_offload_device()), dtype


@contextlib.contextmanager
def on_device(pipeline, parts=None):
    """Run the body with ``pipeline``'s ``parts`` (all by default) on ComfyUI's torch device, then put them back on
    ComfyUI's offload device.

    ComfyUI does not manage these modules, so before moving them it is asked to free room for them (unloading
    its own models if needed); afterwards they go to the CPU, or stay on the GPU when ComfyUI runs with
    --highvram / --gpu-only (its offload device is then the GPU). Only the parts a node needs visit the GPU:
    sampling needs no text encoder there. Outside ComfyUI this does nothing.
    """
    mm = _comfy("comfy.model_management")
    if mm is None:
        yield pipeline
        return
    parts = tuple(parts or pipeline.PARTS)
    device = mm.get_torch_device()
    moving = [p for p in parts if getattr(pipeline, p, None) is not None and pipeline.part_device(p) != device]
    if moving:
        need = sum(engine_module("weights.devices").module_bytes(getattr(pipeline, p)) for p in moving)
        mm.free_memory(int(need * 1.1) + 2 * 1024**3, device)  # weights + working room
        pipeline.to(device, parts=moving)
    try:
        yield pipeline
    finally:
        offload = mm.unet_offload_device()
        back = [p for p in parts if getattr(pipeline, p, None) is not None and pipeline.part_device(p) != offload]
        if back:
            pipeline.to(offload, parts=back)
            empty_cache()


def empty_cache():
    """Release cached device memory (ComfyUI's soft_empty_cache; torch's own outside ComfyUI)."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ progress
class Progress:
    """A sampling callback ``(step, total, x0)`` that steps ComfyUI's progress bar with a latent preview.

    The preview uses ComfyUI's own previewer for SDXL latents (so the user's --preview-method, TAESD included,
    applies); ProgressBar updates also raise ComfyUI's interrupt exception when Cancel was pressed. Outside
    ComfyUI it only logs at debug level.
    """

    def __init__(self, total: int):
        self.total = int(total)
        utils = _comfy("comfy.utils")
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
    latent_preview = _comfy("latent_preview")
    formats = _comfy("comfy.latent_formats")
    mm = _comfy("comfy.model_management")
    if latent_preview is None or formats is None or mm is None:
        return None
    try:
        return latent_preview.get_previewer(mm.get_torch_device(), formats.SDXL())
    except Exception as exc:
        log.debug("no latent previews: %s", exc)
        return None


def should_stop():
    """A ``should_stop`` for the engine: true once the user pressed Cancel in ComfyUI; None outside it."""
    mm = _comfy("comfy.model_management")
    return mm.processing_interrupted if mm is not None else None


@contextlib.contextmanager
def interruptible():
    """Turn the engine's ``Interrupted`` into ComfyUI's own interrupt, so Cancel reads as a cancel, not an error."""
    Interrupted = engine.Interrupted
    try:
        yield
    except Interrupted:
        mm = _comfy("comfy.model_management")
        if mm is not None:
            mm.throw_exception_if_processing_interrupted()
        raise
