"""Hostile non-file inputs, as an attacker and a careless user give them (issue 20): command-line flags and paths,
job files and a hand-edited manifest, workflows for ``queue``, node inputs. Each case asserts the exit code or the
error type, that the message names the parameter and the value, and that nothing was written or sent."""
from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

from aura_flow.batch.jobs import JobFileError, check_name, parse_grid, raw_lines, read_jobs
from aura_flow.batch.manifest import Manifest
from aura_flow.cli import main
from aura_flow.errors import LoadError, ParameterError
from aura_flow.headless import check_server, check_workflow, load_workflow, parse_value
from workflow_exec import load_pack

SMALL = {"width": 64, "height": 64, "steps": 2, "sampler": "euler"}


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the command line
def test_an_out_path_over_the_file_systems_limits_is_a_flag_error(tmp_path, capsys):
    for out in (tmp_path / ("x" * 300), tmp_path / "/".join(["y"] * 3000)):
        code, err = _cli(capsys, "generate", "--checkpoint", str(tmp_path / "never-read"), "--out", str(out))
        assert code == 2 and "Traceback" not in err
        assert err.startswith("error: --out ") and "cannot be used as a folder (File name too long); give a " \
                                                       "shorter path" in err
        assert len(err) < 400  # the 6000-character path is shortened in the message
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["0", "-1", "33", "99999999999999999999"])
def test_remote_concurrency_out_of_range_is_refused_before_the_key(value, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEGMIND_API_KEY", "SG_0123456789abcdef")
    monkeypatch.setenv("SEGMIND_API_URL", "http://127.0.0.1:9/v1/aura-flow")  # nothing listens: never reached
    t0 = time.perf_counter()
    code, err = _cli(capsys, "remote", "--concurrency", value, "--out", str(tmp_path / "out"))
    assert code == 2 and time.perf_counter() - t0 < 2
    assert f"error: --concurrency={value} is out of range; give requests at a time, 1 to 32" in err
    assert not (tmp_path / "out").exists()


def test_the_client_and_the_batch_backend_share_the_concurrency_rule():
    from aura_flow.batch.hosted import HostedBackend
    from aura_flow.remote import RemoteClient

    for bad in (0, -3, 33, 2.0, True, "2"):
        with pytest.raises(ParameterError, match=r"max_concurrency=.* is out of range; .* 1 to 32"):
            RemoteClient("SG_0123456789abcdef", url="http://127.0.0.1:9/v1/aura-flow", max_concurrency=bad)
        with pytest.raises(ParameterError, match=r"^concurrency=.* is out of range; .* 1 to 32"):
            HostedBackend(concurrency=bad)
    assert RemoteClient("SG_0123456789abcdef", url="http://127.0.0.1:9/v1/aura-flow", max_concurrency=32)


@pytest.mark.parametrize("grid, message", [
    ("steps", "error: --grid steps: write KEY=V1,V2,..., e.g. --grid steps=10,20,30"),
    ("prompt=", "error: --grid prompt=: write KEY=V1,V2,..., e.g. --grid steps=10,20,30"),
])
def test_grid_errors_keep_the_grids_own_words(grid, message, tmp_path, capsys):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a fox\n")
    code, err = _cli(capsys, "batch", str(jobs), "--out", str(tmp_path / "out"), "--grid", grid, "--dry-run")
    assert code == 2 and err.strip() == message  # not "--steps=10" (a flag's rewording of the example)
    with pytest.raises(ParameterError, match=r"--grid 'xxxxx.*… \(100,002 characters\): write KEY=V1"):
        parse_grid(["x" * 100_000])


def test_a_lora_path_too_long_for_any_file_system(tmp_path, capsys):
    from aura_flow.pipeline.loras import check_loras

    with pytest.raises(LoadError, match=r"'xxxx.*\(5,002 characters\): not a path to a LoRA file \(File name too "
                                        r"long\); check the path"):
        check_loras([("x" * 5000, 1.0)])
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a", "loras": [["y" * 5000, 1]]}) + "\n")
    code, err = _cli(capsys, "batch", str(jobs), "--out", str(tmp_path / "out"), "--dry-run")
    assert code == 2 and f"{jobs} line 1: loras: 'yyy" in err and "not a path to a LoRA file" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ job files
@pytest.mark.parametrize("line, message", [
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", r"line 1: not valid JSON \(nested too deep\)"),
    ('{"seed": 1' + "0" * 5000 + "}", r"line 1: not valid JSON \(Exceeds the limit \(4300 digits\) for integer "
                                      r"string conversion"),
    ('{"prompt": "a", "steps": 2, "prompt": "b"}', r"line 1: the key 'prompt' is given twice in one object"),
])
def test_json_lines_that_python_cannot_read_are_named(tmp_path, line, message):
    f = tmp_path / "jobs.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(JobFileError, match=rf"^{f} {message}"):
        list(read_jobs(f, defaults=SMALL))


def test_a_csv_column_named_twice_is_refused(tmp_path):
    f = tmp_path / "jobs.csv"
    f.write_text("prompt,steps,prompt\na,2,b\n")
    with pytest.raises(JobFileError, match=rf"^{f} line 1: the column 'prompt' is named twice; name each column once"):
        list(raw_lines(f))


@pytest.mark.parametrize("path_kind", ["fifo", "device"])
def test_a_job_file_that_is_no_regular_file_never_blocks(tmp_path, capsys, path_kind):
    path = tmp_path / "jobs.jsonl"
    if path_kind == "fifo":
        os.mkfifo(path)  # nobody writes to it: an open() would block for ever
    else:
        path = "/dev/zero"  # never ends
    t0 = time.perf_counter()
    code, err = _cli(capsys, "batch", str(path), "--out", str(tmp_path / "out"), "--dry-run")
    assert code == 2 and time.perf_counter() - t0 < 5
    assert f"error: {path}: not a regular file (a pipe or a device); the jobs are read twice" in err


@pytest.mark.parametrize("name, why", [
    ("a\ud800b", "control or formatting"),  # a lone surrogate: no file name can hold it
    ("invoice\u202egnp.exe", "control or formatting"),  # a right-to-left override disguising the name
    ("a\x7fb", "control or formatting"),
    ("a*b", r"without / \\ : \* \?"),
    ("ł" * 120, r"\(200 bytes in UTF-8\)"),  # 120 characters, 240 bytes: the file name would pass 255
    ("CON", "a reserved device name"),
    ("nul.txt", "a reserved device name"),
    ("com1", "a reserved device name"),
    ("fox.", "ending in '.' or a space"),
    ("fox ", "ending in '.' or a space"),
])
def test_names_that_cannot_name_a_file_anywhere_are_refused(name, why):
    with pytest.raises(ParameterError, match=rf"^name=.* cannot name a file.*{why}"):
        check_name(name)


def test_names_that_can_still_work():
    for name in ("fox_01", "łódź", "console", "a.b", "-rf", "ł" * 100, "x" * 120):
        assert check_name(name) == name


def test_a_bad_name_in_a_job_file_writes_nothing(tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a"}\n{"prompt": "b", "name": "a\\ud800"}\n')
    out = tmp_path / "out"
    code, err = _cli(capsys, "batch", str(jobs), "--out", str(out), "--dry-run")
    assert code == 2 and rf"{jobs} line 2: name='a\ud800' cannot name a file" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ the manifest
def test_a_hand_edited_manifest_never_names_a_path_as_a_request_id(tmp_path, caplog):
    lines = [{"job": "k1", "status": "submitted", "request_id": rid} for rid in ("..", "../x", "a/b", "a b", "", 5)]
    lines += [{"job": "k1", "status": "submitted", "request_id": "rq-7", "image": 0}]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    m = Manifest.open(tmp_path)
    assert m.status("k1") == "submitted" and m.pending_images("k1") == [("rq-7", 0)]


def test_a_huge_manifest_line_is_skipped_without_reading_it_whole(tmp_path, caplog):
    path = tmp_path / "manifest.jsonl"
    with open(path, "wb") as fh:
        fh.write(json.dumps({"job": "a", "status": "done"}).encode() + b"\n")
        fh.write(b'{"job": "b", "status": "done", "pad": "' + b"x" * (3 << 20) + b'"}\n')
        fh.write(json.dumps({"job": "c", "status": "failed"}).encode() + b"\n")
    m = Manifest.open(tmp_path)
    assert (m.status("a"), m.status("b"), m.status("c")) == ("done", None, "failed")
    assert "line 2: not a manifest record" in caplog.text
    m.append({"job": "d", "status": "done"})  # appends stay whole lines after it
    m.close()
    assert path.read_bytes().endswith(b"\n") and Manifest.open(tmp_path).status("d") == "done"


# ------------------------------------------------------------------------------------------------ queue (headless)
def _node(cls, **inputs):
    return {"class_type": cls, "inputs": inputs}


@pytest.mark.parametrize("workflow, message", [
    ({"1": _node("A", x=["2", 0]), "2": _node("B", y=["1", 0])}, r"node '1' depends on itself through its inputs "
                                                                  r"\(a cycle: '1' -> '2' -> '1'\)"),
    ({"1": _node("A", x=["1", 0])}, r"node '1' depends on itself"),
    ({"1": _node("A", x=["9", 0])}, r"node '1' input 'x' links to node '9', which is not in the workflow"),
])
def test_workflows_that_cannot_run_are_refused_before_queueing(workflow, message):
    with pytest.raises(ParameterError, match=rf"^workflow: {message}"):
        check_workflow(workflow)


def test_a_long_chain_is_checked_without_recursion():
    chain = {str(i): _node("N", x=[str(i - 1), 0]) for i in range(1, 50_000)}
    chain["0"] = _node("Start")
    assert check_workflow(chain) is chain
    chain["0"] = _node("Start", x=["49999", 0])
    with pytest.raises(ParameterError, match="depends on itself"):
        check_workflow(chain)


def test_workflow_files_that_python_cannot_read(tmp_path, capsys):
    huge = tmp_path / "num.json"
    huge.write_text('{"1": {"class_type": "A", "inputs": {"x": 1' + "0" * 5000 + "}}}")
    with pytest.raises(ParameterError, match=rf"^{huge}: not a JSON workflow \(ValueError: Exceeds the limit"):
        load_workflow(huge)
    fifo = tmp_path / "wf.json"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    code, err = _cli(capsys, "queue", str(fifo), "--server", "127.0.0.1:9", "--out", str(tmp_path / "out"))
    assert code == 2 and time.perf_counter() - t0 < 5
    assert f"error: {fifo}: not a regular file (a folder, a pipe or a device)" in err
    assert parse_value("9" * 5000) == "9" * 5000 and parse_value("[" * 100_000) == "[" * 100_000  # kept as text


@pytest.mark.parametrize("server", ["http://[::1", "\udcff", "x" * 5000, "http://a..b:8188", "http://127.0.0.1:99999"])
def test_server_addresses_that_cannot_be_reached_are_flag_errors(server, tmp_path, capsys):
    with pytest.raises(ParameterError, match=r"^server=.*: (not an address that can be reached|give ComfyUI's)"):
        check_server(server)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"1": _node("A")}))
    code, err = _cli(capsys, "queue", str(wf), "--server", server, "--out", str(tmp_path / "out"))
    assert code == 2 and err.startswith("error: --server=") and len(err) < 400 and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ nodes
