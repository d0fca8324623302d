"""`queue` against a hostile or broken ComfyUI (issue #13): answers of the wrong shape, file names that try to leave
--out, outputs of one name, huge answers, and bad arguments refused before anything is queued."""
from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aura_flow import headless
from aura_flow.errors import ParameterError
from aura_flow.headless import client as client_mod

WORKFLOW = {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "AuraFlow"}}}
PNG = b"\x89PNG\r\n\x1a\n" + b"pixels"


class Hostile:
    """Answers POST /prompt with ``prompt_id``, GET /history/<id> with ``history(prompt_id)`` (JSON, or bytes as
    they are), GET /view with ``PNG`` plus the file name asked; records every request."""

    def __init__(self):
        self.prompt_id = "abc"
        self.history = lambda pid: {pid: {"outputs": {}, "status": {"status_str": "success"}}}
        self.requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.requests.append(("POST", self.path))
                body = {"prompt_id": fake.prompt_id} if self.path == "/prompt" else {}
                self._send(200, json.dumps(body).encode())

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                fake.requests.append(("GET", url.path))
                if url.path.startswith("/history/"):
                    answer = fake.history(urllib.parse.unquote(url.path[len("/history/"):]))
                    return self._send(200, answer if isinstance(answer, bytes) else json.dumps(answer).encode())
                if url.path == "/view":
                    query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
                    return self._send(200, PNG + query["filename"].encode("utf-8", "surrogateescape"))
                self._send(200, b"{}")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def outputs(self, outputs):
        self.history = lambda pid: {pid: {"outputs": outputs, "status": {"status_str": "success"}}}


@pytest.fixture
def server():
    fake = Hostile()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


