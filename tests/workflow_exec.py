"""A small stand-in for ComfyUI's executor, for tests: load the pack as ComfyUI does, check workflows in both
formats against the nodes' INPUT_TYPES, and run API-format workflows node by node.

- `load_pack()` imports the repository root as a package the way ComfyUI imports a custom-node folder
  (``spec_from_file_location`` on ``__init__.py``), so the pack's relative imports are exercised as in ComfyUI.
- `CORE_NODES`: the few ComfyUI core nodes the bundled workflows use, with the same ids, inputs and outputs as
  ComfyUI 0.29's (nodes.py), and plain implementations good enough to run a workflow without ComfyUI.
- `check_api(prompt, classes)` / `check_editor(workflow, classes)` return a list of problems ([] when sound).
- `execute(prompt, classes, ...)` runs an API-format prompt in topological order, a node fed lists once per element
  as ComfyUI does (`map_node_over_list`, `merge_result_data`), and returns every node's outputs and the ``ui`` dicts
  of output nodes. A node whose function is a coroutine function runs as an asyncio task, as ComfyUI's execution.py
  (``_async_map_node_over_list``) runs it: the executor goes on with the nodes that do not need its outputs, so
  several async nodes wait together; a plain function blocks the loop while it runs, as there.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_auraflow_under_test"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def load_pack(name: str = PACK_NAME):
    """The pack imported as a package named ``name``, as ComfyUI's ``load_custom_node`` imports it."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def pack_module(name: str):
    """A module of the pack imported as ComfyUI imports it, e.g. ``pack_module("nodes.routes")``."""
    return importlib.import_module(f"{load_pack().__name__}.{name}")


# ---------------------------------------------------------------------------------------------- core stand-ins
class LoadImage:
    """ComfyUI's LoadImage: a file from the input folder -> IMAGE (1, H, W, 3) and MASK."""
    input_dir = Path(os.environ.get("AURAFLOW_INPUT_DIR", "input"))

    @classmethod
    def INPUT_TYPES(cls):
        files = sorted(p.name for p in cls.input_dir.iterdir()) if cls.input_dir.is_dir() else []
        return {"required": {"image": (files, {"image_upload": True})}}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    def load_image(self, image):
        import numpy as np
        import torch
        from PIL import Image

        pil = Image.open(self.input_dir / image)
        rgb = torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)[None]
        return rgb, torch.zeros(1, 64, 64)


class VAEDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    def decode(self, vae, samples):
        return (vae.decode(samples["samples"]),)


class VAEEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    def encode(self, vae, pixels):
        return ({"samples": vae.encode(pixels)},)


class EmptyLatentImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
                             "height": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
                             "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"

    def generate(self, width, height, batch_size=1):
        import torch

        return ({"samples": torch.zeros(batch_size, 4, height // 8, width // 8)},)


class PreviewImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True

    def save_images(self, images, prompt=None, extra_pnginfo=None):
        return {"ui": {"images": [{"shape": list(images.shape)}]}}


CORE_NODES = {cls.__name__: cls for cls in (LoadImage, VAEDecode, VAEEncode, EmptyLatentImage, PreviewImage)}


def all_classes(pack=None) -> dict:
    pack = pack or load_pack()
    return {**CORE_NODES, **pack.NODE_CLASS_MAPPINGS}


# ---------------------------------------------------------------------------------------------- specs
def inputs_of(cls) -> dict:
    """name -> (type, options) over required and optional inputs, in INPUT_TYPES order."""
    types = cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            out[name] = (spec[0], spec[1] if len(spec) > 1 else {})
    return out


def editor_type(kind) -> str:
    """An input's or output's type as the editor saves it: a combo (a list of names) is "COMBO"."""
    return "COMBO" if isinstance(kind, (list, tuple)) else kind


def is_widget(kind) -> bool:
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def widget_slots(cls) -> list[tuple[str, object, dict] | None]:
    """The editor's widgets_values layout: one slot per widget input, plus the unnamed extra slots the editor adds
    (None) after ``control_after_generate`` seeds and ``image_upload`` combos."""
    slots = []
    for name, (kind, opts) in inputs_of(cls).items():
        if is_widget(kind):
            slots.append((name, kind, opts))
            if opts.get("control_after_generate") or opts.get("image_upload"):
                slots.append(None)
    return slots


def check_value(kind, opts: dict, value, *, open_combo: bool = False) -> str | None:
    """Why ``value`` does not fit a widget input, or None."""
    if isinstance(kind, (list, tuple)):
        if value in kind or (open_combo and isinstance(value, str)):
            return None
        return f"{value!r} is not among the options {list(kind)[:8]}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
        if kind == "INT" and not float(value).is_integer():
            return f"{value!r} is not an integer"
        if "min" in opts and value < opts["min"]:
            return f"{value!r} is below the minimum {opts['min']}"
        if "max" in opts and value > opts["max"]:
            return f"{value!r} is above the maximum {opts['max']}"
        return None
    return f"input of type {kind} takes a link, not a value"


def _open_combos(cls) -> set[str]:
    """Combo inputs whose options come from the user's folders (model files, input images): any name is fine here."""
    if cls.__name__ in ("AuraFlowLoader", "AuraFlowLoraLoader", "LoadImage"):
        return {name for name, (kind, _o) in inputs_of(cls).items() if isinstance(kind, (list, tuple))}
    return set()


# ---------------------------------------------------------------------------------------------- checks
def check_api(prompt: dict, classes: dict) -> list[str]:
    problems = []
    for node_id, node in prompt.items():
        cls = classes.get(node.get("class_type"))
        where = f"node {node_id} ({node.get('class_type')})"
        if cls is None:
            problems.append(f"{where}: unknown node type")
            continue
        spec = cls.INPUT_TYPES()
        inputs = inputs_of(cls)
        given = node.get("inputs", {})
        for name in spec.get("required", {}):
            if name not in given:
                problems.append(f"{where}: required input {name!r} missing")
        for name, value in given.items():
            if name not in inputs:
                problems.append(f"{where}: unknown input {name!r}")
                continue
            kind, opts = inputs[name]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                src = prompt.get(value[0])
                if src is None or src.get("class_type") not in classes:
                    problems.append(f"{where}: input {name!r} links to missing node {value[0]}")
                    continue
                out_types = classes[src["class_type"]].RETURN_TYPES
                if not 0 <= value[1] < len(out_types):
                    problems.append(f"{where}: input {name!r} links to output {value[1]} of {value[0]}, which has "
                                    f"{len(out_types)}")
                elif isinstance(kind, (list, tuple)):  # a combo takes an output typed as the same list of names
                    if not isinstance(out_types[value[1]], (list, tuple)) or list(out_types[value[1]]) != list(kind):
                        problems.append(f"{where}: combo {name!r} fed by {editor_type(out_types[value[1]])}, not by "
                                        "an output typed as its own list of names")
                elif out_types[value[1]] not in kind.split(","):
                    problems.append(f"{where}: {name!r} ({kind}) fed by {out_types[value[1]]}")
                continue
            why = check_value(kind, opts, value, open_combo=name in _open_combos(cls))
            if why:
                problems.append(f"{where}: {name}: {why}")
    return problems


def check_editor(workflow: dict, classes: dict) -> list[str]:
    problems = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    for node in nodes.values():
        where = f"node {node['id']} ({node.get('type')})"
        cls = classes.get(node.get("type"))
        if cls is None:
            problems.append(f"{where}: unknown node type")
            continue
        inputs = inputs_of(cls)
        for i, socket in enumerate(node.get("inputs", [])):
            if socket["name"] not in inputs:
                problems.append(f"{where}: unknown input socket {socket['name']!r}")
            elif editor_type(inputs[socket["name"]][0]) != socket["type"]:
                problems.append(f"{where}: socket {socket['name']!r} typed {socket['type']}, node says "
                                f"{editor_type(inputs[socket['name']][0])}")
            elif is_widget(inputs[socket["name"]][0]) and socket.get("widget") != {"name": socket["name"]}:
                problems.append(f"{where}: widget socket {socket['name']!r} does not name its widget")
        for name, (kind, _o) in inputs.items():
            if not is_widget(kind) and name in cls.INPUT_TYPES().get("required", {}) and \
                    not any(s["name"] == name for s in node.get("inputs", [])):
                problems.append(f"{where}: required input socket {name!r} missing")
        outs = [o["type"] for o in node.get("outputs", [])]
        want = [editor_type(t) for t in cls.RETURN_TYPES]
        if outs != want:
            problems.append(f"{where}: outputs {outs} differ from the node's {want}")
        slots = widget_slots(cls)
        values = node.get("widgets_values", [])
        if len(values) != len(slots):
            problems.append(f"{where}: {len(values)} widgets_values for {len(slots)} widget slots")
        else:
            for slot, value in zip(slots, values):
                if slot is not None:
                    name, kind, opts = slot
                    why = check_value(kind, opts, value, open_combo=name in _open_combos(cls))
                    if why:
                        problems.append(f"{where}: widget {name}: {why}")
    for link in workflow.get("links", []):
        link_id, src, src_slot, dst, dst_slot, kind = link
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id}: joins missing node(s) {src} -> {dst}")
            continue
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        # the editor gives a link its input's type; an input may take a union ("AURAFLOW_MODEL,MODEL")
        if not (inp["type"] == kind and out["type"] in kind.split(",")):
            problems.append(f"link {link_id}: {out['type']} -> {inp['type']} (link says {kind})")
        if inp.get("link") != link_id or link_id not in (out.get("links") or []):
            problems.append(f"link {link_id}: not recorded on both of its sockets")
    return problems


# ---------------------------------------------------------------------------------------------- execution
def topological_order(prompt: dict) -> list[str]:
    order, state = [], {}

    def visit(node_id):
        if state.get(node_id) == "done":
            return
        if state.get(node_id) == "busy":
            raise ValueError(f"workflow has a cycle through node {node_id}")
        state[node_id] = "busy"
        for value in prompt[node_id].get("inputs", {}).values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                visit(value[0])
        state[node_id] = "done"
        order.append(node_id)

    for node_id in prompt:
        visit(node_id)
    return order


def _calls(cls, inputs: dict) -> list[dict]:
    """The keyword arguments of each run of a node, as ComfyUI's ``_map_node_over_list`` makes them: every input is a
    list (a widget's value a list of one, a linked input its source's output list); a node without ``INPUT_IS_LIST``
    runs once per element of the longest list, a shorter list repeating its last element; one with it runs once on
    the lists."""
    if getattr(cls, "INPUT_IS_LIST", False):
        return [inputs]
    longest = max((len(v) for v in inputs.values()), default=0)
    return [{k: v[i if len(v) > i else -1] for k, v in inputs.items()} for i in range(longest)] or [{}]


def _collect(returned) -> tuple[list, list]:
    results, uis = [], []
    for result in returned:
        if isinstance(result, dict):
            if "ui" in result:
                uis.append(result["ui"])
            result = result.get("result", ())
        results.append(tuple(result))
    return results, uis


def map_node_over_list(cls, inputs: dict) -> tuple[list, list]:
    """Run one node (a plain function) once per `_calls` entry. Returns (results, uis)."""
    func = getattr(cls(), cls.FUNCTION)
    return _collect([func(**kwargs) for kwargs in _calls(cls, inputs)])


async def map_node_over_list_async(cls, inputs: dict) -> tuple[list, list]:
    """The same for a coroutine function: its runs awaited together, as ComfyUI's ``_async_map_node_over_list``."""
    import asyncio

    func = getattr(cls(), cls.FUNCTION)
    return _collect(await asyncio.gather(*(func(**kwargs) for kwargs in _calls(cls, inputs))))


def merge_result_data(results: list, cls) -> list:
    """ComfyUI's merge: an ``OUTPUT_IS_LIST`` output concatenates the runs' lists, any other output lists each
    run's value."""
    is_list = getattr(cls, "OUTPUT_IS_LIST", None) or [False] * len(results[0])
    return [[x for r in results for x in r[i]] if flag else [r[i] for r in results]
            for i, flag in zip(range(len(results[0])), is_list)]


def execute(prompt: dict, classes: dict, *, workflow: dict | None = None, lists: bool = False) -> tuple[dict, dict]:
    """Run an API-format ``prompt``; returns ({node id: outputs}, {node id: ui dict}).

    Nodes run as ComfyUI runs them, lists included (`map_node_over_list`, `merge_result_data`), coroutine functions
    as tasks that run side by side. With ``lists=True`` each output is ComfyUI's list of values (one per run, or a
    list output's elements); by default it is the one value of a node that ran once (a node that made a list
    raises: ask for lists). The ``ui`` dicts of output nodes are merged over their runs as ComfyUI merges them.
    Hidden inputs are filled as ComfyUI fills them: PROMPT with the prompt, EXTRA_PNGINFO with
    ``{"workflow": workflow}`` when one is given (one dict for the whole prompt, as ComfyUI passes its
    ``extra_data["extra_pnginfo"]`` to every node), UNIQUE_ID with the node id.
    """
    import asyncio  # here, not at import: load_pack's import time is measured (test_nodes)

    outputs, ui = asyncio.run(_execute(prompt, classes, workflow))
    if lists:
        return outputs, ui
    single = {}
    for node_id, outs in outputs.items():
        if any(len(values) != 1 for values in outs):
            raise ValueError(f"node {node_id} ({prompt[node_id]['class_type']}) made lists; run with lists=True")
        single[node_id] = tuple(values[0] for values in outs)
    return single, ui


async def _execute(prompt: dict, classes: dict, workflow: dict | None) -> tuple[dict, dict]:
    import asyncio
    import inspect

    outputs, ui, pending = {}, {}, {}  # pending: node id -> (class, the task of an async node still running)
    extra_pnginfo = {"workflow": workflow} if workflow else None
    order = topological_order(prompt)

    def store(node_id, cls, ran):
        results, uis = ran
        outputs[node_id] = merge_result_data(results, cls) if results and results[0] else []
        if uis:
            ui[node_id] = {k: [y for x in uis for y in x[k]] for k in uis[0]}

    try:
        for node_id in order:
            node = prompt[node_id]
            links = [v[0] for v in node.get("inputs", {}).values()
                     if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)]
            for src in links:  # wait only for the async nodes this one needs
                if src in pending:
                    src_cls, task = pending.pop(src)
                    store(src, src_cls, await task)
            cls = classes[node["class_type"]]
            inputs = {}
            for name, value in node.get("inputs", {}).items():
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    inputs[name] = outputs[value[0]][value[1]]
                else:
                    inputs[name] = [value]
            for name, kind in cls.INPUT_TYPES().get("hidden", {}).items():
                inputs[name] = [{"PROMPT": prompt, "EXTRA_PNGINFO": extra_pnginfo, "UNIQUE_ID": node_id}.get(kind)]
            if inspect.iscoroutinefunction(getattr(cls, cls.FUNCTION)):
                pending[node_id] = (cls, asyncio.create_task(map_node_over_list_async(cls, inputs)))
                await asyncio.sleep(0)  # let it start, as ComfyUI does
            else:
                store(node_id, cls, map_node_over_list(cls, inputs))
        for node_id in order:
            if node_id in pending:
                cls, task = pending.pop(node_id)
                store(node_id, cls, await task)
    finally:
        for _cls, task in pending.values():
            task.cancel()
    return outputs, ui
