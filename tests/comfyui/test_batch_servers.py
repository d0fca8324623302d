"""``batch --backend comfyui`` over two real ComfyUI processes on two ports (the session's server and a second one
sharing its pack and tiny models): every job done once, spread over both, each image its own job's, a rerun
sends nothing, and a job ComfyUI rejects fails alone. See conftest.py for how to run."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from aura_flow import batch
from aura_flow.batch.manifest import read_records
from aura_flow.images import read_metadata

from comfyui_support import launch

pytestmark = pytest.mark.comfyui

SMALL = {"steps": 2, "width": 256, "height": 256, "output_format": "png"}  # the tiny model's size, 2 CPU steps


@pytest.fixture
def second_server(comfy_base, tmp_path):
    """Another ComfyUI on its own port and output folder, with the session server's pack and models."""
    checkout, base = comfy_base
    base2 = tmp_path / "base2"
    for sub in ("user", "output", "temp"):
        (base2 / sub).mkdir(parents=True)
    for sub in ("custom_nodes", "models"):
        (base2 / sub).symlink_to(base / sub, target_is_directory=True)
    shutil.copytree(base / "input", base2 / "input")
    with launch(checkout, base2) as server:
        yield server


def test_batch_over_two_real_comfyui_servers(comfy_server, second_server, tmp_path):
    rows = [{"prompt": f"a small test picture number {i}", "seed": 40 + i, "name": f"pic{i}"} for i in range(6)]
    rows.append({"prompt": "rejected", "AuraFlowGenerate.scheduler": "nope"})  # ComfyUI's own validation says no
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    servers = [comfy_server.url, second_server.url]
    summary = batch.run(jobs, out, backend="comfyui", defaults=SMALL, progress=False, servers=servers,
                        per_server=2, timeout=600, poll=0.2)
    assert (summary.done, summary.failed) == (6, 1), summary.lines()
    records = [r for _, r in read_records(out / "manifest.jsonl")]
    done = [r for r in records if r["status"] == "done"]
    failed = [r for r in records if r["status"] == "failed"]
    assert len({r["job"] for r in done}) == 6
    assert {r["server"] for r in done} == set(servers)  # both servers pulled jobs
    assert failed[0]["line"] == 7 and "ComfyUI rejected the prompt" in failed[0]["error"] and \
        "nope" in failed[0]["error"]
    for r in done:
        row = rows[r["line"] - 1]
        (name,), (digest,) = r["files"], r["sha256"]
        data = (out / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest and name.startswith(f"{row['name']}_{row['seed']}")
        generate = read_metadata(out / name)["prompt"]["2"]["inputs"]  # the prompt ComfyUI ran for this file
        assert (generate["prompt"], generate["seed"], generate["width"]) == (row["prompt"], row["seed"], 256)
    # each prompt ran once, on the server the manifest names
    for server in (comfy_server, second_server):
        mine = {r["prompt_id"] for r in done if r["server"] == server.url}
        assert mine <= set(server.get_json("/history?max_items=100"))
    again = batch.run(jobs, out, backend="comfyui", defaults=SMALL, progress=False, servers=servers, timeout=600)
    assert (again.done, again.skipped_done, again.skipped_failed) == (0, 6, 1)
