"""``--frames own|autobahn`` (frames.py): the node's own frame fast path,
or Autobahn's frame code alone. Over a real socket the two cannot be told
apart: the same replies, the same limits, the same handling of fragments,
pings and close codes. A bad value is refused (tests/test_bad_options.py
runs it through twistd too), and the import check names what a changed
Autobahn lacks instead of letting the fast path misread it.
"""

from __future__ import annotations

import importlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import foxnode
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage

from foxnode import codec, frames, tap, testing
from foxnode.protocol import FoxServerFactory, FoxServerOwnFrames, FoxServerProtocol
from foxnode.testing import start_node

from test_attacks import BINARY, CLOSE, CONT, PING, PONG, TEXT, Raw, frame, upgraded

LIMIT = 4096
PATHS = [frames.OWN, frames.AUTOBAHN]


def _time_free(reply: Any) -> Any:
    """A reply with the clock's reading taken out (it differs run to run)."""
    if isinstance(reply, dict) and isinstance(reply.get("response"), dict) and "time" in reply["response"]:
        return {**reply, "response": {**reply["response"], "time": "<time>"}}
    return reply


def _frames_until_reply(raw: Raw) -> list[Any]:
    """Every frame up to and including the next text message (pongs too)."""
    seen: list[Any] = []
    while True:
        fin, op, payload = raw.read_frame()
        if op == TEXT:
            seen.append(("text", fin, _time_free(json.loads(payload))))
            return seen
        seen.append((op, fin, payload))


def _conversation(port: int) -> list[Any]:
    """One connection through what both paths must read alike."""
    out: list[Any] = []
    with upgraded(port) as raw:
        def say(*data: bytes) -> None:
            raw.send(b"".join(data))
            out.append(_frames_until_reply(raw))

        say(frame(TEXT, b'{"op": "time", "id": 1}'))
        say(frame(TEXT, b'{"op": "nope", "id": 2}'))
        say(frame(TEXT, b"not json"))
        say(frame(TEXT, b"42"))
        say(frame(BINARY, b'{"op": "peers", "id": 3}'))
        # Several in one segment: answered in order, as one stream.
        raw.send(frame(TEXT, b'{"op": "time", "id": 4}') + frame(TEXT, b'{"op": "peers", "id": 5}'))
        out.append(_frames_until_reply(raw) + _frames_until_reply(raw))
        # Fragmented, with a ping between the fragments: the pong comes first.
        say(frame(TEXT, b'{"op": "ti', fin=False), frame(PING, b"in-between"), frame(CONT, b'me", "id": 6}'))
        say(frame(PING, b"alone"), frame(TEXT, b'{"op": "time", "id": 7}'))
        # Both length forms, multi-byte UTF-8, and a message of exactly the limit.
        pad = '{"op": "nope", "id": 8, "pad": "' + "é" * 100 + '"}'
        say(frame(TEXT, pad.encode()))
        head = b'{"op": "nope", "id": 9, "pad": "'
        at_limit = head + b"x" * (LIMIT - len(head) - 2) + b'"}'
        assert len(at_limit) == LIMIT
        say(frame(TEXT, at_limit))
        say(frame(TEXT, at_limit[:1000], fin=False), frame(CONT, at_limit[1000:]))
        # An empty text frame is not JSON.
        say(frame(TEXT, b""))
        # The client closes: the node answers with the same code.
        raw.send(frame(CLOSE, struct.pack("!H", 1000) + b"bye"))
        out.append(("close", raw.read_close()))
    return out


#: Connections the node ends, and the close code each must end with.
ENDINGS = {
    "over the limit": [frame(TEXT, b" " * (LIMIT + 1))],
    "over the limit in fragments": [frame(TEXT, b" " * 3000, fin=False), frame(CONT, b" " * 3000)],
    "bad UTF-8": [frame(TEXT, b'{"op": "\xff"}')],
    "bad UTF-8 across fragments": [frame(TEXT, b'{"op": "\xc3', fin=False), frame(CONT, b'\x28"}')],
    "unmasked": [frame(TEXT, b'{"op": "time"}', mask=False)],
    "reserved bit": [frame(TEXT, b'{"op": "time"}', rsv=4)],
    "length not minimal": [b"\x81\xfe\x00\x05" + b"\x00" * 4 + b"hello"],
    "continuation without a start": [frame(CONT, b"x")],
    "ping over 125 bytes": [frame(PING, b"p" * 126)],
}
CODES = {"over the limit": 1009, "over the limit in fragments": 1009, "bad UTF-8": 1007,
         "bad UTF-8 across fragments": 1007}


