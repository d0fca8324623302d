"""The pack's nodes, called directly on tiny random models (no ComfyUI here): definitions, numbers, files.

ComfyUI itself is stood in for by small fake modules where its behaviour matters (progress, cancel, devices,
model folders, --disable-metadata).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from workflow_exec import CORE_NODES, ROOT, inputs_of, is_widget, load_pack, pack_module

pack = load_pack()
N = pack.NODE_CLASS_MAPPINGS
engine = sys.modules[f"{pack.__name__}.aura_flow"]
imageio = importlib.import_module(f"{pack.__name__}.aura_flow.images")
SIZE, STEPS = 64, 2


@pytest.fixture(scope="module")
def tiny(tiny_models):  # tests/conftest.py builds them once per session
    return tiny_models["diffusers"]["checkpoint"]


@pytest.fixture(scope="module")
def loaded(tiny):
    return N["AuraFlowLoader"]().load(str(tiny), weight_dtype="fp32")


def run(node_id, **kwargs):
    cls = N[node_id]
    return getattr(cls(), cls.FUNCTION)(**kwargs)


# ---------------------------------------------------------------------------------------------- definitions
def test_mappings_come_from_one_table():
    ids = [row[0] for row in sys.modules[f"{pack.__name__}.nodes"].NODES]
    assert list(N) == ids and list(pack.NODE_DISPLAY_NAME_MAPPINGS) == ids
    assert pack.WEB_DIRECTORY == "./web"
    for node_id, display in pack.NODE_DISPLAY_NAME_MAPPINGS.items():
        assert node_id.startswith("AuraFlow") and " " in display and display.startswith("AuraFlow ")
        assert not set(ids) & set(CORE_NODES)


@pytest.mark.parametrize("node_id", list(N))
def test_input_types_are_valid(node_id):
    cls = N[node_id]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    for name, (kind, opts) in inputs_of(cls).items():
        assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if isinstance(kind, (list, tuple)):
            assert all(isinstance(o, str) for o in kind)
            if "default" in opts and kind:
                assert opts["default"] in kind, f"{node_id}.{name} default {opts['default']!r} not an option"
        elif kind in ("INT", "FLOAT"):
            assert opts["min"] <= opts["default"] <= opts["max"], f"{node_id}.{name}"
            if kind == "INT":
                assert all(isinstance(opts[k], int) for k in ("min", "max", "default"))
        elif kind in ("STRING", "BOOLEAN"):
            assert "default" in opts
        else:
            assert kind.isupper() and not is_widget(kind)
    assert isinstance(cls.DESCRIPTION, str) and cls.DESCRIPTION.endswith(".")
    assert cls.CATEGORY.startswith("AuraFlow")
    assert callable(getattr(cls, cls.FUNCTION))
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    assert (ROOT / "web" / "docs" / f"{node_id}.md").is_file(), f"web/docs/{node_id}.md missing"


def has(spec, **expected) -> bool:
    return {k: spec[1].get(k) for k in expected} == expected


def test_hosted_api_defaults_and_ranges():
    sampler = inputs_of(N["AuraFlowSampler"])
    generate = inputs_of(N["AuraFlowGenerate"])
    for inputs, sampler_key in ((sampler, "sampler_name"), (generate, "sampler")):
        assert has(inputs["cfg"], default=5.0, min=0.0, max=20.0)
        assert has(inputs["steps"], default=25, min=1, max=100)
        assert has(inputs["shift"], default=1.73, min=0.0, max=10.0)
        assert has(inputs["seed"], min=0, max=2**64 - 1, control_after_generate=True)
        assert inputs["width"][1]["default"] == inputs["height"][1]["default"] == 1024
        assert inputs["width"][1]["step"] == 8
        assert inputs[sampler_key][1]["default"] == "uni_pc" and inputs["scheduler"][1]["default"] == "normal"
    assert list(generate)[1:] == ["prompt", "negative_prompt", "cfg", "seed", "shift", "steps", "width", "height",
                                  "sampler", "scheduler", "number_of_images", "output_format", "output_quality",
                                  "speed", "noise_device"]
    save = inputs_of(N["AuraFlowSaveImage"])
    assert save["format"][1]["default"] == "webp" and save["quality"][1]["default"] == 80
    remote = inputs_of(N["AuraFlowRemoteGenerate"])
    # the two one-node generators can swap: the same widgets in the same order, then each one's optional inputs
    extra = ["api_version", "provider", "model", "expand_prompt", "noise_source", "enable_safety_checker"]
    assert list(remote) == list(generate)[1:-2] + extra  # speed, noise: local only; the provider's: remote
    assert list(N["AuraFlowRemoteGenerate"].INPUT_TYPES()["optional"]) == extra


def test_pack_imports_fast_without_torch_like_comfyui_does(tmp_path):
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT / 'tests')!r}); t = time.perf_counter(); "
            "import workflow_exec; p = workflow_exec.load_pack('custom_nodes_x_auraflow'); "
            "dt = time.perf_counter() - t; heavy = [m for m in ('torch', 'diffusers', 'transformers') "
            "if m in sys.modules]; print(dt, heavy, len(p.NODE_CLASS_MAPPINGS))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[1] == "[]", f"heavy modules imported at import time: {out[1:]}"
    assert float(out[0]) < 0.5


# ---------------------------------------------------------------------------------------------- loading
def test_loader_outputs(loaded, tiny):
    model, text_encoder, vae = loaded
    # the text encoder is an object of its own (like ComfyUI's CLIP) over the loaded pipeline's encoder
    assert text_encoder is not model and text_encoder.text_encoder is model.text_encoder
    assert text_encoder.context_dim == model.context_dim and model.transformer is not None
    assert text_encoder.patcher is None and vae.patcher is None  # no ComfyUI here: no ModelPatcher
    assert vae.spacial_compression_decode() == vae.spacial_compression_encode() == vae.downscale_ratio == 8
    assert vae.temporal_compression_decode() is None and vae.latent_channels == 4
    assert vae.first_stage_model is model.vae


def test_loader_separate_parts_as_plain_paths(tiny_models):
    path = tiny_models["transformer_only"]["checkpoint"]
    tmp_path = path.parent
    with pytest.raises(Exception, match="text encoder"):
        run("AuraFlowLoader", checkpoint=str(path), tokenizer=str(tmp_path / "tokenizer.model"))
    model, _te, vae = run("AuraFlowLoader", checkpoint=str(path), text_encoder=str(tmp_path / "text_encoder.safetensors"),
                          vae=str(tmp_path / "vae.safetensors"), tokenizer=str(tmp_path / "tokenizer.model"),
                          weight_dtype="fp32")
    assert model.encode_prompt("a cat").shape[0] == 1
    with pytest.raises(FileNotFoundError, match="checkpoint 'nope.safetensors' not found"):
        run("AuraFlowLoader", checkpoint="nope.safetensors")


# ---------------------------------------------------------------------------------------------- conditioning
def test_text_encode_gives_comfyui_conditioning(loaded):
    model = loaded[0]
    (cond,) = run("AuraFlowTextEncode", text_encoder=model, text="a cat on a mat")
    assert isinstance(cond, list) and len(cond) == 1 and cond[0][1] == {}
    tensor = cond[0][0]
    assert tensor.ndim == 3 and tensor.shape[0] == 1 and tensor.shape[1] >= 256
    assert tensor.shape[2] == model.context_dim and tensor.device.type == "cpu"
    assert torch.equal(tensor, model.encode_prompt("a cat on a mat").cpu())


def cond_of(model, text):
    return run("AuraFlowTextEncode", text_encoder=model, text=text)[0]


def sampler_args(model, **over):
    args = dict(model=model, positive=cond_of(model, "a cat"), negative=cond_of(model, ""), seed=7, steps=STEPS,
                cfg=5.0, sampler_name="euler", scheduler="normal", shift=1.73, denoise=1.0, width=SIZE,
                height=SIZE, batch_size=2)
    args.update(over)
    return args


def test_sampler_equals_engine_sample(loaded):
    model = loaded[0]
    args = sampler_args(model, speed="exact")
    (out,) = run("AuraFlowSampler", **args)
    assert set(out) == {"samples"} and out["samples"].shape == (2, 4, SIZE // 8, SIZE // 8)
    ref = engine.sample(model.velocity, args["positive"][0][0], args["negative"][0][0],
                        torch.zeros(2, 4, SIZE // 8, SIZE // 8), seed=7, steps=STEPS, cfg=5.0, sampler="euler",
                        scheduler="normal", shift=1.73)
    assert torch.allclose(out["samples"], ref, atol=1e-6)
    assert out["samples"].abs().sum() > 0
    (auto,) = run("AuraFlowSampler", **{**args, "speed": "auto"})  # the default: the lossless fold on the CPU
    assert (auto["samples"] - ref).abs().max() < 1e-4


@pytest.mark.parametrize("node", ["AuraFlowSampler", "AuraFlowGenerate"])
def test_speed_widget_runs_the_engine_modes(loaded, node):
    from aura_flow.pipeline.speed import MODES

    model = loaded[0]
    kind, opts = (N[node].INPUT_TYPES()["optional"]["speed"])
    assert kind == ["auto", *MODES] and opts["default"] == "auto"
    args = sampler_args(model) if node == "AuraFlowSampler" else generate_args(model, output_format="png")
    rows = []
    hook = model.transformer.joint_transformer_blocks[-1].register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        exact = run(node, **args, speed="exact")[0]
        exact_rows, rows[:] = sum(rows), []
        fast = run(node, **args, speed="fast")[0]
    finally:
        hook.remove()
    if node == "AuraFlowSampler":
        exact, fast = exact["samples"], fast["samples"]
    assert sum(rows) < exact_rows  # the uncond pass and cached steps were skipped
    assert 0 < (fast - exact).abs().max() < 0.1 * exact.abs().max()
    with pytest.raises(ValueError, match="speed='turbo' is not known"):
        run(node, **args, speed="turbo")


def test_sampler_img2img_does_not_touch_its_inputs(loaded):
    model = loaded[0]
    torch.manual_seed(1)
    latent = {"samples": torch.randn(1, 4, SIZE // 8, SIZE // 8), "batch_index": [0]}
    before = latent["samples"].clone()
    args = sampler_args(model, latent_image=latent, denoise=0.6, sampler_name="uni_pc", steps=3)
    pos_before = args["positive"][0][0].clone()
    (out,) = run("AuraFlowSampler", **args)
    assert torch.equal(latent["samples"], before) and set(latent) == {"samples", "batch_index"}
    assert torch.equal(args["positive"][0][0], pos_before)
    assert out is not latent and out["batch_index"] == [0]
    ref = engine.sample(model.velocity, pos_before, args["negative"][0][0], before, seed=7, steps=3, cfg=5.0,
                        sampler="uni_pc", scheduler="normal", shift=1.73, denoise=0.6)
    assert torch.allclose(out["samples"], ref, atol=1e-6)
    # denoise 0.6 keeps most of the start latent; denoise 1 keeps none of it
    (full,) = run("AuraFlowSampler", **{**args, "denoise": 1.0})
    assert (out["samples"] - before).abs().mean() < (full["samples"] - before).abs().mean()


def test_sampler_refuses_conditioning_it_cannot_use(loaded):
    model = loaded[0]
    wide = [[torch.zeros(1, 256, 4096), {}]]
    with pytest.raises(ValueError, match="width 4096"):
        run("AuraFlowSampler", **sampler_args(model, negative=wide))
    with pytest.raises(ValueError, match="width=100 is not a multiple of 8"):
        run("AuraFlowSampler", **sampler_args(model, width=100))
    good = cond_of(model, "x")
    with pytest.raises(ValueError, match="conditioning area"):
        run("AuraFlowSampler", **sampler_args(model, positive=[[good[0][0], {"area": (8, 8)}]]))
    with pytest.raises(ValueError, match="conditioning mask"):
        run("AuraFlowSampler", **sampler_args(model, positive=[[good[0][0], {"mask": torch.zeros(1, 1, 1, 8, 8)}]]))


def test_sampler_honours_conditioning_options(loaded):
    """Conditioning Combine with an area, a mask and a timestep range: the engine's ComfyUI arithmetic
    (tests/test_conds.py checks it against ComfyUI itself)."""
    Cond = pack_module("aura_flow.sampling.conds").Cond
    model = loaded[0]
    cat, dog, neg = cond_of(model, "a cat")[0][0], cond_of(model, "a dog")[0][0], cond_of(model, "")[0][0]
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, :, SIZE // 2:] = 1.0
    positive = [[cat, {"start_percent": 0.0, "end_percent": 0.5}],
                [dog, {"area": (4, 4, 2, 2), "strength": 1.5, "set_area_to_bounds": False}],
                [cat, {"mask": mask, "mask_strength": 0.7, "set_area_to_bounds": True}]]
    (out,) = run("AuraFlowSampler", **sampler_args(model, positive=positive, batch_size=1, speed="exact"))
    want = engine.sample(model.velocity, [Cond(cat, start_percent=0.0, end_percent=0.5),
                                          Cond(dog, area=(4, 4, 2, 2), strength=1.5),
                                          Cond(cat, mask=mask, mask_strength=0.7, set_area_to_bounds=True)],
                         neg, torch.zeros(1, 4, SIZE // 8, SIZE // 8), seed=7, steps=STEPS, cfg=5.0,
                         sampler="euler", scheduler="normal", shift=1.73)
    assert torch.allclose(out["samples"], want, atol=1e-6)
    (plain,) = run("AuraFlowSampler", **sampler_args(model, batch_size=1, speed="exact"))
    assert (plain["samples"] - out["samples"]).abs().max() > 1e-3


def test_sampler_honours_the_latent_noise_mask(loaded):
    """Set Latent Noise Mask / VAE Encode (for Inpainting): outside the mask the input latent comes back, as with
    ComfyUI's KSampler; the mask stays in the LATENT."""
    model = loaded[0]
    latent = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.manual_seed(4))
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., :, SIZE // 2:] = 1.0  # regenerate the right half
    given = {"samples": latent, "noise_mask": mask}
    (out,) = run("AuraFlowSampler", **sampler_args(model, latent_image=given, batch_size=1))
    half = SIZE // 16
    assert (out["samples"][..., :half] - latent[..., :half]).abs().max() < 1e-4
    assert (out["samples"][..., half + 1:] - latent[..., half + 1:]).abs().max() > 0.1
    assert out["noise_mask"] is mask and set(given) == {"samples", "noise_mask"}


