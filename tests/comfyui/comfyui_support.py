"""Helpers for the real-ComfyUI tests (conftest.py has the fixtures): the pack copy, tiny models named as the
bundled workflows name them, and starting / waiting for a ComfyUI process."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "ComfyUI-AuraFlow"
PACK_PARTS = ("__init__.py", "aura_flow", "nodes", "web", "example_workflows", "pyproject.toml", "README.md", "LICENSE")
START_TIMEOUT = 300.0


# ------------------------------------------------------------------------------------------------ the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comfy_python(checkout: Path) -> str:
    given = os.environ.get("AURAFLOW_COMFYUI_PYTHON")
    if given:
        return given
    for venv in ("venv", ".venv"):
        candidate = checkout / venv / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    return sys.executable


def copy_pack(dest: Path) -> Path:
    """This repository's pack files (no tests, no .git) as custom_nodes/ComfyUI-AuraFlow."""
    pack = dest / PACK_DIR_NAME
    pack.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules")
    for part in PACK_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, pack / part, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, pack / part)
    return pack


# ------------------------------------------------------------------------------------------------ workflows
def workflow_files(kind: str) -> list[Path]:
    """The bundled workflows of one format: "api" (``{"id": {"class_type", ...}}``) or "editor" (nodes/links)."""
    found = []
    for path in sorted((ROOT / "example_workflows").rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        is_editor = isinstance(data, dict) and "nodes" in data and "links" in data
        is_api = isinstance(data, dict) and data and all(isinstance(n, dict) and "class_type" in n
                                                         for n in data.values())
        if (kind == "editor" and is_editor) or (kind == "api" and is_api):
            found.append(path)
    return found


MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".bin")


def build_models_for_workflows(models: Path, scratch: Path) -> dict:
    """Tiny random models under every model name the bundled API workflows reference, where ComfyUI looks.

    checkpoint: a Pony name (``pony*``) -> a tiny Pony V7 transformer-only file in models/diffusion_models; a
    ``.gguf`` -> a tiny GGUF in models/unet; another file name -> an all-in-one tiny file in models/checkpoints; any
    other name -> a tiny diffusers folder in models/diffusers (each file with the tiny tokenizer beside it).
    text_encoder / vae files -> the tiny separate files in models/text_encoders and models/vae; tokenizer files ->
    the tiny sentencepiece model in models/text_encoders; lora_name -> a tiny kohya LoRA in models/loras.
    """
    from aura_flow.tiny import build_tiny
    from aura_flow.weights.writers import build_tiny_gguf
    from lora_files import write_lora

    wanted: dict[str, set] = {"checkpoint": set(), "text_encoder": set(), "vae": set(), "tokenizer": set(),
                              "lora_name": set()}
    for path in workflow_files("api"):
        for node in json.loads(path.read_text(encoding="utf-8")).values():
            for name, value in node.get("inputs", {}).items():
                if name in wanted and isinstance(value, str):
                    wanted[name].add(value)
    for sub in ("checkpoints", "diffusers", "text_encoders", "vae", "diffusion_models", "unet", "loras"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    single = build_tiny(scratch / "single_file", "single_file")
    separate = scratch / "transformer_only"
    build_tiny(separate, "transformer_only")
    diffusers = pony = gguf = None
    for name in sorted(wanted["checkpoint"]):
        if name.lower().startswith("pony") and name.lower().endswith(MODEL_FILE_SUFFIXES):
            pony = pony or build_tiny(scratch / "pony", "transformer_only", preset="pony")
            place(pony, models / "diffusion_models" / name)
        elif name.lower().endswith(".gguf"):
            gguf = gguf or build_tiny_gguf(scratch / "gguf", "Q8_0")
            place(gguf, models / "unet" / name)
        elif name.lower().endswith(MODEL_FILE_SUFFIXES):
            place(single, models / "checkpoints" / name)
        else:
            diffusers = diffusers or build_tiny(scratch / "diffusers", "diffusers")
            shutil.copytree(diffusers, models / "diffusers" / name)
    for key, folder, source in (("text_encoder", "text_encoders", "text_encoder.safetensors"),
                                ("vae", "vae", "vae.safetensors"), ("tokenizer", "text_encoders", "tokenizer.model")):
        for name in sorted(wanted[key]):
            if name.lower().endswith(MODEL_FILE_SUFFIXES + (".model", ".json")):
                (models / folder / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(separate / source, models / folder / name)
    for n, name in enumerate(sorted(wanted["lora_name"])):
        write_lora(models / "loras" / name, seed=n)
    return {key: sorted(names) for key, names in wanted.items()}


def place(model: Path, dest: Path) -> Path:
    """A tiny model file copied to ``dest`` with its tiny tokenizer beside it (the loader finds it there)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(model, dest)
    shutil.copy2(model.parent / "tokenizer.model", dest.parent / "tokenizer.model")
    return dest


def provide_input_images(checkout: Path, input_dir: Path) -> list[str]:
    """The images the bundled API workflows load (LoadImage ``image``): ComfyUI's own input/ files of that name
    (it ships example.png), else a 256x256 test picture made here."""
    from PIL import Image

    names = sorted({node["inputs"]["image"] for path in workflow_files("api")
                    for node in json.loads(path.read_text(encoding="utf-8")).values()
                    if node["class_type"] == "LoadImage" and isinstance(node.get("inputs", {}).get("image"), str)})
    for name in names:
        dest = input_dir / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (checkout / "input" / name).is_file():
            shutil.copy2(checkout / "input" / name, dest)
        else:
            img = Image.new("RGB", (256, 256))
            img.putdata([(x, y, (x + y) // 2) for y in range(256) for x in range(256)])
            img.save(dest)
    return names


@dataclass
class ComfyServer:
    url: str
    base: Path
    pack: Path
    log_path: Path
    process: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as resp:
            return json.loads(resp.read())


@contextlib.contextmanager
def launch(checkout: Path, base: Path, log_name: str = "comfyui.log", **env):
    """A ComfyUI process of ``checkout`` on a free port of 127.0.0.1 with ``--base-directory base`` (on the CPU,
    ``env`` added to its environment), up and answering; stopped when the block ends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = base / log_name
    cmd = [comfy_python(checkout), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=checkout, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1", **env))
    try:
        wait_until_up(url, process, log_path)
        yield ComfyServer(url, base, base / "custom_nodes" / PACK_DIR_NAME, log_path, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_up(url: str, process: subprocess.Popen, log_path: Path, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:]
            pytest.fail(f"ComfyUI exited with code {process.returncode} while starting; log tail:\n{tail}")
        try:
            with urllib.request.urlopen(url + "/object_info/AuraFlowSampler", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-4000:]
    pytest.fail(f"ComfyUI did not answer on {url} within {timeout:g} s; log tail:\n{tail}")


