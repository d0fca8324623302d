"""AuraFlow Prompt List (issue 19, in the editor): typed text or a file of the input folder, in the batch command's
formats, read by its reader (the same seeds / grid expansion and checks, said in the node's words), as list outputs
that make the graph downstream run once per job; the bundled workflow run the way ComfyUI runs lists."""
from __future__ import annotations

import importlib
import io
import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

import workflow_exec as wx
from test_workflows import api, editor, saved, shrink

pack = wx.load_pack()
classes = wx.all_classes(pack)
PL = pack.NODE_CLASS_MAPPINGS["AuraFlowPromptList"]
node_module = importlib.import_module(f"{pack.__name__}.nodes.prompt_list")
jobs_module = importlib.import_module(f"{pack.__name__}.aura_flow.batch.jobs")
errors = importlib.import_module(f"{pack.__name__}.aura_flow.errors")
imageio = importlib.import_module(f"{pack.__name__}.aura_flow.images")
KEYS = node_module.LIST_KEYS
# the node's widgets as ComfyUI passes them (every one), small enough to read
WIDGETS = {"file": node_module.NO_FILE, "format": "auto", "seeds": 1, "grid": "", "negative_prompt": "",
           "seed": 11, "steps": 2, "cfg": 5.0, "shift": 1.73, "width": 64, "height": 64, "sampler": "euler",
           "scheduler": "normal"}
DEFAULTS = {k: WIDGETS[k] for k in node_module.DEFAULT_WIDGETS}


def run(text, **widgets):
    return PL().jobs(text=text, **{**WIDGETS, **widgets})


def as_dict(out) -> dict:
    assert len(out) == len(KEYS) + 1
    return {**dict(zip(KEYS, out[:-1])), "count": out[-1]}


def expected(path, fmt=None, **kw) -> dict:
    """The batch reader's jobs of the same lines, as the node's outputs."""
    jobs = list(jobs_module.read_jobs(path, defaults=DEFAULTS, check_lora_files=False, fmt=fmt, **kw))
    return {**{k: [j.params[k] for j in jobs] for k in KEYS}, "count": len(jobs)}


def message(fn) -> str:
    with pytest.raises(errors.ParameterError) as info:
        fn()
    return str(info.value)


# ---------------------------------------------------------------------------------------------- the node's face
def test_definition_lists_and_combo_types_that_feed_the_generators():
    spec = PL.INPUT_TYPES()["required"]
    assert list(spec)[:5] == ["text", "file", "format", "seeds", "grid"]
    assert all(opts.get("tooltip") for _kind, opts in spec.values())
    assert spec["seed"][1]["control_after_generate"] and spec["seed"][1]["max"] == 2**64 - 1
    assert PL.DESCRIPTION and PL.CATEGORY.startswith("AuraFlow/") and len(PL.OUTPUT_TOOLTIPS) == len(PL.RETURN_TYPES)
    assert PL.RETURN_NAMES == KEYS + ("count",) and PL.OUTPUT_IS_LIST == (True,) * 10 + (False,)
    types_ = PL.RETURN_TYPES
    assert types_[:7] == ("STRING", "STRING", "INT", "INT", "FLOAT", "INT", "INT") and types_[9:] == ("FLOAT", "INT")
    # ComfyUI lets an output typed as a list of names feed a combo with the equal list (execution.py's check)
    generate = wx.inputs_of(classes["AuraFlowGenerate"])
    sampler = wx.inputs_of(classes["AuraFlowSampler"])
    assert types_[7] == list(generate["sampler"][0]) == list(sampler["sampler_name"][0])
    assert types_[8] == list(generate["scheduler"][0]) == list(sampler["scheduler"][0])
    assert dict((r[0], r[2]) for r in importlib.import_module(f"{pack.__name__}.nodes").NODES)[
        "AuraFlowPromptList"] == "AuraFlow Prompt List"


def test_a_list_output_cannot_feed_a_combo_of_other_names():
    prompt = api("auraflow_prompt_list")
    assert wx.check_api(prompt, classes) == []
    prompt["3"]["class_type"] = "AuraFlowRemoteGenerate"  # the service's sampler list differs
    del prompt["3"]["inputs"]["model"]
    for key in ("speed", "noise_device"):
        prompt["3"]["inputs"].pop(key, None)
    problems = wx.check_api(prompt, classes)
    assert any("combo 'sampler' fed by COMBO" in p for p in problems), problems


