"""The ComfyUI batch backend against stand-in ComfyUI servers on 127.0.0.1 (tests/comfyui_standin.py): the pull
scheduler, exactly-once under a hung server, lost answers and reruns, rejected and failed jobs, and the workflow
filling. The runner's own sink is replaced by `RecordingSink` here; tests/test_batch_comfyui_run.py goes through
``aura_flow.batch.run`` and the CLI."""
from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from aura_flow.batch.comfyui import ComfyUIBackend, prompt_id
from aura_flow.batch.comfyui_workflow import WorkflowPlan
from aura_flow.batch.model import Job
from aura_flow.errors import ParameterError
from aura_flow.headless import ServerUnavailable, load_workflow
from aura_flow.params import DEFAULTS
from comfyui_standin import FAST, StandIn, executions_per_job, image_tag

API = Path(__file__).resolve().parents[1] / "example_workflows" / "api"


def make_job(line: int, prompt: str, seed: int | None = None, **params) -> Job:
    full = {**DEFAULTS, "prompt": prompt, "seed": line * 1000 + 7 if seed is None else seed,
            "output_format": "png", **params}
    return Job(line=line, index=0, params=full)


def jobs_of(n: int, word: str = "job", **params) -> list[Job]:
    return [make_job(i + 1, f"{word} {i + 1}", **params) for i in range(n)]


class RecordingSink:
    """The runner's sink as far as a backend sees it: records every call (thread-safe)."""

    def __init__(self, on_done=None):
        self.lock = threading.Lock()
        self.done_jobs, self.failed_jobs, self.starts, self.postfixes = {}, {}, [], []
        self.done_calls = Counter()
        self.on_done = on_done

    def started(self, job, where):
        with self.lock:
            self.starts.append((job.key, where["server"]))

    def submitted(self, job, where):
        raise AssertionError("the ComfyUI backend has no request ids")

    def resume_ids(self, job):
        return []

    def done(self, job, images=None, *, files=None, where, seconds, extra=None):
        assert images and files is None and seconds >= 0
        with self.lock:
            self.done_calls[job.key] += 1
            self.done_jobs[job.key] = (job, images, dict(where))
        if self.on_done:
            self.on_done(self)
        return []

    def failed(self, job, error, *, where, seconds):
        with self.lock:
            self.failed_jobs[job.key] = (job, error, dict(where))

    def postfix(self, values):
        with self.lock:
            self.postfixes.append(dict(values))


def run_backend(servers, jobs, sink=None, stop=None, **options) -> RecordingSink:
    sink = sink or RecordingSink()
    backend = ComfyUIBackend([s.url for s in servers], **{**FAST, **options})
    backend.check()
    for job in jobs:
        backend.check_job(job)
    backend.run(iter(jobs), sink, stop or threading.Event())
    backend.close()
    return sink


def assert_own_images(sink: RecordingSink) -> None:
    for job, images, where in sink.done_jobs.values():
        assert len(images) == job.params["number_of_images"]
        for i, data in enumerate(images):
            tag = image_tag(data)
            assert (tag["prompt"], tag["seed"], tag["index"]) == (job.params["prompt"], job.seed, i)
            assert tag["prompt_id"] == where["prompt_id"]


# ------------------------------------------------------------------------------------------- the scheduler
def test_jobs_spread_over_two_servers_each_done_once_with_its_own_images():
    jobs = jobs_of(12, number_of_images=2)
    with StandIn(0.05) as a, StandIn(0.05) as b:
        sink = run_backend([a, b], jobs, per_server=2)
    assert sorted(sink.done_jobs) == sorted(j.key for j in jobs) and not sink.failed_jobs
    assert set(sink.done_calls.values()) == {1}
    assert_own_images(sink)
    assert executions_per_job(a, b) == Counter({(j.params["prompt"], j.seed): 1 for j in jobs})
    assert len(a.completed) >= 3 and len(b.completed) >= 3  # both servers pulled work
    assert max(len(a.submits), len(b.submits)) <= 9
    assert all(n == 1 for n in (a.submits + b.submits).values())
    assert sink.postfixes and set(sink.postfixes[-1]) == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}


