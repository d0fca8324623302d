"""The bundled workflows: both formats sound against the nodes, in sync with tests/build_workflows.py, and every API-format
one executed node by node on a tiny model (the remote one against the fake hosted API)."""
from __future__ import annotations

import importlib
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

import workflow_exec as wx

WORKFLOWS = wx.ROOT / "example_workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
pack = wx.load_pack()
classes = wx.all_classes(pack)
imageio = importlib.import_module(f"{pack.__name__}.aura_flow.images")
hash_of = importlib.import_module(f"{pack.__name__}.aura_flow.provenance").file_hash
import build_workflows as build  # noqa: E402  (tests/build_workflows.py)


def editor(name):
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def api(name):
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8"))


def test_every_described_workflow_is_bundled_with_twin_and_thumbnail():
    assert NAMES == sorted(build.WORKFLOWS)
    assert sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")) == NAMES
    for name in NAMES:
        thumb = WORKFLOWS / f"{name}.jpg"
        assert thumb.stat().st_size < 50_000
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and im.size == (320, 200)
            assert np.asarray(im).std() > 10  # a picture, not a blank


@pytest.mark.parametrize("name", NAMES)
def test_committed_files_equal_what_build_writes(name):
    want_editor, want_api = build.build(name, classes)
    assert editor(name) == json.loads(build.dumps(want_editor)), "run: python tests/build_workflows.py"
    assert api(name) == json.loads(build.dumps(want_api)), "run: python tests/build_workflows.py"


@pytest.mark.parametrize("name", NAMES)
def test_both_formats_fit_the_nodes(name):
    assert wx.check_editor(editor(name), classes) == []
    assert wx.check_api(api(name), classes) == []


@pytest.mark.parametrize("name", NAMES)
def test_editor_and_api_formats_agree(name):
    wf, prompt = editor(name), api(name)
    assert {str(n["id"]) for n in wf["nodes"]} == set(prompt)
    for node in wf["nodes"]:
        twin = prompt[str(node["id"])]
        assert twin["class_type"] == node["type"]
        slots = wx.widget_slots(classes[node["type"]])
        named = {slot[0]: value for slot, value in zip(slots, node["widgets_values"]) if slot is not None}
        linked = {s["name"] for s in node["inputs"] if s["link"] is not None}  # a linked widget keeps its value
        assert {k: v for k, v in named.items() if k not in linked} == \
            {k: v for k, v in twin["inputs"].items() if not isinstance(v, list)}
        assert linked == {k for k, v in twin["inputs"].items() if isinstance(v, list)}
    for link_id, src, src_slot, dst, dst_slot, _kind in wf["links"]:
        dst_node = next(n for n in wf["nodes"] if n["id"] == dst)
        assert prompt[str(dst)]["inputs"][dst_node["inputs"][dst_slot]["name"]] == [str(src), src_slot]


# ComfyUI's model folders a bundled workflow may name (folder_paths' keys; AuraFlow Loader reads these)
MODEL_DIRECTORIES = {"checkpoints", "diffusion_models", "unet", "text_encoders", "vae", "diffusers", "loras"}
WIDGET_DIRECTORIES = {"checkpoint": {"checkpoints", "diffusion_models", "unet", "diffusers"},
                      "text_encoder": {"text_encoders"}, "vae": {"vae"}, "tokenizer": {"text_encoders"}}


def model_problems(workflow: dict) -> list[str]:
    """What keeps ComfyUI's editor from offering the downloads of a workflow's files: every file widget of every
    loader node must be named in the node's properties.models, with an https URL ending in the same file type and
    a model folder that fits the widget; the node's cnr_id must be the pack's registry id."""
    problems = []
    for node in workflow["nodes"]:
        props = node.get("properties", {})
        if props.get("cnr_id") != (build.CORE_ID if node["type"] in wx.CORE_NODES else build.CNR_ID):
            problems.append(f"node {node['id']}: cnr_id {props.get('cnr_id')!r}")
        if node["type"] != "AuraFlowLoader":
            continue
        slots = wx.widget_slots(classes[node["type"]])
        values = {slot[0]: v for slot, v in zip(slots, node["widgets_values"]) if slot is not None}
        models = {m.get("name"): m for m in props.get("models", [])}
        for widget, allowed in WIDGET_DIRECTORIES.items():
            name = values.get(widget)
            if name in (None, "", build.FROM):
                continue
            entry = models.pop(name, None)
            if entry is None:
                problems.append(f"node {node['id']}: {widget} {name!r} is not in properties.models")
                continue
            url, directory = entry.get("url", ""), entry.get("directory")
            if not url.startswith("https://") or url.rsplit(".", 1)[-1] != name.rsplit(".", 1)[-1]:
                problems.append(f"node {node['id']}: {name!r} has url {url!r}, not an https URL of such a file")
            if directory not in MODEL_DIRECTORIES or directory not in allowed:
                problems.append(f"node {node['id']}: {name!r} goes in {directory!r}, not a folder {widget} reads")
        problems += [f"node {node['id']}: {n!r} in properties.models is no widget's file" for n in models]
    return problems