# ---------------------------------------------------------------------------------------------- generate
def generate_args(model, **over):
    args = dict(model=model, prompt="a cat", negative_prompt="", cfg=5.0, seed=3, shift=1.73, steps=STEPS,
                width=SIZE, height=SIZE, sampler="euler", scheduler="normal", number_of_images=1,
                output_format="png", output_quality=80)
    args.update(over)
    return args


def test_generate_matches_the_pipeline(loaded):
    model = loaded[0]
    images, seed = run("AuraFlowGenerate", **generate_args(model))
    assert images.shape == (1, SIZE, SIZE, 3) and images.dtype == torch.float32 and seed == 3
    ref = model.generate(**{k: v for k, v in generate_args(model).items() if k != "model"})
    assert torch.equal(images, ref.tensor)
    webp, _ = run("AuraFlowGenerate", **generate_args(model, output_format="webp", output_quality=80))
    err = (webp - ref.tensor).abs().mean().item()
    assert 0 < err < 0.1  # the hosted API's lossy encoding, decoded back
    assert torch.equal(webp * 255, (webp * 255).round())


# ---------------------------------------------------------------------------------------------- VAE
def test_vae_nodes_and_core_interface(loaded):
    model, _te, vae = loaded
    latent = {"samples": torch.randn(2, 4, 8, 8, generator=torch.manual_seed(0))}
    (images,) = run("AuraFlowVAEDecode", samples=latent, vae=vae)
    assert images.shape == (2, 64, 64, 3) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0
    assert torch.allclose(images, model.decode(latent["samples"]), atol=1e-5)
    (core,) = CORE_NODES["VAEDecode"]().decode(vae=vae, samples=latent)
    assert torch.equal(core, images)
    odd = torch.rand(1, 70, 75, 4)  # RGBA, not multiples of 8: centre-cropped to 64x72, alpha dropped
    (enc,) = run("AuraFlowVAEEncode", pixels=odd, vae=vae)
    assert enc["samples"].shape == (1, 4, 8, 9)
    ref = model.encode(odd[:, 3:67, 1:73, :3])
    assert torch.allclose(enc["samples"], ref, atol=1e-5)


