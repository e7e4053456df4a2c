"""Limits against abuse: a token bucket, the one rate-limiting primitive
used for requests per connection, dials, and misbehaving peers."""

from __future__ import annotations

import ipaddress

from typing import Callable


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up.

    ``clock`` is a function returning seconds (``reactor.seconds``), so
    tests drive it with ``twisted.internet.task.Clock``.
    """

    __slots__ = ("rate", "burst", "_tokens", "_at", "_clock", "refused")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        #: refusals since the last success
        self.refused = 0

    def take(self, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are enough; False means over the limit."""
        now = self._clock()
        tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if tokens >= cost:
            self._tokens = tokens - cost
            self.refused = 0
            return True
        self._tokens = tokens
        self.refused += 1
        return False

    def ready(self, cost: float = 1.0) -> bool:
        """Whether ``take(cost)`` would succeed now, without taking."""
        elapsed = self._clock() - self._at
        return min(self.burst, self._tokens + elapsed * self.rate) >= cost

    def retry_after(self, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens will be there."""
        missing = cost - self._tokens
        return 0.0 if missing <= 0 else missing / self.rate


def client_key(host: str) -> str:
    """Whom a per-address cap counts: an IPv4 address (an IPv4-mapped IPv6
    address counts as its IPv4 address), or an IPv6 client's /64 (one host
    usually holds a whole /64). The HTTP gate and the WebSocket admission
    count by the same key, so neither can be walked around with the other's."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        return str(mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