def test_at_most_per_server_jobs_in_flight_on_a_server():
    seen = []
    with StandIn(0.15) as a:
        def watch():
            while not a.halted.is_set():
                with a.lock:
                    seen.append(len(a.queue) + (a.running is not None))
                time.sleep(0.005)

        threading.Thread(target=watch, daemon=True).start()
        sink = run_backend([a], jobs_of(8), per_server=3)
    assert len(sink.done_jobs) == 8
    assert max(seen) == 3


def test_hung_server_jobs_finish_on_the_other_and_none_runs_twice():
    """A answers its first job, then stops: its socket closes with a job running and two queued (per_server 3).
    Those go to B; the job A finished (and whose images were fetched) is not run again anywhere."""
    jobs = jobs_of(10)
    with StandIn(0.15, hang_after=1) as a, StandIn(0.05) as b:
        sink = run_backend([a, b], jobs, per_server=3, wait_down=30)
    assert sorted(sink.done_jobs) == sorted(j.key for j in jobs) and not sink.failed_jobs
    assert set(sink.done_calls.values()) == {1}
    assert_own_images(sink)
    assert len(a.completed) == 1
    stranded = [pid for pid in a.submits if pid not in a.executions]
    assert len(stranded) >= 2  # A held a running and a queued job when it hung: the test means something
    by_pid = {w["prompt_id"]: w["server"] for _, _, w in sink.done_jobs.values()}
    assert all(by_pid[pid] == b.url for pid in stranded)
    assert executions_per_job(a, b) == Counter({(j.params["prompt"], j.seed): 1 for j in jobs})


def test_rejected_and_failed_jobs_fail_alone_with_comfyuis_text():
    jobs = [make_job(1, "fine one"), make_job(2, "bad words"), make_job(3, "boom"), make_job(4, "fine two")]
    with StandIn(0.03, reject={"bad words"}, fail={"boom"}) as a:
        sink = run_backend([a], jobs)
    assert sorted(j.line for j, _, _ in sink.done_jobs.values()) == [1, 4]
    errors = {job.line: error for job, error, _ in sink.failed_jobs.values()}
    assert sorted(errors) == [2, 3]
    assert "ComfyUI rejected the prompt" in errors[2] and "node 2 (AuraFlowGenerate)" in errors[2] and \
        "bad words" in errors[2]
    assert "ComfyUI failed the prompt in node 2 (AuraFlowGenerate): RuntimeError: boom: boom" in errors[3]


def test_a_job_that_every_server_answers_500_fails_alone_after_some_requeues():
    jobs = [make_job(1, "ok 1"), make_job(2, "poison"), make_job(3, "ok 2"), make_job(4, "ok 3")]
    with StandIn(0.03, error500={"poison"}) as a, StandIn(0.03, error500={"poison"}) as b:
        sink = run_backend([a, b], jobs)
    assert sorted(j.line for j, _, _ in sink.done_jobs.values()) == [1, 3, 4]
    (job, error, _), = sink.failed_jobs.values()
    assert job.line == 2 and "stopped answering 6 times" in error


def test_lost_submit_answer_asks_history_first_and_never_submits_twice():
    jobs = jobs_of(3)
    with StandIn(0.05, drop_submit=2) as a:
        sink = run_backend([a], jobs, per_server=1)
    assert len(sink.done_jobs) == 3 and not sink.failed_jobs
    assert a.submits == Counter({prompt_id(j): 1 for j in jobs})  # the lost answers were found, not resent
    assert set(a.executions.values()) == {1}


def test_rerun_collects_a_finished_or_queued_prompt_instead_of_running_it_again():
    done_before, queued_before, fresh = make_job(1, "earlier"), make_job(2, "still queued"), make_job(3, "new")
    with StandIn(0.2) as a:
        first = run_backend([a], [done_before])
        # an earlier run queued this one and died: it is still in the server's queue
        a.queue.append((99, prompt_id(queued_before), WorkflowPlan(API / "auraflow_generate.json").fill(queued_before)))
        sink = run_backend([a], [done_before, queued_before, fresh])
    assert len(first.done_jobs) == 1 and len(sink.done_jobs) == 3 and not sink.failed_jobs
    assert_own_images(sink)
    assert a.submits == Counter({prompt_id(done_before): 1, prompt_id(fresh): 1})
    assert a.executions == Counter({prompt_id(j): 1 for j in (done_before, queued_before, fresh)})