def test_vae_tiles_when_asked_and_after_running_out_of_memory(loaded, monkeypatch):
    model, _te, vae = loaded
    latent = torch.randn(1, 4, 16, 16, generator=torch.manual_seed(0))
    whole = vae.decode(latent)
    tiled = vae.decode_tiled(latent, tile_x=8, tile_y=8, overlap=2)  # VAE Decode (Tiled): latent units
    assert tiled.shape == whole.shape == (1, 128, 128, 3)
    assert not torch.equal(tiled, whole)  # tiles were used ...
    assert (tiled - whole).abs().mean() < 0.2  # ... and blended into the same picture
    assert model.vae.use_tiling is False and model.vae.tile_latent_min_size != 8  # settings restored
    pixels = whole
    assert vae.encode_tiled(pixels, tile_x=64, tile_y=64, overlap=16).shape == (1, 4, 16, 16)  # pixels

    real = model.decode

    def small_device(z):
        if not model.vae.use_tiling:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(z)

    monkeypatch.setattr(model, "decode", small_device)
    assert torch.equal(vae.decode(latent), vae.decode_tiled(latent, tile_x=64, overlap=8))


# ---------------------------------------------------------------------------------------------- saving
@pytest.fixture
def saver(tmp_path, monkeypatch):
    monkeypatch.setenv("AURAFLOW_OUTPUT_DIR", str(tmp_path))
    return N["AuraFlowSaveImage"]()


