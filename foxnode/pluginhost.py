"""Plugins: loading them, and serving what they mark (plugin.py has what
a plugin writes).

Loading (``load``), at start, before the node opens its files: the plugins
that ship with foxnode (``DEFAULTS``: the lab's ``time``), then every
installed entry point of the group ``foxnode.plugins``, then each
``--plugin`` (a dotted module name, or a path to a ``.py`` file; a name
without a dot that names a plugin shipped in ``foxnode.plugins``, such as
``chain``, is that one), in that order; a module met twice (``time`` is also foxnode's own entry point) is
loaded once. A plugin that does not import, marks nothing, or serves an op
another plugin serves is a ``PluginError``: one line, and the node does not
start. ``service.build`` refuses an op the node serves itself the same way.

Serving (``PluginHost``): each op is wrapped so that a plugin's fault is
the plugin's reply, never the node's end: ``OpError`` is its status, an
exception a 500 naming the plugin (and a log line naming plugin and op,
with where it was raised), a response that is not JSON a 500 too. An op or
validator that holds the reactor longer than ``slow_call`` is named in a
warning. Validators are ``Screen``: gossip asks it about every message on a
screened topic before delivering or forwarding it (gossip.py). ``@service``
functions are made into services by ``services()``, which ``service.build``
adds to the node's tree last; ``ctx.ask`` is ``_ask`` (foxnode.client's
``call``), unless the host is given another.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import sys
import traceback
from types import ModuleType
from typing import Any, Callable, Iterable, Sequence

import attrs
import orjson
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.python.failure import Failure

from foxnode import codec, logs
from foxnode.config import PluginConfig
from foxnode.plugin import MARK, Ctx, OpError, OpMark, ServiceMark, ValidatorMark

log = logs.logger(__name__)

#: the entry-point group installed packages add plugins with
GROUP = "foxnode.plugins"
#: (name, module) of the plugins that ship with foxnode, loaded always
#: (also foxnode's own entry points, which an editable install may lack)
DEFAULTS: tuple[tuple[str, str], ...] = (("time", "foxnode.plugins.time"),)


class PluginError(Exception):
    """A plugin the node cannot start with; the message is one line."""


@attrs.frozen
class Plugin:
    """One loaded plugin: its module and what it marks."""

    name: str
    #: how it was asked for, for messages: "--plugin greet.py", "entry point time"
    origin: str
    module: ModuleType
    ops: tuple[tuple[OpMark, Callable], ...]
    validators: tuple[tuple[ValidatorMark, Callable], ...]
    #: ``@service`` functions: each makes an ``IService`` from the plugin's ctx
    services: tuple[Callable, ...] = ()


def _where(error: BaseException) -> str:
    """Where ``error`` was raised, as "file, line n", outside importlib."""
    if isinstance(error, SyntaxError) and error.filename:
        return f"{os.path.basename(error.filename)}, line {error.lineno}"
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith("<frozen") and "importlib" not in f.filename
              and os.path.abspath(f.filename) != os.path.abspath(__file__)]
    if not frames:
        return ""
    last = frames[-1]
    return f"{os.path.basename(last.filename)}, line {last.lineno}"


def describe_error(error: BaseException) -> str:
    """``error`` in one line: its type, its text, where it was raised."""
    text = str(error).strip().splitlines()
    where = _where(error)
    return f"{type(error).__name__}: {text[0] if text else ''}" + (f" ({where})" if where else "")


def _is_file(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or "/" in spec


def check_spec(spec: str) -> str | None:
    """What is wrong with a ``--plugin`` value, before anything is imported; None: nothing."""
    if _is_file(spec):
        if not spec.endswith(".py"):
            return "give a dotted module name or a path to a .py file"
        if not os.path.isfile(spec):
            return "no such file"
        if not os.path.splitext(os.path.basename(spec))[0].isidentifier():
            return "the file's name (without .py) must be a Python identifier"
        return None
    if not spec or not all(part.isidentifier() for part in spec.split(".")):
        return "give a dotted module name (mypackage.myplugin) or a path to a .py file"
    return None


def _import_file(path: str) -> ModuleType:
    name = os.path.splitext(os.path.basename(path))[0]
    module_name = f"foxnode_plugin_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _marked(module: ModuleType) -> tuple[list, list, list]:
    ops, validators, services = [], [], []
    for value in vars(module).values():
        mark = getattr(value, MARK, None) if callable(value) else None
        if isinstance(mark, OpMark):
            ops.append((mark, value))
        elif isinstance(mark, ValidatorMark):
            validators.append((mark, value))
        elif isinstance(mark, ServiceMark):
            services.append(value)
    return ops, validators, services


#: what a plugin's name may be: it names its directory (``plugins/<name>``) and its log lines
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def _plugin(name: str, origin: str, module: ModuleType) -> Plugin:
    if not _NAME.fullmatch(name) or ".." in name:
        raise PluginError(f"{origin}: the name {name!r} is not a plugin's "
                          "(letters, digits, _ . -, at most 64, not starting with . or -)")
    ops, validators, services = _marked(module)
    if not ops and not validators and not services:
        raise PluginError(f"{origin}: marks no op and no validator, nor a service "
                          "(decorate functions with foxnode.plugin's @op, @validator or @service)")
    names = [m.name for m, _ in ops]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PluginError(f"{origin}: serves op \"{twice[0]}\" twice")
    return Plugin(name, origin, module, tuple(ops), tuple(validators), tuple(services))


def _import(origin: str, importer: Callable[[], Any]) -> Any:
    try:
        return importer()
    except PluginError:
        raise
    except BaseException as e:  # SystemExit and KeyboardInterrupt at import too: the node's start is ours
        if isinstance(e, KeyboardInterrupt):
            raise
        raise PluginError(f"{origin}: cannot import it: {describe_error(e)}") from None


@functools.cache
def _entry_points() -> tuple[Any, ...]:
    # Read once a process: finding them reads every installed package's
    # metadata (14 ms), and a host process starts 50 nodes or more.
    return tuple(importlib.metadata.entry_points(group=GROUP))


#: where the plugins that ship with foxnode live: ``--plugin chain`` is ``foxnode.plugins.chain``
SHIPPED = "foxnode.plugins"


def shipped(spec: str) -> str | None:
    """The module of the shipped plugin ``spec`` names (a name without a
    dot, such as ``chain``), or None."""
    if "." in spec or not spec.isidentifier():
        return None
    try:
        found = importlib.util.find_spec(f"{SHIPPED}.{spec}")
    except (ImportError, ValueError):
        return None
    return f"{SHIPPED}.{spec}" if found is not None else None


def load(specs: Sequence[str] = (), entry_points: Iterable[Any] | None = None) -> list[Plugin]:
    """Import the default plugins, the installed ones and ``specs``
    (``--plugin`` values); ``PluginError`` for the first that fails."""
    plugins: list[Plugin] = []
    #: what was loaded: module names, and the real paths of files
    loaded: set[str] = set()

    def add(key: str, name: str, origin: str, importer: Callable[[], ModuleType]) -> None:
        if key in loaded:
            return  # foxnode's own time is its entry point too
        loaded.add(key)
        module = _import(origin, importer)
        if not isinstance(module, ModuleType):
            raise PluginError(f"{origin}: names {type(module).__name__}, not a module")
        loaded.add(module.__name__)
        plugins.append(_plugin(name, origin, module))

    for name, module_name in DEFAULTS:
        add(module_name, name, f"plugin {name}", lambda: importlib.import_module(module_name))
    for ep in (_entry_points() if entry_points is None else entry_points):
        add(ep.module, ep.name, f"plugin {ep.name} (entry point {ep.value})", ep.load)
    for spec in specs:
        origin = f"--plugin {spec}"
        wrong = check_spec(spec)
        if wrong:
            raise PluginError(f"{origin}: {wrong}")
        if _is_file(spec):
            add(os.path.realpath(spec), os.path.splitext(os.path.basename(spec))[0], origin,
                lambda: _import_file(spec))
        elif shipped(spec):
            module_name = shipped(spec)
            add(module_name, spec, origin, lambda: importlib.import_module(module_name))
        else:
            add(spec, spec, origin, lambda: importlib.import_module(spec))
    _check_unique(plugins)
    return plugins


def _check_unique(plugins: Sequence[Plugin]) -> None:
    named: dict[str, Plugin] = {}
    served: dict[str, Plugin] = {}
    for plugin in plugins:
        if plugin.name in named:
            raise PluginError(f"{plugin.origin}: another plugin is named \"{plugin.name}\" "
                              f"({named[plugin.name].origin})")
        named[plugin.name] = plugin
        for mark, _ in plugin.ops:
            if mark.name in served:
                raise PluginError(f"{plugin.origin}: op \"{mark.name}\" is served by plugin "
                                  f"\"{served[mark.name].name}\" already")
            served[mark.name] = plugin


class _Caller:
    """The connection a plugin's ``ctx.publish``/``ctx.history`` come on:
    the node's operator (plugins are the operator's code), with nothing to
    send to."""

    trusted = True
    direction = "plugin"
    node_id = None
    peer_addr = None
    remote_host = "plugin"
    local_host = "127.0.0.1"

    def __init__(self, name: str) -> None:
        self.name = name
        self.fox_state: dict = {}

    def describe(self) -> str:
        return f"plugin {self.name}"

    def can_send(self) -> bool:
        return False

    def send_frame(self, frame: bytes, droppable: bool = False) -> bool:
        return False

    def close(self, code: int = 1000, reason: str | None = None) -> None:
        pass


class PluginHost:
    """The loaded plugins of one node: their ctxs, their ops wrapped for
    the node's table, their validators as a ``Screen``."""

    def __init__(self, reactor: Any, plugins: Sequence[Plugin], node_id: str, config: PluginConfig,
                 request: Callable[[Any, codec.Request], Any], peers: Callable[[], list],
                 metrics: Any = None, ask: Callable[..., Deferred] | None = None) -> None:
        self.reactor = reactor
        self.plugins = list(plugins)
        self.config = config
        self.metrics = metrics
        self._request = request
        self.ctxs: dict[str, Ctx] = {}
        #: op name -> the wrapped op (node.Op)
        self.ops: dict[str, Callable] = {}
        #: op name -> the plugin serving it
        self.owners: dict[str, Plugin] = {}
        validators: dict[str, list[tuple[Plugin, Ctx, Callable]]] = {}
        #: (plugin, its ctx, its ``@service`` function), made into services by ``services()``
        self._services: list[tuple[Plugin, Ctx, Callable]] = []
        ask = ask or (lambda addr, op, args, timeout: _ask(reactor, addr, op, args, timeout))
        for plugin in self.plugins:
            caller = _Caller(plugin.name)
            ctx = Ctx(plugin.name, node_id, reactor,
                      os.path.join(config.data_dir, "plugins", plugin.name),
                      lambda op, args, caller=caller: self._call(caller, op, args), peers, ask)
            self.ctxs[plugin.name] = ctx
            for mark, fn in plugin.ops:
                self.ops[mark.name] = self._wrap(plugin, ctx, mark, fn)
                self.owners[mark.name] = plugin
            for vmark, fn in plugin.validators:
                validators.setdefault(vmark.topic, []).append((plugin, ctx, fn))
            for fn in plugin.services:
                self._services.append((plugin, ctx, fn))
        #: None when no plugin validates anything: gossip's path stays as it was
        self.screen = Screen(self, validators) if validators else None

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plugins]

    def services(self) -> list[Any]:
        """The plugins' ``@service`` functions, made (``service.build`` adds them to
        the node's tree); a raise, or what is not an ``IService``, is a
        ``PluginError``."""
        from twisted.application.service import IService

        made = []
        for plugin, ctx, fn in self._services:
            try:
                svc = fn(ctx)
            except Exception as e:
                raise PluginError(f"{plugin.origin}: its service {fn.__name__} raised "
                                  f"{describe_error(e)}") from None
            if not IService.providedBy(svc):
                raise PluginError(f"{plugin.origin}: its service {fn.__name__} returned "
                                  f"{type(svc).__name__}, not an IService")
            made.append(svc)
        return made

    # -- ops ---------------------------------------------------------------------

    def _wrap(self, plugin: Plugin, ctx: Ctx, mark: OpMark, fn: Callable) -> Callable:
        name, any_args = mark.name, mark.any_args
        seconds = self.reactor.seconds

        def serve(conn: Any, args: Any) -> Any:
            if not any_args:
                if args is None:
                    args = {}
                elif not isinstance(args, dict):
                    return codec.bad_args(name, '"args" must be an object')
            started = seconds()
            try:
                result = fn(ctx, args)
            except OpError as e:
                return codec.Reply(e.status, e.message, e.response)
            except (Exception, SystemExit) as e:  # sys.exit() in an op ends the op, not the node
                return self._failed(plugin, name, e)
            finally:
                self._timed(plugin, f"op {name}", seconds() - started)
            if inspect.iscoroutine(result):
                result = ensureDeferred(self._stepped(result, plugin, f"op {name}"))
            if isinstance(result, Deferred):
                return result.addCallbacks(self._reply, self._deferred_failed,
                                           callbackArgs=(plugin, name), errbackArgs=(plugin, name))
            return self._reply(result, plugin, name)

        serve.__name__ = serve.__qualname__ = f"plugin_{plugin.name}_{name}"
        return serve

    def _stepped(self, coro: Any, plugin: Plugin, what: str) -> Any:
        """``coro`` (an ``async def`` op's) driven step by step, each step
        timed: a coroutine blocks the reactor between its awaits."""
        seconds = self.reactor.seconds
        sent, error = None, None
        while True:
            started = seconds()
            try:
                step = coro.send(sent) if error is None else coro.throw(error)
            except StopIteration as done:
                return done.value
            finally:
                self._timed(plugin, what, seconds() - started)
            try:
                sent, error = (yield step), None
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as e:  # a failed await: into the coroutine, as Twisted would
                sent, error = None, e

    def _reply(self, result: Any, plugin: Plugin, name: str) -> codec.Reply:
        try:
            # Encoded once, here: what is not JSON is the plugin's fault, named.
            return codec.ok(orjson.Fragment(orjson.dumps(result)))
        except (orjson.JSONEncodeError, TypeError) as e:
            return self._failed(plugin, name, e, what="returned what is not JSON")

    def _deferred_failed(self, failure: Failure, plugin: Plugin, name: str) -> codec.Reply:
        if failure.check(OpError):
            e = failure.value
            return codec.Reply(e.status, e.message, e.response)
        return self._failed(plugin, name, failure.value)

    def _failed(self, plugin: Plugin, name: str, error: BaseException, what: str = "raised") -> codec.Reply:
        self._count(plugin, "op")
        log.error("plugin {plugin}: op {op} {what} {error}; replied 500, the node goes on",
                  plugin=plugin.name, op=name, what=what, error=describe_error(error))
        return codec.Reply(500, f'Plugin "{plugin.name}" failed in operation "{name}"; '
                                "the node's log says why.")

    def _count(self, plugin: Plugin, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.plugin_errors.labels(plugin.name, kind).inc()

    def _timed(self, plugin: Plugin, what: str, took: float) -> None:
        if took > self.config.slow_call:
            log.warn("plugin {plugin}: {what} held the reactor for {took:.2f} s (more than {limit:g} s): "
                     "nothing else ran meanwhile; move slow work to a thread (deferToThread)",
                     plugin=plugin.name, what=what, took=took, limit=self.config.slow_call)

    # -- what ctx calls ------------------------------------------------------------

    def _call(self, caller: _Caller, op: str, args: Any) -> Deferred:
        d: Deferred = Deferred()

        def settled(reply: Any) -> Any:
            if isinstance(reply, Failure):
                return reply
            if not reply.ok():
                raise OpError(reply.status if 400 <= reply.status <= 599 else 500, reply.error)
            response = reply.response
            if isinstance(response, orjson.Fragment):
                response = orjson.loads(orjson.dumps(response))
            return response

        try:
            result = self._request(caller, codec.Request(op, args))
        except Exception:
            d.errback()
            return d
        if isinstance(result, Deferred):
            return result.addBoth(settled)
        try:
            d.callback(settled(result))
        except Exception:
            d.errback()
        return d


def _ask(reactor: Any, addr: str, op: str, args: Any, timeout: float) -> Deferred:
    """``ctx.ask``: one request to the node at ``addr``, as its client."""
    from foxnode import client

    def settled(reply: codec.Reply) -> Any:
        if not reply.ok():
            status = reply.status if isinstance(reply.status, int) and 400 <= reply.status <= 599 else 502
            raise OpError(status, str(reply.error))
        return reply.response

    try:
        # A pinned address (ws://host:port/ws#<node id>) is dialled without its pin:
        # the WebSocket URL has no fragment.
        d = client.call(reactor, addr.split("#", 1)[0], op, args, timeout=timeout)
    except Exception:  # an address client.call cannot parse: a failed Deferred, as a refused dial
        return fail()
    return d.addCallback(settled)


class Screen:
    """The validators, by topic: gossip asks before it delivers or forwards."""

    def __init__(self, host: PluginHost, validators: dict[str, list[tuple[Plugin, Ctx, Callable]]]) -> None:
        self.host = host
        self.by_topic = validators
        #: the topics screened (gossip checks membership first: the rest pass untouched)
        self.topics = frozenset(validators)

    def __call__(self, message: dict[str, Any]) -> str | None:
        """None if every validator of the message's topic passes it, else
        the name of the plugin whose validator refused it."""
        seconds = self.host.reactor.seconds
        for plugin, ctx, fn in self.by_topic.get(message["topic"], ()):
            started = seconds()
            try:
                verdict = fn(ctx, dict(message))
                if inspect.iscoroutine(verdict):
                    verdict.close()  # validators decide at once; never run, never awaited
            except (Exception, SystemExit) as e:
                self.host._count(plugin, "validator")
                log.error("plugin {plugin}: validator of topic {topic} raised {error}; "
                          "message {id} refused", plugin=plugin.name, topic=message["topic"],
                          error=describe_error(e), id=str(message["id"])[:16])
                verdict = False
            finally:
                self.host._timed(plugin, f"validator of topic {message['topic']}", seconds() - started)
            if verdict is not True:
                if verdict is not False:
                    log.error("plugin {plugin}: validator of topic {topic} returned {verdict!r:.40}, "
                              "not True or False; message {id} refused", plugin=plugin.name,
                              topic=message["topic"], verdict=verdict, id=str(message["id"])[:16])
                metrics = self.host.metrics
                if metrics is not None:
                    metrics.validator_refused.labels(plugin.name).inc()
                return plugin.name
        return None
