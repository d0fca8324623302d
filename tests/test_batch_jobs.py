"""Job files (issue 19): JSONL, CSV and text read streaming into checked jobs, --seeds / --grid expansion, fixed
seeds for unseeded lines, and errors that name the file, the line and the key (no model needed)."""
from __future__ import annotations

import json
import tracemalloc

import pytest

from aura_flow.batch.jobs import (MAX_LINE_BYTES, JobFileError, parse_grid, read_jobs)
from aura_flow.errors import ParameterError

SMALL = {"width": 64, "height": 64, "steps": 2, "sampler": "euler"}


def _jsonl(path, *objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs), encoding="utf-8")
    return path


def test_jsonl_lines_defaults_comments_and_line_numbers(tmp_path):
    f = _jsonl(tmp_path / "jobs.jsonl", {"prompt": "a fox", "seed": 7}, "# a comment", "",
               {"prompt": "a cat", "steps": 3, "cfg": 1, "name": "cat"})
    jobs = list(read_jobs(f, defaults=SMALL))
    assert [j.line for j in jobs] == [1, 4]
    assert jobs[0].params["seed"] == 7 and jobs[0].params["steps"] == 2 and jobs[0].params["width"] == 64
    assert jobs[1].params["steps"] == 3 and jobs[1].params["cfg"] == 1.0 and jobs[1].name == "cat"
    assert jobs[1].file_names("webp") == [f"cat_{jobs[1].seed}_00.webp"]
    assert not any(j.expands for j in jobs)


def test_csv_and_text_formats(tmp_path):
    csv_file = tmp_path / "jobs.csv"
    csv_file.write_text('prompt,seed,steps,loras,name\n"a fox, red",5,3,,fox\n\nplain,,,[],\n', encoding="utf-8")
    a, b = read_jobs(csv_file, defaults=SMALL)
    assert (a.line, a.params["prompt"], a.seed, a.params["steps"], a.name) == (2, "a fox, red", 5, 3, "fox")
    assert (b.line, b.params["prompt"], b.params["steps"], b.loras, b.name) == (4, "plain", 2, (), None)
    txt = tmp_path / "prompts.txt"
    txt.write_text("a fox\n\n# skipped\na cat {x:1.2}\n", encoding="utf-8")
    assert [(j.line, j.params["prompt"]) for j in read_jobs(txt, defaults=SMALL)] == [(1, "a fox"),
                                                                                      (4, "a cat {x:1.2}")]


def test_seeds_expand_from_the_jobs_seed_and_wrap(tmp_path):
    f = _jsonl(tmp_path / "j.jsonl", {"prompt": "a", "seed": 2**64 - 2}, {"prompt": "b", "seed": 10.0})
    jobs = list(read_jobs(f, defaults=SMALL, seeds=3))
    assert [j.seed for j in jobs] == [2**64 - 2, 2**64 - 1, 0, 10, 11, 12]
    assert [j.index for j in jobs] == [0, 1, 2, 0, 1, 2] and all(j.expands for j in jobs)
    assert len({j.key for j in jobs}) == 6 and len({j.stem for j in jobs}) == 6


def test_unseeded_lines_get_the_same_seed_on_every_read_and_duplicates_differ(tmp_path):
    f = _jsonl(tmp_path / "j.jsonl", {"prompt": "a fox"}, {"prompt": "a cat"}, {"prompt": "a fox"})
    first = [j.seed for j in read_jobs(f, defaults=SMALL)]
    assert first == [j.seed for j in read_jobs(f, defaults=SMALL)]
    assert len(set(first)) == 3 and all(0 <= s < 2**53 for s in first)
    # the seed depends on the parameters: another step count draws another seed
    assert [j.seed for j in read_jobs(f, defaults={**SMALL, "steps": 3})] != first
    # a seed from the defaults (the --seed flag) is every unseeded line's seed
    assert {j.seed for j in read_jobs(f, defaults={**SMALL, "seed": 99})} == {99}


def test_grid_is_the_cartesian_product_per_line_sharing_the_lines_seed(tmp_path):
    f = _jsonl(tmp_path / "j.jsonl", {"prompt": "a"}, {"prompt": "b", "seed": 4})
    grid = parse_grid(["steps=2,3", "sampler=euler,heun,dpmpp_2m"])
    assert grid == [("steps", [2, 3]), ("sampler", ["euler", "heun", "dpmpp_2m"])]
    jobs = list(read_jobs(f, defaults=SMALL, grid=grid))
    assert len(jobs) == 12 and len({j.key for j in jobs}) == 12
    cells = [(j.params["steps"], j.params["sampler"]) for j in jobs[:6]]
    assert cells == [(2, "euler"), (2, "heun"), (2, "dpmpp_2m"), (3, "euler"), (3, "heun"), (3, "dpmpp_2m")]
    assert len({j.seed for j in jobs[:6]}) == 1 and {j.seed for j in jobs[6:]} == {4}
    assert len(list(read_jobs(f, defaults=SMALL, grid=grid, seeds=2))) == 24