def gradient(n=2, h=48, w=40):
    ramp = torch.linspace(0, 1, w).expand(h, w)
    return torch.stack([torch.stack([ramp, ramp.T[:h, :w] if h == w else ramp.flip(1), ramp * 0 + i / n], -1)
                        for i in range(n)])


@pytest.mark.parametrize("fmt,pil_format", [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")])
def test_save_writes_format_size_and_metadata(saver, tmp_path, fmt, pil_format):
    prompt = {"1": {"class_type": "AuraFlowGenerate", "inputs": {"prompt": "żółw ✓"}}}
    workflow = {"nodes": [{"id": 1}], "links": []}
    images = gradient()
    out = saver.save(images, "cats/AuraFlow", fmt, 90, True, prompt=prompt, extra_pnginfo={"workflow": workflow})
    files = out["ui"]["images"]
    assert [f["filename"] for f in files] == [f"AuraFlow_0000{i}_.{fmt}" for i in (1, 2)]
    assert all(f["subfolder"] == "cats" and f["type"] == "output" for f in files)
    assert out["result"][0] is images
    for f in files:
        path = tmp_path / "cats" / f["filename"]
        with Image.open(path) as im:
            assert im.format == pil_format and im.size == (40, 48)
            assert imageio.read_metadata(im) == {"prompt": prompt, "workflow": workflow}
            pixels = torch.from_numpy(__import__("numpy").asarray(im.convert("RGB"), dtype="float32") / 255)
    assert (pixels - images[1]).abs().mean() < (0.0 if fmt == "png" else 0.03) + 1 / 255
    assert sorted(p.name for p in (tmp_path / "cats").iterdir()) == [f["filename"] for f in files]  # no temp files
    again = saver.save(images[:1], "cats/AuraFlow", fmt, 90, True)
    assert again["ui"]["images"][0]["filename"] == f"AuraFlow_00003_.{fmt}"


def test_save_without_metadata(saver, tmp_path, monkeypatch):
    prompt = {"1": {"class_type": "X", "inputs": {}}}
    out = saver.save(gradient(1), "plain", "png", 80, False, prompt=prompt, extra_pnginfo={"workflow": {}})
    assert imageio.read_metadata(tmp_path / out["ui"]["images"][0]["filename"]) == {}
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(disable_metadata=True)
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))  # a submodule comes with its package
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    out = saver.save(gradient(1), "plain", "webp", 80, True, prompt=prompt, extra_pnginfo={"workflow": {}})
    assert imageio.read_metadata(tmp_path / out["ui"]["images"][0]["filename"]) == {}


