"""The API key: the key file written atomically through a unique temporary name, refusing links, size-limited on
read and write; the service's answers scrubbed of the key in every form (issue #13, "Money and secrets")."""
from __future__ import annotations

import os
import threading
import time

import pytest

from remote_server import KEY
from workflow_exec import pack_module

R = pack_module("aura_flow.remote")
keys = pack_module("aura_flow.remote.keys")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ("SEGMIND_API_KEY", "SEGMIND_API_URL", "AURAFLOW_SEGMIND_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------------------------------------ the key file
def test_concurrent_saves_never_tear_the_key_file(tmp_path):
    path = tmp_path / "auraflow" / "segmind_api_key"
    written = [f"SG_{i:016x}" for i in range(16)]
    start = threading.Barrier(len(written))
    errors = []

    def save(key):
        start.wait()
        try:
            for _ in range(5):
                R.save_api_key(key, path)
        except Exception as exc:  # noqa: BLE001 - any failure of a concurrent writer is the bug
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(k,)) for k in written]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_text() in {k + "\n" for k in written}  # one whole key, never a mix
    assert listing(path.parent) == ["segmind_api_key"]  # no temporary file left behind
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_planted_link_never_receives_the_key(tmp_path):
    folder = tmp_path / "auraflow"
    folder.mkdir()
    stolen = tmp_path / "stolen"
    # the old fixed temporary name, and the key file itself, are links an attacker planted
    (folder / "segmind_api_key.tmp").symlink_to(stolen)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("untouched\n")
    (folder / "segmind_api_key").symlink_to(elsewhere)
    R.save_api_key(KEY, folder / "segmind_api_key")
    assert not stolen.exists()
    assert elsewhere.read_text() == "untouched\n"  # the link was replaced, its target not written
    assert not (folder / "segmind_api_key").is_symlink()
    assert (folder / "segmind_api_key").read_text() == KEY + "\n"


def test_a_huge_key_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "auraflow" / "segmind_api_key"
    with pytest.raises(R.MissingKeyError, match=r"10,485,763 characters long; a key has at most 256") as info:
        R.save_api_key("SG_" + "a" * (10 * 1024 * 1024), path)
    assert len(str(info.value)) < 400
    assert not path.parent.exists()


def test_a_huge_key_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "segmind_api_key"
    with open(path, "wb") as fh:  # sparse: reading it whole would take minutes and all the memory
        fh.write(b"SG_" + b"a" * 100)
        fh.truncate(64 * 1024**3)
    t0 = time.monotonic()
    with pytest.raises(R.MissingKeyError, match="is over 4,096 bytes, so it holds more than a key; write the key "
                                                "alone"):
        R.resolve_api_key(path)
    assert time.monotonic() - t0 < 5


def test_the_environment_key_is_bounded_too(monkeypatch):
    monkeypatch.setenv("SEGMIND_API_KEY", "SG_" + "b" * 5000)
    with pytest.raises(R.MissingKeyError, match="SEGMIND_API_KEY environment variable is 5,003 characters long"):
        R.resolve_api_key()


def test_a_fifo_at_the_key_path_does_not_block(tmp_path):
    path = tmp_path / "segmind_api_key"
    os.mkfifo(path)
    t0 = time.monotonic()
    with pytest.raises(R.MissingKeyError, match="is not a regular file"):
        R.resolve_api_key(path)
    assert time.monotonic() - t0 < 5


def test_a_key_file_that_is_not_text_is_refused(tmp_path):
    path = tmp_path / "segmind_api_key"
    path.write_bytes(b"SG_\xff\xfe")
    with pytest.raises(R.MissingKeyError, match="is not text; write the key alone"):
        R.resolve_api_key(path)


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "auraflow"
    (folder / "segmind_api_key").mkdir(parents=True)  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        R.save_api_key(KEY, folder / "segmind_api_key")
    assert listing(folder) == ["segmind_api_key"]
