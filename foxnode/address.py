"""Peer addresses: what a ``ws://``/``wss://`` URL must look like before the
node stores it or dials it.

A node dials what it stores, so this is the gate between strangers' input
and the node's outbound traffic; every rejection names its reason.

An address may *pin* the node expected behind it, as geth's enode URLs do:
``ws://host:port/ws#<node id>`` (64 lowercase hex digits, nothing else
after ``#``). The pinned form is its own record in the store; it is dialed
without the fragment, and a dial that meets another node is refused
(``wrong-node``, handshake.py).
"""

from __future__ import annotations

import ipaddress
import re

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
    #: the node id the address pins (after ``#``), if it does
    node_id: str | None = None

    @property
    def dial_url(self) -> str:
        """What is dialed: the URL without its pinned node id."""
        return self.url.split("#", 1)[0]

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    """True for a host that reaches this machine itself: localhost names,
    loopback and unspecified addresses, also IPv4-mapped in IPv6."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return any(a is not None and (a.is_loopback or a.is_unspecified) for a in (ip, mapped))


# The authority of a peer URL: a host name, a dotted IPv4 address or a
# bracketed IPv6 address, then an optional port. Anything else (user info,
# junk after "]", several colons) is refused before the parts are read.
_AUTHORITY = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\[\]:@/?#]+)(?::(?P<port>[^:]*))?$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
# What ipaddress.IPv4Address takes (four decimal octets, no leading zeros),
# matched without building one: registers check an address each.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")
_UNPRINTABLE = re.compile(r"[\s\x00-\x1f\x7f]")
_NODE_ID = re.compile(r"[0-9a-f]{64}")
# scheme, authority, path (a query may follow; a fragment is refused before)
_SPLIT = re.compile(r"^(wss?)://([^/?#]*)([^?#]*)")


def _check_host(host: str) -> str:
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidAddress("malformed IPv6 host") from None
        return host[1:-1]
    if _IPV4.fullmatch(host):
        return host  # the common case, decided by the cheaper pattern
    if not _HOSTNAME.match(host):
        raise InvalidAddress("malformed host")
    # A name ending in a number is an IPv4 address to a resolver, and
    # 127.1, 2130706433 or 0x7f.1 all reach 127.0.0.1: only the canonical
    # dotted quad is taken, so that what an address reaches is plain to see.
    if _NUMERIC_LABEL.match(host.lower().rstrip(".").rsplit(".", 1)[-1]):
        raise InvalidAddress("malformed IPv4 address (give four decimal parts)")
    return host


def parse(url: object) -> PeerAddress:
    """Validate a peer address; raise ``InvalidAddress`` with the reason."""
    if not isinstance(url, str):
        raise InvalidAddress("not a string")
    if len(url) > MAX_ADDRESS_LENGTH:
        raise InvalidAddress(f"longer than {MAX_ADDRESS_LENGTH} characters")
    if not url.startswith(("ws://", "wss://")):
        raise InvalidAddress("not a ws:// or wss:// URL")
    if _UNPRINTABLE.search(url):
        raise InvalidAddress("contains whitespace or control characters")
    pinned = None
    if "#" in url:
        fragment = url.split("#", 1)[1]
        if not _NODE_ID.fullmatch(fragment):
            raise InvalidAddress("after # only a node id may follow (64 lowercase hex digits)")
        pinned = fragment
    scheme, netloc, path = _SPLIT.match(url).groups()
    if "@" in netloc:
        raise InvalidAddress("user info is not allowed")
    if not netloc:
        raise InvalidAddress("no host")
    authority = _AUTHORITY.match(netloc)
    if authority is None:
        raise InvalidAddress("malformed host or port")
    host = _check_host(authority["host"]).lower()  # names are case-insensitive
    secure = scheme == "wss"
    port_text = authority["port"]
    if port_text is None:
        port = 443 if secure else 80
    elif port_text == "":
        raise InvalidAddress("empty port")
    elif not port_text.isascii() or not port_text.isdigit():
        raise InvalidAddress("port is not a number")
    elif len(port_text) > 1 and port_text.startswith("0"):
        raise InvalidAddress("port has leading zeros")
    else:
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise InvalidAddress("port out of range 1..65535")
    return PeerAddress(url, secure, host, port, path or "/", pinned)


def endpoint(url: str) -> str:
    """What ``url`` reaches, one spelling for all of its spellings: the
    scheme, the host in lower case without a trailing dot (an IPv6 one
    compressed), the port, the path; no query (the node's web server does
    not look at it) and no pinned node id. Raises ``InvalidAddress``."""
    parsed = parse(url)
    host = parsed.host.rstrip(".")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        host = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    return f"{'wss' if parsed.secure else 'ws'}://{host}:{parsed.port}{parsed.path}"


def pinned(url: str, node_id: str) -> str:
    """``url`` pinned to ``node_id`` (any pin it had replaced)."""
    return f"{url.split('#', 1)[0]}#{node_id}"


def with_host(port: int, host: str, secure: bool = False, path: str = "/ws") -> str:
    """The address of a node seen at ``host`` that announced ``port``."""
    if ":" in host:
        host = f"[{host}]"
    return f"{'wss' if secure else 'ws'}://{host}:{port}{path}"
