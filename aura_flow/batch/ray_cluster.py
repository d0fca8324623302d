"""Joining a Ray cluster for the ``ray`` batch backend (`aura_flow.batch.ray`): ``auto``, ``HOST:PORT`` (a node's
GCS, ``ray start --head --port``) or ``ray://HOST:PORT`` (Ray Client, ``ray[client]``).

- The address is checked before ``ray.init``: Ray itself waits forever for a GCS that does not answer (it retries
  every few seconds, logging), so the place it would connect to is probed with a plain TCP connect first, and
  nothing answering there is a `ClusterUnavailable` naming it. Ray rewrites a loopback address (127.0.0.1,
  localhost) to this machine's network address; the probe does the same (`ray._private.services`), so a cluster
  that listens on 127.0.0.1 only is said, not waited for.
- The workers run this process's ``aura_flow``: the package is sent to the cluster (``runtime_env`` ``py_modules``,
  about 1 MiB, cached by Ray per content), so a driver run from a git checkout that the cluster's Python does not have
  (or has in another version) gets the same code, hence the same bytes. The nodes need the pack's dependencies
  (torch, diffusers, transformers, safetensors, ...) and Ray of the driver's version; not the pack itself.
- While jobs run the driver watches the cluster (`Watch`): when the GCS stops answering (the head node died, ``ray
  stop`` on it) the run ends with a `ClusterUnavailable`; the jobs in flight are neither failed nor recorded, so
  the same command run against the cluster started again does exactly the jobs not done.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from ..errors import ParameterError
from ..headless import ServerUnavailable

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 3.0  # seconds a TCP connect to the cluster may take
WATCH_EVERY = 3.0  # seconds between probes while no result arrives
CODE_EXCLUDES = ["__pycache__", "*.pyc"]
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class ClusterUnavailable(ServerUnavailable):
    """No Ray cluster answers at the address (before the run, or it stopped answering during it): the batch
    command's exit code 3, the jobs not done stay to resume."""


def target(address: str):
    """(host, port) this process connects to for ``address`` ("auto": ``RAY_ADDRESS`` or the cluster ``ray start``
    recorded on this machine; a loopback host as Ray rewrites it); None for "local"."""
    if address == "local":
        return None
    if address.startswith("ray://"):
        hostport = address[len("ray://"):].split("/", 1)[0]
    else:
        try:
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:  # another Ray layout: probe what was given (auto: RAY_ADDRESS, if set)
            hostport = os.environ.get("RAY_ADDRESS", "") if address == "auto" else address
        else:
            try:
                hostport = canonicalize_bootstrap_address(address) or ""
            except Exception as exc:  # noqa: BLE001 - Ray's own wording: no cluster found, a bad address
                raise ClusterUnavailable(f"ray_address={address}: {exc}; start one with `ray start --head` on a "
                                         "node, or use ray_address=local") from None
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        if address == "auto" and not hostport:
            return None  # Ray finds the cluster itself
        raise ParameterError(f"ray_address={address!r} is not a Ray address; give local, auto, HOST:PORT or "
                             "ray://HOST:PORT")
    return host.strip("[]"), int(port)


def answers(hostport, timeout: float = PROBE_TIMEOUT) -> bool:
    try:
        with socket.create_connection(hostport, timeout=timeout):
            return True
    except OSError:
        return False


def check_reachable(address: str, hostport) -> None:
    if hostport is not None and not answers(hostport):
        host, port = hostport
        given = ((os.environ.get("RAY_ADDRESS") if address == "auto" else address) or "").rsplit(":", 1)[0]
        rewritten = f" (Ray connects to {host}:{port} for {address}: it replaces a loopback address with this " \
            "machine's)" if given in LOOPBACK and host != given else ""
        raise ClusterUnavailable(f"ray_address={address}: no Ray cluster answers at {host}:{port}{rewritten}; "
                                 "start one with `ray start --head`, or check the address and port")


def code_env() -> dict:
    """The runtime_env that sends this process's ``aura_flow`` package to the workers."""
    import aura_flow

    return {"py_modules": [str(Path(aura_flow.__file__).parent)], "excludes": list(CODE_EXCLUDES)}


class Watch:
    """Probes the cluster every ``every`` seconds (`due`), and at once after a worker error (`gone`)."""

    def __init__(self, address: str, hostport, every: float = WATCH_EVERY):
        self.address, self.hostport, self.every = address, hostport, every
        self.last = time.monotonic()

    def gone(self) -> bool:
        """True when the cluster does not answer twice, a second apart (a blip is not a death)."""
        self.last = time.monotonic()
        if self.hostport is None or answers(self.hostport):
            return False
        time.sleep(1.0)
        return not answers(self.hostport)

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every

    def error(self, done: int, in_flight: int) -> ClusterUnavailable:
        where = "{}:{}".format(*self.hostport) if self.hostport else self.address
        return ClusterUnavailable(
            f"ray_address={self.address}: the Ray cluster stopped answering at {where} (its head node is "
            f"gone); {done} jobs finished in this run are in the manifest, the {in_flight} in flight were not "
            "recorded. Start the cluster again and run the same command: it does the jobs not done")


__all__ = ["ClusterUnavailable", "Watch", "target", "answers", "check_reachable", "code_env"]
