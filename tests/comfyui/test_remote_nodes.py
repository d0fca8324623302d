"""AuraFlow Remote Generate inside a real ComfyUI, against the stand-in fal queue (tests/fal_server.py) the session's
ComfyUI was started with (FAL_QUEUE_URL, FAL_KEY in its environment): three remote nodes in one API workflow wait for
the service together, so they finish in well under twice one node's time; every image is saved; the key is in
neither /history nor the saved files. See conftest.py for how to run."""
from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image

from aura_flow import headless
from aura_flow.images import read_metadata
from aura_flow.params import validate_generation
from remote_server import seed_colour  # tests/ is on sys.path (tests/conftest.py)

pytestmark = pytest.mark.comfyui

SERVICE_TIME = 3.0  # seconds the stand-in takes for each request (issue 21: "a 3 s service time")


def remote_prompt(seeds, prefix: str) -> dict:
    """An API workflow: one AuraFlow Remote Generate (provider fal, every other widget at its default) per seed,
    each saved by its own AuraFlow Save Image (png, workflow and metadata embedded)."""
    inputs = dict(validate_generation({}, remote=True), prompt="a lake at dawn", provider="fal", model="aura-flow")
    prompt = {}
    for n, seed in enumerate(seeds):
        prompt[f"{2 * n + 1}"] = {"class_type": "AuraFlowRemoteGenerate", "inputs": {**inputs, "seed": seed}}
        prompt[f"{2 * n + 2}"] = {"class_type": "AuraFlowSaveImage", "inputs": {
            "images": [f"{2 * n + 1}", 0], "filename_prefix": f"{prefix}_{seed}", "format": "png", "quality": 80,
            "embed_workflow": True}}
    return prompt


def run_timed(client: headless.ComfyClient, prompt: dict) -> tuple[float, dict]:
    """(seconds from POST /prompt until /history holds the finished prompt, its history entry). The prompt goes
    with an ``extra_pnginfo`` as the editor sends it, so the Save nodes embed what the remote node adds there."""
    body = {"prompt": prompt, "client_id": client.client_id,
            "extra_data": {"extra_pnginfo": {"workflow": {"note": "sent by test_remote_nodes"}}}}
    start = time.monotonic()
    status, answer = client.json("POST", "/prompt", body)
    assert status == 200 and isinstance(answer.get("prompt_id"), str), answer
    deadline = start + 120
    while (entry := client.history(answer["prompt_id"])) is None:
        assert time.monotonic() < deadline, "the prompt did not finish within 120 s"
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    assert entry["status"]["status_str"] == "success", entry["status"]
    return elapsed, entry


def test_three_remote_nodes_in_one_prompt_wait_together(comfy_server, fal_service):
    fal, key = fal_service
    client = headless.ComfyClient(comfy_server.url)
    submits_before = len(fal.submits)
    fal.service_time = SERVICE_TIME
    try:
        run_timed(client, remote_prompt([501], "fal_warm"))  # the first run imports and connects
        one, _ = run_timed(client, remote_prompt([502], "fal_one"))
        three, entry = run_timed(client, remote_prompt([503, 504, 505], "fal_three"))
    finally:
        fal.service_time = 0.0
    assert one >= SERVICE_TIME and three < 2 * one, f"one node {one:.2f} s, three nodes {three:.2f} s"

    # every node asked the service once, and its own image was saved with its own seed and request id
    bodies = [r["body"] for r in fal.submits[submits_before:]]
    assert len(bodies) == 5 and sorted(b["seed"] for b in bodies[2:]) == [503, 504, 505]
    ids = {job["body"]["seed"]: rid for rid, job in fal.jobs.items()}
    for node, seed in (("1", 503), ("3", 504), ("5", 505)):
        save = str(int(node) + 1)
        (item,) = entry["outputs"][save]["images"]
        assert item["filename"].startswith(f"fal_three_{seed}_")
        data = client.fetch(item)
        with Image.open(io.BytesIO(data)) as img:
            top = img.convert("RGB").getpixel((10, 10))
            assert img.size == (1024, 1024) and max(abs(a - b) for a, b in zip(top, seed_colour(seed))) <= 1
            meta = read_metadata(img)
        # the record of the node that made this image (the prompt's EXTRA_PNGINFO is shared by all three)
        assert meta["auraflow_remote"] == {"provider": "fal", "model": "aura-flow", "api_version": "queue",
                                           "failed": [], "images": [{"index": 0, "seed": seed,
                                                                     "request_id": ids[seed],
                                                                     "has_nsfw_concepts": False}]}, meta
        by_node = meta["auraflow_remote_nodes"]  # every remote node that had finished, by node id
        assert by_node[node] == meta["auraflow_remote"] and set(by_node) <= {"1", "3", "5"}
        # the key is nowhere in the file
        assert key.encode() not in data and key.split(":")[1].encode() not in data, f"the key is in {item}"

    # nor in what ComfyUI keeps or serves about the prompts, nor sent anywhere but to the queue
    history = client.request("GET", "/history")[1].decode()
    assert entry["prompt"][1] in history and key not in history and key.split(":")[1] not in history
    assert fal.media.requests and all(key not in json.dumps(r["headers"]) for r in fal.media.requests)
