"""Writes the bundled workflows from one description each: the editor format (``example_workflows/<name>.json``,
listed by ComfyUI as a template of this pack), the API format (``example_workflows/api/<name>.json``: ComfyUI lists
every top-level ``example_workflows/*.json`` as a template, so the API twins live one folder down) and a
``<name>.jpg`` thumbnail.

Widget order, socket types and defaults come from the nodes' own INPUT_TYPES, so the files cannot drift from the
nodes; tests/test_workflows.py checks that the committed files equal what this writes.

    python tests/build_workflows.py          # rewrite the files
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "example_workflows"
sys.path.insert(0, str(HERE))
from workflow_exec import CORE_NODES, all_classes, editor_type, inputs_of, is_widget, load_pack, widget_slots  # noqa: E402

PROMPT = ("A mesmerizing 3D render of the words 'Happy birthday' in a dreamy, pastel-coloured cursive script, "
          "floating above a gradient from deep purple to soft pink, with a rainbow, hearts and twinkling stars, "
          "ukiyo-e and graffiti, vibrant, dark fantasy, typography")
SEED = 2425367  # the hosted API's example seed
FROM = "(from checkpoint)"
# Each file a loader node of a bundled workflow names, with where it comes from and the ComfyUI folder it goes in:
# written into the node's properties.models, as ComfyUI's own templates do, so the editor offers the downloads when
# the files are missing (instead of red nodes). The registry id (pyproject's project name) goes in cnr_id.
CNR_ID = "comfyui-auraflow"
CORE_ID = "comfy-core"
HF = "https://huggingface.co"
MODEL_FILES = {
    # fal's all-in-one AuraFlow v0.3 (transformer, Pile-T5-XL text encoder, SDXL VAE in one file)
    "aura_flow_0.3.safetensors": (f"{HF}/fal/AuraFlow-v0.3/resolve/main/aura_flow_0.3.safetensors", "checkpoints"),
    # city96's GGUF of the transformer, with the text encoder and VAE from fal's repository
    "aura_flow_0.3-Q8_0.gguf": (f"{HF}/city96/AuraFlow-v0.3-gguf/resolve/main/aura_flow_0.3-Q8_0.gguf",
                                "diffusion_models"),
    "auraflow_v0.3_text_encoder.fp16.safetensors": (
        f"{HF}/fal/AuraFlow-v0.3/resolve/main/text_encoder/model.fp16.safetensors", "text_encoders"),
    "auraflow_v0.3_vae.fp16.safetensors": (
        f"{HF}/fal/AuraFlow-v0.3/resolve/main/vae/diffusion_pytorch_model.fp16.safetensors", "vae"),
    # Pony V7 (README, "Pony V7")
    "pony-v7-base.safetensors": (f"{HF}/purplesmartai/pony-v7-base/resolve/main/safetensor/pony-v7-base.safetensors",
                                 "diffusion_models"),
    "pony_v7_text_encoder.fp16.safetensors": (
        f"{HF}/purplesmartai/pony-v7-base/resolve/main/text_encoder/model.fp16.safetensors", "text_encoders"),
    "pony_v7_vae.fp16.safetensors": (
        f"{HF}/purplesmartai/pony-v7-base/resolve/main/vae/diffusion_pytorch_model.fp16.safetensors", "vae"),
}
FILE_WIDGETS = ("checkpoint", "text_encoder", "vae", "tokenizer")  # AuraFlow Loader's file inputs
LOADER = ("AuraFlowLoader", {"checkpoint": "aura_flow_0.3.safetensors"}, {})
GGUF_LOADER = ("AuraFlowLoader", {"checkpoint": "aura_flow_0.3-Q8_0.gguf",
                                  "text_encoder": "auraflow_v0.3_text_encoder.fp16.safetensors",
                                  "vae": "auraflow_v0.3_vae.fp16.safetensors"}, {})
# Pony V7 (purplesmartai/pony-v7-base): the transformer-only file in models/diffusion_models, its text encoder
# (text_encoder/model.fp16.safetensors) and VAE (vae/diffusion_pytorch_model.fp16.safetensors) saved under these
# names; the tokenizer is ComfyUI's own Pile-T5 one (the same vocabulary). Settings: README, "Pony V7".
PONY_LOADER = ("AuraFlowLoader", {"checkpoint": "pony-v7-base.safetensors",
                                  "text_encoder": "pony_v7_text_encoder.fp16.safetensors",
                                  "vae": "pony_v7_vae.fp16.safetensors"}, {})
PONY_PROMPT = ("score_9, A cheerful red fox sits on a mossy rock in a misty autumn forest and looks at the viewer "
               "with bright green eyes, golden leaves drift down around it and soft morning light falls between "
               "the trees. Detailed digital painting with warm colors, soft brush strokes and a shallow depth of "
               "field. fox, forest, autumn, fallen leaves, morning light")
PONY_SAMPLER = {"seed": SEED, "steps": 40, "cfg": 3.5, "sampler_name": "euler", "scheduler": "normal",
                "shift": 1.73, "width": 1024, "height": 1024}

LIST_PROMPTS = ("# one job a line: plain prompts, or JSONL objects such as {\"prompt\": \"a fox\", \"seed\": 7}\n"
                "A red fox sitting in fresh snow at dawn, soft golden light, detailed fur\n"
                "A lighthouse on a rocky coast during a storm, dramatic waves, oil painting\n"
                "A cozy reading nook with a window seat, rain outside, warm lamp light, watercolor\n")
LIST_WIRES = {key: (1, i) for i, key in enumerate(("prompt", "negative_prompt", "seed", "steps", "cfg", "width",
                                                   "height", "sampler", "scheduler", "shift"))}

# name -> (title, [(node type, widget values that differ from the defaults, {input: (source index, output)})]);
# a wire into a widget input links it, as the editor does when a link is dropped on a widget
WORKFLOWS = {
    "auraflow_generate": ("AuraFlow: text to image in one node", [
        LOADER,
        ("AuraFlowGenerate", {"prompt": PROMPT, "seed": SEED}, {"model": (0, 0)}),
        ("AuraFlowSaveImage", {}, {"images": (1, 0)}),
    ]),
    "auraflow_txt2img_nodes": ("AuraFlow: text to image, step by step", [
        LOADER,
        ("AuraFlowTextEncode", {"text": PROMPT}, {"text_encoder": (0, 1)}),
        ("AuraFlowTextEncode", {"text": ""}, {"text_encoder": (0, 1)}),
        ("AuraFlowSampler", {"seed": SEED}, {"model": (0, 0), "positive": (1, 0), "negative": (2, 0)}),
        ("VAEDecode", {}, {"samples": (3, 0), "vae": (0, 2)}),
        ("AuraFlowSaveImage", {}, {"images": (4, 0)}),
    ]),
    "auraflow_remote": ("AuraFlow: text to image with the hosted API", [
        ("AuraFlowRemoteGenerate", {"prompt": PROMPT, "seed": SEED}, {}),
        ("AuraFlowSaveImage", {"filename_prefix": "AuraFlow/remote"}, {"images": (0, 0)}),
    ]),
    "auraflow_img2img": ("AuraFlow: image to image", [
        LOADER,
        ("LoadImage", {"image": "example.png"}, {}),
        ("AuraFlowVAEEncode", {}, {"pixels": (1, 0), "vae": (0, 2)}),
        ("AuraFlowTextEncode", {"text": "a watercolor painting, soft light"}, {"text_encoder": (0, 1)}),
        ("AuraFlowTextEncode", {"text": ""}, {"text_encoder": (0, 1)}),
        ("AuraFlowSampler", {"seed": SEED, "denoise": 0.6},
         {"model": (0, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (2, 0)}),
        ("AuraFlowVAEDecode", {}, {"samples": (5, 0), "vae": (0, 2)}),
        ("AuraFlowSaveImage", {"filename_prefix": "AuraFlow/img2img"}, {"images": (6, 0)}),
    ]),
    "auraflow_gguf": ("AuraFlow GGUF: text to image with a quantized transformer", [
        GGUF_LOADER,
        ("AuraFlowGenerate", {"prompt": PROMPT, "seed": SEED}, {"model": (0, 0)}),
        ("AuraFlowSaveImage", {"filename_prefix": "AuraFlow/gguf"}, {"images": (1, 0)}),
    ]),
    "auraflow_pony_v7": ("Pony V7: text to image with its recommended settings", [
        PONY_LOADER,
        ("AuraFlowTextEncode", {"text": PONY_PROMPT}, {"text_encoder": (0, 1)}),
        ("AuraFlowTextEncode", {"text": ""}, {"text_encoder": (0, 1)}),
        ("AuraFlowSampler", PONY_SAMPLER, {"model": (0, 0), "positive": (1, 0), "negative": (2, 0)}),
        ("VAEDecode", {}, {"samples": (3, 0), "vae": (0, 2)}),
        ("AuraFlowSaveImage", {"filename_prefix": "PonyV7"}, {"images": (4, 0)}),
    ]),
    "auraflow_prompt_list": ("AuraFlow: one image per line of a prompt list", [
        LOADER,
        ("AuraFlowPromptList", {"text": LIST_PROMPTS, "seed": SEED}, {}),
        ("AuraFlowGenerate", {}, {"model": (0, 0), **LIST_WIRES}),
        ("AuraFlowSaveImage", {"filename_prefix": "AuraFlow/list"}, {"images": (2, 0)}),
    ]),
}
EXTRA_SLOT_VALUE = {"control_after_generate": "randomize", "image_upload": "image"}


def _widget_values(cls, given: dict) -> dict:
    values = {}
    for name, (kind, opts) in inputs_of(cls).items():
        if is_widget(kind):
            default = opts.get("default", kind[0] if isinstance(kind, (list, tuple)) and kind else None)
            values[name] = given.get(name, default)
    unknown = set(given) - set(values)
    if unknown:
        raise ValueError(f"{cls.__name__}: no widget(s) {sorted(unknown)}")
    return values


def properties(kind: str, values: dict) -> dict:
    """A node's editor properties: the pack that provides it, and for AuraFlow Loader the files it names (which
    every file of a bundled loader must have: an entry in MODEL_FILES)."""
    props = {"cnr_id": CORE_ID if kind in CORE_NODES else CNR_ID, "Node name for S&R": kind}
    if kind == "AuraFlowLoader":
        names = [values[w] for w in FILE_WIDGETS if values.get(w) not in (None, "", FROM)]
        props["models"] = [{"name": n, "url": MODEL_FILES[n][0], "directory": MODEL_FILES[n][1]} for n in names]
    return props


def build(name: str, classes: dict) -> tuple[dict, dict]:
    """(editor-format workflow, API-format prompt) for one entry of WORKFLOWS."""
    _title, spec = WORKFLOWS[name]
    api, nodes, links = {}, [], []
    for index, (kind, given, wires) in enumerate(spec):
        node_id = index + 1
        cls = classes[kind]
        values = _widget_values(cls, given)
        inputs = dict(values)
        sockets = []
        for input_name, (input_kind, _opts) in inputs_of(cls).items():
            widget = is_widget(input_kind)
            if widget and input_name not in wires:
                continue
            link_id = None
            if input_name in wires:
                src, out = wires[input_name]
                link_id = len(links) + 1
                links.append([link_id, src + 1, out, node_id, len(sockets), editor_type(input_kind)])
                inputs[input_name] = [str(src + 1), out]
            sockets.append({"name": input_name, "type": editor_type(input_kind), "link": link_id,
                            **({"widget": {"name": input_name}} if widget else {})})
        api[str(node_id)] = {"class_type": kind, "inputs": inputs}
        slots = widget_slots(cls)
        widgets = []
        for slot_index, slot in enumerate(slots):
            if slot is None:
                opts = slots[slot_index - 1][2]
                widgets.append(next(v for k, v in EXTRA_SLOT_VALUE.items() if opts.get(k)))
            else:
                widgets.append(values[slot[0]])
        nodes.append({"id": node_id, "type": kind, "pos": [40 + 380 * _depth(spec, index), 0],
                      "size": [340, 0], "flags": {}, "order": index, "mode": 0,
                      "inputs": sockets, "outputs": [],
                      "properties": properties(kind, values),
                      "widgets_values": widgets})
    for node, (kind, _g, _w) in zip(nodes, spec):
        cls = classes[kind]
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        node["outputs"] = [{"name": n, "type": editor_type(t), "slot_index": i,
                            "links": [link[0] for link in links if link[1] == node["id"] and link[2] == i]}
                           for i, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))]
    column_bottom: dict[int, int] = {}  # stack each column by the nodes' real heights, so none hides another
    for node in nodes:
        # roughly the editor's own minimum: title, one row per socket pair, one per widget
        node["size"][1] = 50 + 22 * max(len(node["inputs"]), len(node["outputs"])) + 28 * len(node["widgets_values"])
        x = node["pos"][0]
        node["pos"][1] = column_bottom.get(x, 60)
        column_bottom[x] = node["pos"][1] + node["size"][1] + 40
    editor = {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
              "groups": [], "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}
    return editor, api


def _depth(spec, index) -> int:
    wires = spec[index][2]
    return 1 + max((_depth(spec, src) for src, _o in wires.values()), default=-1)


def thumbnail(name: str, editor: dict, display: dict) -> bytes:
    """A small drawn picture of the graph on AuraFlow-ish colours: the template list's preview."""
    from PIL import Image, ImageDraw

    width, height = 320, 200
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):  # deep purple to soft pink, as in the example prompt
        t = y / (height - 1)
        draw.line([(0, y), (width, y)], fill=(int(60 + 180 * t), int(20 + 120 * t), int(110 + 90 * t)))
    nodes = {n["id"]: n for n in editor["nodes"]}
    columns = sorted({n["pos"][0] for n in nodes.values()})
    rows = sorted({n["pos"][1] for n in nodes.values()})
    col_w = (width - 12) / len(columns)
    box_w = min(90, col_w - 10)

    def box(node):
        x = 8 + columns.index(node["pos"][0]) * col_w
        y = 14 + rows.index(node["pos"][1]) * 44
        return x, y, x + box_w, y + 30

    for link in editor["links"]:
        a, b = box(nodes[link[1]]), box(nodes[link[3]])
        draw.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=(255, 230, 160), width=2)
    for node in nodes.values():
        x0, y0, x1, y1 = box(node)
        draw.rounded_rectangle([x0, y0, x1, y1], radius=5, fill=(32, 28, 44), outline=(255, 255, 255))
        label = display.get(node["type"], node["type"]).replace("AuraFlow ", "")
        draw.text((x0 + 4, y0 + 9), label[:int(box_w // 6.2)], fill=(255, 255, 255))
    draw.text((10, height - 18), WORKFLOWS[name][0][:52], fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def dumps(data) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    pack = load_pack()
    classes = all_classes(pack)
    display = {**{k: k for k in classes}, **pack.NODE_DISPLAY_NAME_MAPPINGS,
               "VAEDecode": "VAE Decode", "LoadImage": "Load Image"}
    (OUT / "api").mkdir(exist_ok=True)
    for name in WORKFLOWS:
        editor, api = build(name, classes)
        (OUT / f"{name}.json").write_text(dumps(editor), encoding="utf-8")
        (OUT / "api" / f"{name}.json").write_text(dumps(api), encoding="utf-8")
        (OUT / f"{name}.jpg").write_bytes(thumbnail(name, editor, display))
    return 0


if __name__ == "__main__":
    sys.exit(main())