# ---------------------------------------------------------------------------------------------- formats
def test_plain_text_lines_with_the_widgets_as_defaults(tmp_path):
    text = "a red fox\n\n# a comment\na cat, sitting, on a mat\n"
    out = as_dict(run(text))
    assert out == {"prompt": ["a red fox", "a cat, sitting, on a mat"], "negative_prompt": ["", ""], "seed": [11, 11],
                   "steps": [2, 2], "cfg": [5.0, 5.0], "width": [64, 64], "height": [64, 64],
                   "sampler": ["euler", "euler"], "scheduler": ["normal", "normal"], "shift": [1.73, 1.73],
                   "count": 2}
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    assert out == expected(tmp_path / "p.txt")


def test_jsonl_lines_override_the_widgets(tmp_path):
    lines = [{"prompt": "a fox", "seed": 7, "steps": 3}, {"prompt": "a cat", "cfg": 1, "sampler": "dpmpp_2m",
                                                          "negative_prompt": "blurry"},
             {"prompt": "a dog", "width": 128, "shift": 3, "scheduler": "karras", "name": "dog"}]
    text = "# jobs\n" + "\n".join(json.dumps(o) for o in lines) + "\n"
    out = as_dict(run(text))
    assert out["prompt"] == ["a fox", "a cat", "a dog"] and out["seed"] == [7, 11, 11]
    assert out["steps"] == [3, 2, 2] and out["cfg"] == [5.0, 1.0, 5.0] and out["width"] == [64, 64, 128]
    assert out["sampler"] == ["euler", "dpmpp_2m", "euler"] and out["scheduler"] == ["normal", "normal", "karras"]
    assert out["negative_prompt"] == ["", "blurry", ""] and out["shift"] == [1.73, 1.73, 3.0]
    assert all(type(v) is float for v in out["cfg"] + out["shift"]) and all(type(v) is int for v in out["seed"])
    (tmp_path / "j.jsonl").write_text(text, encoding="utf-8")
    assert out == expected(tmp_path / "j.jsonl")


def test_csv_with_a_header(tmp_path):
    text = 'prompt,seed,steps\n"a fox, in snow",5,3\n\na cat,,\n'
    out = as_dict(run(text))
    assert out["prompt"] == ["a fox, in snow", "a cat"] and out["seed"] == [5, 11] and out["steps"] == [3, 2]
    (tmp_path / "t.csv").write_text(text, encoding="utf-8")
    assert out == expected(tmp_path / "t.csv")


def test_the_auto_rule_and_forced_formats():
    detect = node_module.detect_format
    assert detect("prompt,seed\na,1\n") == "csv" and detect("\ufeffprompt\na\n") == "csv"
    assert detect("a fox, a forest, autumn\n") == "text"  # commas alone do not make CSV
    assert detect("prompt,colour\na,red\n") == "text"  # nor a header with a key the batch files do not know
    assert detect('\n# c\n  {"prompt": "a"}\n') == "jsonl" and detect("") == "text"
    json_line = '{"prompt": "a"}'
    assert run(json_line)[0] == ["a"]
    assert run(json_line, format="text")[0] == [json_line]  # forced: the line is the prompt
    assert run("prompt\na fox\n", format="text")[0] == ["prompt", "a fox"]
    assert "not valid JSON" in message(lambda: run("a fox\n", format="jsonl"))


