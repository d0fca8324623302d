"""A stand-in ComfyUI server on 127.0.0.1 for the batch backend's tests and benchmark: a real threaded HTTP server
with ComfyUI's queue API, running ONE prompt at a time for a fixed service time, as ComfyUI does.

Endpoints: ``POST /prompt`` (a client's ``prompt_id`` is kept; a prompt without a ``prompt`` text or with a
rejected one gets 400 with ``error`` and ``node_errors``), ``GET /prompt`` (``exec_info.queue_remaining``),
``GET /queue``, ``POST /queue`` (``{"delete": [ids]}``, ``{"clear": true}``), ``POST /interrupt``,
``GET /history/<id>``, ``GET /view``.

A prompt's text is the ``prompt`` input of its AuraFlowGenerate-like node (or a ``text`` input), its seed the
``seed`` input, its image count ``number_of_images`` (or ``batch_size``). Each image is a small PNG (or the save
node's ``format``) whose colour derives from the prompt and seed (`job_colour`) and whose ``aura_test`` text chunk
holds ``{"prompt", "seed", "index", "prompt_id"}``: a test can tell that an image is its own job's.

Accounting: ``executions[prompt_id]`` counts the prompts run to completion, ``completed`` lists ``(prompt_id,
prompt, seed)`` in that order, ``submits[prompt_id]`` counts the POST /prompt of each id.

Faults: ``hang_after=N``: once N prompts have finished and their images were downloaded, the server stops (the
listening socket is closed, queued prompts never run, a running one never finishes); with ``freeze=True`` the
socket stays open instead and no request is answered any more. ``reject={text}``: 400 for a prompt with that text.
``fail={text}``: an execution_error for it. ``drop_submit=N``: the next N submits are queued but their connection
is closed without an answer (a lost answer). ``error500={text}``: HTTP 500 to the submit of that text. `kill` closes the socket and forgets the queue and history (a crash);
`restart` listens again on the same port. Every server stops by itself (`stop`, or the ``with`` block's end).
"""
from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import urllib.parse
import uuid
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image
from PIL.PngImagePlugin import PngInfo


# backend options for tests: quick polls, retries and backoff
FAST = dict(request_timeout=2.0, backoff=0.1, backoff_max=0.5, check_every=0.3, poll=0.05)


def executions_per_job(*servers) -> Counter:
    """(prompt, seed) -> how often the servers ran it to completion."""
    runs = Counter()
    for s in servers:
        for _, text, seed in s.completed:
            runs[(text, seed)] += 1
    return runs


