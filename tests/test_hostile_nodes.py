"""Hostile inputs, the smaller shapes of issue 20: prompt text that holds what a parser might use as its own
stand-ins, node inputs of the wrong type, metadata keys and values in any script, save names at the file system's
limit, and the ComfyUI calls written so that static tools see them. Each case asserts the error type, that the
message names the input and the fix, and that nothing ran or was written."""
from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import io
import sys

import pytest
import torch

import aura_flow
from aura_flow.errors import ParameterError
from aura_flow.prompts import parse_weights
from workflow_exec import ROOT, load_pack

pack = load_pack()
N = pack.NODE_CLASS_MAPPINGS
engine = sys.modules[f"{pack.__name__}.aura_flow"]
NodeParameterError = engine.ParameterError
imageio = importlib.import_module(f"{pack.__name__}.aura_flow.images")


# ------------------------------------------------------------------------------------------------ prompt parsing
@pytest.mark.parametrize("text, parsed", [
    # what an in-band sentinel parser turned into parentheses stays the very characters typed
    ("a\x00\x02b\x00\x01c", [("a\x00\x02b\x00\x01c", 1.0)]),
    ("(a\x00\x02b:1.5) \x00\x01", [("a\x00\x02b", 1.5), (" \x00\x01", 1.0)]),
    ("\x00\x02x:2\x00\x01", [("\x00\x02x:2\x00\x01", 1.0)]),
    # and ComfyUI's own parsing of everything else (checked against its sd1_clip.token_weights)
    (r"a \(b\) (c:1.2)", [("a (b) ", 1.0), ("c", 1.2)]),
    (r"(x \(y\):0.5)", [("x (y)", 0.5)]),
    (r"(a:1\))", [("a:1)", 1.1)]),  # an escaped parenthesis makes no number, as in ComfyUI
    ("\\\\(a)", [("\\(a)", 1.0)]),  # "\\" then an escaped "(": the ")" closes nothing
    ("((a) b:0.7)", [("a", 0.77), (" b", 0.7)]),
    (r"\( (a) \)", [("( ", 1.0), ("a", 1.1), (" )", 1.0)]),
])
def test_the_prompt_parser_has_no_stand_in_a_user_can_type(text, parsed):
    got = parse_weights(text)
    assert [s for s, _w in got] == [s for s, _w in parsed]
    assert [w for _s, w in got] == pytest.approx([w for _s, w in parsed])


def test_control_characters_reach_the_tokenizer_as_typed(tiny_pipe):
    tok = tiny_pipe.tokenizer
    for text in ("a\x00\x02b\x00\x01c", "x \x00\x01 y"):
        ids, _mask, weights = tok.weighted(text, min_length=0)
        assert ids == tok._encode(text) + [tok.end_id] and set(weights) == {1.0}
    # while an escaped parenthesis is the parenthesis itself
    assert tok.weighted(r"a \(b\)", min_length=0)[0] == tok._encode("a (b)") + [tok.end_id]


def test_a_weight_error_shows_the_text_as_typed():
    with pytest.raises(ParameterError, match=r"the weight 11 of 'x\\\\\(\\x00\\x02' is out of range"):
        parse_weights("(x\\(\x00\x02:11)")


# ------------------------------------------------------------------------------------------------ node inputs
@pytest.fixture(scope="module")
def loaded(tiny_models):
    return N["AuraFlowLoader"]().load(str(tiny_models["diffusers"]["checkpoint"]), weight_dtype="fp32")


def _calls(loaded):
    model, te, vae = loaded
    (cond,) = N["AuraFlowTextEncode"]().encode(te, "a cat")
    gen = dict(prompt="a", negative_prompt="", cfg=1.0, seed=1, shift=1.73, steps=1, width=64, height=64,
               sampler="euler", scheduler="normal", number_of_images=1, output_format="png", output_quality=80)
    return {
        "AuraFlowTextEncode": dict(text_encoder=te, text="a cat"),
        "AuraFlowSampler": dict(model=model, positive=cond, negative=cond, seed=1, steps=1, cfg=1.0,
                                sampler_name="euler", scheduler="normal", shift=1.73, denoise=1.0, width=64, height=64),
        "AuraFlowGenerate": dict(model=model, **gen),
        "AuraFlowRemoteGenerate": dict(gen, width=512, height=512),
        "AuraFlowVAEDecode": dict(samples={"samples": torch.zeros(1, 4, 8, 8)}, vae=vae),
        "AuraFlowVAEEncode": dict(pixels=torch.rand(1, 64, 64, 3), vae=vae),
        "AuraFlowLoader": dict(checkpoint="x", weight_dtype="fp32"),
        "AuraFlowLoraLoader": dict(model=model, lora_name="x.safetensors", strength=1.0),
        "AuraFlowSaveImage": dict(images=torch.rand(1, 8, 8, 3), filename_prefix="p", format="png"),
    }