def test_a_failed_earlier_attempt_runs_again_under_a_new_id():
    job = make_job(1, "flaky")
    with StandIn(0.03, fail={"flaky"}) as a:
        first = run_backend([a], [job])
        a.fail.clear()
        second = run_backend([a], [job])
    assert len(first.failed_jobs) == 1 and len(second.done_jobs) == 1
    assert second.done_jobs[job.key][2]["prompt_id"] == prompt_id(job, 1)
    assert a.submits == Counter({prompt_id(job, 0): 1, prompt_id(job, 1): 1})


def test_stop_mid_run_then_rerun_does_every_job_exactly_once():
    jobs = jobs_of(8)
    stop = threading.Event()
    with StandIn(0.08) as a, StandIn(0.08) as b:
        first = run_backend([a, b], jobs, RecordingSink(on_done=lambda s: len(s.done_jobs) >= 3 and stop.set()),
                            stop=stop)
        assert 3 <= len(first.done_jobs) < 8
        time.sleep(0.3)  # the prompts left running finish on their servers
        rest = [j for j in jobs if j.key not in first.done_jobs]
        second = run_backend([a, b], rest)
    assert not (set(first.done_jobs) & set(second.done_jobs))
    assert sorted([*first.done_jobs, *second.done_jobs]) == sorted(j.key for j in jobs)
    assert executions_per_job(a, b) == Counter({(j.params["prompt"], j.seed): 1 for j in jobs})
    assert not a.queue and not b.queue


def test_a_server_that_dies_and_returns_takes_jobs_again():
    jobs = jobs_of(16)
    with StandIn(0.05) as a, StandIn(0.05) as b:
        def crash():
            while len(a.completed) < 2:
                time.sleep(0.01)
            a.kill()
            time.sleep(0.4)
            a.restart()

        t = threading.Thread(target=crash)
        t.start()
        sink = run_backend([a, b], jobs)
        t.join()
        after = len(a.completed)
    assert sorted(sink.done_jobs) == sorted(j.key for j in jobs) and not sink.failed_jobs
    assert_own_images(sink)
    assert after > 2  # it was tried again with backoff and took work
    assert set(sink.done_calls.values()) == {1}
    # only a prompt that finished in the instant of the crash, before its images were fetched, runs again
    assert sum(n - 1 for n in executions_per_job(a, b).values()) <= 1


def test_every_server_down_ends_the_run_with_a_clear_error():
    jobs = jobs_of(6)
    with StandIn(0.3, hang_after=1) as a:  # the second job is still running when the first is collected
        sink = RecordingSink()
        with pytest.raises(ServerUnavailable, match="no ComfyUI server answered for 0.5 s.*run the same command "
                                                    "again to resume"):
            run_backend([a], jobs, sink, wait_down=0.5)
    assert len(sink.done_jobs) == 1 and not sink.failed_jobs


# ------------------------------------------------------------------------------------------- checks
def test_checks_name_the_option_and_value():
    with StandIn() as a:
        for options, match in (({"per_server": 0}, "--per-server 0: give the jobs in flight per server, 1 to 64"),
                               ({"timeout": -1}, "timeout=-1"),
                               ({"workflow": API / "missing.json"}, "no such workflow file")):
            with pytest.raises(ParameterError, match=match):
                ComfyUIBackend([a.url], **options).check()
        with pytest.raises(ParameterError, match="given twice"):
            ComfyUIBackend([a.url, a.url]).check()
    with pytest.raises(ParameterError, match="--server: give at least one"):
        ComfyUIBackend([]).check()
    with pytest.raises(ServerUnavailable, match="no ComfyUI server answers"):
        ComfyUIBackend([a.url], request_timeout=1).check()


