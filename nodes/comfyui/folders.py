"""ComfyUI's folders: model files the loaders list and resolve, the output folder and its save paths, the user
folder, files of the input folder. Outside ComfyUI: plain paths, ``$AURAFLOW_OUTPUT_DIR`` (default ``./output``),
``$AURAFLOW_INPUT_DIR`` (default ``./input``), no model lists."""
from __future__ import annotations

import os

from ...aura_flow.errors import ParameterError, shown as _shown

CHECKPOINT_FOLDERS = ("checkpoints", "diffusion_models")  # single files, searched in this order
DIFFUSERS_FOLDER = "diffusers"  # folders holding a model_index.json
TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "tokenizer.json")
LORA_FOLDER = "loras"
# ComfyUI's file lists leave .gguf out; this pack's own folder name lists them from models/unet and
# models/diffusion_models (the diffusion_models paths, shared, so extra_model_paths.yaml entries count too).
# ComfyUI-GGUF registers "unet_gguf" the same way; that key is its own and is left alone.
GGUF_FOLDER = "auraflow_gguf"
GGUF_SOURCE = "diffusion_models"
GGUF_EXTENSIONS = {".gguf"}


def comfy_folder_paths():
    """ComfyUI's ``folder_paths`` module, or None outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def register_gguf_folder(fp=None) -> bool:
    """Add `GGUF_FOLDER` to ComfyUI's folder table (once); False outside ComfyUI or on one without the table."""
    fp = fp or comfy_folder_paths()
    table = getattr(fp, "folder_names_and_paths", None)
    if table is None:
        return False
    if GGUF_FOLDER not in table:
        paths = table[GGUF_SOURCE][0] if GGUF_SOURCE in table else []
        table[GGUF_FOLDER] = (paths, set(GGUF_EXTENSIONS))
    return True


def gguf_names() -> list[str]:
    """The .gguf files under ComfyUI's models/unet and models/diffusion_models folders; [] outside ComfyUI."""
    if not register_gguf_folder():
        return []
    return model_names(GGUF_FOLDER)


def model_names(folder: str) -> list[str]:
    """File names ComfyUI lists in one of its model folders; [] outside ComfyUI."""
    fp = comfy_folder_paths()
    if fp is None:
        return []
    try:
        return list(fp.get_filename_list(folder))
    except KeyError:  # an older ComfyUI without this folder name
        return []


def _folder_paths(fp, folder: str) -> list[str]:
    try:
        return [p for p in fp.get_folder_paths(folder) if os.path.isdir(p)]
    except KeyError:
        return []


def diffusers_names() -> list[str]:
    """Sub-folders of ComfyUI's ``models/diffusers`` folders that hold a ``model_index.json``."""
    fp = comfy_folder_paths()
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
    fp = comfy_folder_paths()
    if fp is None:
        return []
    names = []
    for base in _folder_paths(fp, "text_encoders"):
        for root, _dirs, files in os.walk(base, followlinks=True):
            names += [os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/")
                      for f in files if f in TOKENIZER_FILES]
    return sorted(set(names))


def resolve_model(name: str, folders: tuple[str, ...], *, what: str, diffusers: bool = False,
                  tokenizer: bool = False) -> str:
    """The full path of a model chosen in a loader widget.

    Inside ComfyUI ``name`` is looked up in ``folders`` (then the diffusers folders / tokenizer files when asked);
    outside it, and for names ComfyUI does not list, an existing plain path is accepted, so tests and headless
    prompts can name files directly.
    """
    fp = comfy_folder_paths()
    if fp is not None:
        if GGUF_FOLDER in folders:
            register_gguf_folder(fp)
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
    shown = {GGUF_FOLDER: "unet"}  # the .gguf list's own name means nothing to a user
    where = ", ".join(dict.fromkeys(f"models/{shown.get(f, f)}"
                                    for f in folders + ((DIFFUSERS_FOLDER,) if diffusers else ())))
    raise FileNotFoundError(f"{what} {_shown(name)} not found in {where if fp is not None else 'the file system'}. "
                            f"Put it in {where} and press R in the editor to refresh the list"
                            + ("" if fp is not None else ", or pass an existing path") + ".")


def output_directory() -> str:
    fp = comfy_folder_paths()
    if fp is not None:
        return fp.get_output_directory()
    return os.path.abspath(os.environ.get("AURAFLOW_OUTPUT_DIR") or "output")


def input_directory() -> str:
    fp = comfy_folder_paths()
    if fp is not None:
        return fp.get_input_directory()
    return os.path.abspath(os.environ.get("AURAFLOW_INPUT_DIR") or "input")


MAX_INPUT_LISTED = 20000  # entries of the input folder looked at for one list (it may hold many images)


def input_files(extensions) -> list[str]:
    """Files of the input folder (and its sub-folders, hidden ones left out) whose names end with one of
    ``extensions``, as sorted '/'-separated relative paths; at most `MAX_INPUT_LISTED` entries are looked at."""
    base = input_directory()
    names, seen = [], 0
    for root, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        seen += len(dirs) + len(files)
        names += [os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/")
                  for f in files if f.lower().endswith(tuple(extensions)) and not f.startswith(".")]
        if seen > MAX_INPUT_LISTED:
            break
    return sorted(names)


def input_file(name: str, what: str) -> str:
    """The full path of ``name`` (a relative path from `input_files`) inside the input folder; a name that leads
    out of it (``..``, an absolute path, a link) or names no file is refused naming ``what`` (the node input)."""
    base = os.path.realpath(input_directory())
    path = os.path.realpath(os.path.join(base, name))
    if os.path.isabs(name) or os.path.commonpath((base, path)) != base:
        raise ParameterError(f"{what}={name!r} is outside the input folder {base}; pick a file from the list")
    if not os.path.isfile(path):
        raise ParameterError(f"{what}={name!r} is not a file in the input folder {base}; put it there and press R "
                             "in the editor to refresh the list")
    return path


def user_directory() -> str | None:
    """ComfyUI's user folder (``ComfyUI/user``), or None outside ComfyUI."""
    fp = comfy_folder_paths()
    return fp.get_user_directory() if fp is not None else None


def save_image_path(prefix: str, output_dir: str, width: int, height: int) -> tuple[str, str, int, str]:
    """(folder, file stem, next counter, subfolder) for ``prefix`` under ``output_dir``; refuses escaping prefixes.

    Inside ComfyUI this is ``folder_paths.get_save_image_path`` (which also expands ``%date%``-style variables);
    outside it, a plain equivalent: the subfolder must stay inside ``output_dir``, and the counter continues after
    the highest ``<stem>_<NNNNN>_`` file already there.
    """
    escaping = ParameterError(f"filename_prefix={prefix!r} would save outside the output folder {output_dir}; "
                              "use a name or a relative sub-folder such as 'AuraFlow/cat'")
    fp = comfy_folder_paths()
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
    try:
        import comfy.cli_args as cli_args
    except ImportError:
        return False
    return bool(getattr(getattr(cli_args, "args", None), "disable_metadata", False))