WRONG = [
    ("AuraFlowTextEncode", "text", None, r"text=None is not text \(NoneType\); give the prompt as text \(''"),
    ("AuraFlowTextEncode", "text", 5, r"text=5 is not text \(int\)"),
    ("AuraFlowTextEncode", "text", ["a"], r"text=\['a'\] is not text \(list\)"),
    ("AuraFlowTextEncode", "text_encoder", None, "text_encoder: expected an AURAFLOW_TEXT_ENCODER, got NoneType; "
                                                 "connect AuraFlow Loader's text_encoder output"),
    ("AuraFlowTextEncode", "text_encoder", "a cat", "text_encoder: expected an AURAFLOW_TEXT_ENCODER, got str"),
    ("AuraFlowSampler", "model", None, "model: expected an AURAFLOW_MODEL or a ComfyUI MODEL holding AuraFlow, got "
                                       "NoneType; connect AuraFlow Loader's model output, or Load Checkpoint's"),
    ("AuraFlowSampler", "model", 3, "model: expected .* got int"),
    ("AuraFlowSampler", "seed", None, "seed=None: this input needs a value"),
    ("AuraFlowGenerate", "model", "model.safetensors", r"model: expected an AURAFLOW_MODEL, got str; connect AuraFlow "
                                                       r"Loader's model output \(or an AuraFlow LoRA Loader's\)"),
    ("AuraFlowGenerate", "prompt", None, "prompt=None is not text"),
    ("AuraFlowGenerate", "negative_prompt", 1.5, r"negative_prompt=1.5 is not text \(float\)"),
    ("AuraFlowGenerate", "seed", None, "seed=None: this input needs a value"),
    ("AuraFlowRemoteGenerate", "prompt", None, "prompt=None is not text"),  # before any key is looked up
    ("AuraFlowRemoteGenerate", "seed", None, "seed=None: this input needs a value"),
    ("AuraFlowVAEDecode", "vae", None, r"vae: expected a VAE, got NoneType; connect AuraFlow Loader's vae output "
                                       r"\(or Load VAE's\)"),
    ("AuraFlowVAEDecode", "vae", b"x", "vae: expected a VAE, got bytes"),  # bytes have a .decode of their own
    ("AuraFlowVAEEncode", "vae", "x", "vae: expected a VAE, got str"),
    ("AuraFlowLoader", "checkpoint", None, r"checkpoint=None is not text \(NoneType\); pick a file in the list"),
    ("AuraFlowLoader", "checkpoint", b"x.safetensors", r"checkpoint=b'x.safetensors' is not text \(bytes\)"),
    ("AuraFlowLoader", "vae", 1, r"vae=1 is not text \(int\); pick a file in the list .* or '\(from checkpoint\)'"),
    ("AuraFlowLoraLoader", "lora_name", None, "lora_name=None is not text .* pick a LoRA in the list"),
    ("AuraFlowLoraLoader", "model", None, "model: expected an AURAFLOW_MODEL, got NoneType"),
    ("AuraFlowSaveImage", "filename_prefix", None, "filename_prefix=None: give a file name"),
    ("AuraFlowSaveImage", "embed_workflow", "yes", "embed_workflow='yes' is not true or false"),
    ("AuraFlowSaveImage", "extra_pnginfo", "x", r"extra_pnginfo: expected ComfyUI's EXTRA_PNGINFO \(a dict\), got "
                                                "str"),
]


