"""The API's address: https anywhere, plain http only to loopback (tests, local proxies)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import RemoteError

DEFAULT_API_URL = "https://api.segmind.com/v1/aura-flow"
API_URL_ENV = "SEGMIND_API_URL"


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
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path.split('?')[0]}"


def parse_endpoint(url: str) -> Endpoint:
    """Check the API URL: https anywhere, plain http only to loopback (tests, local proxies)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise RemoteError(f"{API_URL_ENV}: not a valid URL; use e.g. {DEFAULT_API_URL}") from None
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise RemoteError(f"{API_URL_ENV}: expected an https:// URL with a host, e.g. {DEFAULT_API_URL}")
    if parts.scheme == "http" and not is_loopback(host):
        raise RemoteError(f"{API_URL_ENV}: plain http:// is refused for {host} (the API key would travel "
                          "unencrypted); use https://, or http:// only to 127.0.0.1, ::1 or localhost")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Endpoint(parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path)


# ----------------------------------------------------------------------------------------------- results
