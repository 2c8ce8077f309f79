"""DNS-rebinding and cross-origin defence: which ``Host`` and ``Origin`` headers the server answers.

A web page can rebind its own name to 127.0.0.1 and then drive a loopback server from the player's
browser (its requests carry ``Host: evil.example``), or post to ``http://127.0.0.1:8000`` from any site
(its requests carry ``Origin: https://evil.example``). So by default a server bound to a loopback
address answers only loopback host names, one bound to a specific address that address and loopback,
and one bound to a wildcard (0.0.0.0, ::) any host; ``--allowed-hosts`` replaces the set. A request
with an ``Origin`` header is answered only when it is same-origin (the origin's host is the request's
host), its host is an allowed host (a page served by this machine), or the origin is listed in
``--allowed-origins`` (which also turns on CORS for it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

LOOPBACK = ("localhost", "127.0.0.1", "::1")
WILDCARD = ("0.0.0.0", "::", "")


def default_allowed_hosts(bind_host: str) -> tuple[str, ...]:
    """The host names a server bound to ``bind_host`` answers by default ("*": any)."""
    host = bind_host.strip("[]").lower()
    if host in WILDCARD:
        return ("*",)
    if _is_loopback(host):
        return LOOPBACK
    return (host, *LOOPBACK)


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host of a ``Host`` header value (port and IPv6 brackets removed), lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header[1:]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostPolicy:
    def __init__(self, allowed_hosts: Iterable[str], allowed_origins: Iterable[str] = ()):
        self.hosts = frozenset(h.strip().strip("[]").lower() for h in allowed_hosts)
        self.origins = frozenset(o.strip().rstrip("/").lower() for o in allowed_origins)
        self.any_host, self.any_origin = "*" in self.hosts, "*" in self.origins

    def host_ok(self, header: str | None) -> bool:
        if self.any_host:
            return True
        return header is not None and self._allowed(host_name(header))

    def _allowed(self, host: str) -> bool:
        return host in self.hosts or (_is_loopback(host) and any(_is_loopback(h) for h in self.hosts))

    def origin_ok(self, origin: str | None, host_header: str | None) -> bool:
        """A request without Origin (not from a browser page), from the same origin as its Host, from a
        listed origin, or from a page whose host is an allowed non-wildcard host."""
        if origin is None or self.any_origin:
            return True
        origin = origin.strip().rstrip("/").lower()
        if origin in self.origins:
            return True
        host = urlsplit(origin).hostname
        if host is None:  # "null" (a sandboxed page, a file://) or garbage
            return False
        same_origin = host_header is not None and host == host_name(host_header)
        return same_origin or (not self.any_host and self._allowed(host))