def _endings(port: int) -> dict[str, Any]:
    out = {}
    for name, data in ENDINGS.items():
        with upgraded(port) as raw:
            first = _time_free(raw.request({"op": "time", "id": "before"}))
            raw.send(b"".join(data))
            out[name] = (first, raw.read_close())
    return out


async def _run(reactor: Any, directory: Path, path: str) -> tuple[list[Any], dict[str, Any]]:
    running = await start_node(reactor, directory, "--frames", path, "--max-message-size", str(LIMIT))
    try:
        factory = running.service.site.ws_factory
        assert factory.frames == path
        assert factory.protocol is (FoxServerOwnFrames if path == frames.OWN else FoxServerProtocol)
        talk = await deferToThread(_conversation, running.port)
        ended = await deferToThread(_endings, running.port)
        return talk, ended
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_both_paths_answer_alike_over_a_socket(reactor, tmp_path):
    own = await _run(reactor, tmp_path / "own", frames.OWN)
    theirs = await _run(reactor, tmp_path / "autobahn", frames.AUTOBAHN)
    assert own == theirs
    talk, ended = own
    # Alike, and right: not both wrong the same way.
    assert talk[0] == [("text", True, {"status": 200, "error": "OK", "id": 1,
                                       "response": {"time": "<time>", "time_zone": talk[0][0][2]["response"]["time_zone"]}})]
    assert talk[1][0][2]["status"] == 404 and talk[1][0][2]["id"] == 2
    assert talk[2][0][2] == {"status": 500, "error": "Cannot parse request message.", "response": None}
    assert talk[3][0][2] == {"status": 500, "error": "Message body is not supported.", "response": None}
    assert [f[2]["id"] for f in talk[5]] == [4, 5]
    assert talk[6][0] == (PONG, True, b"in-between") and talk[6][1][2]["id"] == 6
    assert talk[7][0] == (PONG, True, b"alone") and talk[7][1][2]["id"] == 7
    assert [m[-1][2].get("id") for m in talk[8:11]] == [8, 9, 9]
    assert talk[-1] == ("close", 1000)
    for name, (first, code) in ended.items():
        assert first["status"] == 200 and first["id"] == "before", name
        assert code == CODES.get(name, 1002), f"{name}: closed with {code}"


def _pinged(port: int) -> list[Any]:
    """The node's own pings (--ping-interval 1), answered: the connection
    stays and serves."""
    out: list[Any] = []
    with upgraded(port) as raw:
        for _ in range(2):
            fin, op, payload = raw.read_frame()
            out.append((fin, op, len(payload)))
            raw.send(frame(PONG, payload))
        out.append(_time_free(raw.request({"op": "time", "id": "after"})))
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest_twisted.ensureDeferred
async def test_the_nodes_pings_are_the_same_both_ways(reactor, tmp_path, path):
    running = await start_node(reactor, tmp_path, "--frames", path, "--ping-interval", "1", "--ping-timeout", "1")
    try:
        got = await deferToThread(_pinged, running.port)
    finally:
        await running.stop()
    assert [f[:2] for f in got[:2]] == [(True, PING), (True, PING)]
    assert got[2]["status"] == 200 and got[2]["id"] == "after"


def test_a_bad_value_is_refused():
    with pytest.raises(usage.UsageError, match=r"^--frames 'fast': give own or autobahn$"):
        tap.Options().parseOptions(["--frames", "fast"])
    with pytest.raises(ValueError, match="give own or autobahn"):
        FoxServerFactory(None, Clock(), frames="fast")
    options = tap.Options()
    options.parseOptions(["--frames", "autobahn"])
    assert options.node_config().frames == frames.AUTOBAHN


