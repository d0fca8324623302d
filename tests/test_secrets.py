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


# ------------------------------------------------------------------------------------------------ the answers
answers = pack_module("aura_flow.remote.answers")
Response = pack_module("aura_flow.remote.transport").Response
PARAMS = {"width": 64, "height": 64, "output_format": "png", "output_quality": 80}


def reader() -> "answers.Answers":
    return answers.Answers(R.parse_endpoint("http://127.0.0.1:9/v1/aura-flow"), KEY, "the test")


def leaks(text: str) -> list[str]:
    """Every piece of 4 or more characters of the key (past its public 'SG_') found in ``text``, whitespace
    ignored."""
    dense = "".join(text.split())
    secret = KEY[3:]
    return [secret[i:i + n] for n in range(4, len(secret) + 1) for i in range(len(secret) - n + 1)
            if secret[i:i + n] in dense]


def png(text_chunk: str | None = None, size: int = 64) -> bytes:
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if text_chunk:
        info.add_text("comment", text_chunk)
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


@pytest.mark.parametrize("body", [
    b" " * 4090 + KEY.encode(),  # straddles the old 4096-byte read cut
    b" " * (64 * 1024 - 7) + KEY.encode() + b" tail",  # straddles today's 64 KiB cut
    b"\n" * 5000 + b'{"error": "invalid key ' + KEY.encode() + b'"}',
    b"key: " + " \n\t".join(KEY[i:i + 4] for i in range(0, len(KEY), 4)).encode(),  # split by whitespace
    b'{"error": "' + b" " * 250 + KEY.encode() + b'"}',  # the key at the 300-character cut of the message
    b"<html><title>bad " + KEY.encode() + b"</title></html>",
])
def test_a_401_body_never_shows_any_part_of_the_key(body):
    err = reader().fatal(Response(401, {}, body), 0)
    assert isinstance(err, R.RemoteError) and err.status == 401
    assert "the service refused the API key from the test (401" in str(err)
    assert leaks(str(err)) == [] and leaks(repr(err.args)) == []


def test_a_redirect_location_and_request_id_are_scrubbed():
    err = reader().fatal(Response(302, {"location": f"https://x.example/?k={KEY[:12]}"}, b""), 0)
    assert leaks(str(err)) == []


@pytest.mark.parametrize("body", [b"not an image, echoing " + KEY.encode(), KEY.encode() + b"\x00" * 100])
def test_a_200_echoing_the_key_is_not_kept(body):
    with pytest.raises(R.RemoteError) as info:
        reader().decode(Response(200, {"content-type": "image/png"}, body), PARAMS, 0, 5)
    assert info.value.billed is True and info.value.data is None
    assert "its bytes hold the API key, so they are not kept" in str(info.value)
    assert leaks(str(info.value)) == []


def test_a_wrong_size_image_carrying_the_key_is_not_kept():
    with pytest.raises(R.RemoteError) as info:
        reader().decode(Response(200, {}, png(f"key={KEY}")), {**PARAMS, "width": 128}, 0, 5)
    assert info.value.data is None and "not kept" in str(info.value)


def test_a_good_image_carrying_the_key_keeps_its_pixels_not_its_bytes():
    import numpy as np

    image = reader().decode(Response(200, {}, png(f"made with {KEY}")), PARAMS, 0, 5)
    assert KEY[3:9].encode() not in image.data
    clean = reader().decode(Response(200, {}, png()), PARAMS, 0, 5)
    assert clean.data == png()  # an image without the key is kept byte for byte
    assert np.array_equal(np.asarray(image.image), np.asarray(clean.image))


def test_the_cli_writes_no_file_holding_the_key(tmp_path, monkeypatch, capsys):
    from remote_server import FakeService

    from aura_flow.cli import main

    out = tmp_path / "out"
    monkeypatch.setenv("SEGMIND_API_KEY", KEY)
    monkeypatch.setenv("SEGMIND_API_VERSION", "v1")  # the sync API answers with the image bytes themselves
    with FakeService() as svc:
        monkeypatch.setenv("SEGMIND_API_URL", svc.url)
        svc.fail_seed(3, {"status": 200, "body": b"garbage " + KEY.encode(), "type": "image/png"})
        svc.fail_seed(4, {"status": 200, "body": png(KEY, 512), "type": "image/png"})  # the two run concurrently
        code = main(["remote", "--width", "512", "--height", "512", "--number-of-images", "2",
                     "--output-format", "png", "--out", str(out), "--seed", "3"])
    assert code == 1
    captured = capsys.readouterr()
    assert "not kept" in captured.err and leaks(captured.err + captured.out) == []
    # the good image, re-encoded, no rejected bytes; the manifest that records the run (checked for the key below)
    assert sorted(p.name for p in out.iterdir()) == ["auraflow_4.png", "manifest.jsonl"]
    for path in out.iterdir():
        assert KEY[3:9].encode() not in path.read_bytes()
