"""The pack inside a real ComfyUI: it loads, its nodes and routes are served, every bundled API workflow runs to
images through /prompt (with aura_flow.headless, the `queue` command's code), the editor opens every bundled
editor-format workflow without a missing-node error, and the sigma plot draws. See conftest.py for how to run."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aura_flow import headless
from aura_flow.params import DEFAULTS

from comfyui_support import PACK_DIR_NAME, ROOT, workflow_files

pytestmark = pytest.mark.comfyui

PLOT_WIDGETS = ("scheduler", "steps", "shift", "denoise", "sampler_name")
SMALL = {"steps": 2, "width": 256, "height": 256}  # the tiny model's native size; 2 steps keep CPU runs short


def load_pack_here():
    """The pack as ComfyUI imports it (a package from custom_nodes/<dir>/__init__.py), in this process."""
    name = "auraflow_pack_under_comfyui_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def small(prompt: dict) -> dict:
    """The workflow at the tiny model's size and 2 steps (the hosted-API node keeps its own size limits)."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        if "Remote" in node["class_type"]:
            continue
        for name, value in SMALL.items():
            if isinstance(node.get("inputs", {}).get(name), int):
                node["inputs"][name] = value
    return prompt


# ------------------------------------------------------------------------------------------------ server side
def test_pack_loads_without_import_error(comfy_server):
    log = comfy_server.log()
    pack_lines = [line for line in log.splitlines() if PACK_DIR_NAME in line]
    assert any("seconds" in line for line in pack_lines), f"the pack is not in the import-times list:\n{log[-3000:]}"
    failed = [line for line in pack_lines if "IMPORT FAILED" in line or "Cannot import" in line]
    assert not failed, f"ComfyUI failed to import the pack: {failed}\n{log[-6000:]}"
    # up to the first prompt: the session's other tests queue prompts ComfyUI rejects on purpose (logged as ERROR)
    startup = log.split("got prompt", 1)[0]
    problems = [line for line in startup.splitlines()
                if ("AuraFlow" in line or PACK_DIR_NAME in line) and ("WARNING" in line or "ERROR" in line)]
    assert not problems, "\n".join(problems)


def test_nodes_in_object_info_match_the_pack(comfy_server):
    pack = load_pack_here()
    info = comfy_server.get_json("/object_info")
    mine = {k: v for k, v in info.items() if v.get("python_module", "").endswith(PACK_DIR_NAME)}
    assert sorted(mine) == sorted(pack.NODE_CLASS_MAPPINGS), "ComfyUI lists other nodes than the pack defines"
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        served = mine[node_id]
        assert served["display_name"] == pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert served["category"] == cls.CATEGORY and served["description"] == cls.DESCRIPTION
        assert served["output"] == list(cls.RETURN_TYPES)
        assert served["search_aliases"] == cls.SEARCH_ALIASES  # the editor's node search finds "pony", "gguf"...
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            here = spec.get(section, {})
            there = served["input"].get(section, {})
            assert sorted(there) == sorted(here), f"{node_id} {section} inputs differ"
            for name, (kind, *_) in here.items():
                served_kind = there[name][0]
                if isinstance(kind, (list, tuple)):  # a combo: its options may differ inside ComfyUI (model lists)
                    assert isinstance(served_kind, list) or served_kind == "COMBO", (node_id, name, served_kind)
                else:
                    assert served_kind == kind, (node_id, name, served_kind, kind)
    sampler = mine["AuraFlowSampler"]["input"]["required"]
    assert all(name in sampler for name in PLOT_WIDGETS), "the sigma plot reads these widgets"


def test_the_tiny_models_are_listed_by_the_loader(comfy_server):
    referenced = {value for path in workflow_files("api") for node in json.loads(path.read_text()).values()
                  for name, value in node.get("inputs", {}).items() if name == "checkpoint" and isinstance(value, str)}
    if not referenced:
        pytest.skip("no bundled API workflow names a checkpoint")
    options = comfy_server.get_json("/object_info/AuraFlowLoader")["AuraFlowLoader"]["input"]["required"]["checkpoint"]
    names = options[0] if isinstance(options[0], list) else options[1]["options"]
    assert referenced <= set(names), (referenced, names)