def test_bad_steps_names_file_line_and_key(tmp_path):
    f = _jsonl(tmp_path / "jobs.jsonl", *[{"prompt": f"p{i}"} for i in range(4)], {"prompt": "x", "steps": 500})
    with pytest.raises(JobFileError) as err:
        list(read_jobs(f, defaults=SMALL))
    assert str(err.value) == f"{f} line 5: steps=500 is out of range; allowed: 1..100"
    assert isinstance(err.value, ParameterError)


@pytest.mark.parametrize("content, expected", [
    (b'{"prompt": "a", "stepz": 3}\n', "line 1: stepz: unknown key; known: prompt,"),
    (b'{"prompt": "a", "KSampler.steps": 3}\n', "line 1: KSampler.steps: unknown key; known: prompt,"),
    (b'\n["a"]\n', "line 2: a JSON list, not an object"),
    (b'{"prompt": "a"\n', "line 1: not valid JSON"),
    (b'{"prompt": "a"}\n{"prompt": "\xff"}\n', "line 2: not UTF-8 text"),
    (b'{"prompt": "a", "name": "../x"}\n', "line 1: name='../x' cannot name a file"),
    (b'{"prompt": "a", "name": "a\\u0000b"}\n', "line 1: name='a\\x00b' cannot name a file"),
    (b'{"prompt": "a", "loras": [["x.safetensors", 20]]}\n', "line 1: loras: strength 20 of x.safetensors"),
    (b'{"prompt": "a", "loras": "x"}\n', "line 1: loras='x' is not a list"),
    (b'{"prompt": "a", "width": 65}\n', "line 1: width=65 is not a multiple of 8"),
])
def test_bad_lines_are_named(tmp_path, content, expected):
    f = tmp_path / "jobs.jsonl"
    f.write_bytes(content)
    with pytest.raises(JobFileError, match=None) as err:
        list(read_jobs(f, defaults=SMALL, check_lora_files=False))
    assert str(err.value).startswith(f"{f} {expected}"), str(err.value)


def test_workflow_inputs_only_for_a_backend_that_takes_them(tmp_path):
    f = _jsonl(tmp_path / "j.jsonl", {"prompt": "a", "seed": 1, "12.text": "hi", "3.cfg": 2})
    (job,) = read_jobs(f, defaults=SMALL, accepts_sets=True)
    assert job.sets == (("12.text", "hi"), ("3.cfg", 2))
    with pytest.raises(JobFileError, match="need --backend comfyui"):
        list(read_jobs(f, defaults=SMALL))


def test_bounded_cost_lines_seeds_grid_and_csv(tmp_path):
    f = tmp_path / "long.txt"
    f.write_bytes(b"ok\n" + b"x" * (MAX_LINE_BYTES + 10) + b"\n")
    with pytest.raises(JobFileError, match=r"long.txt line 2: longer than 1,048,576 bytes"):
        list(read_jobs(f, defaults=SMALL))
    g = _jsonl(tmp_path / "j.jsonl", {"prompt": "a"})
    with pytest.raises(ParameterError, match=r"seeds=10001 is out of range; allowed: 1..10000"):
        list(read_jobs(g, seeds=10001))
    with pytest.raises(ParameterError, match="--grid makes over 10,000 jobs a line"):
        list(read_jobs(g, grid=[("steps", list(range(1, 101))), ("cfg", list(range(101)))]))
    with pytest.raises(ParameterError, match="--grid stepz: unknown key"):
        list(read_jobs(g, grid=[("stepz", [1])]))
    with pytest.raises(JobFileError, match=r"j.jsonl line 1 \(--grid steps=500\): steps=500 is out of range"):
        list(read_jobs(g, defaults=SMALL, grid=parse_grid(["steps=2,500"])))
    c = tmp_path / "j.csv"
    c.write_text("prompt,seed\na,1,extra\n", encoding="utf-8")
    with pytest.raises(JobFileError, match="j.csv line 2: 3 cells but the header names 2 columns"):
        list(read_jobs(c))
    with pytest.raises(ParameterError, match="--grid steps: write KEY=V1,V2"):
        parse_grid(["steps"])


def test_reading_is_streaming(tmp_path):
    """A text file of many lines costs memory per line only for the unseeded-line counter (~100 bytes), far below
    keeping the jobs (a Job with its parameters is well over 1 KB)."""
    n = 6000
    f = tmp_path / "many.txt"
    f.write_text("".join(f"prompt number {i}\n" for i in range(n)), encoding="utf-8")
    list(read_jobs(f, defaults=SMALL))  # imports and the schedule check, outside the measure
    tracemalloc.start()
    try:
        count = 0
        for _ in read_jobs(f, defaults=SMALL):
            count += 1
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        kept = list(read_jobs(f, defaults=SMALL))
        kept_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == len(kept) == n
    assert peak < 250 * n, peak
    assert kept_peak > 5 * peak, (kept_peak, peak)