pack = load_pack()
N = pack.NODE_CLASS_MAPPINGS
NodeParameterError = sys.modules[f"{pack.__name__}.aura_flow"].ParameterError


def test_a_save_prefix_no_file_name_can_hold(tmp_path, monkeypatch):
    monkeypatch.setenv("AURAFLOW_OUTPUT_DIR", str(tmp_path / "out"))
    with pytest.raises(NodeParameterError, match=r"filename_prefix='cat\\ud800': character 4 is a lone surrogate "
                                                 r"0xd800, which no file name can hold"):
        N["AuraFlowSaveImage"]().save(torch.rand(1, 8, 8, 3), "cat\ud800", "png", 80, True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))


def test_a_latent_view_of_any_claimed_size_is_refused_before_a_pass_over_it(tiny_models):
    vae = N["AuraFlowLoader"]().load(str(tiny_models["diffusers"]["checkpoint"]), weight_dtype="fp32")[2]
    huge = torch.zeros(1, 4, 1, 1).expand(1, 4, 100_000, 100_000)  # 160 GB if anything touched every value
    with pytest.raises(NodeParameterError, match=r"samples has shape \(1, 4, 100000, 100000\): 800000x800000 pixels; "
                                                 r"at most 16384 a side"):
        N["AuraFlowVAEDecode"]().decode({"samples": huge}, vae)


