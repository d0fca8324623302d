"""The API's address and version: https anywhere, plain http only to loopback (tests, local proxies); the async v2
queue by default, the sync v1 path when asked for.

v2 addresses are derived from ``SEGMIND_API_URL`` as the provider's SDK derives them from its base URL: the
``/vN`` segment before the model's slug becomes ``/v2`` (``https://api.segmind.com/v1/aura-flow`` submits to
``https://api.segmind.com/v2/aura-flow``). The status and result URLs come from the submit's answer and must stay
on the API's own host (same scheme, host and port), because the key travels with them.
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, replace
from urllib.parse import quote, urljoin, urlsplit

from ..errors import shown
from .errors import RemoteError
from .providers import FAL, SEGMIND

DEFAULT_API_URL = SEGMIND.default_url
API_URL_ENV = SEGMIND.url_env
URL_ENVS = {SEGMIND.url_env: SEGMIND.default_url, FAL.url_env: FAL.default_url}
# A request id as the services give them (Segmind's rq-..., fal's UUIDs): it goes into URL paths and file names,
# so nothing else ('/', '..', '%', spaces) is accepted from an answer, a command line or a node.
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
API_VERSION_ENV = "SEGMIND_API_VERSION"
API_VERSIONS = ("v2", "v1")  # v2: submit, poll, fetch (the default); v1: one blocking request per image
AUTO = "auto"  # follow $SEGMIND_API_VERSION, else v2

_VERSION_SEGMENT = re.compile(r"v\d+")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    path: str

    @property
    def display(self) -> str:
        """The URL without user:password or query, for messages."""
        return f"{self.origin}{self.path.split('?')[0]}"

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def same_host(self, other: "Endpoint") -> bool:
        return (self.scheme, self.host.lower(), self.port) == (other.scheme, other.host.lower(), other.port)


def parse_endpoint(url: str, name: str = API_URL_ENV) -> Endpoint:
    """Check a URL: https anywhere, plain http only to loopback, nothing that cannot be sent as it is (spaces,
    CR/LF and other control characters, non-ASCII). ``name`` says where the URL came from."""
    hint = f"; use e.g. {URL_ENVS[name]}" if name in URL_ENVS else ""
    if not isinstance(url, str):
        raise RemoteError(f"{name}: not a URL{hint}", billed=False)
    bad = next((i for i, c in enumerate(url.strip()) if not 0x21 <= ord(c) <= 0x7E), None)
    if bad is not None:
        char = url.strip()[bad]
        what = ("a space" if char == " " else "a control character (CR, LF, tab...)" if ord(char) < 0x21 or
                ord(char) == 0x7F else "a non-ASCII character")
        raise RemoteError(f"{name}: the URL has {what} at position {bad + 1}, which cannot be sent in a request; "
                          f"percent-encode it (a space is %20) or fix the value. Nothing was sent{hint}", billed=False)
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise RemoteError(f"{name}: not a valid URL{hint}") from None
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise RemoteError(f"{name}: expected an https:// URL with a host{hint}")
    if parts.scheme == "http" and not is_loopback(host):
        what = "the API key" if name in URL_ENVS else "it"
        raise RemoteError(f"{name}: plain http:// is refused for {host} ({what} would travel unencrypted); use "
                          "https://, or http:// only to 127.0.0.1, ::1 or localhost")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Endpoint(parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path)


def v2_submit_endpoint(ep: Endpoint) -> Endpoint:
    """Where v2 submits go, derived from the v1 URL as the SDK does: ``.../v1/aura-flow`` -> ``.../v2/aura-flow``.

    The last path segment is the model's slug; the segment before it is dropped when it names a version
    (``v1``, ``v2``, ...), and ``/v2`` put in its place. A query (a proxy's) is kept.
    """
    path, _, query = ep.path.partition("?")
    base, _, slug = path.rstrip("/").rpartition("/")
    head, _, last = base.rpartition("/")
    if _VERSION_SEGMENT.fullmatch(last):
        base = head
    return replace(ep, path=f"{base}/v2/{slug}" + (f"?{query}" if query else ""))


def v2_request_paths(submit: Endpoint, request_id: str) -> tuple[str, str]:
    """The documented status and result paths of a request, for an answer that names none."""
    base = submit.path.split("?")[0].rstrip("/").rpartition("/")[0]  # .../v2
    rid = quote(request_id, safe="-_.")
    return f"{base}/requests/{rid}/status", f"{base}/requests/{rid}"


def on_api_host(api: Endpoint, url: str, what: str, scrub) -> Endpoint:
    """``url`` (absolute, or relative to the API) as an Endpoint on the API's own host, or a RemoteError.

    The key goes with every request to it, so another scheme, host or port is refused, not followed.
    """
    absolute = urljoin(f"{api.origin}{api.path}", url.strip())
    try:
        target = parse_endpoint(absolute, what)
    except RemoteError:
        target = None
    if target is None or not target.same_host(api):
        raise RemoteError(f"the service named {scrub(absolute.split('?')[0])} as the {what}, which is not on the API "
                          f"host {api.origin}; refused, so the API key goes nowhere else. A proxy in between must "
                          f"rewrite status_url and response_url to itself", billed=None)
    return target


def resolve_api_version(choice: str | None = None, where: str = "api_version") -> str:
    """``"v1"`` or ``"v2"``: ``choice`` when it names one, else ``$SEGMIND_API_VERSION``, else v2.

    ``where`` names the setting as the caller's user knows it (``--api-version``, the node's ``api_version``).
    """
    if choice is not None and str(choice).strip().lower() not in ("", AUTO):
        value = str(choice).strip().lower()
        if value not in API_VERSIONS:
            raise RemoteError(f"{where}={shown(choice)} is not known; use v2 (the async queue, the default) or v1 (the "
                              "sync API)")
        return value
    env = os.environ.get(API_VERSION_ENV, "").strip().lower()
    if not env:
        return "v2"
    if env not in API_VERSIONS:
        raise RemoteError(f"{API_VERSION_ENV}={shown(env)} is not known; set it to v2 (the async queue, the default) or "
                          "v1 (the sync API), or unset it")
    return env
