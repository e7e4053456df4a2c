"""What a plugin writes: ``op``, ``validator``, ``OpError``, and the ``Ctx``
it is handed (PROTOCOL.md "Plugins"; README "The homework: add an op").

    from foxnode.plugin import op, OpError

    @op("greet")
    def greet(ctx, args):
        if "name" not in args:
            raise OpError(400, 'Operation "greet" requires "name".')
        return {"greeting": "hi " + args["name"]}

The decorators only mark a function (its plugin is the module it is in);
pluginhost.py finds the marks when it loads the module, and serves them.
``@service`` marks ``fn(ctx)`` returning a Twisted ``IService``: what the
plugin does over time (timers, a file to close), started after the node's
own services and stopped before them, by the node's service tree.

``Ctx`` is all of the node a plugin may use: the node's id, ``publish``,
``history``, its live peers and ``ask`` (an op of a peer's), a data
directory of the plugin's own, the reactor and its clock, a logger. It holds no reference to the node, its
stores or its keys; what it does, it does through the node's own ops.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred

from foxnode import logs

#: the attribute a decorator marks a function with
MARK = "__foxnode_plugin__"


class OpError(Exception):
    """Raised by an op: the reply is ``status`` with ``message`` as its
    ``error`` (and ``response``, null by default). Raised by a call on
    ``Ctx`` (``publish``, ``history``) for a refused request, with the
    node's status and text."""

    def __init__(self, status: int, message: str, response: Any = None) -> None:
        if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
            raise ValueError(f"OpError: status must be a whole number from 400 to 599, not {status!r}")
        super().__init__(status, message)
        self.status = status
        self.message = str(message)
        self.response = response

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


@attrs.frozen
class OpMark:
    name: str
    #: the op takes ``args`` as the request gave them (any JSON, or None),
    #: not only an object (the seed's ``time`` ignores them altogether)
    any_args: bool = False


@attrs.frozen
class ValidatorMark:
    topic: str


@attrs.frozen
class ServiceMark:
    pass


def op(name: str, *, any_args: bool = False) -> Callable[[Callable], Callable]:
    """Serve the decorated ``fn(ctx, args)`` as op ``name``. ``args`` is the
    request's ``args`` object (``{}`` when it had none; a request whose
    ``args`` is not an object gets 400 unless ``any_args``). ``fn`` returns
    the response (JSON: 200 OK with it), a Deferred of it, or is ``async
    def``; it raises ``OpError`` for any other reply."""
    if not isinstance(name, str) or not name or not name.isprintable() or len(name) > 64:
        raise ValueError(f"op: the name must be a printable string of 1 to 64 characters, not {name!r}")

    def mark(fn: Callable) -> Callable:
        setattr(fn, MARK, OpMark(name, any_args))
        return fn

    return mark


def validator(topic: str) -> Callable[[Callable], Callable]:
    """Run the decorated ``fn(ctx, message) -> bool`` on every message on
    ``topic`` at this node, before it is delivered or forwarded: ``True``
    passes it, anything else (``False``, ``None``, an exception) stops it
    here. ``message`` is the event a subscriber would get: ``id``,
    ``topic``, ``payload``, ``origin``, ``created``, ``from``,
    ``encrypted``, ``pow``; a sealed message (``encrypted`` set) has
    ``payload`` None: the node cannot read it."""
    if not isinstance(topic, str) or not topic:
        raise ValueError(f"validator: the topic must be a non-empty string, not {topic!r}")

    def mark(fn: Callable) -> Callable:
        setattr(fn, MARK, ValidatorMark(topic))
        return fn

    return mark


def service(fn: Callable) -> Callable:
    """Mark ``fn(ctx) -> IService``: called once when the node is built;
    the service it returns joins the node's service tree (started last,
    stopped first). A raise there stops the node's start in one line."""
    if not callable(fn):
        raise ValueError(f"service: decorate a function, not {fn!r}")
    setattr(fn, MARK, ServiceMark())
    return fn


class Ctx:
    """What a plugin's ops and validators are handed, one per plugin."""

    __slots__ = ("name", "node_id", "reactor", "log", "_data_dir", "_call", "_peers", "_ask")

    def __init__(self, name: str, node_id: str, reactor: Any, data_dir: str,
                 call: Callable[[str, dict], Deferred], peers: Callable[[], list],
                 ask: Callable[..., Deferred] | None = None) -> None:
        #: the plugin's name (as ``info`` lists it)
        self.name = name
        #: this node's id (64 hex digits)
        self.node_id = node_id
        #: the node's reactor: ``ctx.reactor.callLater`` for timers
        self.reactor = reactor
        #: a ``twisted.logger.Logger`` named for the plugin
        self.log = logs.logger(f"foxnode.plugin.{name}")
        self._data_dir = data_dir
        self._call = call
        self._peers = peers
        self._ask = ask

    def now(self) -> float:
        """The node's clock (``reactor.seconds()``): unix seconds, a float."""
        return float(self.reactor.seconds())

    @property
    def data_dir(self) -> str:
        """A directory of the plugin's own in the node's data directory
        (``plugins/<name>``), made when first asked for."""
        os.makedirs(self._data_dir, exist_ok=True)
        return self._data_dir

    def peers(self) -> list[dict[str, Any]]:
        """The live peer connections: ``{"node_id", "addr", "direction"}`` each (copies)."""
        return [{"node_id": p["node_id"], "addr": p["addr"], "direction": p["direction"]}
                for p in self._peers()]

    def publish(self, topic: str, payload: Any, **options: Any) -> Deferred:
        """Publish as a client of this node would (``ttl``, ``key``, ``to``,
        ``sign``, ``pow`` as ``publish`` takes them): a Deferred of the
        response (``{"id", "pow"}``), or failing with ``OpError``."""
        return self._call("publish", {"topic": topic, "payload": payload, **options})

    def history(self, **args: Any) -> Deferred:
        """The node's ``history`` op with these args (``topics``, ``since``,
        ...): a Deferred of its response, or failing with ``OpError``
        (404 where the node keeps no history)."""
        return self._call("history", args)

    def ask(self, addr: str, op: str, args: Any = None, timeout: float = 10.0) -> Deferred:
        """Call ``op`` of the node at ``addr`` (a peer's ``addr`` from
        ``peers()``), as a client of it: one connection, one request,
        closed. A Deferred of the response, failing with ``OpError`` for a
        reply that is not 2xx (the peer's status and text), or with the
        connection's error (refused, timed out) when there was no reply."""
        if self._ask is None:
            from twisted.internet.defer import fail

            return fail(OpError(501, "ctx.ask is not available on this node"))
        return self._ask(addr, op, args, timeout)

    def __repr__(self) -> str:
        return f"<Ctx of plugin {self.name!r} on node {self.node_id[:12]}>"
