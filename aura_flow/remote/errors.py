"""The remote client's errors. Every message says what happened and what to do, and never contains the key."""
from __future__ import annotations


class RemoteError(RuntimeError):
    """The hosted API could not deliver. The message says what happened and what to do; never contains the key.

    ``status`` is the HTTP status (None for network faults), ``index`` the image of a batch it concerns,
    ``billed`` True/False/None (unknown), ``data`` the body bytes of an image that arrived but was rejected,
    ``request_id`` the service's id of the request (find a billed result again with it), when it named one.
    Raised by `RemoteClient.generate`, it carries the whole call's `RemoteResult` as ``result`` (its
    ``failures`` hold every image's error, with their ``data``).
    """

    result = None

    def __init__(self, message, *, status=None, index=None, billed=False, data=None, request_id=None):
        super().__init__(message)
        self.status = status
        self.index = index
        self.billed = billed
        self.data = data
        self.request_id = request_id


class MissingKeyError(RemoteError):
    """No API key in the environment or the key file."""


class RemoteTimeout(RemoteError):
    """The service did not answer within the total timeout (the generation may still finish and be billed)."""


class RemoteInterrupted(RemoteError):
    """``should_stop()`` turned true. ``result`` holds the images that had already arrived; ``request_ids`` the
    requests the service had named that may still complete (and be billed)."""

    def __init__(self, message, result=None, request_ids=()):
        super().__init__(message, billed=None)
        self.result = result
        self.request_ids = list(request_ids)


class Cancelled(Exception):
    """Internal: the whole call is being cancelled (interrupt or an earlier fatal error)."""