def job_colour(prompt: str, seed: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{prompt}\0{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


def make_image(prompt: str, seed: int, index: int, pid: str, fmt: str = "png") -> bytes:
    img = Image.new("RGB", (8, 8), job_colour(prompt, seed))
    buf = io.BytesIO()
    if fmt == "png":
        info = PngInfo()
        info.add_text("aura_test", json.dumps({"prompt": prompt, "seed": seed, "index": index, "prompt_id": pid}))
        img.save(buf, "PNG", pnginfo=info)
    else:
        img.save(buf, {"webp": "WEBP", "jpg": "JPEG"}[fmt], quality=95)
    return buf.getvalue()


def image_tag(data: bytes) -> dict:
    """The ``aura_test`` chunk of a stand-in PNG."""
    return json.loads(Image.open(io.BytesIO(data)).text["aura_test"])


def _find(prompt: dict, *names):
    for node in prompt.values():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        for name in names:
            if name in inputs and not isinstance(inputs[name], list):
                return inputs[name]
    return None


def _canonical_uuid(value) -> bool:
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value
    except ValueError:
        return False


class _HTTP(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


class StandIn:
    def __init__(self, service: float = 0.05, *, port: int = 0, hang_after: int | None = None,
                 freeze: bool = False, reject=(), fail=(), drop_submit: int = 0, error500=()):
        self.service, self.port = service, port
        self.hang_after, self.freeze = hang_after, freeze
        self.reject, self.fail, self.drop_submit, self.error500 = set(reject), set(fail), drop_submit, set(error500)
        self.executions, self.submits, self.completed = Counter(), Counter(), []
        self.views_left: dict[str, int] = {}
        self.finished_and_fetched = 0
        self.lock = threading.Condition()
        self.halted = threading.Event()  # hung, frozen or killed: nothing runs any more
        self.closing = threading.Event()
        self.httpd = None
        self._fresh_state()

    def _fresh_state(self):
        self.queue, self.running, self.history, self.files = deque(), None, {}, {}
        self.number, self.interrupt = 0, False

    # ------------------------------------------------------------------------------------------- life
    def start(self) -> "StandIn":
        handler = type("Handler", (_Handler,), {"standin": self})
        self.httpd = _HTTP(("127.0.0.1", self.port), handler)
        self.port = self.httpd.server_address[1]
        self.halted.clear()
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _close_socket(self):
        httpd, self.httpd = self.httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()

    def hang(self) -> None:
        self.halted.set()
        with self.lock:
            self.lock.notify_all()
        threading.Thread(target=self._close_socket, daemon=True).start()

    def kill(self) -> None:
        """A crash: the socket closes, the queue and history are gone."""
        self.halted.set()
        with self.lock:
            self.lock.notify_all()
        self._close_socket()
        self.worker.join(5)
        with self.lock:
            self._fresh_state()

    def restart(self) -> None:
        self.start()

    def stop(self) -> None:
        self.closing.set()
        self.halted.set()
        with self.lock:
            self.lock.notify_all()
        self._close_socket()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------------------------------- the queue
    def _work(self):
        while not self.halted.is_set():
            with self.lock:
                while not self.queue and not self.halted.is_set():
                    self.lock.wait(0.1)
                if self.halted.is_set():
                    return
                number, pid, prompt = self.queue.popleft()
                self.running, self.interrupt = (number, pid, prompt), False
            end = time.monotonic() + self.service
            while time.monotonic() < end and not self.halted.is_set() and not self.interrupt:
                time.sleep(min(0.01, max(0.0, end - time.monotonic())))
            if self.halted.is_set():
                return
            self._finish(pid, prompt, interrupted=self.interrupt)

    def _finish(self, pid, prompt, interrupted: bool):
        text, seed = _find(prompt, "prompt", "text"), _find(prompt, "seed", "noise_seed")
        count = _find(prompt, "number_of_images", "batch_size") or 1
        fmt = _find(prompt, "format") or "png"
        with self.lock:
            self.running = None
            if interrupted or text in self.fail:
                event = ("execution_interrupted", {"node_id": "2", "node_type": "AuraFlowGenerate"}) if interrupted \
                    else ("execution_error", {"node_id": "2", "node_type": "AuraFlowGenerate",
                                              "exception_type": "RuntimeError", "exception_message": f"boom: {text}"})
                self.history[pid] = {"prompt": [0, pid, prompt], "outputs": {},
                                     "status": {"status_str": "error", "completed": False, "messages": [list(event)]}}
                return
            images = []
            for i in range(int(count)):
                name = f"ComfyUI_{len(self.files) + 1:05d}_.{fmt}"
                self.files[name] = make_image(text, seed, i, pid, fmt)
                images.append({"filename": name, "subfolder": "", "type": "output"})
            self.executions[pid] += 1
            self.completed.append((pid, text, seed))
            self.views_left[pid] = len(images)
            self.history[pid] = {"prompt": [0, pid, prompt], "outputs": {"3": {"images": images}},
                                 "status": {"status_str": "success", "completed": True, "messages": []}}

    def viewed(self, name: str) -> None:
        """A file was downloaded: the hang fault counts finished prompts whose images all were."""
        with self.lock:
            for pid, entry in self.history.items():
                names = [i["filename"] for o in entry["outputs"].values() for i in o["images"]]
                if name in names and self.views_left.get(pid):
                    self.views_left[pid] -= 1
                    if self.views_left[pid] == 0:
                        self.finished_and_fetched += 1
            hang = self.hang_after is not None and self.finished_and_fetched >= self.hang_after
        if hang and not self.halted.is_set():
            if self.freeze:
                self.halted.set()
            else:
                self.hang()


class _Handler(BaseHTTPRequestHandler):
    standin: StandIn
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def _frozen(self) -> bool:
        s = self.standin
        if s.freeze and s.halted.is_set() and not s.closing.is_set():
            s.closing.wait(30)  # never answers; the client's timeout ends the request
            return True
        return False

    def _json(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def do_GET(self):
        if self._frozen():
            return
        s, url = self.standin, urllib.parse.urlsplit(self.path)
        if url.path == "/prompt":
            with s.lock:
                return self._json(200, {"exec_info": {"queue_remaining": len(s.queue) + (s.running is not None)}})
        if url.path == "/queue":
            with s.lock:
                running = [[*s.running, {}, []]] if s.running else []
                pending = [[n, pid, p, {}, []] for n, pid, p in s.queue]
            return self._json(200, {"queue_running": running, "queue_pending": pending})
        if url.path.startswith("/history/"):
            pid = urllib.parse.unquote(url.path[len("/history/"):])
            with s.lock:
                entry = s.history.get(pid)
            return self._json(200, {pid: entry} if entry else {})
        if url.path == "/view":
            name = urllib.parse.parse_qs(url.query).get("filename", [""])[0]
            with s.lock:
                data = s.files.get(name)
            if data is None:
                return self._json(404, {"error": "no such file"})
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
            s.viewed(name)
            return
        self._json(404, {"error": "not found"})

    def do_POST(self):
        if self._frozen():
            return
        s, path, body = self.standin, self.path, self._body()
        if path == "/prompt":
            prompt, pid = body.get("prompt"), body.get("prompt_id") or str(uuid.uuid4())
            if not _canonical_uuid(pid):  # as ComfyUI's validate_job_id
                return self._json(400, {"error": {"type": "invalid_prompt_id", "message": "prompt_id must be a "
                                                  "valid UUID"}, "node_errors": {}})
            text = _find(prompt, "prompt", "text") if isinstance(prompt, dict) else None
            if not isinstance(text, str) or text in s.reject:
                return self._json(400, {"error": {"type": "prompt_outputs_failed_validation",
                                                  "message": "Prompt outputs failed validation", "details": ""},
                                        "node_errors": {"2": {"class_type": "AuraFlowGenerate", "errors": [
                                            {"message": "Value not allowed", "details": f"prompt: {text!r}"}]}}})
            if text in s.error500:
                return self._json(500, {"message": "Internal Server Error"})
            with s.lock:
                s.number += 1
                s.submits[pid] += 1
                s.queue.append((s.number, pid, prompt))
                s.lock.notify_all()
                drop = s.drop_submit > 0
                s.drop_submit -= drop
            if drop:  # queued, but the answer is lost on the way
                self.close_connection = True
                return
            return self._json(200, {"prompt_id": pid, "number": s.number, "node_errors": {}})
        if path == "/queue":
            with s.lock:
                if body.get("clear"):
                    s.queue.clear()
                gone = set(body.get("delete") or ())
                s.queue = deque(item for item in s.queue if item[1] not in gone)
            return self._json(200, {})
        if path == "/interrupt":
            with s.lock:
                if s.running and body.get("prompt_id") in (None, s.running[1]):
                    s.interrupt = True
            return self._json(200, {})
        self._json(404, {"error": "not found"})