def _fresh_import(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[str]]:
    """foxnode.frames imported anew (the module everyone else holds is put
    back afterwards) and the log lines its import wrote."""
    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(formatEvent(event))

    # The package's attribute too: ``from foxnode import frames`` reads it.
    monkeypatch.setattr(foxnode, "frames", frames)
    monkeypatch.delitem(sys.modules, "foxnode.frames")
    globalLogPublisher.addObserver(observe)
    try:
        return importlib.import_module("foxnode.frames"), lines
    finally:
        globalLogPublisher.removeObserver(observe)


def test_the_import_check_names_a_missing_method(monkeypatch):
    import autobahn

    monkeypatch.delattr(WebSocketProtocol, "_cancelAutoPingTimeoutCall")
    fresh, lines = _fresh_import(monkeypatch)
    assert fresh is not frames
    assert fresh.MISSING == ("_cancelAutoPingTimeoutCall",)
    assert fresh.effective(frames.OWN) == frames.AUTOBAHN
    warned = [line for line in lines if "_cancelAutoPingTimeoutCall" in line]
    assert len(warned) == 1 and f"Autobahn {autobahn.__version__} lacks" in warned[0], lines


def test_the_import_check_names_a_missing_connection_attribute(monkeypatch):
    # Instance attributes are looked for on an opened connection: one that
    # Autobahn no longer copies from its factory is missed.
    monkeypatch.setattr(WebSocketServerProtocol, "CONFIG_ATTRS",
                        [a for a in WebSocketServerProtocol.CONFIG_ATTRS if a != "applyMask"])
    fresh, _ = _fresh_import(monkeypatch)
    assert fresh.MISSING == ("applyMask",)


def test_this_autobahn_passes_the_import_check():
    assert frames.MISSING == () and frames.missing_insides() == ()


def test_a_factory_falls_back_when_autobahn_lacks_something(monkeypatch):
    monkeypatch.setattr(frames, "MISSING", ("applyMask",))
    factory = FoxServerFactory(None, Clock(), frames=frames.OWN)
    assert factory.frames == frames.AUTOBAHN and factory.protocol is FoxServerProtocol


def test_the_suite_can_run_on_either_path(monkeypatch, tmp_path):
    monkeypatch.delenv(testing.FRAMES_ENV, raising=False)
    assert testing.frames_under_test() == frames.OWN
    assert "--frames" not in testing.twistd_command(tmp_path, 0)
    monkeypatch.setenv(testing.FRAMES_ENV, "autobahn")
    assert testing.node_options(tmp_path)["frames"] == frames.AUTOBAHN
    # A test's own --frames wins.
    assert testing.node_options(tmp_path, "--frames", "own")["frames"] == frames.OWN
    assert testing.twistd_command(tmp_path, 0)[-2:] == ["--frames", "autobahn"]
    server, _client, _pump = testing.connected_pair(_Quiet(), _Quiet(), Clock())
    assert type(server) is FoxServerProtocol
    monkeypatch.setenv(testing.FRAMES_ENV, "fast")
    with pytest.raises(ValueError, match="FOXNODE_FRAMES='fast': give own or autobahn"):
        testing.frames_under_test()


class _Quiet:
    def connection_opened(self, conn): pass
    def connection_lost(self, conn, code, reason): pass
    def handle_request(self, conn, req): return codec.Reply(200, "OK")


def test_autobahn_pretty_prints_a_connection_only_for_a_line_that_is_written(monkeypatch):
    # Autobahn formats every connection's options for a debug line that is
    # written only with --debug: a sixth of a large devnet's CPU.
    import pprint

    import autobahn.websocket.protocol as autobahn_protocol
    from twisted.internet.testing import StringTransport

    calls = []
    real = pprint.PrettyPrinter.pformat
    monkeypatch.setattr(pprint.PrettyPrinter, "pformat", lambda self, o: calls.append(o) or real(self, o))
    protocol = FoxServerFactory(None, reactor=Clock()).buildProtocol(None)
    protocol.makeConnection(StringTransport())
    assert calls == []
    # Written, the line is what it was.
    value = {"maxMessagePayloadSize": 1 << 20, "nested": [1, 2, 3]}
    line = formatEvent({"log_format": "\n{attrs}", "attrs": autobahn_protocol.pformat(value)})
    assert line == "\n" + pprint.pformat(value) and len(calls) == 2
