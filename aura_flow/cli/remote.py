"""``python -m aura_flow remote``: generate with a hosted API (Segmind, or fal with ``--provider fal``), write the
images, print their paths.

Same flags as ``generate``, plus ``--provider segmind|fal`` and ``--model aura-flow|pony-v7`` (and fal's
``--expand-prompt``, ``--noise-source``, ``--enable-safety-checker``); the key comes from ``SEGMIND_API_KEY`` /
``FAL_KEY`` or the key file (``--key-file``, default ``~/.config/auraflow/segmind_api_key`` / ``fal_key``), never
from the command line, where it would land in shell history. Each request id goes to stderr as soon as the service
names it, so a billed result can be found again; when some may still complete, the ``fetch`` command that gets them
is printed too. fal's ``has_nsfw_concepts`` and the prompt it drew (when ``--expand-prompt`` changed it) go to
stderr with each image. Ctrl-C asks fal to cancel the requests not yet finished and names them. The request ids are
also recorded in ``--out``'s ``manifest.jsonl`` (the batch manifest's record shape), each as soon as the service
names it.
"""
from __future__ import annotations

import hashlib
import sys
import time

from .. import remote as remote_api
from ..images import write_new_file
from ..plan import plan_generation
from ..remote.client import MAX_CONCURRENCY, check_concurrency
from .flags import HelpFormatter, add_generation_flags, check_output_folder, generation_params

# the client's option names as this command spells them, for its messages
FLAG_NAMES = {"timeout": "--timeout", "api_version": "--api-version", "number_of_images": "--number-of-images",
              "concurrency": "--concurrency",
              "provider": "--provider", "model": "--model", **{name: "--" + name.replace("_", "-") for name in (
                  "prompt", "negative_prompt", "cfg", "seed", "shift", "steps", "width", "height", "sampler",
                  "scheduler", "output_format", "output_quality", "expand_prompt", "noise_source",
                  "enable_safety_checker")}}


def add_provider_flags(p) -> None:
    """--provider and --model (remote and fetch)."""
    p.add_argument("--provider", choices=remote_api.PROVIDER_NAMES, default="segmind",
                   help="segmind (SEGMIND_API_KEY) or fal's queue (FAL_KEY)")
    p.add_argument("--model", choices=remote_api.MODEL_NAMES, default=None,
                   help="aura-flow (the default) or, on fal, pony-v7")


def register(subparsers) -> None:
    p = subparsers.add_parser("remote", help="generate with the hosted Aura Flow API (needs SEGMIND_API_KEY)",
                              description="Generate with the hosted Aura Flow API (Segmind), write the "
                              "images to --out and print their paths. The key comes from SEGMIND_API_KEY or the key "
                              "file, never from the command line.", formatter_class=HelpFormatter)
    add_generation_flags(p, remote=True)
    add_provider_flags(p)
    p.add_argument("--expand-prompt", action="store_true", help="fal aura-flow: let fal rewrite the prompt (off "
                                                                 "unless given; the prompt drawn is printed)")
    p.add_argument("--noise-source", choices=("default", *remote_api.NOISE_SOURCES), default="default",
                   help="fal pony-v7: where the initial noise is made")
    p.add_argument("--enable-safety-checker", action="store_true", help="fal pony-v7: fal's safety checker")
    add_service_flags(p)
    p.set_defaults(func=run, parser=p)


def add_service_flags(g, *, timeout: float | None = 180.0) -> None:
    """The hosted service's flags (``remote``, and ``batch --backend hosted`` in its own group ``g``):
    ``--key-file``, ``--timeout``, ``--concurrency``, ``--api-version``. ``--timeout`` is added only when the parser
    has none yet (another backend's group may have one: the flag is then shared)."""
    g.add_argument("--key-file", default=None, help="file holding the API key (default: $AURAFLOW_SEGMIND_KEY_FILE "
                                                    "or ~/.config/auraflow/segmind_api_key; for fal "
                                                    "$AURAFLOW_FAL_KEY_FILE or ~/.config/auraflow/fal_key)")
    shared = g._option_string_actions.get("--timeout")
    if shared is None:
        g.add_argument("--timeout", type=float, default=timeout,
                       help="seconds to wait for one image, queue and generation included"
                            + ("" if timeout else " (hosted: 180)"))
    else:  # e.g. --backend comfyui's: one flag, each backend reading it its own way
        shared.help += "; --backend hosted: seconds to wait for one image, queue and generation included"
    g.add_argument("--concurrency", type=int, default=2, help=f"requests at a time, 1 to {MAX_CONCURRENCY}")
    g.add_argument("--api-version", choices=remote_api.API_VERSIONS, default=None,
                   help="segmind only. v2: the async queue (submit, then poll; the default, or $SEGMIND_API_VERSION); "
                        "v1: the sync API, one connection held for the whole generation")


