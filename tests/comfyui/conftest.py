"""Tests against a real ComfyUI checkout: ``pytest tests/comfyui --comfyui=PATH`` (or ``AURAFLOW_COMFYUI=PATH``).

Without a path every test here is skipped (CI has no ComfyUI). With one, a session fixture starts that ComfyUI on a
free port on 127.0.0.1 with ``--base-directory`` set to a temp folder holding a copy of this pack in custom_nodes/,
tiny random models under the names the bundled workflows use, and its own user/output folders, so nothing in the
checkout is touched.

Environment:
- ``AURAFLOW_COMFYUI``: the checkout (instead of --comfyui).
- ``AURAFLOW_COMFYUI_PYTHON``: the Python to run it with (default: the checkout's venv/ or .venv/, else this one).
  It needs ComfyUI's requirements.txt and this pack's dependencies.
- ``AURAFLOW_CHROMIUM`` (default /usr/bin/chromium) and ``NODE_PATH`` with the npm package playwright-core, for the
  browser test; it is skipped, saying why, when either is missing.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pytest runs in importlib mode (see pyproject.toml)

from comfyui_support import ROOT, build_models_for_workflows, copy_pack, launch, provide_input_images


# the --comfyui option is added in tests/conftest.py, so that it works from the repository root


def comfyui_checkout(config) -> str | None:
    return config.getoption("--comfyui", default=None) or os.environ.get("AURAFLOW_COMFYUI") or None


def pytest_collection_modifyitems(config, items):
    if comfyui_checkout(config):
        return
    skip = pytest.mark.skip(reason="needs a ComfyUI checkout: pass --comfyui PATH or set AURAFLOW_COMFYUI")
    for item in items:
        if "comfyui" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_base(request, tmp_path_factory):
    """A ComfyUI --base-directory: the pack in custom_nodes/, tiny models, user/, input/, output/."""
    checkout = Path(comfyui_checkout(request.config)).expanduser().resolve()
    if not (checkout / "main.py").is_file() or not (checkout / "folder_paths.py").is_file():
        pytest.fail(f"--comfyui {checkout}: not a ComfyUI checkout (no main.py / folder_paths.py there)")
    base = tmp_path_factory.mktemp("comfy_base")
    for sub in ("custom_nodes", "models", "user", "input", "output", "temp"):
        (base / sub).mkdir()
    copy_pack(base / "custom_nodes")
    build_models_for_workflows(base / "models", tmp_path_factory.mktemp("tiny_src"))
    provide_input_images(checkout, base / "input")
    return checkout, base


@pytest.fixture(scope="session")
def remote_service():
    """The fake hosted Aura Flow API (tests/remote_server.py) for workflows with the remote node."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from remote_server import KEY, FakeService
    finally:
        sys.path.remove(str(ROOT / "tests"))
    with FakeService() as service:
        yield service, KEY


@pytest.fixture(scope="session")
def fal_service():
    """The stand-in fal queue (tests/fal_server.py), with its CDN, for workflows with remote nodes on fal; a test
    may set its ``service_time`` for its own run and put it back."""
    from fal_server import FAL_KEY, FakeFal  # tests/ is on sys.path (tests/conftest.py)

    with FakeFal() as service:
        yield service, FAL_KEY


@pytest.fixture(scope="session")
def comfy_server(comfy_base, remote_service, fal_service):
    checkout, base = comfy_base
    service, key = remote_service
    fal, fal_key = fal_service
    with launch(checkout, base, SEGMIND_API_KEY=key, SEGMIND_API_URL=service.url, FAL_KEY=fal_key,
                FAL_QUEUE_URL=fal.url) as server:
        yield server