@pytest.mark.parametrize("prefix", ["../escape", "a/../../escape", "/tmp/escape", ".."])
def test_save_refuses_prefixes_that_leave_the_output_folder(saver, tmp_path, prefix):
    with pytest.raises(ValueError, match="outside the output folder"):
        saver.save(gradient(1), prefix, "png", 80, True)
    assert not list(tmp_path.parent.glob("escape*"))


# ---------------------------------------------------------------------------------------------- inside ComfyUI (fakes)
class Stop(BaseException):
    """Stands for comfy.model_management.InterruptProcessingException."""


@pytest.fixture
def fake_comfy(monkeypatch, tmp_path):
    """The parts of ComfyUI the nodes use: devices, memory calls, progress bar, previews, interrupt, folders."""
    calls = types.SimpleNamespace(loads=[], empty=0, bars=[], interrupt_after=None, steps=0)
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = Stop
    mm.get_torch_device = lambda: torch.device("cpu", 0)  # differs from the offload device, as a GPU would
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.should_use_bf16 = lambda device=None: False
    mm.should_use_fp16 = lambda device=None: False

    def soft_empty_cache(force=False):
        calls.empty += 1

    def interrupted():
        return calls.interrupt_after is not None and calls.steps >= calls.interrupt_after

    def throw():
        if interrupted():
            raise Stop()

    mm.soft_empty_cache, mm.processing_interrupted, mm.throw_exception_if_processing_interrupted = (
        soft_empty_cache, interrupted, throw)

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.updates = []
            calls.bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            calls.steps += 1
            self.updates.append((value, total, preview))
            throw()

    utils.ProgressBar = ProgressBar
    formats = types.ModuleType("comfy.latent_formats")
    formats.SDXL = lambda: "sdxl-format"
    preview = types.ModuleType("latent_preview")

    class Previewer:
        def decode_latent_to_preview_image(self, fmt, x0):
            return (fmt, tuple(x0.shape), 512)

    preview.get_previewer = lambda device, fmt: Previewer() if fmt == "sdxl-format" else None
    folder_paths = types.ModuleType("folder_paths")
    models = tmp_path / "models"
    folder_paths.get_filename_list = lambda folder: sorted(p.name for p in (models / folder).glob("*"))
    folder_paths.get_folder_paths = lambda folder: [str(models / folder)]
    folder_paths.get_full_path = lambda folder, name: (str(models / folder / name)
                                                       if (models / folder / name).exists() else None)
    folder_paths.get_output_directory = lambda: str(tmp_path / "output")
    comfy = types.ModuleType("comfy")
    for name, module in {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils,
                         "comfy.latent_formats": formats, "latent_preview": preview,
                         "folder_paths": folder_paths}.items():
        monkeypatch.setitem(sys.modules, name, module)
    calls.models = models
    return calls