def test_sigmas_route_and_web_extension_are_served(comfy_server):
    for prefix in ("", "/api"):
        body = comfy_server.get_json(f"{prefix}/auraflow/sigmas?scheduler=karras&steps=4&shift=1.73")
        assert body["sigmas"] == pytest.approx([1.0, 0.2116056, 0.0286709, 0.0017287, 0.0], abs=1e-6)
    client = headless.ComfyClient(comfy_server.url)
    status, body = client.json("GET", "/auraflow/sigmas?scheduler=linear&steps=4")
    assert status == 400 and "scheduler='linear' is not known" in body["error"]
    extensions = comfy_server.get_json("/extensions")
    assert f"/extensions/{PACK_DIR_NAME}/auraflow.js" in extensions
    status, js = client.request("GET", f"/extensions/{PACK_DIR_NAME}/auraflow.js")
    assert status == 200 and js == (ROOT / "web" / "auraflow.js").read_bytes()


# ------------------------------------------------------------------------------------------- workflows to images
@pytest.mark.parametrize("path", workflow_files("api"), ids=lambda p: p.name)
def test_bundled_api_workflow_runs_to_images(comfy_server, path, tmp_path):
    from PIL import Image

    prompt = small(headless.load_workflow(path))
    paths = headless.run_workflow(prompt, comfy_server.url, out_dir=tmp_path, timeout=600, poll=0.2)
    assert paths, f"{path.name} finished without images"
    loaded = [n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"]
    if loaded:  # image-to-image: the output keeps the input picture's size
        sizes = {Image.open(comfy_server.base / "input" / name).size for name in loaded}
    else:
        sizes = {(n["inputs"].get("width"), n["inputs"].get("height")) for n in prompt.values()
                 if isinstance(n["inputs"].get("width"), int) and isinstance(n["inputs"].get("height"), int)}
    local = any(n["class_type"] == "AuraFlowLoader" for n in prompt.values())
    for image_path in paths:
        with Image.open(image_path) as img:
            img.load()
            if len(sizes) == 1:
                assert img.size == next(iter(sizes)), (image_path, img.size)
            assert img.getextrema() != ((0, 0),) * len(img.getbands()), f"{image_path} is all black"
            if local:  # the run's record reached AuraFlow Save Image (through ComfyUI's own VAE Decode too)
                from aura_flow.images import read_metadata

                assert read_metadata(img)["auraflow"]["checkpoint"]["hash"], image_path


@pytest.mark.parametrize("speed", [None, "fast"], ids=["saved-before-speed", "fast"])
def test_speed_input_is_optional_and_runs_a_mode(comfy_server, speed, tmp_path):
    for path in workflow_files("api"):
        prompt = small(headless.load_workflow(path))
        nodes = [n for n in prompt.values() if n["class_type"] in ("AuraFlowSampler", "AuraFlowGenerate")]
        if not nodes:
            continue
        for node in nodes:
            assert node["inputs"]["speed"] == "auto"  # what the bundled workflows carry
            if speed is None:
                del node["inputs"]["speed"]  # a prompt written before the input existed
            else:
                node["inputs"]["speed"] = speed
        paths = headless.run_workflow(prompt, comfy_server.url, out_dir=tmp_path / path.stem, timeout=600, poll=0.2)
        assert paths, f"{path.name} with speed={speed} finished without images"


def test_queue_command_against_real_comfyui(comfy_server, tmp_path):
    api = [p for p in workflow_files("api")
           if any(n["class_type"] == "AuraFlowSampler" for n in json.loads(p.read_text()).values())]
    if not api:
        pytest.skip("no bundled API workflow with AuraFlowSampler")
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(small(json.loads(api[0].read_text()))))
    cmd = [sys.executable, "-m", "aura_flow", "queue", str(wf), "--server", comfy_server.url, "--out",
           str(tmp_path / "out"), "--set", "AuraFlowSampler.seed=7", "--set", "AuraFlowSampler.scheduler=karras"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    written = [Path(line) for line in proc.stdout.splitlines()]
    assert written and all(p.is_file() and p.stat().st_size > 0 for p in written)

    # ComfyUI's own validation error, verbatim, and exit code 1
    proc = subprocess.run(cmd[:-4] + ["--set", "AuraFlowSampler.scheduler=nope"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "ComfyUI rejected the prompt" in proc.stderr and "scheduler" in proc.stderr and "nope" in proc.stderr


def test_execution_error_reaches_the_queue_command(comfy_server, tmp_path):
    api = [p for p in workflow_files("api")
           if any(n["class_type"] == "AuraFlowLoader" for n in json.loads(p.read_text()).values())]
    if not api:
        pytest.skip("no bundled API workflow with AuraFlowLoader")
    broken = comfy_server.base / "models" / "checkpoints" / "broken_auraflow.safetensors"
    broken.write_bytes(b"this is not a safetensors file")
    prompt = small(json.loads(api[0].read_text()))
    with pytest.raises(headless.QueueError) as err:
        headless.run_workflow(prompt, comfy_server.url, sets=["AuraFlowLoader.checkpoint=broken_auraflow.safetensors"],
                              out_dir=tmp_path, timeout=300, poll=0.2)
    message = str(err.value)
    assert "ComfyUI failed the prompt in node" in message and "(AuraFlowLoader): LoadError: " in message
    assert "broken_auraflow.safetensors" in message, message


# ------------------------------------------------------------------------------------------------------- editor
def browser_tools():
    chromium = os.environ.get("AURAFLOW_CHROMIUM", "/usr/bin/chromium")
    node = shutil.which("node")
    if not node or not Path(chromium).exists():
        pytest.skip(f"the browser test needs node and Chromium ({chromium}; set AURAFLOW_CHROMIUM)")
    probe = subprocess.run([node, "-e", "require.resolve('playwright-core')"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip("the browser test needs the npm package playwright-core on NODE_PATH "
                    "(npm install --prefix DIR playwright-core; NODE_PATH=DIR/node_modules)")
    return node, chromium


def plot_pixels(png: Path):
    """Pixels of the plot's line colour (#4fc3f7) and of its error colour (#ff6b6b) in a screenshot."""
    from PIL import Image

    with Image.open(png) as img:
        rgb = img.convert("RGB")
        width, height = rgb.size
        data = rgb.load()

    def near(c, ref, tol=60):
        return sum(abs(a - b) for a, b in zip(c, ref)) <= tol

    line, error, other = [], 0, 0
    for y in range(height):
        for x in range(width):
            c = data[x, y]
            if near(c, (0x4F, 0xC3, 0xF7)):
                line.append((x, y))
            elif near(c, (0xFF, 0x6B, 0x6B)):
                error += 1
            elif not near(c, (0x16, 0x18, 0x1D), 12):
                other += 1
    return width, height, line, error, other


def test_editor_loads_workflows_and_draws_the_sigma_plot(comfy_server, tmp_path):
    node, chromium = browser_tools()
    editor = workflow_files("editor")
    control = tmp_path / "control_missing_node.json"  # proves the missing-node check can fail
    control.write_text(json.dumps({
        "last_node_id": 1, "last_link_id": 0, "links": [], "groups": [], "config": {}, "extra": {}, "version": 0.4,
        "nodes": [{"id": 1, "type": "AuraFlowNoSuchNode", "pos": [0, 0], "size": [200, 80], "flags": {}, "order": 0,
                   "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": []}]}))
    # each distinct set of files the bundled workflows name in properties.models (AuraFlow v0.3, Pony V7's three
    # files, the GGUF with its text encoder and VAE), under names not installed here: the editor lists each one
    absent_controls, seen = {}, set()
    for path in editor:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = frozenset(m["name"] for n in data["nodes"] for m in n["properties"].get("models", []))
        if not names or names in seen:
            continue
        seen.add(names)
        for graph_node in data["nodes"]:
            for model in graph_node["properties"].get("models", []):
                graph_node["widgets_values"] = ["absent_" + v if v == model["name"] else v
                                                for v in graph_node["widgets_values"]]
                model["name"] = "absent_" + model["name"]
        absent_controls[f"absent_{path.stem}"] = [m for n in data["nodes"] for m in n["properties"].get("models", [])]
        (tmp_path / f"absent_{path.stem}.json").write_text(json.dumps(data))
    shots = tmp_path / "shots"
    shots.mkdir()
    job = {"url": comfy_server.url + "/", "chromium": chromium, "outDir": str(shots),
           "workflows": [{"name": p.stem, "path": str(p)} for p in editor] + [
               {"name": "control", "path": str(control)}] + [
               {"name": name, "path": str(tmp_path / f"{name}.json")} for name in absent_controls],
           "plot": {"nodeType": "AuraFlowSampler", "set": {"scheduler": "karras", "steps": 10,
                                                           "sampler_name": "euler"}, "expectCount": 11},
           "vue": {"nodeType": "AuraFlowSampler"}, "hooks": True}
    proc = subprocess.run([node, str(Path(__file__).with_name("browser.mjs")), json.dumps(job)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    keep = os.environ.get("AURAFLOW_KEEP_SCREENSHOTS")
    if keep:
        shutil.copytree(shots, keep, dirs_exist_ok=True)
    assert "failure" not in result, result.get("failure")
    assert "AuraFlow.SigmaPlot" in result["extensions"] and "AuraFlow.RemoteKey" in result["extensions"]
    assert result["pageErrors"] == []
    hooks = result["hooks"]  # a ComfyUI MODEL fits the sampler's union socket; the menu item comes from the hook
    assert hooks["socketType"] == "AURAFLOW_MODEL,MODEL" and hooks["modelLinked"] and not hooks["clipLinked"]
    assert hooks["remoteMenu"] == ["Set remote API key (Segmind, fal)…"] and hooks["samplerMenu"] == []
    assert hooks["menuShown"], "right-clicking AuraFlow Remote Generate shows no 'Set remote API key (Segmind, fal)…'"

    assert {m["name"] for models in absent_controls.values() for m in models} >= {  # what issue 20 asks to offer
        "absent_aura_flow_0.3.safetensors", "absent_pony-v7-base.safetensors", "absent_aura_flow_0.3-Q8_0.gguf"}
    for name, models in absent_controls.items():
        offered = result["workflows"].pop(name)
        listed = {row["name"]: row for row in offered["missingModels"]}
        assert sorted(listed) == sorted(m["name"] for m in models), (name, offered)
        for model in models:  # the folder and URL come from properties.models; the frontend offers no .gguf download
            row = listed[model["name"]]
            assert (row["directory"], row["url"], row["copyUrl"]) == (model["directory"], model["url"], True), row
            assert row["download"] == model["name"].endswith(".safetensors"), row
    ctl = result["workflows"].pop("control")
    assert ctl["unknown"] == ["AuraFlowNoSuchNode"] and ctl["brokenNodes"] == ["1:AuraFlowNoSuchNode"]
    assert any("AuraFlowNoSuchNode" in text for text in ctl["missingText"]), ctl
    for name, report in result["workflows"].items():
        assert report["unknown"] == [] and report["brokenNodes"] == [], (name, report)
        assert report["missingText"] == [], (name, report["missingText"])
        assert report["shownModels"] == [] and report["missingModels"] == [], (name, report)  # installed here
        assert report["loadedNodes"] == report["fileNodes"] > 0, (name, report)

    plot = result["plot"]
    assert plot["before"] == DEFAULTS["steps"] + 1 and plot["after"] == 11
    assert "auraflow_sigma_plot" in plot["widgetNames"]
    # the plot widget is not serialized: widgets_values holds only the real widgets
    assert len([v for v in plot["widgets_values"] if v is not None]) == len(plot["widgetNames"]) - 1

    width, height, line, error, _ = plot_pixels(shots / "sigma-plot.png")
    assert len(line) > 150 and error == 0, f"no schedule line in {shots / 'sigma-plot.png'}"
    xs = sorted({x for x, _ in line})
    assert xs[-1] - xs[0] > 0.7 * width
    left = [y for x, y in line if x < xs[0] + 0.1 * width]
    right = [y for x, y in line if x > xs[-1] - 0.1 * width]
    assert sum(left) / len(left) + 0.4 * height < sum(right) / len(right), "sigma must fall from 1 to 0"
    _, _, line, error, _ = plot_pixels(shots / "sigma-plot-error.png")
    assert error > 30 and len(line) == 0, "a 400 from the route must replace the plot with its message"

    # Vue nodes: a click on steps "+" (25 -> 26) redraws the plot with one more sigma
    assert result["vue"] == {"before": DEFAULTS["steps"] + 1, "after": DEFAULTS["steps"] + 2}
    width, _, line, error, _ = plot_pixels(shots / "sigma-plot-vue.png")
    assert len(line) > 150 and error == 0 and max(x for x, _ in line) - min(x for x, _ in line) > 0.7 * width


# ------------------------------------------------------------------------------------------- GGUF and LoRAs
def test_gguf_checkpoint_with_two_chained_loras_runs_to_images(comfy_server, tmp_path):
    """A GGUF from models/unet, two chained AuraFlow LoRA Loaders, and beside them a branch on the loader's own
    model, through /prompt: the images equal the engine's (the same GGUF and LoRAs loaded here), the base branch
    has no LoRA, and the saved files carry the auraflow record."""
    import shutil

    import numpy as np
    import torch
    from PIL import Image

    import aura_flow
    from aura_flow.images import read_metadata
    from aura_flow.provenance import file_hash
    from aura_flow.weights.writers import build_tiny_gguf
    from lora_files import LAYERS_A, LAYERS_B, write_lora

    from comfyui_support import place

    models = comfy_server.base / "models"
    gguf = build_tiny_gguf(tmp_path / "src", "Q8_0", seed=3)
    place(gguf, models / "unet" / "auraflow_lora_test_Q8_0.gguf")
    shutil.copy2(gguf.parent / "text_encoder.safetensors", models / "text_encoders" / "gguf_test_te.safetensors")
    shutil.copy2(gguf.parent / "vae.safetensors", models / "vae" / "gguf_test_vae.safetensors")
    a = write_lora(models / "loras" / "test_style_a.safetensors", LAYERS_A, seed=1)
    b = write_lora(models / "loras" / "test_char_b.safetensors", LAYERS_B, seed=2, style="peft")
    listed = comfy_server.get_json("/object_info/AuraFlowLoader")["AuraFlowLoader"]["input"]["required"]["checkpoint"]
    assert "auraflow_lora_test_Q8_0.gguf" in (listed[0] if isinstance(listed[0], list) else listed[1]["options"])
    gen = dict(prompt="a red fox", negative_prompt="", cfg=3.0, seed=11, shift=1.73, steps=2, width=64, height=64,
               sampler="euler", scheduler="normal", number_of_images=1, output_format="png", output_quality=80)
    prompt = {
        "1": {"class_type": "AuraFlowLoader", "inputs": {
            "checkpoint": "auraflow_lora_test_Q8_0.gguf", "text_encoder": "gguf_test_te.safetensors",
            "vae": "gguf_test_vae.safetensors", "tokenizer": "(from checkpoint)", "weight_dtype": "fp32"}},
        "2": {"class_type": "AuraFlowLoraLoader", "inputs": {"model": ["1", 0], "lora_name": a.name,
                                                             "strength": 0.8}},
        "3": {"class_type": "AuraFlowLoraLoader", "inputs": {"model": ["2", 0], "lora_name": b.name,
                                                             "strength": -0.6}},
        "4": {"class_type": "AuraFlowGenerate", "inputs": {"model": ["3", 0], **gen}},
        "5": {"class_type": "AuraFlowSaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "gguf_loras",
                                                            "format": "png", "quality": 80, "embed_workflow": True}},
        "6": {"class_type": "AuraFlowGenerate", "inputs": {"model": ["1", 0], **gen}},
        "7": {"class_type": "AuraFlowSaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "gguf_base",
                                                            "format": "png", "quality": 80, "embed_workflow": True}},
    }
    paths = headless.run_workflow(prompt, comfy_server.url, out_dir=tmp_path / "out", timeout=600, poll=0.2)
    (styled,) = [p for p in paths if p.name.startswith("gguf_loras")]
    (base,) = [p for p in paths if p.name.startswith("gguf_base")]

    files = dict(text_encoder=gguf.parent / "text_encoder.safetensors", vae=gguf.parent / "vae.safetensors")
    engine_gen = dict(gen)
    with_loras = aura_flow.load(gguf, **files, dtype="fp32", device="cpu", loras=[(a, 0.8), (b, -0.6)])
    want = with_loras.generate(**engine_gen).images[0]
    plain = aura_flow.load(gguf, **files, dtype="fp32", device="cpu").generate(**engine_gen).images[0]

    def pixels(image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.int16))

    with Image.open(styled) as got_styled, Image.open(base) as got_base:
        assert (pixels(got_styled) - pixels(want)).abs().max() <= 1
        assert (pixels(got_base) - pixels(plain)).abs().max() <= 1
        assert (pixels(want) - pixels(plain)).abs().max() > 10  # the LoRAs show
        record, base_record = read_metadata(got_styled)["auraflow"], read_metadata(got_base)["auraflow"]
    assert record["checkpoint"] == {"name": "auraflow_lora_test_Q8_0.gguf", "hash": file_hash(gguf)}
    assert [(x["name"], x["strength"], x["format"]) for x in record["loras"]] == [
        ("test_style_a.safetensors", 0.8, "kohya lora"), ("test_char_b.safetensors", -0.6, "diffusers/peft lora")]
    assert base_record["loras"] == [] and record["dtype"] == "fp32"
    assert str(models) not in json.dumps(record)
