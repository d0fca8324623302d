"""Shared fixtures: tiny random-weight AuraFlow models written to disk once per test session, in every layout."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):  # the engine and nodes; the tests' own helpers (workflow_exec, remote_server)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_models(tiny_root):
    """layout -> dict(checkpoint=..., text_encoder=..., vae=..., tokenizer=...) for aura_flow.load(**kwargs)."""
    from aura_flow.tiny import LAYOUTS, build_tiny

    out = {}
    for layout in LAYOUTS:
        dest = tiny_root / layout
        path = build_tiny(dest, layout)
        kw = {"checkpoint": path}
        if layout.startswith("transformer_only"):
            kw.update(text_encoder=dest / "text_encoder.safetensors", vae=dest / "vae.safetensors")
        out[layout] = kw
    return out


@pytest.fixture(scope="session")
def tiny_pipe(tiny_models):
    import aura_flow

    return aura_flow.load(**tiny_models["diffusers"], device="cpu")


def pytest_addoption(parser):
    # here, not in tests/comfyui/conftest.py, so that `pytest --comfyui=PATH` works from the repository root;
    # write it with "=": a bare path after it would be taken for a test path before this option is known
    parser.addoption("--comfyui", default=None, metavar="PATH",
                     help="a ComfyUI checkout for the tests marked comfyui (or set AURAFLOW_COMFYUI)")
