"""Image files with the generation's metadata: encode to webp / jpg / png, save atomically, read the metadata back.

Torch-free (Pillow only), shared by the Save node, the command line and the headless runner.

Metadata is a dict of JSON-serialisable values (ComfyUI passes ``{"prompt": <API graph>, "workflow": <editor
graph>}``); each value is stored as JSON text, ASCII-escaped so any Unicode text survives every container:
- png: one text chunk per key, as ComfyUI's own Save Image writes it;
- webp and jpg: EXIF, in the layout ComfyUI's animated-WEBP saver uses and its editor reads back when an image is
  dropped on it: ``prompt`` in tag 0x0110 (Model) as ``"prompt:<json>"``, every other key in the tags below
  0x010F (Make, then ImageDescription, ...) as ``"<key>:<json>"``, in UTF-8.
Keys are any Unicode text too. A key a container cannot hold as it is (a png keyword is 1-79 Latin-1 characters by
the PNG standard, in tEXt and iTXt alike; an EXIF entry ends its key at the first ":") is stored as its JSON string,
``"\u5de5..."`` with the quotes, which `read_metadata` turns back into the key. A png key that is over 79
characters even so is refused (ParameterError naming it; webp and jpg hold it). A value that is not JSON is refused
naming its key.
A jpg's EXIF segment holds at most 64 KiB; keys that do not fit are dropped, largest first, with a warning.
"""
from __future__ import annotations

import io
import json
import logging
import os
import uuid
from pathlib import Path

from .errors import ParameterError, shown
from .params import OUTPUT_FORMATS, check_choice, check_range

log = logging.getLogger(__name__)

EXT = {"webp": ".webp", "jpg": ".jpg", "png": ".png"}
_PIL_FORMAT = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
_EXIF_PROMPT_TAG = 0x0110  # Model
_EXIF_FIRST_OTHER_TAG = 0x010F  # Make; further keys count down from here
_EXIF_LAST_OTHER_TAG = 0x010D  # DocumentName: three free ASCII tags below Model are enough for prompt+workflow+1
_JPEG_EXIF_LIMIT = 65533 - 8  # one APP1 segment, less its "Exif\0\0" header and length field
PNG_KEYWORD_MAX = 79  # the PNG standard's limit for a text chunk's keyword (Latin-1 characters)


def _json_text(key, value) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as exc:  # not JSON (bytes, a tensor, a circular dict)
        raise ParameterError(f"image metadata: the value of {shown(key)} cannot be saved ({exc}); metadata values "
                             "must be JSON (text, numbers, lists, dicts)") from None


def _stored_key(key, fmt: str) -> str:
    """``key`` as it is written in a ``fmt`` file: itself where the container holds it as it is, else its JSON
    string (ASCII, in quotes). A png keyword that cannot be held either way is a ParameterError."""
    if not isinstance(key, str):
        raise ParameterError(f"image metadata: the key {shown(key)} is not text; metadata keys must be strings")
    if fmt == "png":
        plain = 0 < len(key) <= PNG_KEYWORD_MAX and key == key.strip() and "\0" not in key and \
            all(ord(c) < 256 and c.isprintable() for c in key)
    else:
        plain = bool(key) and ":" not in key and key.isprintable()
    if plain and not key.startswith('"'):
        return key
    escaped = json.dumps(key)
    if fmt == "png" and len(escaped) > PNG_KEYWORD_MAX:
        raise ParameterError(f"image metadata: the key {shown(key)} cannot be a png text keyword: that is at most "
                             f"{PNG_KEYWORD_MAX} Latin-1 characters, and the key takes {len(escaped)} as JSON escapes; "
                             "use a shorter key, or save as webp or jpg, which hold any key")
    return escaped


def _read_key(stored: str) -> str:
    """The key `_stored_key` wrote."""
    if stored.startswith('"'):
        try:
            key = json.loads(stored)
        except ValueError:
            return stored
        return key if isinstance(key, str) else stored
    return stored


def _exif_for(metadata: dict, *, limit: int | None = None):
    """An EXIF block holding ``metadata`` in ComfyUI's key:json layout; keys over ``limit`` bytes are dropped."""
    from PIL import Image

    texts = {key: f"{_stored_key(key, 'exif')}:{_json_text(key, value)}".encode("utf-8")
             for key, value in metadata.items()}
    while True:
        exif = Image.Exif()
        tag = _EXIF_FIRST_OTHER_TAG
        for key, text in texts.items():
            if key == "prompt":
                exif[_EXIF_PROMPT_TAG] = text
                continue
            if tag < _EXIF_LAST_OTHER_TAG:
                log.warning("image metadata: no EXIF tag left for key %r; it is not saved", key)
                continue
            exif[tag] = text
            tag -= 1
        if limit is None or not texts:
            return exif
        size = len(exif.tobytes())
        if size <= limit:
            return exif
        largest = max(texts, key=lambda k: len(texts[k]))
        log.warning("image metadata: %r (%d bytes) does not fit a jpg's 64 KiB EXIF segment and is not saved; "
                    "save as png or webp to keep it", largest, len(texts[largest]))
        del texts[largest]