@pytest.mark.parametrize("name", NAMES)
def test_every_loader_names_its_files_for_the_editors_downloads(name):
    assert model_problems(editor(name)) == []


def test_the_bundled_files_are_the_published_ones():
    loaders = [n for name in NAMES for n in editor(name)["nodes"] if n["type"] == "AuraFlowLoader"]
    assert len(loaders) == 6  # generate, txt2img_nodes, img2img, gguf, pony_v7, prompt_list
    urls = {m["name"]: m["url"] for n in loaders for m in n["properties"]["models"]}
    assert urls["aura_flow_0.3.safetensors"] == \
        "https://huggingface.co/fal/AuraFlow-v0.3/resolve/main/aura_flow_0.3.safetensors"
    assert urls["aura_flow_0.3-Q8_0.gguf"].startswith("https://huggingface.co/city96/AuraFlow-v0.3-gguf/resolve/")
    assert all(u.startswith("https://huggingface.co/purplesmartai/pony-v7-base/resolve/main/")
               for n, u in urls.items() if n.startswith("pony"))
    tomllib = pytest.importorskip("tomllib")
    assert build.CNR_ID == tomllib.loads((wx.ROOT / "pyproject.toml").read_text())["project"]["name"]


def test_the_model_check_catches_what_the_editor_could_not_offer():
    wf = editor("auraflow_pony_v7")
    loader = wf["nodes"][0]
    models = loader["properties"]["models"]
    models[0]["url"] = models[0]["url"].replace("https://", "http://")
    models[1]["directory"] = "vae"  # the text encoder in the VAE folder
    del models[2]
    loader["properties"]["cnr_id"] = "comfy-core"
    problems = model_problems(wf)
    assert any("'pony-v7-base.safetensors' has url 'http://" in p for p in problems)
    assert any("'pony_v7_text_encoder.fp16.safetensors' goes in 'vae'" in p for p in problems)
    assert any("vae 'pony_v7_vae.fp16.safetensors' is not in properties.models" in p for p in problems)
    assert any("node 1: cnr_id 'comfy-core'" in p for p in problems)


def test_the_checks_catch_broken_workflows():
    wf = editor("auraflow_txt2img_nodes")
    wf["links"][0][5] = "IMAGE"
    wf["nodes"][3]["widgets_values"] = wf["nodes"][3]["widgets_values"][:-1]
    problems = wx.check_editor(wf, classes)
    assert any("link 1" in p for p in problems) and any("widgets_values" in p for p in problems)
    prompt = api("auraflow_txt2img_nodes")
    prompt["4"]["inputs"]["cfg"] = 50
    prompt["4"]["inputs"]["positive"] = ["5", 0]  # an IMAGE into a CONDITIONING input
    prompt["6"]["class_type"] = "NoSuchNode"
    problems = wx.check_api(prompt, classes)
    assert any("cfg: 50 is above" in p for p in problems)
    assert any("'positive' (CONDITIONING) fed by IMAGE" in p for p in problems)
    assert any("unknown node type" in p for p in problems)


# ---------------------------------------------------------------------------------------------- execution
@pytest.fixture
def env(tmp_path, monkeypatch, tiny_models):
    """Output and input folders in tmp_path, example.png in the input folder, and the tiny model's path."""
    monkeypatch.setenv("AURAFLOW_OUTPUT_DIR", str(tmp_path / "output"))
    (tmp_path / "input").mkdir()
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)),
                              np.full((64, 64), 128, np.uint8)], -1)).save(tmp_path / "input" / "example.png")
    monkeypatch.setattr(wx.LoadImage, "input_dir", tmp_path / "input")
    return tmp_path, str(tiny_models["diffusers"]["checkpoint"])


