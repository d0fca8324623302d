"""``python -m aura_flow fetch REQUEST_ID ...``: the images of hosted-API requests made before, by request id.

The v2 API keeps a request's result for an hour after it was submitted. A run that was interrupted, timed out or
lost its connection names the request ids that may still complete (and be billed); this command polls each until
it completes and writes its image to ``--out``, without submitting anything, so nothing is paid twice. The key
comes from ``SEGMIND_API_KEY`` or the key file, as for ``remote``; ``--provider fal --model pony-v7`` fetches from
fal's queue (key ``FAL_KEY``), where a request is found under the model it was submitted to.
"""
from __future__ import annotations

import sys

from .. import remote as remote_api
from ..images import write_new_file
from .flags import HelpFormatter, check_output_folder
from .remote import add_provider_flags, image_notes

FLAG_NAMES = {"timeout": "--timeout", "request_ids": "REQUEST_ID", "api_version": "the API version",
              "provider": "--provider", "model": "--model"}


def register(subparsers) -> None:
    p = subparsers.add_parser("fetch", help="fetch hosted-API images again by request id (within the hour)",
                              description="Fetch the images of earlier hosted Aura Flow API requests by their request "
                              "ids (printed by `remote`, shown in the remote node's progress text and errors, and "
                              "stored in the metadata of the images the node saves), write them to --out and print "
                              "their paths. Nothing is submitted or billed again; a result is kept for an hour "
                              "after its request was submitted.",
                              formatter_class=HelpFormatter,
                              epilog="exit codes: 0 all images written; 1 some or all failed (what arrived is still "
                                     "written); 2 bad arguments; 130 interrupted")
    p.add_argument("request_ids", nargs="+", metavar="REQUEST_ID",
                   help=f"a request id (up to {remote_api.MAX_FETCH})")
    p.add_argument("--out", default="out", help="folder for the images (existing files are never overwritten)")
    add_provider_flags(p)
    p.add_argument("--key-file", default=None, help="file holding the API key (default: $AURAFLOW_SEGMIND_KEY_FILE "
                                                    "or ~/.config/auraflow/segmind_api_key; for fal "
                                                    "$AURAFLOW_FAL_KEY_FILE or ~/.config/auraflow/fal_key)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for one image")
    p.set_defaults(func=run, parser=p)


def run(args) -> int:
    remote_api.check_request_ids(args.request_ids, "REQUEST_ID")  # before the key is read
    timeout = remote_api.positive_seconds(args.timeout, "--timeout")
    check_output_folder(args.out)
    try:
        client = remote_api.RemoteClient.from_environment(
            key_file=args.key_file, timeout=timeout, api_version="v2" if args.provider == "segmind" else None,
            names=FLAG_NAMES, provider=args.provider, model=args.model)
        result = client.fetch(args.request_ids)
    except remote_api.RemoteError as exc:
        sys.stderr.write(f"error: {exc}\n")
        if exc.result is not None:
            _write(exc.result, args.out)
        return 130 if isinstance(exc, remote_api.RemoteInterrupted) else 1
    _write(result, args.out)
    for failure in result.failures:
        sys.stderr.write(f"{args.request_ids[failure.index]}: {failure}\n")
    return 1 if result.failures else 0


def _write(result, out) -> None:
    ids = result.params["request_ids"]
    for im in result.images:
        path = write_new_file(out, f"auraflow_{ids[im.index]}", im.data)
        sys.stdout.write(f"{path}\n")
        seed = "" if im.seed is None else f", seed {im.seed}"
        sys.stderr.write(f"{ids[im.index]}: {path} ({im.width}x{im.height} {im.format}{seed}{image_notes(im)})\n")
    sys.stdout.flush()
