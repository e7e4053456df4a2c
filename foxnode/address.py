"""Peer addresses: what a ``ws://``/``wss://`` URL must look like before the
node stores it or dials it.

A node dials what it stores, so this is the gate between strangers' input
and the node's outbound traffic; every rejection names its reason.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

import attrs

MAX_ADDRESS_LENGTH = 256
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


class InvalidAddress(ValueError):
    """``str(error)`` is the reason, suitable for a ``rejected`` entry."""


@attrs.frozen
class PeerAddress:
    url: str
    secure: bool
    host: str
    port: int
    path: str

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse(url: object) -> PeerAddress:
    """Validate a peer address; raise ``InvalidAddress`` with the reason."""
    if not isinstance(url, str):
        raise InvalidAddress("not a string")
    if len(url) > MAX_ADDRESS_LENGTH:
        raise InvalidAddress(f"longer than {MAX_ADDRESS_LENGTH} characters")
    if not url.startswith(("ws://", "wss://")):
        raise InvalidAddress("not a ws:// or wss:// URL")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidAddress("contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InvalidAddress(f"malformed URL ({e})") from None
    if "@" in parts.netloc:
        raise InvalidAddress("user info is not allowed")
    if parts.fragment or url.endswith("#"):
        raise InvalidAddress("a fragment is not allowed")
    host = parts.hostname or ""
    if not host:
        raise InvalidAddress("no host")
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidAddress("malformed IPv6 host") from None
    elif not _HOSTNAME.match(host):
        raise InvalidAddress("malformed host")
    secure = parts.scheme == "wss"
    if port is None:
        if parts.netloc.endswith(":"):
            raise InvalidAddress("empty port")
        port = 443 if secure else 80
    if not 1 <= port <= 65535:
        raise InvalidAddress("port out of range 1..65535")
    return PeerAddress(url, secure, host, port, parts.path or "/")


def with_host(port: int, host: str, secure: bool = False, path: str = "/ws") -> str:
    """The address of a node seen at ``host`` that announced ``port``."""
    if ":" in host:
        host = f"[{host}]"
    return f"{'wss' if secure else 'ws'}://{host}:{port}{path}"