def run(server, out, **kw):
    return headless.run_workflow(WORKFLOW, server.url, out_dir=out, poll=0.01, **kw)


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("answer", [
    lambda pid: {pid: ["not", "a", "dict"]},
    lambda pid: {pid: "finished"},
    lambda pid: ["a", "list"],
    lambda pid: b"[" * 100000,
    lambda pid: b"\xff\xfe not json",
    lambda pid: {pid: {"outputs": ["list"], "status": {}}},
])
def test_answers_of_the_wrong_shape_are_server_errors(server, tmp_path, answer):
    server.history = answer
    with pytest.raises(headless.ServerUnavailable, match=r"ComfyUI\?$"):
        run(server, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_outputs_of_the_wrong_types_are_skipped(server, tmp_path, caplog):
    server.outputs({"1": "x", "2": {"images": "x"}, "3": {"images": [5, {"filename": 7}, {"filename": ""},
                                                                      {"filename": "a.png", "subfolder": 3}]},
                    "4": {"images": [{"filename": "ok.png", "subfolder": "", "type": "output"}]}})
    (path,) = run(server, tmp_path / "out")
    assert path == tmp_path / "out" / "ok.png" and "skipped 4 output entries" in caplog.text


def test_file_names_never_leave_the_output_folder(server, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    out.mkdir(parents=True)
    (out / "link").symlink_to(outside, target_is_directory=True)
    names = [("../../escape.png", ""), ("/etc/passwd", ""), ("..", ""), ("x.png", "../../.."), ("y.png", "/abs"),
             ("z.png", "link"), ("a\\..\\..\\w.png", ""), ("n\0ul.png", ""), ("l" * 300 + ".png", ""),
             ("sub/../../v.png", "ok/../..")]
    server.outputs({"9": {"images": [{"filename": f, "subfolder": s, "type": "output"} for f, s in names]}})
    paths = run(server, out)
    assert files_under(tmp_path / "a") == sorted(f"b/out/{p}" for p in ["escape.png", "passwd", "x.png",
                                                                        "abs/y.png", "w.png", "ok/v.png"])
    assert [p.parent for p in paths] == [out, out, out, out / "abs", out, out / "ok"]
    assert list(outside.iterdir()) == [] and not (tmp_path / "escape.png").exists()


def test_two_outputs_of_one_name_and_an_existing_file_are_all_kept(server, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "AuraFlow_00001_.png").write_bytes(b"an earlier run")
    item = {"filename": "AuraFlow_00001_.png", "subfolder": "", "type": "output"}
    server.outputs({"9": {"images": [item, item]}, "10": {"images": [item]}})
    paths = run(server, out)
    assert [p.name for p in paths] == ["AuraFlow_00001__1.png", "AuraFlow_00001__2.png", "AuraFlow_00001__3.png"]
    assert (out / "AuraFlow_00001_.png").read_bytes() == b"an earlier run"


def test_huge_answers_are_bounded(server, tmp_path, monkeypatch):
    monkeypatch.setattr(client_mod, "MAX_JSON_BYTES", 1000)
    server.outputs({"9": {"images": [{"filename": f"f{i}.png", "subfolder": "", "type": "output"}
                                     for i in range(100)]}})
    with pytest.raises(headless.ServerUnavailable, match="the answer is over 1,000 bytes; not read"):
        run(server, tmp_path / "out")
    monkeypatch.setattr(client_mod, "MAX_JSON_BYTES", 10**6)
    monkeypatch.setattr(client_mod, "MAX_FILE_BYTES", 10)
    with pytest.raises(headless.ServerUnavailable, match="over 10 bytes"):
        run(server, tmp_path / "out")
    assert files_under(tmp_path) == []


def test_a_prompt_id_that_is_no_string_is_a_server_error(server, tmp_path):
    server.prompt_id = {"$ne": 1}
    with pytest.raises(headless.ServerUnavailable, match="without a prompt id"):
        run(server, tmp_path / "out")


@pytest.mark.parametrize("kw, message", [
    ({"timeout": float("nan")}, "timeout=nan: give the seconds to wait"),
    ({"timeout": -1}, "timeout=-1: give the seconds"),
    ({"timeout": float("inf")}, "timeout=inf"),
    ({"server": "file:///etc"}, "server='file:///etc': give ComfyUI's http:// or https:// address"),
    ({"server": "http://"}, "give ComfyUI's http"),
    ({"server": "127.0.0.1:8188\r\nX: y"}, "give ComfyUI's address"),
])
def test_bad_arguments_are_refused_before_anything_is_queued(server, tmp_path, kw, message):
    with pytest.raises(ParameterError, match=message):
        headless.run_workflow(WORKFLOW, kw.pop("server", server.url), out_dir=tmp_path, **kw)
    assert server.requests == []


def test_the_cli_says_it_in_flags(server, tmp_path, capsys):
    from aura_flow.cli import main

    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(WORKFLOW))
    assert main(["queue", str(wf), "--server", server.url, "--timeout", "nan"]) == 2
    assert "error: --timeout=nan: give the seconds to wait" in capsys.readouterr().err
    assert server.requests == []


def test_workflow_files_and_set_values_are_bounded(tmp_path, monkeypatch):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000)
    with pytest.raises(ParameterError, match=r"deep.json: not a JSON workflow \(RecursionError"):
        headless.load_workflow(deep)
    monkeypatch.setattr("aura_flow.headless.workflow.MAX_WORKFLOW_BYTES", 10)
    big = tmp_path / "big.json"
    big.write_text(json.dumps(WORKFLOW))
    with pytest.raises(ParameterError, match=r"big.json: \d+ bytes is too large for a workflow"):
        headless.load_workflow(big)
    nested = "[" * 100000
    assert headless.apply_sets(WORKFLOW, [f"9.filename_prefix={nested}"])["9"]["inputs"]["filename_prefix"] == nested
    many = {str(i): {"class_type": "X", "inputs": {}} for i in range(5000)}
    with pytest.raises(ParameterError, match="and 4980 more$") as info:
        headless.apply_sets(many, ["Nope.x=1"])
    assert len(str(info.value)) < 1000