def test_in_comfyui_progress_and_previews(loaded, fake_comfy):
    model = loaded[0]
    (out,) = run("AuraFlowSampler", **sampler_args(model, steps=3))
    (bar,) = fake_comfy.bars
    assert [u[:2] for u in bar.updates] == [(1, 3), (2, 3), (3, 3)]
    assert all(u[2] == ("JPEG", (2, 4, SIZE // 8, SIZE // 8), 512) for u in bar.updates)
    # without ComfyUI's ModelPatcher nothing is loaded or moved
    assert fake_comfy.loads == [] and model.device == torch.device("cpu")
    assert set(model.placement.values()) == {torch.device("cpu")}


@pytest.fixture
def fake_memory_manager(fake_comfy, monkeypatch):
    """ComfyUI's ModelPatcher and load_models_gpu, recording what the nodes ask for (they move nothing)."""
    mm = sys.modules["comfy.model_management"]
    patcher_module = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device

    patcher_module.ModelPatcher = ModelPatcher
    monkeypatch.setitem(sys.modules, "comfy.model_patcher", patcher_module)
    mm.load_models_gpu = lambda models, **kw: fake_comfy.loads.append((models, kw))
    for name in ("text_encoder_device", "vae_device"):
        setattr(mm, name, mm.get_torch_device)
    for name in ("text_encoder_offload_device", "vae_offload_device"):
        setattr(mm, name, mm.unet_offload_device)
    mm.xformers_enabled = lambda: False
    mm.pytorch_attention_flash_attention = lambda: True
    mm.dtype_size = lambda dtype: 4
    return fake_comfy


def test_in_comfyui_each_part_is_loaded_through_one_model_patcher(tiny, fake_memory_manager):
    calls = fake_memory_manager.loads
    model, te, vae = run("AuraFlowLoader", checkpoint=str(tiny), weight_dtype="fp32")
    assert calls == [] and model.offload_text_encoder is False  # loading builds nothing for ComfyUI yet
    pos = run("AuraFlowTextEncode", text_encoder=te, text="a cat")[0]
    neg = run("AuraFlowTextEncode", text_encoder=te, text="")[0]
    args = dict(positive=pos, negative=neg, seed=1, steps=1, cfg=5.0, sampler_name="euler", scheduler="normal",
                shift=1.73, denoise=1.0, width=SIZE, height=SIZE, batch_size=2)
    (lat,) = run("AuraFlowSampler", model=model, **args)
    view = types.SimpleNamespace(transformer=model.transformer, dtype=model.dtype, context_dim=model.context_dim,
                                 device=model.device, sample=model.sample, placed=model.placed)  # a LoRA view
    run("AuraFlowSampler", model=view, **args)
    run("AuraFlowVAEDecode", samples=lat, vae=vae)
    kinds = [(type(ms[0].model).__name__, ms[0]) for ms, _kw in calls]
    assert [k for k, _ in kinds] == ["AuraFlowTextEncoder"] * 2 + ["AuraFlowTransformer"] * 2 + \
        ["AuraFlowAutoencoder"]
    te_p, tr_p, vae_p = kinds[0][1], kinds[2][1], kinds[4][1]
    assert kinds[1][1] is te_p and kinds[3][1] is tr_p  # one patcher per part, shared by the view
    assert te.patcher is te_p and vae.patcher is vae_p and type(tr_p).__name__ == "AuraFlowPatcher"
    assert tr_p.model.diffusion_model is model.transformer and vae_p.model.first_stage_model is model.vae
    assert te_p.model.transformer is model.text_encoder
    # ComfyUI's memory estimates: a CFG batch of 2 images (minimum one pass), the VAE whole
    area = 2 * (SIZE // 8) ** 2
    assert calls[2][1] == {"memory_required": 2 * area * 4 * 0.01 * 2.0 * 2**20,
                           "minimum_memory_required": area * 4 * 0.01 * 2.0 * 2**20, "force_full_load": False}
    assert calls[4][1]["force_full_load"] and calls[4][1]["memory_required"] == 2178 * (SIZE // 8) ** 2 * 64 * 4
    # the pipeline runs where ComfyUI put each part; the text encoder's linears can stream
    assert model.device == torch.device("cpu", 0) and model.part_device("vae") == torch.device("cpu", 0)
    linear = pack_module("aura_flow.weights.linear")
    assert not any(type(m) is torch.nn.Linear for m in model.text_encoder.modules())
    assert sum(isinstance(m, linear.PatchableLinear) for m in model.text_encoder.modules()) > 4
    calls.clear()
    run("AuraFlowGenerate", **generate_args(model, steps=1))  # one stage per part
    assert [type(ms[0].model).__name__ for ms, _kw in calls] == ["AuraFlowTextEncoder", "AuraFlowTransformer",
                                                                 "AuraFlowAutoencoder"]
    calls.clear()
    with pytest.raises(ValueError, match="scheduler='nope'"):
        run("AuraFlowSampler", model=model, **{**args, "scheduler": "nope"})
    assert calls == []  # refused before anything was loaded


def test_what_a_partial_load_leaves_behind_is_placed_too(loaded):
    """ComfyUI's lowvram walk moves only leaf modules, and castable ones only when they fit: the rest (bare
    parameters such as the register tokens and the position grid, norms) is put on the device after each load,
    while every PatchableLinear is left to ComfyUI (to stream its weight per call)."""
    memory = pack_module("nodes.comfyui.memory")
    linear = pack_module("aura_flow.weights.linear")
    tr = loaded[0].transformer
    names = {f"{prefix}.{name}".lstrip(".") for prefix, m in tr.named_modules()
             for mod, kind, name in memory.stragglers(tr) if mod is m}
    assert {"register_tokens", "pos_embed.pos_embed"} <= names
    layers = linear.patchable_layers(tr)
    assert layers and not any(n.rsplit(".", 1)[0] in layers for n in names)  # no linear layer's weight
    params = dict(tr.named_parameters())
    assert all(n in params for n in names)  # the transformer has no buffers
    assert memory.place_stragglers(tr, torch.device("cpu")) == sum(params[n].numel() * 4 for n in names)


def test_in_comfyui_the_record_names_the_device_the_model_ran_on(loaded, fake_memory_manager):
    """The auraflow record (nodes/records.py) names the device ComfyUI's memory manager put the model on for the
    run (cpu:0 here, a stand-in for a GPU), not the device it was loaded on."""
    record_of = pack_module("nodes.records").record_of
    model = loaded[0]
    (out,) = run("AuraFlowSampler", **sampler_args(model, steps=1, noise_device="gpu"))
    assert (record_of(out["samples"])["device"], record_of(out["samples"])["noise_device"]) == ("cpu:0", "gpu")
    images, _seed = run("AuraFlowGenerate", **generate_args(model, steps=1))
    assert record_of(images)["device"] == "cpu:0"


def test_in_comfyui_cancel_stops_within_a_step(loaded, fake_comfy):
    model = loaded[0]
    fake_comfy.interrupt_after = 1
    calls = []
    original = model.velocity

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    model.velocity = counting
    try:
        with pytest.raises(Stop):
            run("AuraFlowSampler", **sampler_args(model, steps=10))
    finally:
        del model.velocity
    assert len(calls) <= 2  # stopped after the first step, not after ten


def test_in_comfyui_loader_lists_and_resolves_model_folders(tiny, fake_comfy):
    import shutil

    (fake_comfy.models / "diffusers").mkdir(parents=True)
    shutil.copytree(tiny, fake_comfy.models / "diffusers" / "AuraFlow-tiny")
    for folder in ("checkpoints", "diffusion_models", "text_encoders", "vae"):
        (fake_comfy.models / folder).mkdir()
    (fake_comfy.models / "checkpoints" / "sdxl.safetensors").write_bytes(b"")
    spec = inputs_of(N["AuraFlowLoader"])
    assert spec["checkpoint"][0] == ["sdxl.safetensors", "AuraFlow-tiny"]
    assert spec["vae"][0] == ["(from checkpoint)"]
    model, _te, vae = run("AuraFlowLoader", checkpoint="AuraFlow-tiny")
    assert model.dtype == torch.float32  # fake ComfyUI: neither bf16 nor fp16 on this device
    with pytest.raises(FileNotFoundError, match="models/checkpoints"):
        run("AuraFlowLoader", checkpoint="missing.safetensors")


# ---------------------------------------------------------------------------------------------- inside a real ComfyUI
COMFYUI_SCRIPT = r'''
import asyncio, json, os, sys
checkout, pack_dir, models, out = sys.argv[1:5]
sys.path.insert(0, checkout)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_management as mm, comfy.utils, folder_paths, nodes, torch
from comfy.cli_args import args, LatentPreviewMethod
from PIL import Image

folder_paths.set_output_directory(out)
folder_paths.add_model_folder_path("diffusers", models, is_default=True)
assert asyncio.run(nodes.load_custom_node(pack_dir))
N = nodes.NODE_CLASS_MAPPINGS
ids = ["AuraFlowLoader", "AuraFlowTextEncode", "AuraFlowSampler", "AuraFlowGenerate", "AuraFlowRemoteGenerate",
       "AuraFlowVAEDecode", "AuraFlowVAEEncode", "AuraFlowSaveImage"]
assert all(i in N for i in ids), sorted(N)
choices = N["AuraFlowLoader"].INPUT_TYPES()["required"]["checkpoint"][0]
assert "diffusers" in choices, choices
model, te, vae = N["AuraFlowLoader"]().load("diffusers")
pos = N["AuraFlowTextEncode"]().encode(te, "a cat")[0]
neg = N["AuraFlowTextEncode"]().encode(te, "")[0]

events = []
def hook(value, total, preview, node_id=None):
    mm.throw_exception_if_processing_interrupted()
    events.append((value, total, None if preview is None else preview[0]))
comfy.utils.set_progress_bar_global_hook(hook)
args.preview_method = LatentPreviewMethod.Latent2RGB
sampler = N["AuraFlowSampler"]()
lat = sampler.sample(model, pos, neg, 1, 3, 5.0, "uni_pc", "normal", 1.73, 1.0, 64, 64, 1)[0]
assert events == [(1, 3, "JPEG"), (2, 3, "JPEG"), (3, 3, "JPEG")], events

img = nodes.VAEDecode().decode(vae, lat)[0]
assert img.shape == (1, 64, 64, 3) and 0 <= float(img.min()) and float(img.max()) <= 1
assert torch.allclose(nodes.VAEDecodeTiled().decode(vae, lat, 512, 64)[0], img)
assert nodes.VAEEncode().encode(vae, torch.rand(1, 67, 70, 3))[0]["samples"].shape == (1, 4, 8, 8)
inpaint = nodes.VAEEncodeForInpaint().encode(vae, torch.rand(1, 64, 64, 3), torch.zeros(1, 64, 64))[0]
assert inpaint["samples"].shape == (1, 4, 8, 8)
empty = nodes.EmptyLatentImage().generate(64, 64, 2)[0]
assert sampler.sample(model, pos, neg, 1, 2, 5.0, "euler", "normal", 1.73, 1.0, latent_image=empty)[0][
    "samples"].shape == (2, 4, 8, 8)
mixed = sampler.sample(model, nodes.ConditioningConcat().concat(pos, neg)[0],
                       nodes.ConditioningZeroOut().zero_out(neg)[0], 1, 2, 5.0, "euler", "normal", 1.73, 1.0,
                       64, 64, 1)[0]
assert mixed["samples"].shape == (1, 4, 8, 8)

saver = N["AuraFlowSaveImage"]()
ui = saver.save(img, "sub/AF", "webp", 80, True, prompt={"1": {}}, extra_pnginfo={"workflow": {"a": 1}})["ui"]
exif = Image.open(os.path.join(out, "sub", ui["images"][0]["filename"])).getexif()
assert exif[0x0110] == 'prompt:{"1": {}}' and exif[0x010F] == 'workflow:{"a": 1}', dict(exif)
try:
    saver.save(img, "../../escape", "png", 80, True)
    raise AssertionError("escaping prefix accepted")
except ValueError as exc:
    assert "outside the output folder" in str(exc)
args.disable_metadata = True
ui = saver.save(img, "sub/AF", "png", 80, True, prompt={"1": {}}, extra_pnginfo={"workflow": {}})["ui"]
assert Image.open(os.path.join(out, "sub", ui["images"][0]["filename"])).text == {}

events.clear()
def cancelling(value, total, preview, node_id=None):
    events.append(value)
    if value == 1:
        mm.interrupt_current_processing(True)
    mm.throw_exception_if_processing_interrupted()
comfy.utils.set_progress_bar_global_hook(cancelling)
try:
    sampler.sample(model, pos, neg, 1, 10, 5.0, "euler", "normal", 1.73, 1.0, 64, 64, 1)
    raise AssertionError("not cancelled")
except mm.InterruptProcessingException:
    assert events == [1], events

# ComfyUI's own sampler functions, run through the engine's calling convention (how names the engine lacks are
# served), give the engine's numbers for the same sampler: the bridge hands them what they read.
comfy.utils.set_progress_bar_global_hook(None)
import importlib
pack_name = N["AuraFlowSampler"].__module__.split(".")[0]
ext = importlib.import_module(pack_name + ".nodes.comfyui.samplers")
registry = importlib.import_module(pack_name + ".aura_flow.sampling.registry")
assert ext.register_comfyui_samplers() == []  # every ComfyUI 0.29 name is the engine's own
for name in ("euler_ancestral", "dpmpp_2m_sde", "res_multistep", "dpm_2", "uni_pc"):
    registry.register_sampler("comfyui_" + name, ext.comfy_sampler_function(name),
                              discard_penultimate=registry.SAMPLERS[name].discard_penultimate)
    ours = sampler.sample(model, pos, neg, 7, 4, 5.0, name, "normal", 1.73, 1.0, 64, 64, 1)[0]["samples"]
    theirs = sampler.sample(model, pos, neg, 7, 4, 5.0, "comfyui_" + name, "normal", 1.73, 1.0, 64, 64, 1)[0][
        "samples"]
    assert float((ours - theirs).abs().max()) < 1e-4, (name, float((ours - theirs).abs().max()))

# prompt weighting parses exactly as ComfyUI's own tokenizer does
import random
from comfy.sd1_clip import escape_important, token_weights, unescape_important
text_mod = importlib.import_module(pack_name + ".aura_flow.prompts")
rng = random.Random(0)
alphabet = ["a", "b", " ", "(", ")", ":", "1.5", "0.7", "\\(", "\\)", "x", ":bad", "((", "))"]
for t in ["a (red:1.5) ((cat))", "a \\(lit\\) (b:2)"] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(2000)]:
    want = [(unescape_important(s), w) for s, w in token_weights(escape_important(t), 1.0)]
    assert text_mod.parse_weights(t) == want, (t, want)
print("ALL OK")
'''


@pytest.mark.comfyui
def test_nodes_inside_a_real_comfyui(tmp_path, tiny_models):
    """Core VAE/conditioning nodes on our objects, progress previews, Cancel, save paths and --disable-metadata,
    all through a real ComfyUI's own modules (in a subprocess, so its top-level ``nodes`` cannot clash)."""
    import shutil

    checkout = os.environ.get("AURAFLOW_COMFYUI")
    if not checkout:
        pytest.skip("set AURAFLOW_COMFYUI to a ComfyUI checkout (AURAFLOW_COMFYUI_PYTHON: its Python) to run this")
    pack_dir = tmp_path / "custom_nodes" / "ComfyUI-AuraFlow"
    pack_dir.mkdir(parents=True)
    for part in ("__init__.py", "aura_flow", "nodes", "web"):
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy
        copy(ROOT / part, pack_dir / part)
    script = tmp_path / "run" / "inside_comfyui.py"
    script.parent.mkdir()
    script.write_text(COMFYUI_SCRIPT)
    models = Path(tiny_models["diffusers"]["checkpoint"]).parent
    python = os.environ.get("AURAFLOW_COMFYUI_PYTHON") or sys.executable
    done = subprocess.run([python, str(script), checkout, str(pack_dir), str(models), str(tmp_path / "out")],
                          cwd=checkout, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ALL OK" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]


def test_external_samplers_are_offered_only_inside_comfyui():
    """Outside ComfyUI there is no sampler of ComfyUI's to serve: nothing is added to the engine's registry."""
    registry = pack_module("aura_flow.sampling.registry")
    register_comfyui_samplers = pack_module("nodes.comfyui.samplers").register_comfyui_samplers

    before = registry.SAMPLER_NAMES
    assert register_comfyui_samplers() == []
    assert registry.SAMPLER_NAMES == before