def test_long_choices_are_shortened_in_messages():
    from aura_flow.pipeline.modes import check as check_speed
    from aura_flow.remote import RemoteError, resolve_api_version

    with pytest.raises(ParameterError, match=r"^speed='xxx.*… \(100,002 characters\) is not known") as speed:
        check_speed("x" * 100_000)
    with pytest.raises(RemoteError, match=r"^api_version='xxx.*… \(100,002 characters\) is not known") as api:
        resolve_api_version("x" * 100_000)
    assert len(str(speed.value)) < 400 and len(str(api.value)) < 400


# ------------------------------------------------------------------------------------------------ the key
def test_a_key_file_saved_with_a_byte_order_mark_and_crlf_is_read(tmp_path, monkeypatch):
    from aura_flow.remote import resolve_api_key

    monkeypatch.delenv("SEGMIND_API_KEY", raising=False)
    key = tmp_path / "segmind_api_key"
    key.write_bytes(b"\xef\xbb\xbf  SG_0123456789abcdef\r\n\r\n")  # Notepad's UTF-8
    assert resolve_api_key(key) == ("SG_0123456789abcdef", f"the key file {key}")


@pytest.mark.parametrize("raw", [b"SG_0123456789abcdef\r\nX-Evil: 1\n", b"SG_0123\rSG_4567", b"SG_01\x00x"])
def test_a_key_that_holds_cr_lf_or_nul_is_refused_and_never_shown(raw, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SEGMIND_API_KEY", raising=False)
    monkeypatch.setenv("SEGMIND_API_URL", "http://127.0.0.1:9/v1/aura-flow")  # never reached
    key = tmp_path / "segmind_api_key"
    key.write_bytes(raw)
    out = tmp_path / "out"
    code, err = _cli(capsys, "remote", "--key-file", str(key), "--out", str(out))
    assert code == 1 and f"error: the API key in the key file {key} contains spaces, control or non-ASCII " \
                          "characters; write the key alone" in err
    for part in raw.decode().replace("\r", "\n").replace("\0", "\n").split("\n"):
        assert len(part) < 6 or part not in err
    assert not out.exists() or not any(out.iterdir())


def test_a_bad_batch_workflow_is_said_as_the_flag_not_as_a_job_line(tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a"}\n')
    fifo = tmp_path / "wf.json"
    os.mkfifo(fifo)
    code, err = _cli(capsys, "batch", str(jobs), "--out", str(tmp_path / "out"), "--backend", "comfyui", "--server",
                     "127.0.0.1:9", "--workflow", str(fifo))
    assert code == 2 and err == f"error: --workflow {fifo}: not a regular file (a folder, a pipe or a device); give " \
                                "the workflow's .json file\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("prefix, char", [("a\r\nb", "2 is a control character \\(0x0d\\)"),
                                          ("cat\x1b[31m", "4 is a control character \\(0x1b\\)"),
                                          ("x\x85", "2 is a control character \\(0x85\\)")])
