"""`python -m aura_flow queue` against a fake ComfyUI: a real HTTP server on 127.0.0.1 that speaks the parts of
ComfyUI's API the command uses (POST /prompt, GET /history/<id>, GET /view, POST /queue, POST /interrupt)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from aura_flow import headless
from aura_flow.params import ParameterError

ROOT = Path(__file__).resolve().parents[1]

WORKFLOW = {
    "3": {"class_type": "KSampler", "_meta": {"title": "Sampler"},
          "inputs": {"seed": 1, "steps": 25, "cfg": 5.0, "sampler_name": "euler", "model": ["4", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "_meta": {"title": "Load Checkpoint"},
          "inputs": {"ckpt_name": "a.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "_meta": {"title": "Positive"}, "inputs": {"text": "a cat"}},
    "7": {"class_type": "CLIPTextEncode", "_meta": {"title": "Negative"}, "inputs": {"text": ""}},
    "9": {"class_type": "SaveImage", "_meta": {"title": "Save Image"}, "inputs": {"filename_prefix": "AuraFlow"}},
}
PNG_A = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3
PNG_B = b"\x89PNG\r\n\x1a\n" + b"second image"

VALIDATION_ERROR = {
    "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
              "details": "Value not in list: sampler_name: 'nope' not in [...]", "extra_info": {}},
    "node_errors": {"3": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                      "details": "sampler_name: 'nope' not in ['euler', 'uni_pc']",
                                      "extra_info": {}}],
                          "dependent_outputs": ["9"], "class_type": "KSampler"}},
}
EXECUTION_ERROR_MESSAGES = [
    ["execution_start", {"prompt_id": "x", "timestamp": 1}],
    ["execution_error", {"prompt_id": "x", "node_id": "4", "node_type": "CheckpointLoaderSimple",
                         "executed": [], "exception_message": "a.safetensors: no AuraFlow keys found\n",
                         "exception_type": "/opt/ComfyUI/custom_nodes/ComfyUI-AuraFlow.aura_flow.errors.LoadError",
                         "traceback": ["Traceback ...\n"],
                         "current_inputs": {}, "current_outputs": []}],
]


class FakeComfyUI:
    """Records every request; ``mode`` picks the answer: ok, invalid, fails, never (the prompt stays running),
    vanish (the prompt is neither in the queue nor in the history, as after a server restart)."""

    def __init__(self):
        self.mode = "ok"
        self.requests: list[tuple[str, str, object]] = []
        self.history_polls = 0
        self.queue_polls = 0
        self.finish_after_polls = 2  # the prompt shows up in /history only on the third poll
        self.prompt_ids: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes, ctype="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status, obj):
                self._send(status, json.dumps(obj).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                fake.requests.append(("POST", self.path, body))
                if self.path == "/prompt":
                    if fake.mode == "invalid":
                        return self._json(400, VALIDATION_ERROR)
                    prompt_id = str(uuid.uuid4())
                    fake.prompt_ids.append(prompt_id)
                    return self._json(200, {"prompt_id": prompt_id, "number": 0, "node_errors": {}})
                if self.path in ("/queue", "/interrupt"):
                    return self._send(200, b"")
                self._send(404, b"404: Not Found", "text/plain")

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
                fake.requests.append(("GET", url.path, query))
                if url.path.startswith("/history/"):
                    prompt_id = urllib.parse.unquote(url.path[len("/history/"):])
                    fake.history_polls += 1
                    if fake.mode in ("never", "vanish") or fake.history_polls <= fake.finish_after_polls:
                        return self._json(200, {})
                    return self._json(200, {prompt_id: fake.history_entry(prompt_id)})
                if url.path == "/queue":  # one other prompt ahead on the first look, then ours is running
                    fake.queue_polls += 1
                    mine = [[1, fake.prompt_ids[-1], {}, {}, []]] if fake.prompt_ids and fake.mode != "vanish" else []
                    if fake.queue_polls == 1 and mine:
                        return self._json(200, {"queue_running": [], "queue_pending": [[0, "other", {}, {}, []],
                                                                                       *mine]})
                    return self._json(200, {"queue_running": mine, "queue_pending": []})
                if url.path == "/view":
                    files = {("AuraFlow_00001_.png", ""): PNG_A, ("AuraFlow_00002_.png", "batch"): PNG_B}
                    data = files.get((query.get("filename"), query.get("subfolder", "")))
                    if data is None or query.get("type") != "output":
                        return self._send(404, b"", "text/plain")
                    return self._send(200, data, "image/png")
                self._send(404, b"404: Not Found", "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def history_entry(self, prompt_id):
        if self.mode == "fails":
            return {"prompt": [0, prompt_id, {}, {}, []], "outputs": {},
                    "status": {"status_str": "error", "completed": False, "messages": EXECUTION_ERROR_MESSAGES}}
        images = [{"filename": "AuraFlow_00001_.png", "subfolder": "", "type": "output"},
                  {"filename": "AuraFlow_00002_.png", "subfolder": "batch", "type": "output"}]
        return {"prompt": [0, prompt_id, {}, {}, ["9"]], "outputs": {"9": {"images": images}},
                "status": {"status_str": "success", "completed": True,
                           "messages": [["execution_start", {}], ["execution_success", {}]]}}

    def posted_prompts(self):
        return [body for method, path, body in self.requests if (method, path) == ("POST", "/prompt")]


@pytest.fixture
def comfy():
    fake = FakeComfyUI()
    fake.thread.start()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


@pytest.fixture
def workflow_file(tmp_path):
    path = tmp_path / "wf.api.json"
    path.write_text(json.dumps(WORKFLOW))
    return path


def run_cli(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "aura_flow", "queue", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return proc.returncode, proc.stdout, proc.stderr


def test_queue_submits_edits_waits_and_downloads(comfy, workflow_file, tmp_path):
    out = tmp_path / "images"
    code, stdout, stderr = run_cli(workflow_file, "--server", comfy.url, "--out", out,
                                   "--set", "3.seed=5", "--set", "Positive.text=a red fox",
                                   "--set", "SaveImage.filename_prefix=run/fox", "--set", "Sampler.cfg=1.5",
                                   "--set", "4.ckpt_name=aura flow.safetensors", cwd=tmp_path)
    assert code == 0, stderr
    written = [Path(line) for line in stdout.splitlines()]
    assert written == [out / "AuraFlow_00001_.png", out / "batch" / "AuraFlow_00002_.png"]
    assert written[0].read_bytes() == PNG_A and written[1].read_bytes() == PNG_B

    (body,) = comfy.posted_prompts()
    assert set(body) == {"prompt", "client_id"} and len(body["client_id"]) == 32
    expected = json.loads(json.dumps(WORKFLOW))
    expected["3"]["inputs"].update(seed=5, cfg=1.5)
    expected["6"]["inputs"]["text"] = "a red fox"
    expected["9"]["inputs"]["filename_prefix"] = "run/fox"
    expected["4"]["inputs"]["ckpt_name"] = "aura flow.safetensors"
    assert body["prompt"] == expected
    assert isinstance(body["prompt"]["3"]["inputs"]["seed"], int)

    # polled /history/<its id> until the entry appeared, then fetched both files through /view
    (prompt_id,) = comfy.prompt_ids
    polls = [path for method, path, _ in comfy.requests if path.startswith("/history/")]
    assert polls == [f"/history/{prompt_id}"] * 3
    views = [q for method, path, q in comfy.requests if path == "/view"]
    assert views == [{"filename": "AuraFlow_00001_.png", "subfolder": "", "type": "output"},
                     {"filename": "AuraFlow_00002_.png", "subfolder": "batch", "type": "output"}]


def test_validation_error_exits_1_with_comfyui_text(comfy, workflow_file, tmp_path):
    comfy.mode = "invalid"
    code, stdout, stderr = run_cli(workflow_file, "--server", comfy.url, "--set", "3.sampler_name=nope",
                                   cwd=tmp_path)
    assert code == 1 and stdout == ""
    assert "ComfyUI rejected the prompt: Prompt outputs failed validation" in stderr
    assert "node 3 (KSampler): Value not in list: sampler_name: 'nope' not in ['euler', 'uni_pc']" in stderr
    assert comfy.posted_prompts()[0]["prompt"]["3"]["inputs"]["sampler_name"] == "nope"
    assert not any(path.startswith("/history") for _, path, _ in comfy.requests)


def test_execution_error_exits_1_with_exception_text(comfy, workflow_file, tmp_path):
    comfy.mode = "fails"
    code, stdout, stderr = run_cli(workflow_file, "--server", comfy.url, "--out", tmp_path / "o", cwd=tmp_path)
    assert code == 1 and stdout == ""
    assert ("ComfyUI failed the prompt in node 4 (CheckpointLoaderSimple): LoadError: "
            "a.safetensors: no AuraFlow keys found") in stderr
    assert not (tmp_path / "o").exists()


def test_timeout_exits_3_and_unreachable_server_names_the_fix(comfy, workflow_file, tmp_path):
    comfy.mode = "never"
    code, _, stderr = run_cli(workflow_file, "--server", comfy.url, "--timeout", "0.5", cwd=tmp_path)
    assert code == 3 and "did not finish within 0.5 s" in stderr and "--timeout" in stderr

    port = comfy.httpd.server_address[1]
    comfy.httpd.shutdown()
    comfy.httpd.server_close()
    code, _, stderr = run_cli(workflow_file, "--server", f"127.0.0.1:{port}", cwd=tmp_path)
    assert code == 3 and f"cannot reach ComfyUI at http://127.0.0.1:{port}" in stderr and "--server" in stderr


def test_bad_set_and_editor_format_exit_2_before_any_request(comfy, workflow_file, tmp_path):
    cases = {
        "3.sed=5": "node 3 (KSampler, 'Sampler') has no input 'sed'; its inputs: cfg, model, sampler_name, seed",
        "CLIPTextEncode.text=x": "2 nodes have the class_type 'CLIPTextEncode' (6, 7); use one of those node ids",
        "Nope.seed=1": "no node has that id, title or class_type",
        "seed=1": "expected NODE.INPUT=VALUE",
    }
    for item, message in cases.items():
        code, _, stderr = run_cli(workflow_file, "--server", comfy.url, "--set", item, cwd=tmp_path)
        assert code == 2 and message in stderr, (item, stderr)

    editor = tmp_path / "editor.json"
    editor.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    code, _, stderr = run_cli(editor, "--server", comfy.url, cwd=tmp_path)
    assert code == 2 and "editor format" in stderr and "Export (API)" in stderr
    assert comfy.requests == []


def test_set_values_parse_as_json_else_text_and_never_mutate_the_input():
    before = json.loads(json.dumps(WORKFLOW))
    edited = headless.apply_sets(WORKFLOW, ["3.seed=18446744073709551615", "3.cfg=2", "6.text=[1, 2",
                                            "6.text=null", "Negative.text=\"7\"", "Sampler.model=[\"4\", 1]",
                                            "4.ckpt_name=x=y.safetensors"])
    assert WORKFLOW == before
    assert edited["3"]["inputs"]["seed"] == 2**64 - 1
    assert edited["3"]["inputs"]["cfg"] == 2 and edited["6"]["inputs"]["text"] is None
    assert edited["7"]["inputs"]["text"] == "7" and edited["3"]["inputs"]["model"] == ["4", 1]
    assert edited["4"]["inputs"]["ckpt_name"] == "x=y.safetensors"
    assert headless.apply_sets(WORKFLOW, ["6.text=[1, 2"])["6"]["inputs"]["text"] == "[1, 2"
    # an id wins over a title that looks like another node's id
    wf = {"1": {"class_type": "A", "inputs": {"v": 0}}, "2": {"class_type": "B", "_meta": {"title": "1"},
                                                           "inputs": {"v": 0}}}
    assert headless.apply_sets(wf, ["1.v=9"])["1"]["inputs"]["v"] == 9
    with pytest.raises(ParameterError, match="no node has that id"):
        headless.apply_sets(WORKFLOW, ["99.seed=1"])


def test_run_workflow_api_accepts_a_wrapped_prompt_and_returns_paths(comfy, tmp_path):
    paths = headless.run_workflow({"prompt": WORKFLOW}, comfy.url, out_dir=tmp_path, poll=0.01)
    assert [p.read_bytes() for p in paths] == [PNG_A, PNG_B]
    assert comfy.posted_prompts()[0]["prompt"] == WORKFLOW


def test_wait_logs_queue_position_then_running(comfy, tmp_path, caplog):
    comfy.finish_after_polls = 4
    with caplog.at_level("INFO", logger="aura_flow.headless"):
        paths = headless.run_workflow(WORKFLOW, comfy.url, out_dir=tmp_path, poll=0.01, check_every=0.0)
    assert len(paths) == 2
    states = [r.getMessage().split(": ", 1)[1].rsplit(" (", 1)[0] for r in caplog.records
              if r.getMessage().startswith("prompt ")]
    assert states == ["queued (1 ahead)", "running"]


def test_a_prompt_that_vanished_from_comfyui_fails_instead_of_waiting(comfy, tmp_path):
    comfy.mode = "vanish"
    with pytest.raises(headless.QueueError, match="no longer in ComfyUI's queue nor in its history"):
        headless.run_workflow(WORKFLOW, comfy.url, out_dir=tmp_path, poll=0.01, check_every=0.05, timeout=30)


def test_cancel_removes_the_prompt_from_the_queue_and_interrupts_it(comfy):
    client = headless.ComfyClient(comfy.url)
    client.cancel("1234")
    assert [(m, p, b) for m, p, b in comfy.requests] == [("POST", "/queue", {"delete": ["1234"]}),
                                                       ("POST", "/interrupt", {"prompt_id": "1234"})]