def shrink(prompt: dict, checkpoint: str) -> dict:
    """The API workflow pointed at the tiny model, at 64x64 and 2 steps (widgets a user would change)."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "AuraFlowLoader":  # the tiny model's own text encoder and VAE
            inputs.update(checkpoint=checkpoint, weight_dtype="fp32", text_encoder=build.FROM, vae=build.FROM)
        if node["class_type"] != "AuraFlowRemoteGenerate":
            for key, value in (("width", 64), ("height", 64), ("steps", 2)):
                if key in inputs and not isinstance(inputs[key], list):  # a link stays
                    inputs[key] = value
    return prompt


def saved(tmp_path, ui: dict) -> list:
    files = [f for entry in ui.values() for f in entry["images"]]
    return [tmp_path / "output" / f["subfolder"] / f["filename"] for f in files]


@pytest.mark.parametrize("name", ["auraflow_generate", "auraflow_txt2img_nodes", "auraflow_img2img", "auraflow_gguf"])
def test_local_workflows_run_and_save_images_with_their_graph(env, name):
    tmp_path, checkpoint = env
    prompt = shrink(api(name), checkpoint)
    workflow = editor(name)
    outputs, ui = wx.execute(prompt, classes, workflow=workflow)
    (path,) = saved(tmp_path, ui)
    with Image.open(path) as im:
        assert im.format == "WEBP" and im.size == (64, 64)
        metadata = imageio.read_metadata(im)
        assert np.asarray(im).std() > 1
    assert metadata.pop("auraflow") == {  # what else reproduces it (aura_flow/provenance.py)
        "version": pack.aura_flow.__version__, "checkpoint": {"name": "diffusers", "hash": hash_of(checkpoint)},
        "dtype": "fp32", "compute_dtype": "float32", "device": "cpu", "speed": "auto", "noise_device": "cpu",
        "loras": []}
    generators = [v for v in prompt.values() if v["class_type"] == "AuraFlowGenerate"]
    if generators:  # AuraFlow Generate also says its parameters, as the command line's images do
        widgets = generators[0]["inputs"]
        assert metadata.pop("parameters") == {k: widgets[k] for k in (
            "prompt", "negative_prompt", "cfg", "seed", "shift", "steps", "width", "height", "sampler", "scheduler",
            "number_of_images", "output_format", "output_quality")}
    assert metadata == {"prompt": prompt, "workflow": workflow}
    images = outputs[next(k for k, v in prompt.items() if v["class_type"] == "AuraFlowSaveImage")][0]
    assert images.shape == (1, 64, 64, 3) and 0 <= images.min() and images.max() <= 1


@pytest.mark.heavy
def test_one_node_and_step_by_step_workflows_make_the_same_image(env):
    _tmp, checkpoint = env
    one = shrink(api("auraflow_generate"), checkpoint)
    one["2"]["inputs"]["output_format"] = "png"  # no lossy round trip, to compare the pixels themselves
    nodes = shrink(api("auraflow_txt2img_nodes"), checkpoint)
    out_one, _ = wx.execute(one, classes)
    out_nodes, _ = wx.execute(nodes, classes)
    assert out_one["2"][1] == nodes["4"]["inputs"]["seed"]
    assert torch.allclose(out_one["2"][0], out_nodes["5"][0], atol=1e-5)


@pytest.mark.heavy
def test_img2img_keeps_the_input_image(env):
    _tmp, checkpoint = env
    prompt = shrink(api("auraflow_img2img"), checkpoint)
    out, _ = wx.execute(prompt, classes)
    start = out["3"][0]["samples"]
    result = out["6"][0]["samples"]
    fresh = shrink(api("auraflow_img2img"), checkpoint)
    fresh["6"]["inputs"]["denoise"] = 1.0
    out_full, _ = wx.execute(fresh, classes)
    assert (result - start).abs().mean() < (out_full["6"][0]["samples"] - start).abs().mean()


def test_remote_workflow_against_the_fake_service(env, monkeypatch):
    remote_server = pytest.importorskip("remote_server")
    tmp_path, _checkpoint = env
    prompt = api("auraflow_remote")
    saved_before = json.loads(json.dumps(prompt))
    del saved_before["1"]["inputs"]["api_version"]  # a prompt saved before the input existed still fits
    assert wx.check_api(saved_before, classes) == []
    remote_checks = pytest.importorskip("remote_checks")
    queue = importlib.import_module(f"{pack.__name__}.aura_flow.remote.queue")
    monkeypatch.setattr(queue, "DEFAULT_POLL", remote_checks.FAST_POLL)  # the node polls as a test should
    with remote_server.FakeService() as service:
        monkeypatch.setenv("SEGMIND_API_KEY", remote_server.KEY)
        monkeypatch.setenv("SEGMIND_API_URL", service.url)
        outputs, ui = wx.execute(prompt, classes, workflow=editor("auraflow_remote"))
    assert [r["path"] for r in service.submits] == ["/v2/aura-flow"]  # the bundled workflow runs on v2
    remote_checks.media_never_saw_the_key(service)
    (path,) = saved(tmp_path, ui)
    assert path.parent.name == "AuraFlow" and path.name.startswith("remote_")
    with Image.open(path) as im:
        assert im.format == "WEBP" and im.size == (1024, 1024)
        metadata = imageio.read_metadata(im)
        assert metadata["prompt"] == prompt and metadata["workflow"] == editor("auraflow_remote")
        assert metadata["auraflow_remote"] == {"api_version": "v2", "failed": [], "images": [
            {"index": 0, "seed": prompt["1"]["inputs"]["seed"], "request_id": "rq-1"}]}  # find the billed result
        assert remote_server.KEY not in json.dumps(metadata)
    images, seed = outputs["1"][0], outputs["1"][1]
    assert seed == prompt["1"]["inputs"]["seed"]
    top = tuple(round(float(c) * 255) for c in images[0, 10, 10])
    assert max(abs(a - b) for a, b in zip(top, remote_server.seed_colour(seed))) <= 8


def test_three_fal_remote_nodes_each_save_their_own_record(env, monkeypatch):
    """The prompt's EXTRA_PNGINFO is one dict for all its nodes: each saved image still names its own node's seed and
    request id (carried on the images), and ``auraflow_remote_nodes`` every finished node's by node id."""
    fal_server = pytest.importorskip("fal_server")
    remote_checks = pytest.importorskip("remote_checks")
    tmp_path, _checkpoint = env
    queue = importlib.import_module(f"{pack.__name__}.aura_flow.remote.queue")
    monkeypatch.setattr(queue, "DEFAULT_POLL", remote_checks.FAST_POLL)

    class FirstFinishesLast(fal_server.FakeFal):
        def _state(self, job):  # seed 11 (node 1) completes after the other two: the shared dict then holds its
            if job["body"].get("seed") == 11 and time.monotonic() - job["time"] < 0.5:  # record when 2 and 3 save
                return "IN_PROGRESS"
            return super()._state(job)

    node = {**api("auraflow_remote")["1"]["inputs"], "provider": "fal"}  # the bundled node, on fal
    prompt = {str(n): {"class_type": "AuraFlowRemoteGenerate", "inputs": {**node, "seed": 10 + n}} for n in (1, 2, 3)}
    for n in (1, 2, 3):  # all three wait together, then each image is saved
        prompt[str(n + 3)] = {"class_type": "AuraFlowSaveImage", "inputs": {
            "images": [str(n), 0], "filename_prefix": f"fal_{10 + n}", "format": "png", "quality": 80,
            "embed_workflow": True}}
    with FirstFinishesLast() as fal:
        monkeypatch.setenv("FAL_KEY", fal_server.FAL_KEY)
        monkeypatch.setenv("FAL_QUEUE_URL", fal.url)
        _outputs, ui = wx.execute(prompt, classes, workflow={"nodes": []})
    ids = {job["body"]["seed"]: rid for rid, job in fal.jobs.items()}
    records = {}
    for path in saved(tmp_path, ui):
        with Image.open(path) as im:
            metadata = imageio.read_metadata(im)
        seed = int(path.name.split("_")[1])
        assert metadata["auraflow_remote"]["images"] == [
            {"index": 0, "seed": seed, "request_id": ids[seed], "has_nsfw_concepts": False}], path
        records.update(metadata["auraflow_remote_nodes"])
    assert len(ids) == 3 and {k: v["images"][0]["seed"] for k, v in records.items()} == {"1": 11, "2": 12, "3": 13}
    assert fal_server.FAL_KEY not in json.dumps(records)