def run(args) -> int:
    """Exit codes: 0 all images written, 1 some or all failed (what arrived is still written), 130 interrupted."""
    plan = plan_generation(generation_params(args), remote=True)  # before the key is read
    timeout = remote_api.positive_seconds(args.timeout, "--timeout")
    check_concurrency(args.concurrency, "--concurrency")
    check_output_folder(args.out)
    n = plan.number_of_images
    record = Record(args.out, plan.params(), provider=args.provider, model=args.model or "aura-flow")

    def on_request(index, request_id):
        sys.stderr.write(f"image {index + 1}/{n}: request id {request_id}\n")
        record.submitted(index, request_id)  # on disk before the image arrives: a crash leaves the id

    options = {"expand_prompt": args.expand_prompt, "noise_source": args.noise_source,
               "enable_safety_checker": args.enable_safety_checker}
    try:
        client = remote_api.RemoteClient.from_environment(key_file=args.key_file, timeout=timeout,
                                                          max_concurrency=args.concurrency,
                                                          api_version=args.api_version, names=FLAG_NAMES,
                                                          provider=args.provider, model=args.model)
        client.check(plan, options)  # what the model cannot honour, before any request
        result = client.generate(plan, on_request=on_request, options=options)
    except remote_api.RemoteError as exc:
        sys.stderr.write(f"error: {exc}\n")
        written = _write(exc.result, args.out, report_failures=False) if exc.result is not None else []
        record.finished(written, str(exc))
        _fetch_hint(exc, exc.result, args.out, args)
        return 130 if isinstance(exc, remote_api.RemoteInterrupted) else 1
    except KeyboardInterrupt as exc:  # the client has asked fal to cancel what was unfinished; its note says so
        notes = getattr(exc, "__notes__", None) or ["remote generation interrupted"]
        sys.stderr.write("".join(f"error: {note}\n" for note in notes))
        record.finished([], "; ".join(notes))
        return 130
    written = _write(result, args.out, report_failures=True)
    record.finished(written, result.failure_summary() if result.failures else None)
    sys.stderr.write(f"seed: {result.seed}\n")
    if result.remaining_credits is not None:
        sys.stderr.write(f"remaining credits: {result.remaining_credits}\n")
    _fetch_hint(None, result, args.out, args)
    return 1 if result.failures else 0


def _fetch_hint(exc, result, out, args) -> None:
    """Name the command that fetches, within the hour, what may still complete or was billed and never received
    (Segmind's v2 and fal's queue: v1 keeps nothing to fetch)."""
    ids = list(getattr(exc, "request_ids", None) or ())
    for err in ([exc] if exc is not None else []) + ([] if result is None else result.failures):
        if err.request_id and err.billed is not False and err.data is None and err.status != 404 \
                and err.request_id not in ids:
            ids.append(err.request_id)
    if not ids:
        return
    if args.provider == "fal":
        where = f" --provider fal --model {args.model or 'aura-flow'}"
    elif remote_api.resolve_api_version(args.api_version) == "v2":
        where = ""
    else:
        return
    sys.stderr.write(f"to fetch what may still arrive, within an hour of the submit: python -m aura_flow fetch "
                     f"{' '.join(ids[:remote_api.MAX_FETCH])}{where} --out {out}\n")


class Record:
    """The run in ``OUT/manifest.jsonl``, in the batch manifest's record shape (``backend`` ``remote``; ``job`` the
    key a batch job with these parameters has): a ``submitted`` line per request id as the service names it, then
    one ``done`` line (or ``failed``, with the error) with the files, their sha256 and request ids (none when
    nothing was named nor arrived: no key, a submit refused)."""

    def __init__(self, out, params: dict, **where):
        from ..batch.manifest import Manifest
        from ..batch.model import job_key

        self.manifest, self.params, self.t0 = Manifest.open(out), params, time.perf_counter()
        self.base = {"job": job_key(params), "line": None, "index": 0, "name": None, "backend": "remote", **where}
        self.named = 0

    def submitted(self, index: int, request_id: str) -> None:
        self.named += 1
        self.manifest.append({**self.base, "status": "submitted", "seed": remote_api.batch_seed(
            self.params["seed"], index), "request_id": request_id, "image": index})

    def finished(self, written: list, error: str | None) -> None:
        ids = [rid for _, _, rid in written]
        if not written and not self.named:  # nothing was sent that the service named (no key, refused at once)
            return self.manifest.close()
        self.manifest.append({**self.base, "status": "failed" if error else "done", "seed": self.params["seed"],
                              "files": [path.name for path, _, _ in written],
                              "sha256": [hashlib.sha256(data).hexdigest() for _, data, _ in written],
                              "request_id": ids[0] if ids else None, "request_ids": ids,
                              "seconds": round(time.perf_counter() - self.t0, 3), "error": error})
        self.manifest.close()


def _write(result, out, *, report_failures: bool) -> list:
    """Write every image that arrived and print its path; bytes billed but rejected (wrong size) are kept too.
    (path, bytes, request id) of each image written."""
    n = result.params["number_of_images"]
    written = []
    for im in result.images:
        path = write_new_file(out, f"auraflow_{im.seed}", im.data)
        written.append((path, im.data, im.request_id))
        sys.stdout.write(f"{path}\n")
        sys.stderr.write(f"image {im.index + 1}/{n}: {path} (seed {im.seed}, request id {im.request_id or 'none'}"
                         f"{image_notes(im)})\n")
    sys.stdout.flush()
    for failure in result.failures:
        kept = ""
        if failure.data:
            seed = remote_api.batch_seed(result.params["seed"], failure.index)
            path = write_new_file(out, f"auraflow_{seed}_rejected", failure.data)
            kept = f"; its bytes are kept as {path}"
        if report_failures or kept:
            sys.stderr.write(f"image {failure.index + 1}/{n}: {failure if report_failures else 'rejected'}{kept}\n")
    return written


def image_notes(im) -> str:
    """fal's word on an image: its NSFW flag, and the prompt drawn when it differs from the one sent."""
    notes = "" if im.nsfw is None else f", has_nsfw_concepts {str(im.nsfw).lower()}"
    return notes + ("" if im.prompt_used is None else f", drawn from the prompt {im.prompt_used!r}")