@pytest.mark.parametrize("node, name, value, message", WRONG, ids=[f"{w[0]}.{w[1]}={w[2]!r}" for w in WRONG])
def test_node_inputs_of_the_wrong_type_get_the_nodes_message(node, name, value, message, loaded, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("AURAFLOW_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.delenv("SEGMIND_API_KEY", raising=False)
    monkeypatch.setenv("SEGMIND_API_URL", "http://127.0.0.1:9/")  # never reached: refused before
    kwargs = _calls(loaded)[node]
    kwargs[name] = value
    model = loaded[0]
    encoded, sampled = [], []
    monkeypatch.setattr(model, "_prompt_cache", {})
    real_encode, real_sample = model.text_encoder.forward, model.sample
    monkeypatch.setattr(model.text_encoder, "forward", lambda *a, **k: encoded.append(1) or real_encode(*a, **k))
    monkeypatch.setattr(model, "sample", lambda *a, **k: sampled.append(1) or real_sample(*a, **k))
    cls = N[node]
    with pytest.raises(NodeParameterError, match=message):
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if inspect.isawaitable(out):  # an async node (AuraFlow Remote Generate): ComfyUI awaits it
            asyncio.run(out)
    assert encoded == [] and sampled == []  # refused before any work
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))


def test_none_still_means_from_checkpoint_for_the_loaders_optional_files(tiny_models):
    model, te, vae = N["AuraFlowLoader"]().load(str(tiny_models["diffusers"]["checkpoint"]), text_encoder=None,
                                                vae=None, tokenizer=None, weight_dtype="fp32")
    assert model.vae is not None and te.text_encoder is not None


# ------------------------------------------------------------------------------------------------ metadata
UNICODE_METADATA = {
    "prompt": {"1": {"class_type": "AuraFlowTextEncode", "inputs": {"text": "一只猫 🐱, 虹 🌈"}}},
    "workflow": {"nodes": [], "extra": {"note": "ワークフロー ✨"}},
    "工作流": {"描述": "中文 🎉", "emoji": "👩‍🚀"},
    "a:b": ["colon key", "ü"],
}


@pytest.fixture
def saver(tmp_path, monkeypatch):
    monkeypatch.setenv("AURAFLOW_OUTPUT_DIR", str(tmp_path / "output"))
    return N["AuraFlowSaveImage"]()


@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
def test_metadata_in_any_script_is_saved_and_read_back(saver, tmp_path, fmt):
    extra = {k: v for k, v in UNICODE_METADATA.items() if k != "prompt"}
    out = saver.save(torch.rand(1, 16, 16, 3), "uni", fmt, 90, True, prompt=UNICODE_METADATA["prompt"],
                     extra_pnginfo=extra)
    path = tmp_path / "output" / out["ui"]["images"][0]["filename"]
    assert imageio.read_metadata(path) == UNICODE_METADATA
    if fmt != "png":  # EXIF text is UTF-8: the bytes in the file are the key's own, as ComfyUI's editor reads them
        assert "工作流".encode() in path.read_bytes()


def test_a_key_no_png_keyword_can_hold_is_refused_naming_it(saver, tmp_path):
    key = "🐱" * 7  # 86 characters as JSON escapes; a png keyword holds 79 Latin-1 characters
    with pytest.raises(NodeParameterError, match=r"image metadata: the key '🐱🐱🐱🐱🐱🐱🐱' cannot be a png text "
                                                 r"keyword: that is at most 79 Latin-1 characters, and the key takes "
                                                 r"86 as JSON escapes; use a shorter key, or save as webp or jpg"):
        saver.save(torch.rand(1, 8, 8, 3), "k", "png", 90, True, extra_pnginfo={key: 1})
    assert not (tmp_path / "output").exists() or not any((tmp_path / "output").rglob("*.png"))
    out = saver.save(torch.rand(1, 8, 8, 3), "k", "webp", 90, True, extra_pnginfo={key: 1})
    assert imageio.read_metadata(tmp_path / "output" / out["ui"]["images"][0]["filename"]) == {key: 1}


def test_metadata_that_is_not_json_is_refused_naming_the_key(saver, tmp_path):
    with pytest.raises(NodeParameterError, match=r"image metadata: the value of 'raw' cannot be saved \(Object of type "
                                                 r"bytes is not JSON serializable\); metadata values must be JSON"):
        saver.save(torch.rand(1, 8, 8, 3), "j", "png", 90, True, extra_pnginfo={"raw": b"\x00"})
    assert not (tmp_path / "output").exists() or not any((tmp_path / "output").rglob("*.png"))


def test_latin1_and_plain_keys_are_written_as_comfyui_writes_them():
    from PIL import Image

    im = Image.new("RGB", (8, 8))
    data = imageio.encode_image(im, "png", 80, {"workflow": {"a": "é"}, "café": 1})
    with Image.open(io.BytesIO(data)) as png:
        assert png.text == {"workflow": '{"a": "\\u00e9"}', "café": "1"}  # tEXt chunks, JSON as ComfyUI dumps it


