"""A minimal client of ComfyUI's HTTP API: ``POST /prompt``, ``GET /history/<id>``, ``GET /queue``, ``GET /view``,
cancelling. Every answer is read with a size limit and checked for ComfyUI's shapes before it is used."""
from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from ..images import write_first_free
from .answers import (QueueError, ServerUnavailable, _dict, _list, destination, format_execution_error,
                      format_validation_error, free_names)

log = logging.getLogger(__name__)

DEFAULT_SERVER = "http://127.0.0.1:8188"
DEFAULT_TIMEOUT = 3600.0
MAX_JSON_BYTES = 64 * 1024 * 1024  # a /history or /queue answer
MAX_FILE_BYTES = 1024 * 1024 * 1024  # one downloaded file (a 16384x16384 png is about 800 MB at worst)


class ComfyClient:
    """A minimal client of ComfyUI's HTTP API."""

    def __init__(self, server: str = DEFAULT_SERVER, request_timeout: float = 30.0):
        if "://" not in server:
            server = "http://" + server
        self.server = server.rstrip("/")
        self.request_timeout = request_timeout
        self.client_id = uuid.uuid4().hex

    def request(self, method: str, path: str, body=None, limit: int | None = None) -> tuple[int, bytes]:
        """(status, body bytes) for any HTTP answer (at most ``limit`` bytes, `MAX_JSON_BYTES` by default);
        ServerUnavailable when there is none."""
        limit = MAX_JSON_BYTES if limit is None else limit
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout) as resp:
                return resp.status, self._read(resp, limit, method, path)
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read(64 * 1024)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerUnavailable(f"cannot reach ComfyUI at {self.server} ({reason}). Start it (python main.py "
                                    "--listen 127.0.0.1 --port 8188) or pass its address with --server") from None

    def _read(self, resp, limit: int, method: str, path: str) -> bytes:
        data = resp.read(limit + 1)
        if len(data) > limit:
            raise ServerUnavailable(f"{method} {self.server}{path}: the answer is over {limit:,} bytes; not read")
        return data

    def json(self, method: str, path: str, body=None):
        status, raw = self.request(method, path, body)
        try:
            data = json.loads(raw) if raw else {}
        except (ValueError, RecursionError):  # ValueError: not JSON, not UTF-8
            data = None
        if status >= 400 and not (status == 400 and isinstance(data, dict) and "error" in data):
            snippet = " ".join(raw[:300].decode("utf-8", "replace").split())
            raise ServerUnavailable(f"{method} {self.server}{path}: HTTP {status}: {snippet}")
        if not isinstance(data, dict):
            raise ServerUnavailable(f"{method} {self.server}{path}: the answer is not a JSON object; is {self.server} "
                                    "ComfyUI?")
        return status, data

    def submit(self, prompt: dict, prompt_id: str | None = None) -> str:
        """POST /prompt (under ``prompt_id`` when given: ComfyUI takes a client's own id); the prompt id, or
        QueueError with ComfyUI's validation errors."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if prompt_id is not None:
            body["prompt_id"] = prompt_id
        status, data = self.json("POST", "/prompt", body)
        if status == 400:
            raise QueueError(format_validation_error(data))
        prompt_id = data.get("prompt_id")
        if not isinstance(prompt_id, str) or not 0 < len(prompt_id) <= 200:
            raise ServerUnavailable(f"POST {self.server}/prompt answered without a prompt id; is {self.server} "
                                    "ComfyUI?")
        return prompt_id

    def history(self, prompt_id: str) -> dict | None:
        """The finished prompt's history entry, or None while it is queued or running."""
        _, data = self.json("GET", f"/history/{urllib.parse.quote(prompt_id, safe='')}")
        # ComfyUI writes the history entry only when the prompt has finished (PromptQueue.task_done)
        entry = data.get(prompt_id) or None
        if entry is not None and not isinstance(entry, dict):
            raise ServerUnavailable(f"GET {self.server}/history: the prompt's entry is a {type(entry).__name__}, not "
                                    "ComfyUI's JSON object; is the server ComfyUI?")
        return entry

    def queue_state(self, prompt_id: str) -> str | None:
        """"running", "queued (N ahead)" or None when ComfyUI's queue does not hold the prompt (GET /queue)."""
        _, data = self.json("GET", "/queue")
        running = [i for i in _list(data.get("queue_running")) if isinstance(i, list) and len(i) > 1]
        pending = [i for i in _list(data.get("queue_pending")) if isinstance(i, list) and len(i) > 1]
        if any(item[1] == prompt_id for item in running):
            return "running"
        mine = [item for item in pending if item[1] == prompt_id]
        if not mine:
            return None
        number = mine[0][0]
        ahead = len(running) + sum(1 for item in pending if isinstance(item[0], (int, float)) and
                                   isinstance(number, (int, float)) and item[0] < number)
        return f"queued ({ahead} ahead)"

    def wait(self, prompt_id: str, timeout: float = DEFAULT_TIMEOUT, poll: float = 0.5,
             check_every: float = 5.0) -> dict:
        """Poll /history until the prompt is finished; its outputs, or QueueError when it failed or vanished.

        Every ``check_every`` seconds /queue tells whether it is still queued or running (logged when that
        changes); a prompt in neither place nor in the history was deleted or lost with a server restart.
        """
        start = time.monotonic()
        next_check, state = start + check_every, None
        while True:
            entry = self.history(prompt_id)
            if entry is None and time.monotonic() >= next_check:
                new_state = self.queue_state(prompt_id)
                entry = self.history(prompt_id)  # it may have finished between the two requests
                if entry is None and new_state is None:
                    raise QueueError(f"prompt {prompt_id} is no longer in ComfyUI's queue nor in its history: it was "
                                     "deleted from the queue, or the server restarted. Queue it again.")
                if new_state != state:
                    log.info("prompt %s: %s (%.0f s)", prompt_id, new_state, time.monotonic() - start)
                next_check, state = time.monotonic() + check_every, new_state
            if entry is not None:
                status = _dict(entry.get("status"))
                if status.get("status_str") == "error":
                    raise QueueError(format_execution_error(status.get("messages")))
                return entry.get("outputs") or {}
            now = time.monotonic()
            if timeout and now - start > timeout:
                raise ServerUnavailable(f"prompt {prompt_id} did not finish within {timeout:g} s; it is still in "
                                        f"ComfyUI's queue at {self.server} (raise --timeout to wait longer)")
            time.sleep(min(poll, max(0.05, (now - start) / 4)))

    def cancel(self, prompt_id: str) -> None:
        """Remove the prompt from the queue, or interrupt it when it is running."""
        try:
            self.request("POST", "/queue", {"delete": [prompt_id]})
            self.request("POST", "/interrupt", {"prompt_id": prompt_id})
        except ServerUnavailable:
            pass

    def download(self, item: dict, out_dir):
        """GET /view for one output entry ``{"filename", "subfolder", "type"}``, written under ``out_dir`` (never
        outside it, never over a file: a name taken gets ``_1``, ``_2``...); the path written, or None when the
        entry names no usable file."""
        where = destination(out_dir, item)
        if where is None:
            return None
        folder, name = where
        return write_first_free(folder, self.fetch(item), free_names(name))

    def fetch(self, item: dict) -> bytes:
        """GET /view for one output entry ``{"filename", "subfolder", "type"}``: the file's bytes (at most
        `MAX_FILE_BYTES`)."""
        query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder") or "",
                                        "type": item.get("type") or "output"})
        status, raw = self.request("GET", f"/view?{query}", limit=MAX_FILE_BYTES)
        if status != 200:
            raise ServerUnavailable(f"GET {self.server}/view?{query[:300]}: HTTP {status}")
        return raw