# ---------------------------------------------------------------------------------------------- expansion
def test_seeds_and_grid_expand_as_the_batch_command(tmp_path):
    text = '{"prompt": "a fox", "seed": 100}\n{"prompt": "a cat"}\n'
    out = as_dict(run(text, seeds=3, grid="steps=2,4\n\ncfg=1,3.5\n"))
    assert out["count"] == 2 * 3 * 4
    assert out["seed"][:3] == [100, 101, 102] and out["seed"][12:15] == [11, 12, 13]
    assert out["steps"][:12] == [2] * 6 + [4] * 6 and out["cfg"][:6] == [1.0] * 3 + [3.5] * 3
    (tmp_path / "j.jsonl").write_text(text, encoding="utf-8")
    want = expected(tmp_path / "j.jsonl", seeds=3, grid=jobs_module.parse_grid(["steps=2,4", "cfg=1,3.5"]))
    assert out == want
    # without a seed widget (a script calling the node) unseeded lines get the batch command's fixed seeds
    widgets = {k: v for k, v in WIDGETS.items() if k != "seed"}
    derived = PL().jobs(text=text, **widgets)[2]
    assert derived == [j.seed for j in jobs_module.read_jobs(tmp_path / "j.jsonl", defaults={
        k: v for k, v in DEFAULTS.items() if k != "seed"})]
    assert derived[0] == 100 and derived[1] != 11


# ---------------------------------------------------------------------------------------------- errors
def test_a_bad_line_is_named_as_the_batch_command_names_it(tmp_path):
    text = "\n".join(json.dumps({"prompt": f"p{i}"}) for i in range(4)) + '\n{"prompt": "p", "steps": 500}\n'
    said = message(lambda: run(text))
    assert said == "text line 5: steps=500 is out of range; allowed: 1..100"
    (tmp_path / "text").write_text(text, encoding="utf-8")
    with pytest.raises(jobs_module.JobFileError) as info:
        list(jobs_module.read_jobs(tmp_path / "text", defaults=DEFAULTS, fmt="jsonl", label="text",
                                   check_lora_files=False))
    assert str(info.value) == said
    assert message(lambda: run('{"prompt": "a", "colour": "red"}')).startswith(
        "text line 1: colour: unknown key; known: prompt,")
    assert "--backend" not in message(lambda: run('{"prompt": "a", "3.text": "x"}'))
    said = message(lambda: run("a", sampler="nope"))  # a bad widget: no line to name
    assert said.startswith("sampler='nope' is not known; valid names: euler,")


def test_grid_errors_in_the_nodes_words():
    assert message(lambda: run("a", grid="steps")) == "grid steps: write KEY=V1,V2,..., e.g. steps=10,20,30"
    assert "on one grid line" in message(lambda: run("a", grid="steps=1\nsteps=2"))
    said = message(lambda: run("a", grid="steps=2,500"))
    assert said == "text line 1 (grid steps=500): steps=500 is out of range; allowed: 1..100"
    assert "--" not in said + message(lambda: run("a", grid="colour=1,2"))


def test_keys_without_an_output_are_refused_not_dropped():
    said = message(lambda: run('\n{"prompt": "a", "loras": [["x.safetensors", 0.5]]}'))
    assert said.startswith("text line 2: loras:") and "AuraFlow LoRA Loader" in said
    said = message(lambda: run('{"prompt": "a", "number_of_images": 4}'))
    assert said.startswith("text line 1: number_of_images=4:") and "AuraFlow Generate" in said
    out = run('{"prompt": "a", "number_of_images": 1, "output_format": "webp", "name": "fox"}')  # the defaults: fine
    assert out[0] == ["a"]