# ------------------------------------------------------------------------------------------------ save names
@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
def test_a_240_byte_prefix_saves_when_the_final_name_fits(saver, tmp_path, fmt):
    prefix = "sub/" + "ł" * 120  # 240 bytes of name
    out = saver.save(torch.rand(2, 8, 8, 3), prefix, fmt, 80, True)
    names = [im["filename"] for im in out["ui"]["images"]]
    assert names == ["ł" * 120 + f"_{n:05}_.{fmt}" for n in (1, 2)]
    assert all(len(n.encode()) <= 255 and (tmp_path / "output" / "sub" / n).is_file() for n in names)


def test_the_limit_counts_the_real_counter(saver, tmp_path):
    stem = "c" * 244  # 244 + len("_00001_.png") = 255 bytes: fits while the counter has five digits
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / f"{stem}_99999_.png").write_bytes(b"")
    with pytest.raises(NodeParameterError, match=r"filename_prefix: the name 'c+'… is 244 bytes long; at most 243 "
                                                 r"\(the file name .* would be 256 bytes"):
        saver.save(torch.rand(1, 8, 8, 3), stem, "png", 80, True)
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == [f"{stem}_99999_.png"]
    with pytest.raises(NodeParameterError, match="is 244 bytes long; at most 243"):  # webp: one more byte of extension
        saver.save(torch.rand(1, 8, 8, 3), "d" * 244, "webp", 80, True)


def test_a_long_downloaded_name_that_is_taken_gets_a_name_that_fits(tmp_path):
    from aura_flow.headless.answers import destination, free_names
    from aura_flow.images import write_first_free

    name = "ł" * 120 + "_00001_.png"  # 251 bytes: a name ComfyUI can save, so the runner downloads it
    folder, got = destination(tmp_path, {"filename": name, "subfolder": "", "type": "output"})
    paths = [write_first_free(folder, b"x", free_names(got)) for _ in range(3)]
    assert paths[0].name == name and len({p.name for p in paths}) == 3
    assert all(len(p.name.encode()) <= 255 and p.name.endswith(".png") for p in paths)


# ------------------------------------------------------------------------------------------------ ComfyUI's modules
COMFY_USED = {"comfy.cli_args", "comfy.latent_formats", "comfy.model_base", "comfy.model_management",
              "comfy.model_patcher", "comfy.model_sampling", "comfy.sample", "comfy.samplers", "comfy.utils"}


def test_comfyui_is_imported_by_plain_lazy_imports_that_static_tools_see():
    """nodes/comfyui/ names every ComfyUI module in an import statement inside the function that uses it (so
    comfy-import-guard and readers see each symbol), never by a string, never at import time."""
    found = set()
    for path in sorted((ROOT / "nodes" / "comfyui").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        text = path.read_text(encoding="utf-8")
        assert "importlib" not in text and "__import__" not in text, path
        for node in tree.body:  # module level: nothing of ComfyUI's
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("comfy", "folder_paths", "server", "latent_preview")
                               for n in names), (path, names)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("comfy."):
                        found.add(alias.name)
                        # "import comfy.x as y": bound from sys.modules even when a test's fake package lacks it
                        assert alias.asname or node.col_offset, (path, alias.name)
    assert found == COMFY_USED


def test_outside_comfyui_every_gate_falls_back(monkeypatch):
    for name in list(sys.modules):
        if name == "comfy" or name.startswith("comfy.") or name in ("folder_paths", "server", "latent_preview"):
            monkeypatch.delitem(sys.modules, name)
    gate = sys.modules[f"{pack.__name__}.nodes.comfyui.devices"]
    assert gate.load_placement() == ("auto", "auto")
    assert sys.modules[f"{pack.__name__}.nodes.comfyui.memory"].managed() is False
    assert sys.modules[f"{pack.__name__}.nodes.comfyui.progress"].should_stop() is None
    assert sys.modules[f"{pack.__name__}.nodes.comfyui.folders"].metadata_disabled() is False
    assert sys.modules[f"{pack.__name__}.nodes.comfyui.samplers"].register_comfyui_samplers() == []
    assert not any(n == "comfy" or n.startswith("comfy.") for n in sys.modules)


def test_engine_prompt_none_still_means_empty():
    """The engine's own API keeps None as "no prompt" (the nodes refuse it: a widget always has text)."""
    assert aura_flow.plan_generation({"prompt": None}).prompt == ""