def test_a_save_prefix_with_control_characters_is_refused(prefix, char, tmp_path, monkeypatch):
    monkeypatch.setenv("AURAFLOW_OUTPUT_DIR", str(tmp_path / "out"))
    with pytest.raises(NodeParameterError, match=rf"^filename_prefix=.*: character {char}, which a file name should "
                                                 "not hold; give plain text"):
        N["AuraFlowSaveImage"]().save(torch.rand(1, 8, 8, 3), prefix, "png", 80, True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))


@pytest.mark.parametrize("argv, line", [
    (["generate", "--checkpoint", "x", "--steps", "nan"],
     "python -m aura_flow generate: error: argument --steps: invalid int value: 'nan'; --steps: sampling steps 1-100 "
     "(see --help)"),
    (["remote", "--concurrency", "two"],
     "python -m aura_flow remote: error: argument --concurrency: invalid int value: 'two'; --concurrency: requests at "
     "a time, 1 to 32 (see --help)"),
    (["batch", "j.txt", "--out", "o", "--seeds", "1e3"],
     "python -m aura_flow batch: error: argument --seeds: invalid int value: '1e3'; --seeds: run every job with N "
     "seeds, 1 to 10000 (see --help)"),
    (["generate", "--checkpoint", "x", "--output-format", "gif"],
     "python -m aura_flow generate: error: argument --output-format: invalid choice: 'gif' (choose from 'webp', "
     "'jpg', 'png') (see --help)"),
])
def test_a_flag_of_the_wrong_type_is_one_line_naming_its_range(argv, line, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and capsys.readouterr().err == line + "\n"


def test_queue_checks_its_out_folder_before_anything_is_queued(tmp_path, capsys):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"1": _node("A")}))
    blocker = tmp_path / "a_file"
    blocker.write_text("kept")
    code, err = _cli(capsys, "queue", str(wf), "--server", "127.0.0.1:9", "--out", str(blocker))
    assert code == 2 and err == f"error: --out {blocker}: is a file, not a folder; give a folder to write the images " \
                                "into\n"  # not 3 (no server): refused before the server was asked
    assert blocker.read_text() == "kept"


