"""Ready for the Comfy Registry: pyproject's registry fields, the license, what the archive leaves out, search
aliases on every node, and a web extension that uses the frontend's hooks (no LiteGraph prototype patched)."""
from __future__ import annotations

import re

import pytest

from workflow_exec import ROOT, load_pack

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_has_what_the_registry_reads():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert project["name"] and project["version"] and project["description"]
    assert project["license"] == {"text": "Apache-2.0"}
    assert "License :: OSI Approved :: Apache Software License" in project["classifiers"]
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    assert (ROOT / comfy["Icon"].rsplit("/", 1)[1]).is_file()  # the icon the URL serves is in the repository
    # comfy-cli accepts only [op]X.Y.Z[-suffix]; ">=0.29" would be dropped with a warning
    assert re.fullmatch(r"(>=|<=|==|>|<|~=|!=)?\d+\.\d+\.\d+(-\w+)?", comfy["requires-comfyui"])
    assert "web" not in comfy  # ComfyUI would load every .js twice (WEB_DIRECTORY already serves web/)


def test_dependencies_are_requirements_txt_without_torch():
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(ln for ln in lines if ln) == sorted(PYPROJECT["project"]["dependencies"])
    assert not any(re.match(r"torch\b", d) for d in PYPROJECT["project"]["dependencies"])
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0 -e" in ci  # CI still installs the pinned CPU torch first


def test_license_is_the_full_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 11000


def test_the_archive_leaves_out_tests_benchmarks_and_ci():
    patterns = {ln.strip() for ln in (ROOT / ".comfyignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    assert {"tests/", "benchmarks/", ".ci/"} <= patterns
    assert not patterns & {"aura_flow/", "nodes/", "web/", "example_workflows/", "LICENSE", "__init__.py"}


def test_every_node_has_search_aliases():
    pack = load_pack()
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        aliases = getattr(cls, "SEARCH_ALIASES", None)
        assert isinstance(aliases, list) and aliases and all(isinstance(a, str) and a for a in aliases), node_id
        assert "aura flow" in aliases, node_id
    for node_id in ("AuraFlowLoader", "AuraFlowSampler"):
        assert {"pony", "gguf"} <= set(pack.NODE_CLASS_MAPPINGS[node_id].SEARCH_ALIASES)


def test_web_extension_uses_the_frontend_hooks():
    for path in sorted((ROOT / "web").glob("*.js")):
        source = path.read_text()
        assert not re.search(r"\.prototype\s*[\.\[]", source), f"{path.name} patches a prototype"
    assert "getNodeMenuItems(node)" in (ROOT / "web" / "remote_key.js").read_text()
    assert "nodeCreated(node)" in (ROOT / "web" / "auraflow.js").read_text()
