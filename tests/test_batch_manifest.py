"""The batch manifest (issue 19): append-only lines, a torn last line ignored and ended, a bad middle line
skipped with a warning, the compact index (latest status, request ids submitted and not finished)."""
from __future__ import annotations

import json
import logging
import threading

from aura_flow.batch.manifest import Manifest


def test_append_read_back_and_index(tmp_path):
    m = Manifest.open(tmp_path)
    assert len(m) == 0 and not (tmp_path / "manifest.jsonl").exists()  # nothing written until the first append
    m.append({"job": "a", "status": "submitted", "request_id": "r1"})
    m.append({"job": "a", "status": "submitted", "request_id": "r2"})
    m.append({"job": "b", "status": "failed", "error": "boom" * 1000})
    m.append({"job": "c", "status": "done", "files": ["x.webp"]})
    m.append({"job": "c", "status": "failed", "error": "late"})  # done is final
    m.close()
    lines = (tmp_path / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and all(json.loads(x)["time"] for x in lines)
    assert len(json.loads(lines[2])["error"]) == 2000
    again = Manifest.open(tmp_path)
    assert (again.status("a"), again.pending_ids("a")) == ("submitted", ["r1", "r2"])
    assert (again.status("b"), again.status("c"), again.status("zz")) == ("failed", "done", None)
    assert again.counts() == {"done": 1, "failed": 1, "submitted": 1}
    again.append({"job": "a", "status": "done"})
    assert again.pending_ids("a") == [] and again.status("a") == "done"


def test_torn_last_line_is_ignored_and_ended_before_the_next_record(tmp_path):
    m = Manifest.open(tmp_path)
    m.append({"job": "a", "status": "done"})
    m.close()
    path = tmp_path / "manifest.jsonl"
    with open(path, "ab") as fh:
        fh.write(b'{"job": "b", "status": "do')  # a crash mid-write
    m = Manifest.open(tmp_path)
    assert m.status("a") == "done" and m.status("b") is None
    m.append({"job": "b", "status": "done"})
    m.close()
    raw = path.read_bytes().split(b"\n")
    assert raw[1] == b'{"job": "b", "status": "do' and json.loads(raw[2])["job"] == "b" and raw[3] == b""
    m = Manifest.open(tmp_path)
    assert m.status("b") == "done" and m.records == 2


def test_a_bad_line_in_the_middle_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"job": "a", "status": "done"}\nnot json\n{"job": "b", "status": "failed"}\n'
                    '{"status": "done"}\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        m = Manifest.open(tmp_path)
    assert (m.status("a"), m.status("b")) == ("done", "failed")
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "line 2" in warned[0] and "line 4" in warned[1]


def test_concurrent_appends_stay_whole_lines(tmp_path):
    m = Manifest.open(tmp_path)

    def writer(t):
        for i in range(50):
            m.append({"job": f"{t}-{i}", "status": "done", "files": ["x" * 500]})

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m.close()
    lines = (tmp_path / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 200 and len({json.loads(x)["job"] for x in lines}) == 200