def test_an_output_folder_that_is_a_file_is_said_before_encoding(tmp_path, monkeypatch):
    blocker = tmp_path / "output"
    blocker.write_text("kept")
    monkeypatch.setenv("AURAFLOW_OUTPUT_DIR", str(blocker))
    with pytest.raises(NodeParameterError, match=rf"^the output folder {blocker}: is a file, not a folder"):
        N["AuraFlowSaveImage"]().save(torch.rand(1, 8, 8, 3), "p", "png", 80, True)
    assert blocker.read_text() == "kept"


@pytest.mark.parametrize("kind", ["folder", "fifo", "link"])
def test_a_manifest_that_is_no_regular_file_is_refused_at_once(kind, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    manifest = out / "manifest.jsonl"
    if kind == "folder":
        manifest.mkdir()
    elif kind == "fifo":
        os.mkfifo(manifest)  # nobody writes: reading it would block for ever
    else:
        (tmp_path / "elsewhere.jsonl").write_text("")
        manifest.symlink_to(tmp_path / "elsewhere.jsonl")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a fox\n")
    expected = f"error: {manifest}: not a regular file (a folder, a link, a pipe or a device), so the record of this " \
               "folder's jobs cannot be read nor extended; move it away or give another output folder\n"
    t0 = time.perf_counter()
    assert _cli(capsys, "batch", str(jobs), "--out", str(out), "--dry-run") == (2, expected)
    monkeypatch.setenv("SEGMIND_API_KEY", "SG_0123456789abcdef")
    monkeypatch.setenv("SEGMIND_API_URL", "http://127.0.0.1:9/v1/aura-flow")  # never reached
    assert _cli(capsys, "remote", "--out", str(out)) == (2, expected)
    assert time.perf_counter() - t0 < 10 and sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]