def test_loras_need_a_loader_and_sets_a_real_input():
    plan = WorkflowPlan(API / "auraflow_generate.json")
    lora_job = Job(line=5, index=0, params={**DEFAULTS, "seed": 1}, loras=(("style.safetensors", 0.8),))
    with pytest.raises(ParameterError, match=r"^loras: the job has 1 LoRA\(s\) but the workflow .* has no "
                                             "LoRA loader node"):
        plan.check_job(lora_job)
    bad_set = Job(line=7, index=0, params={**DEFAULTS, "seed": 1}, sets=(("2.nope", 3),))
    with pytest.raises(ParameterError, match="^2.nope=3: node 2 .* has no input 'nope'"):
        plan.check_job(bad_set)
    with pytest.raises(ParameterError, match="^Nothing.steps=3: no node has that id, title or class_type"):
        plan.check_job(Job(line=7, index=0, params={**DEFAULTS, "seed": 1}, sets=(("Nothing.steps", 3),)))


def test_generator_workflow_takes_every_key_and_the_save_format():
    job = Job(line=1, index=0, params={**DEFAULTS, "prompt": "a fox", "seed": 42, "steps": 30, "output_format": "png",
                                       "output_quality": 90}, sets=(("AuraFlowLoader.weight_dtype", "bf16"),))
    prompt = WorkflowPlan(API / "auraflow_generate.json").fill(job)
    gen = prompt["2"]["inputs"]
    assert {k: gen[k] for k in job.params} == dict(job.params)
    assert prompt["3"]["inputs"]["format"] == "png" and prompt["3"]["inputs"]["quality"] == 90
    assert prompt["1"]["inputs"]["weight_dtype"] == "bf16"
    assert gen["model"] == ["1", 0]  # links stay


def test_node_workflow_maps_by_input_name_and_fills_lora_loaders():
    workflow = load_workflow(API / "auraflow_txt2img_nodes.json")
    workflow["7"] = {"class_type": "AuraFlowLoraLoader", "inputs": {"model": ["1", 0], "lora_name": "x.safetensors",
                                                                    "strength": 1.0}}
    workflow["8"] = {"class_type": "AuraFlowLoraLoader", "inputs": {"model": ["7", 0], "lora_name": "y.safetensors",
                                                                    "strength": 1.0}}
    workflow["4"]["inputs"]["model"] = ["8", 0]
    job = Job(line=1, index=0, params={**DEFAULTS, "prompt": "a fox", "negative_prompt": "blur", "seed": 42,
                                       "sampler": "euler", "number_of_images": 3, "width": 512},
              loras=(("style.safetensors", 0.5),))
    prompt = WorkflowPlan(workflow).fill(job)
    assert prompt["2"]["inputs"]["text"] == "a fox" and prompt["3"]["inputs"]["text"] == "blur"
    sampler = prompt["4"]["inputs"]
    assert (sampler["seed"], sampler["sampler_name"], sampler["batch_size"], sampler["width"]) == (42, "euler", 3, 512)
    assert prompt["6"]["inputs"]["format"] == "webp"
    assert prompt["7"]["inputs"] == {"model": ["1", 0], "lora_name": "style.safetensors", "strength": 0.5}
    assert prompt["8"]["inputs"]["strength"] == 0.0  # a loader the job leaves unused is off
    with pytest.raises(ParameterError, match="has 3 LoRA.*only 2 LoRA loader node"):
        WorkflowPlan(workflow).fill(Job(line=1, index=0, params={**DEFAULTS, "seed": 1},
                                        loras=(("a", 1.0), ("b", 1.0), ("c", 1.0))))


def test_a_workflow_without_a_prompt_input_is_refused():
    workflow = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}
    with pytest.raises(ParameterError, match="no node takes the job's prompt"):
        WorkflowPlan(workflow)


@pytest.mark.heavy
def test_a_frozen_server_that_keeps_its_socket_open_is_left_after_the_request_timeout():
    jobs = jobs_of(8)
    with StandIn(0.05, hang_after=2, freeze=True) as a, StandIn(0.05) as b:
        sink = run_backend([a, b], jobs, request_timeout=0.5)
    assert sorted(sink.done_jobs) == sorted(j.key for j in jobs) and not sink.failed_jobs
    assert_own_images(sink)
    assert all(n == 1 for n in executions_per_job(a, b).values())