def test_the_cap_on_jobs_is_worded_for_the_node_and_reads_no_further():
    cap = node_module.MAX_JOBS
    assert len(run("a fox\n" * cap)[0]) == cap
    said = message(lambda: run("a fox\n" * cap + "a cat\n" + "x" * 10 + '\n{"bad": 1}\n' * 1000, format="text"))
    assert said.startswith(f"text line {cap + 1}: the list makes over 1,000 jobs") and "aura_flow batch" in said
    # seeds x grid over the cap: said before any line is read (line 1 is bad too)
    said = message(lambda: run('{"prompt": "a", "steps": 500}', seeds=cap // 2, grid="cfg=1,2,3"))
    assert said.startswith("seeds=500 and grid make over 1,000 jobs from each line")


@pytest.mark.parametrize("widgets, said", [
    ({"text": None}, "text=None is not text; write one prompt a line"),
    ({"text": 42}, "text=42 is not text"),
    ({"text": "a", "file": 5}, "file=5 is not a file name"),
    ({"text": "a", "format": "xml"}, "format='xml' is not one of auto, text, jsonl, csv"),
    ({"text": "a", "format": None}, "format=None is not one of"),
    ({"text": "a", "seeds": 0}, "seeds=0 is out of range; allowed: 1..1000"),
    ({"text": "a", "seeds": True}, "seeds=True is out of range"),
    ({"text": "a", "seeds": "3"}, "seeds='3' is out of range"),
    ({"text": "a", "grid": None}, "grid=None is not text"),
    ({"text": "a", "steps": 0}, "steps=0 is out of range; allowed: 1..100"),
    ({"text": "a", "width": "wide"}, "width="),
    ({"text": "\n# only comments\n\n"}, "text: no jobs; write one prompt a line"),
    ({"text": "a\ud800b"}, "text holds a character that is not text at position 2"),
    ({"text": "a", "colour": "red"}, "colour: not an input of AuraFlow Prompt List"),
])
def test_hostile_inputs_get_the_nodes_message(widgets, said):
    text = widgets.pop("text")
    assert message(lambda: run(text, **widgets)).startswith(said)


def test_huge_text_is_refused_before_reading():
    said = message(lambda: run("a" * (node_module.MAX_TEXT_BYTES + 1)))
    assert said.startswith("text is 8,388,609 characters long; at most 8,388,608") and "aura_flow batch" in said


# ---------------------------------------------------------------------------------------------- the input folder
@pytest.fixture
def input_dir(tmp_path, monkeypatch):
    """A fake ComfyUI folder_paths whose input folder is tmp_path/input, holding job files and other files."""
    base = tmp_path / "input"
    (base / "sub").mkdir(parents=True)
    (base / ".cache").mkdir()
    (base / "jobs.jsonl").write_text('{"prompt": "a fox", "seed": 3}\n{"prompt": "a cat", "steps": 0}\n', "utf-8")
    (base / "prompts.txt").write_text("a fox\na cat\n", "utf-8")
    (base / "table.csv").write_text("prompt,steps\na fox,3\n", "utf-8")
    (base / "sub" / "more.TXT").write_text("a bird\n", "utf-8")
    (base / "photo.png").write_bytes(b"not a job file")
    (base / ".hidden.txt").write_text("x\n", "utf-8")
    (base / ".cache" / "c.txt").write_text("x\n", "utf-8")
    (tmp_path / "outside.txt").write_text("a secret\n", "utf-8")
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_input_directory = lambda: str(base)
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    return base


def test_the_file_combo_lists_job_files_of_the_input_folder(input_dir):
    files = PL.INPUT_TYPES()["required"]["file"][0]
    assert files == [node_module.NO_FILE, "jobs.jsonl", "prompts.txt", "sub/more.TXT", "table.csv"]


def test_a_file_is_read_instead_of_the_text_in_its_extensions_format(input_dir):
    out = as_dict(run("ignored", file="prompts.txt"))
    assert out["prompt"] == ["a fox", "a cat"] and out["count"] == 2
    assert as_dict(run(None, file="table.csv"))["steps"] == [3]
    assert run("", file="sub/more.TXT")[0] == ["a bird"]
    assert message(lambda: run("", file="jobs.jsonl")) == "jobs.jsonl line 2: steps=0 is out of range; allowed: 1..100"
    assert run("", file="jobs.jsonl", format="text")[0][0] == '{"prompt": "a fox", "seed": 3}'


@pytest.mark.parametrize("name, said", [
    ("../outside.txt", "file='../outside.txt' is outside the input folder"),
    ("/etc/passwd.txt", "file='/etc/passwd.txt' is outside the input folder"),
    ("gone.txt", "file='gone.txt' is not a file in the input folder"),
    ("photo.png", "file='photo.png': not a job file; pick a .txt, .jsonl or .csv file"),
])
def test_a_file_outside_the_folder_or_not_a_job_file_is_refused(input_dir, name, said):
    assert message(lambda: run("", file=name)).startswith(said)


def test_a_link_out_of_the_input_folder_is_refused(input_dir):
    (input_dir / "link.txt").symlink_to(input_dir.parent / "outside.txt")
    assert "outside the input folder" in message(lambda: run("", file="link.txt"))


def test_a_changed_file_runs_the_node_again_and_a_big_one_is_refused(input_dir):
    first = PL.IS_CHANGED(file="prompts.txt", text="")
    assert first == PL.IS_CHANGED(file="prompts.txt", text="") and PL.IS_CHANGED(file=node_module.NO_FILE) == ""
    (input_dir / "prompts.txt").write_text("a fox\na dog\n", "utf-8")
    assert PL.IS_CHANGED(file="prompts.txt") != first
    (input_dir / "big.txt").write_bytes(b"a\n" * (node_module.MAX_TEXT_BYTES // 2 + 1))
    said = message(lambda: run("", file="big.txt"))
    assert said.startswith("file='big.txt' is 8,388,610 bytes; this node reads at most 8,388,608")


def test_the_batch_reader_reads_a_stream_as_it_reads_a_file(tmp_path):
    data = 'prompt,seed\n"a, b",4\n'
    (tmp_path / "j.csv").write_text(data, encoding="utf-8")
    from_file = list(jobs_module.read_jobs(tmp_path / "j.csv", defaults=DEFAULTS))
    from_stream = list(jobs_module.read_jobs(io.BytesIO(data.encode()), defaults=DEFAULTS, fmt="csv", label="x"))
    assert from_file == from_stream and from_file[0].params["prompt"] == "a, b"


# ---------------------------------------------------------------------------------------------- in a graph
def test_the_executor_runs_a_list_fed_node_once_per_element():
    out, ui = wx.execute({"1": {"class_type": "AuraFlowPromptList", "inputs": {**WIDGETS, "text": "a\nb\nc",
                                                                             "seeds": 2}}},
                         classes, lists=True)
    assert out["1"][0] == ["a", "a", "b", "b", "c", "c"] and out["1"][10] == [6] and ui == {}
    with pytest.raises(ValueError, match="made lists"):
        wx.execute({"1": {"class_type": "AuraFlowPromptList", "inputs": {**WIDGETS, "text": "a\nb"}}}, classes)
    # a node without INPUT_IS_LIST runs once per element; a shorter list repeats its last element
    calls = []

    class Probe:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"a": ("STRING",), "b": ("INT",)}}

        RETURN_TYPES = ("STRING",)
        FUNCTION = "f"

        def f(self, a, b):
            calls.append((a, b))
            return {"ui": {"seen": [a]}, "result": (f"{a}{b}",)}

    results, uis = wx.map_node_over_list(Probe, {"a": ["x", "y", "z"], "b": [1, 2]})
    assert calls == [("x", 1), ("y", 2), ("z", 2)] and wx.merge_result_data(results, Probe) == [["x1", "y2", "z2"]]
    assert uis == [{"seen": ["x"]}, {"seen": ["y"]}, {"seen": ["z"]}]


def test_bundled_workflow_saves_one_image_per_line(tmp_path, monkeypatch, tiny_models):
    monkeypatch.setenv("AURAFLOW_OUTPUT_DIR", str(tmp_path / "output"))
    prompt = shrink(api("auraflow_prompt_list"), str(tiny_models["diffusers"]["checkpoint"]))
    lines = [line for line in prompt["2"]["inputs"]["text"].splitlines() if line and not line.startswith("#")]
    assert len(lines) == 3
    workflow = editor("auraflow_prompt_list")
    outputs, ui = wx.execute(prompt, classes, workflow=workflow, lists=True)
    assert outputs["2"][10] == [3] and len(outputs["3"][0]) == 3  # Generate ran once per line
    paths = saved(tmp_path, ui)
    assert len(paths) == 3 and len(set(paths)) == 3
    pixels, seed = [], prompt["2"]["inputs"]["seed"]
    for path, line in zip(paths, lines):
        with Image.open(path) as im:
            assert im.size == (64, 64)
            metadata = imageio.read_metadata(im)
            pixels.append(np.asarray(im, dtype=np.float32))
        assert metadata["parameters"]["prompt"] == line and metadata["parameters"]["seed"] == seed
        assert metadata["parameters"]["steps"] == 2 and metadata["prompt"] == prompt
        assert metadata["workflow"] == workflow and metadata["auraflow"]["checkpoint"]["name"] == "diffusers"
    for i in range(3):
        for j in range(i):
            assert np.abs(pixels[i] - pixels[j]).mean() > 1  # three different pictures