def encode_image(pil, fmt: str, quality: int = 80, metadata: dict | None = None) -> bytes:
    """Encode a PIL image as ``fmt`` ("webp", "jpg" or "png") at ``quality`` (0-100; png ignores it).

    ``metadata`` (a dict of JSON-serialisable values) is embedded as described in the module docstring; None or
    an empty dict writes none.
    """
    fmt = check_choice("output_format", fmt, OUTPUT_FORMATS)
    quality = check_range("output_quality", quality)
    metadata = dict(metadata or {})
    image = pil
    if fmt == "jpg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    elif image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    options: dict = {}
    if fmt == "png":
        options["compress_level"] = 4  # ComfyUI's Save Image level: fast, a little larger
        if metadata:
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            for key, value in metadata.items():
                info.add_text(_stored_key(key, "png"), _json_text(key, value))
            options["pnginfo"] = info
    else:
        options["quality"] = quality
        if fmt == "webp":
            options["method"] = 4
        if metadata:
            options["exif"] = _exif_for(metadata, limit=_JPEG_EXIF_LIMIT if fmt == "jpg" else None)
    buf = io.BytesIO()
    image.save(buf, format=_PIL_FORMAT[fmt], **options)
    return buf.getvalue()


def save_new_image(pil, directory, stem: str, fmt: str, quality: int = 80, metadata: dict | None = None) -> Path:
    """Encode ``pil`` and write it as ``directory/stem.<ext>``, or ``stem_1.<ext>``, ``stem_2.<ext>``... when that
    name is taken: an existing file is never replaced, and a reader never sees a half-written one."""
    return write_new_file(directory, stem, encode_image(pil, fmt, quality, metadata))


def save_image_atomic(pil, path, fmt: str, quality: int = 80, metadata: dict | None = None) -> str:
    """Encode and write ``pil`` to ``path`` (replacing it) through a temporary file in the same folder.

    A reader never sees a half-written file, and a failed save leaves nothing behind. Returns the path."""
    data = encode_image(pil, fmt, quality, metadata)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _write_temp(folder, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    return path


def read_metadata(source) -> dict:
    """The metadata embedded by `encode_image`, from a path, bytes or an open PIL image: ``{key: value}``."""
    from PIL import Image

    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    image = source if isinstance(source, Image.Image) else Image.open(source)
    out: dict = {}
    if image.format == "PNG":
        for key, text in getattr(image, "text", {}).items():
            try:
                out[_read_key(key)] = json.loads(text)
            except ValueError:
                out[_read_key(key)] = text
        return out
    exif = image.getexif()
    for tag in range(_EXIF_LAST_OTHER_TAG, _EXIF_PROMPT_TAG + 1):
        text = exif.get(tag)
        if isinstance(text, bytes):
            text = text.decode("latin-1")
        if not isinstance(text, str):
            continue
        try:  # Pillow reads EXIF text as Latin-1; it was written as UTF-8
            text = text.encode("latin-1").decode("utf-8")
        except UnicodeError:
            pass  # another writer's text: as it is
        try:
            if text.startswith('"'):  # a key stored as its JSON string
                key, end = json.JSONDecoder().raw_decode(text)
                if not isinstance(key, str) or text[end:end + 1] != ":":
                    continue
                out[key] = json.loads(text[end + 1:])
            elif ":" in text:
                key, _, payload = text.partition(":")
                out[key] = json.loads(payload)
        except ValueError:
            continue  # a camera's own Make/Model string, not ours
    return out


def image_extension(data: bytes) -> str:
    """The file extension for image bytes, from their magic number (``bin`` when they are no image)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return "bin"


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_temp(folder, data: bytes) -> str:
    """``data`` in a new hidden file of ``folder``, flushed to disk; its path. Created with mode 0666 less the
    process's umask (applied by the system: nothing here changes the umask), never through a link."""
    tmp = os.path.join(folder, f".{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def write_first_free(directory, data: bytes, names) -> Path:
    """Write ``data`` under the first of ``names`` (file names in ``directory``) that is free, atomically: the file
    appears whole under its name or not at all, an existing file (or link) is never replaced, and concurrent
    writers each get their own name. The path written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(directory, data)
    try:
        for name in names:
            path = directory / name
            try:
                os.link(tmp, path)  # fails when the name exists, also as a dangling link
                return path
            except FileExistsError:
                continue
            except OSError:  # a file system without hard links: exclusive create, then write
                try:
                    with open(path, "xb") as fh:
                        fh.write(data)
                    return path
                except FileExistsError:
                    continue
        raise FileExistsError(f"{directory}: no free file name left; clean the folder")
    finally:
        _unlink(tmp)


def write_new_file(directory, stem: str, data: bytes) -> Path:
    """Write ``data`` to ``directory/stem.<ext>`` (``stem_1.<ext>``... if taken), never overwriting a file; the
    extension comes from the bytes (`image_extension`)."""
    ext = image_extension(data)
    return write_first_free(directory, data, (f"{stem}.{ext}" if n == 0 else f"{stem}_{n}.{ext}"
                                              for n in range(100000)))


def check_output_folder(path, flag: str = "--out") -> Path:
    """The folder images will be written to, checked before any heavy work: not an existing file, and writable
    (or creatable) by this user. Nothing is created yet."""
    folder = Path(os.fspath(path)).expanduser()
    if "\0" in str(folder):
        raise ParameterError(f"{flag} {shown(str(folder))}: a path cannot hold a NUL character")
    try:
        if folder.exists() and not folder.is_dir():
            raise ParameterError(f"{flag} {folder}: is a file, not a folder; give a folder to write the images into")
        probe = folder
        while not probe.exists():  # the nearest existing parent decides whether the folder can be made
            if probe.parent == probe:
                break
            probe = probe.parent
    except OSError as exc:  # a name over the file system's limit (255 bytes a name, 4096 a path), a link loop
        raise ParameterError(f"{flag} {shown(str(folder))}: cannot be used as a folder ({exc.strerror or exc}); "
                             "give a shorter path") from None
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ParameterError(f"{flag} {folder}: {probe} is not a writable folder; give a folder you can write to")
    return folder
