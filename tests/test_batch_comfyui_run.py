"""``batch --backend comfyui`` end to end: ``aura_flow.batch.run`` and the CLI over stand-in ComfyUI servers on
127.0.0.1 (tests/comfyui_standin.py): the manifest, the files, reruns, Ctrl-C, and the checks before anything is
sent."""
from __future__ import annotations

import _thread
import hashlib
import json
import threading
import time
from collections import Counter

import pytest

from aura_flow import batch
from aura_flow.batch.jobs import JobFileError
from aura_flow.batch.manifest import read_records
from aura_flow.batch.progress import Progress
from aura_flow.cli import main
from comfyui_standin import FAST, StandIn, executions_per_job, image_tag

PNG = {"output_format": "png"}


def write_jobs(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def done_records(out) -> list[dict]:
    return [r for _, r in read_records(out / "manifest.jsonl") if r["status"] == "done"]


def test_run_over_two_servers_one_hanging_writes_one_done_line_per_job(tmp_path):
    rows = [{"prompt": f"a fox number {i}", "seed": 100 + i, "name": f"fox{i}"} for i in range(8)]
    rows[3]["number_of_images"] = 2
    jobs = write_jobs(tmp_path / "jobs.jsonl", rows)
    out = tmp_path / "out"
    with StandIn(0.1, hang_after=1) as a, StandIn(0.05) as b:
        summary = batch.run(jobs, out, backend="comfyui", defaults=PNG, progress=False, servers=[a.url, b.url],
                            per_server=3, **FAST)
        records = done_records(out)
        assert (summary.done, summary.failed, summary.images) == (8, 0, 9)
        assert len(records) == 8 and len({r["job"] for r in records}) == 8
        files = [f for r in records for f in r["files"]]
        assert len(set(files)) == 9 and sorted(p.name for p in out.iterdir() if p.suffix == ".png") == sorted(files)
        for r in records:
            row = rows[r["line"] - 1]
            assert r["backend"] == "comfyui" and r["server"] in (a.url, b.url) and r["prompt_id"]
            for i, (name, digest) in enumerate(zip(r["files"], r["sha256"])):
                data = (out / name).read_bytes()
                assert hashlib.sha256(data).hexdigest() == digest
                assert name.startswith(f"{row['name']}_{row['seed']}_{i:02d}")  # named after the job
                assert (image_tag(data)["prompt"], image_tag(data)["seed"]) == (row["prompt"], row["seed"])
        assert len(a.completed) == 1 and sum(executions_per_job(a, b).values()) == 8
        assert set(executions_per_job(a, b).values()) == {1}
        submits = sum(b.submits.values())
        # a rerun: everything is done; nothing is sent, no file is touched
        stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        again = batch.run(jobs, out, backend="comfyui", defaults=PNG, progress=False, servers=[b.url], **FAST)
        assert (again.done, again.skipped_done) == (0, 8)
        assert sum(b.submits.values()) == submits
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


class PostfixLog(Progress):
    """The runner's progress, keeping every postfix the backend set (its per-server counts)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def postfix(self, values) -> None:
        super().postfix(values)
        self.seen.append(dict(values))


def test_per_server_counts_reach_the_progress(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": f"cat {i}", "seed": i} for i in range(6)])
    progress = PostfixLog()
    with StandIn(0.05) as a, StandIn(0.05) as b:
        batch.run(jobs, tmp_path / "out", backend="comfyui", defaults=PNG, progress=progress,
                  servers=[a.url, b.url], per_server=2, **FAST)
        labels = {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    assert all(set(seen) == labels for seen in progress.seen)
    in_flight = [int(v.split("/")[0]) for seen in progress.seen for v in seen.values()]
    assert max(in_flight) == 2  # per_server, never more
    last = progress.seen[-1]
    assert sum(int(v.split("/")[1]) for v in last.values()) == 6 and all(v.startswith("0/") for v in last.values())


def test_node_input_keys_go_into_the_workflow_and_bad_ones_stop_the_run_before_sending(tmp_path):
    with StandIn(0.02) as a:
        good = write_jobs(tmp_path / "good.jsonl", [{"prompt": "x", "AuraFlowLoader.weight_dtype": "bf16"}])
        batch.run(good, tmp_path / "o1", backend="comfyui", defaults=PNG, progress=False, servers=[a.url], **FAST)
        sent = next(iter(a.history.values()))["prompt"][2]
        assert sent["1"]["inputs"]["weight_dtype"] == "bf16" and sent["2"]["inputs"]["prompt"] == "x"
        bad = write_jobs(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": "y", "2.nope": 1}])
        with pytest.raises(JobFileError, match=r"bad.jsonl line 2: 2.nope=1: node 2 \(AuraFlowGenerate\) has no "
                                               "input 'nope'"):
            batch.run(bad, tmp_path / "o2", backend="comfyui", progress=False, servers=[a.url], **FAST)
        loras = write_jobs(tmp_path / "loras.jsonl", [{"prompt": "z", "loras": [["style.safetensors", 0.5]]}])
        with pytest.raises(JobFileError, match="loras.jsonl line 1: loras: .* no LoRA loader node"):
            batch.run(loras, tmp_path / "o3", backend="comfyui", progress=False, servers=[a.url], **FAST)
        assert sum(a.submits.values()) == 1


def test_ctrl_c_mid_run_then_rerun_does_every_job_exactly_once(tmp_path):
    rows = [{"prompt": f"owl {i}", "seed": i} for i in range(10)]
    jobs = write_jobs(tmp_path / "jobs.jsonl", rows)
    out = tmp_path / "out"
    with StandIn(0.1) as a, StandIn(0.1) as b:
        def interrupt():
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and len(done_records(out) if (out / "manifest.jsonl").exists()
                                                       else []) < 3:
                time.sleep(0.01)
            _thread.interrupt_main()

        t = threading.Thread(target=interrupt)
        t.start()
        first = batch.run(jobs, out, backend="comfyui", defaults=PNG, progress=False, servers=[a.url, b.url], **FAST)
        t.join()
        assert first.interrupted and 3 <= first.done < 10 and first.exit_code == 130
        time.sleep(0.3)  # the prompts left running finish on their servers; the rerun collects them
        second = batch.run(jobs, out, backend="comfyui", defaults=PNG, progress=False, servers=[a.url, b.url],
                           **FAST)
        assert second.done == 10 - first.done and second.skipped_done == first.done
        keys = Counter(r["job"] for r in done_records(out))
        assert len(keys) == 10 and set(keys.values()) == {1}
        assert executions_per_job(a, b) == Counter({(r["prompt"], r["seed"]): 1 for r in rows})


def test_cli_batch_comfyui(tmp_path, capsys):
    jobs = tmp_path / "prompts.txt"
    jobs.write_text("a red fox\na blue owl\na green frog\n", encoding="utf-8")
    out = tmp_path / "out"
    with StandIn(0.02) as a, StandIn(0.02) as b:
        code = main(["batch", str(jobs), "--out", str(out), "--backend", "comfyui", "--server", a.url,
                     "--server", b.url.removeprefix("http://"), "--per-server", "1", "--output-format", "png",
                     "--seed", "5"])
        assert code == 0, capsys.readouterr().err
        records = done_records(out)
        assert sorted(image_tag((out / r["files"][0]).read_bytes())["prompt"] for r in records) == \
            ["a blue owl", "a green frog", "a red fox"]
        assert "done 3, failed 0" in capsys.readouterr().err
    # the servers are gone now: the check says so before anything runs (exit 3)
    code = main(["batch", str(jobs), "--out", str(tmp_path / "out2"), "--backend", "comfyui", "--server", a.url,
                 "--output-format", "png", "--seed", "5"])
    assert code == 3 and "no ComfyUI server answers" in capsys.readouterr().err
    for argv, message in ((["--backend", "comfyui", "--per-server", "0", "--server", a.url],
                           "--per-server 0: give the jobs in flight per server, 1 to 64"),
                          (["--backend", "comfyui"], "--server: give at least one ComfyUI address"),
                          (["--server", a.url], "--server is a flag of --backend comfyui, not of --backend local")):
        code = main(["batch", str(jobs), "--out", str(tmp_path / "out3"), *argv])
        assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out3" / "manifest.jsonl").exists() or not done_records(tmp_path / "out3")
