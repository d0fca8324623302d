"""The house rules, checked on the code itself: the engine never imports ComfyUI, only nodes/comfyui/ does, no
import circles between the pack's modules, no oversize module, and the tests run from a checkout whose folder name
is not a Python name (users clone into custom_nodes/ComfyUI-AuraFlow)."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY_MODULES = ("comfy", "comfy_extras", "comfy_api", "folder_paths", "server", "latent_preview", "nodes",
                 "execution", "node_helpers")
# the solvers mirror k-diffusion function by function; splitting them would break that mirror
LONG_ALLOWED = {"aura_flow/sampling/ode.py", "aura_flow/sampling/sde.py"}
MAX_LINES = 450


def pack_modules() -> dict[str, Path]:
    """module name (relative to the pack root) -> file, for aura_flow/ and nodes/."""
    out = {}
    for top in ("aura_flow", "nodes"):
        for path in (ROOT / top).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict) -> tuple[set[str], set[str]]:
    """(the pack's modules ``name`` imports, the absolute top-level names it imports)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inner, outer = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
                inner.update(c for c in candidates if c in modules)
            elif node.module:
                outer.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            outer.update(a.name.split(".")[0] for a in node.names)
    return inner, outer


def test_engine_never_imports_comfyui_and_nodes_only_through_their_gate():
    modules = pack_modules()
    for name, path in modules.items():
        _inner, outer = imports_of(name, path, modules)
        comfy = outer & set(COMFY_MODULES)
        if name.startswith("aura_flow"):
            assert not comfy, f"{path}: the engine imports ComfyUI's {comfy}"
        elif not name.startswith("nodes.comfyui"):
            assert not comfy, f"{path}: imports ComfyUI's {comfy} outside nodes/comfyui/ (the one gate)"


def test_no_import_circles():
    modules = pack_modules()
    graph = {name: imports_of(name, path, modules)[0] - {name} for name, path in modules.items()}
    # a package's __init__ that only hands names on is imported by its own modules' relative imports of the
    # package; those edges (child -> its own package) are not dependencies
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_oversize_module():
    for path in [*(ROOT / "aura_flow").rglob("*.py"), *(ROOT / "nodes").rglob("*.py")]:
        rel = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if rel not in LONG_ALLOWED:
            assert lines <= MAX_LINES, f"{rel}: {lines} lines; split it by concern (at most {MAX_LINES})"


@pytest.mark.heavy
def test_the_tests_run_from_a_checkout_named_like_a_comfyui_pack(tmp_path):
    """A checkout in custom_nodes/ComfyUI-AuraFlow (not a Python name): pytest collects and passes there."""
    dest = tmp_path / "custom_nodes" / "ComfyUI-AuraFlow"
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info",
                                                              ".pytest_cache", "out", "output"))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_schedules.py",
                          "tests/test_routes.py", "tests/test_house.py", "-m", "not heavy"],
                         cwd=dest, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "error" not in run.stdout.lower().split("passed")[-1]
