"""Cross-site control (PROTOCOL.md "Who may do what", Browsers): a web page
the user visits must not drive their node. The Host header must name the
node on every path (DNS rebinding), and an upgrade to /ws must come from the
node's own page or an --allowed-origin.

Requests are written byte by byte over real sockets (a browser's or an
attacker's exact headers), to a node in this process on 127.0.0.1 or ::1.
"""

from __future__ import annotations

import base64
import os
import socket
from typing import Any, Iterable

import orjson
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.python import usage

from foxnode import client, tap
from foxnode.testing import LOOPBACK, running_node, wait_for
from foxnode.web import Origin, host_key

TIMEOUT = 10.0
ABSENT = object()


def http_request(path: str, host: Any, headers: Iterable[tuple[str, str]] = (),
                 version: str = "HTTP/1.1") -> bytes:
    """A GET with Host ``host`` (a string, a list of them, or ABSENT); an
    upgrade to WebSocket when the path is /ws."""
    lines = [f"GET {path} {version}"]
    for h in [] if host is ABSENT else host if isinstance(host, list) else [host]:
        lines.append(f"Host: {h}")
    if path == "/ws":
        lines += ["Upgrade: websocket", "Connection: Upgrade",
                  f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}"]
        if not any(k.lower() == "sec-websocket-version" for k, _ in headers):
            lines.append("Sec-WebSocket-Version: 13")
    else:
        lines.append("Connection: close")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def exchange(port: int, data: bytes, family: int = socket.AF_INET) -> tuple[int | None, bytes]:
    """Send one request; the response's status (None if the node closed
    first) and what followed the status line, up to the end of its body or
    of its head for a 101."""
    where = (LOOPBACK, port) if family == socket.AF_INET else ("::1", port)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(where)
        sock.sendall(data)
        buf = b""
        while not _complete(buf):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
    if not buf.startswith(b"HTTP/1."):
        return None, buf
    status = int(buf.split(b" ", 2)[1])
    return status, buf


def _complete(buf: bytes) -> bool:
    """A whole response: a 101's head, or a head and its Content-Length of body
    (an upgrade refused keeps its connection: it asked for no close)."""
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    if head.startswith(b"HTTP/1.1 101"):
        return True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def statuses(port: int, cases: list[tuple[str, bytes]], family: int = socket.AF_INET) -> dict[str, Any]:
    return {name: exchange(port, data, family) for name, data in cases}


def body_of(response: bytes) -> Any:
    return orjson.loads(response.split(b"\r\n\r\n", 1)[1])


PATHS = {"/": 200, "/ws": 101, "/healthz": 200, "/metrics": 200, "/static/node.js": 200,
         "/no/such/page": 404}


def foreign_hosts(port: int) -> dict[str, Any]:
    """Host headers a rebinding page, or an attacker walking around the
    check, might send; none names the node."""
    p = port
    return {
        "another name": "evil.example",
        "another name, the node's port": f"evil.example:{p}",
        "the node's address as a prefix": f"127.0.0.1.evil.example:{p}",
        "localhost as a prefix": f"localhost.evil.example:{p}",
        "a name under localhost": f"evil.localhost:{p}",
        "user info": f"user@127.0.0.1:{p}",
        "user info after": f"127.0.0.1:{p}@evil.example",
        "a space and more": f"127.0.0.1 evil.example",
        "junk after the port": f"127.0.0.1:{p} x",
        "two ports": f"127.0.0.1:{p}:{p}",
        "port out of range": "127.0.0.1:99999",
        "port not a number": "127.0.0.1:abc",
        "empty": "",
        "unclosed bracket": "[::1",
        "IPv4 in brackets": f"[127.0.0.1]:{p}",
        "percent-escaped": f"%6cocalhost:{p}",
        "two trailing dots": f"localhost..:{p}",
        "a leading dot": f".localhost:{p}",
        "another loopback address": f"127.0.0.2:{p}",
        "IPv6 loopback, the connection came over IPv4": f"[::1]:{p}",
        "short IPv4 form": f"127.1:{p}",
        "IPv4 as one number": f"2130706433:{p}",
        "IPv4 in hex": f"0x7f.0.0.1:{p}",
        "a look-alike of localhost (Cyrillic o)": f"l\u043ecalhost:{p}",
        "two Host headers, the good one first": [f"127.0.0.1:{p}", "evil.example"],
        "two Host headers, the good one last": ["evil.example", f"127.0.0.1:{p}"],
        "two good Host headers": [f"127.0.0.1:{p}", f"127.0.0.1:{p}"],
        "no Host header": ABSENT,
    }


def own_hosts(port: int) -> dict[str, str]:
    p = port
    return {
        "the address it came in on": f"127.0.0.1:{p}",
        "the address without port": "127.0.0.1",
        "the address with a trailing dot": f"127.0.0.1.:{p}",
        "localhost": f"localhost:{p}",
        "localhost, other case": f"LocalHost:{p}",
        "localhost, trailing dot": f"localhost.:{p}",
        "localhost without port": "localhost",
    }


@pytest_twisted.ensureDeferred
async def test_a_host_not_naming_the_node_is_refused_on_every_path(reactor, node_dir):
    async with running_node(reactor, node_dir) as node:
        port = node.port
        cases = [(f"{name} at {path}", http_request(path, host))
                 for name, host in foreign_hosts(port).items() for path in PATHS]
        # HTTP/1.0 has no Host: still nothing is served without one.
        cases += [(f"HTTP/1.0 without Host at {path}", http_request(path, ABSENT, version="HTTP/1.0"))
                  for path in PATHS]
        got = await deferToThread(statuses, port, cases)
        wrong = {name: status for name, (status, _) in got.items() if status != 403}
        assert not wrong, wrong
        for name, (_, response) in got.items():
            refusal = body_of(response)
            assert refusal["status"] == 403 and "Host" in refusal["error"], (name, refusal)
            assert b"Traceback" not in response
        await wait_for(reactor, lambda: not node.node.connections, what="no WebSocket opened")
        assert node.service.site.ws_factory.countConnections == 0


@pytest_twisted.ensureDeferred
async def test_a_host_naming_the_node_is_served_on_every_path(reactor, node_dir):
    async with running_node(reactor, node_dir) as node:
        port = node.port
        cases = [(f"{name} at {path}", http_request(path, host))
                 for name, host in own_hosts(port).items() for path in PATHS]
        cases += [(f"HTTP/1.0 with Host at {path}",
                   http_request(path, f"127.0.0.1:{port}", version="HTTP/1.0"))
                  for path in PATHS if path != "/ws"]
        got = await deferToThread(statuses, port, cases)
    wrong = {name: status for name, (status, _) in got.items()
             if status != PATHS[name.rsplit(" at ", 1)[1]]}
    assert not wrong, wrong


@pytest_twisted.ensureDeferred
async def test_allowed_hosts_and_the_advertised_name_are_the_nodes(reactor, node_dir):
    async with running_node(reactor, node_dir, "--allowed-host", "node.example",
                            "--allowed-host", "127.0.0.7",
                            "--advertise", "ws://fox.example:9000/ws") as node:
        port = node.port
        cases = {
            "an allowed name": (f"node.example:{port}", 200),
            "an allowed name, other case, trailing dot": (f"Node.Example.:{port}", 200),
            "an allowed address": f"127.0.0.7:{port}",
            "the advertised name, any port": ("fox.example:1234", 200),
            "a name under an allowed one": (f"sub.node.example:{port}", 403),
            "an allowed name as a prefix": (f"node.example.evil:{port}", 403),
            "still not another name": ("evil.example", 403),
        }
        cases["an allowed address"] = (cases["an allowed address"], 200)
        got = await deferToThread(statuses, port, [
            (name, http_request("/healthz", host)) for name, (host, _) in cases.items()])
    wrong = {name: status for name, (status, _) in got.items() if status != cases[name][1]}
    assert not wrong, wrong


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
@pytest_twisted.ensureDeferred
async def test_ipv6_host_and_origin(reactor, node_dir):
    async with running_node(reactor, node_dir, "--listen", "tcp6:0:interface=\\:\\:1") as node:
        port = node.port
        cases = {
            "bracketed": (http_request("/healthz", f"[::1]:{port}"), 200),
            "another spelling": (http_request("/healthz", f"[0:0:0::1]:{port}"), 200),
            "not bracketed": (http_request("/healthz", f"::1:{port}"), 403),
            "a zone": (http_request("/healthz", f"[::1%25lo]:{port}"), 403),
            "IPv4 loopback, the connection came over IPv6": (http_request("/healthz", f"127.0.0.1:{port}"), 403),
            "own page": (http_request("/ws", f"[::1]:{port}", [("Origin", f"http://[::1]:{port}")]), 101),
            "own page, IPv4 origin": (http_request("/ws", f"[::1]:{port}", [("Origin", f"http://127.0.0.1:{port}")]), 403),
        }
        got = await deferToThread(statuses, port, [(n, d) for n, (d, _) in cases.items()], socket.AF_INET6)
    wrong = {name: status for name, (status, _) in got.items() if status != cases[name][1]}
    assert not wrong, wrong


# -- Origin ----------------------------------------------------------------------------

def origin_cases(port: int) -> dict[str, tuple[str, list[tuple[str, str]], int]]:
    """(Host, extra headers, expected status) for upgrades to /ws."""
    p = port
    here = f"127.0.0.1:{p}"

    def origin(*values: str) -> list[tuple[str, str]]:
        return [("Origin", v) for v in values]

    return {
        "no Origin (a script, another node)": (here, [], 101),
        "the node's page": (here, origin(f"http://{here}"), 101),
        "the node's page over https": (here, origin(f"https://{here}"), 101),
        "the node's page, scheme in capitals": (here, origin(f"HTTP://{here}"), 101),
        "the node's page at localhost": (f"localhost:{p}", origin(f"http://localhost:{p}"), 101),
        "the node's page at localhost.": (f"localhost.:{p}", origin(f"http://localhost.:{p}"), 101),
        "the node's page, Host without port, default port": ("127.0.0.1", origin("http://127.0.0.1"), 101),
        "null (a sandboxed frame, a file)": (here, origin("null"), 403),
        "empty": (here, origin(""), 403),
        "another site": (here, origin("http://evil.example"), 403),
        "another site, the node's port": (here, origin(f"http://evil.example:{p}"), 403),
        "the node's address as a prefix": (here, origin(f"http://127.0.0.1:{p}.evil.example"), 403),
        "another port": (here, origin(f"http://127.0.0.1:{p + 1}"), 403),
        "the default port": (here, origin("http://127.0.0.1"), 403),
        "another scheme": (here, origin(f"ws://{here}"), 403),
        "a file scheme": (here, origin(f"file://{here}"), 403),
        "with a path": (here, origin(f"http://{here}/"), 403),
        "with user info": (here, origin(f"http://user@{here}"), 403),
        "a list of two": (here, origin(f"http://{here}, http://evil.example"), 403),
        "two Origin headers, the good one first": (here, origin(f"http://{here}", "http://evil.example"), 403),
        "two Origin headers, the good one last": (here, origin("http://evil.example", f"http://{here}"), 403),
        "127.0.0.1's page to localhost": (f"localhost:{p}", origin(f"http://{here}"), 403),
        "localhost's page to 127.0.0.1": (here, origin(f"http://localhost:{p}"), 403),
        "the old draft's header, alone": (here, [("Sec-WebSocket-Origin", "http://evil.example")], 403),
        "the old draft's header beside a good Origin":
            (here, origin(f"http://{here}") + [("Sec-WebSocket-Origin", "http://evil.example")], 403),
        "the old draft's header, version 8":
            (here, [("Sec-WebSocket-Version", "8"), ("Sec-WebSocket-Origin", "http://evil.example")], 403),
        "the old draft's header naming the node's page":
            (here, [("Sec-WebSocket-Origin", f"http://{here}")], 101),
    }


@pytest_twisted.ensureDeferred
async def test_an_upgrade_from_another_sites_page_is_refused(reactor, node_dir):
    async with running_node(reactor, node_dir) as node:
        port = node.port
        cases = origin_cases(port)
        got = await deferToThread(statuses, port, [
            (name, http_request("/ws", host, headers)) for name, (host, headers, _) in cases.items()])
        wrong = {name: status for name, (status, _) in got.items() if status != cases[name][2]}
        assert not wrong, wrong
        for name, (status, response) in got.items():
            if status == 403:
                refusal = body_of(response)
                assert "Origin" in refusal["error"], (name, refusal)
        # Other paths are not for driving the node: a foreign Origin is served there.
        status, _ = await deferToThread(exchange, port, http_request(
            "/healthz", f"127.0.0.1:{port}", [("Origin", "http://evil.example")]))
        assert status == 200
        await wait_for(reactor, lambda: not node.node.connections, what="the upgrades' connections to close")
        assert node.service.site.gate.total == 0


@pytest_twisted.ensureDeferred
async def test_allowed_origins(reactor, node_dir):
    async with running_node(reactor, node_dir, "--allowed-origin", "https://app.example",
                            "--allowed-origin", "http://127.0.0.1:8080") as node:
        port = node.port
        here = f"127.0.0.1:{port}"
        cases = {
            "allowed": ("https://app.example", 101),
            "allowed, default port spelled out": ("https://app.example:443", 101),
            "allowed, other case": ("https://APP.example", 101),
            "allowed with port": ("http://127.0.0.1:8080", 101),
            "the node's own page still": (f"http://{here}", 101),
            "allowed name, other scheme": ("http://app.example", 403),
            "allowed name, other port": ("https://app.example:8443", 403),
            "allowed address, other port": ("http://127.0.0.1:8081", 403),
            "null": ("null", 403),
        }
        got = await deferToThread(statuses, port, [
            (name, http_request("/ws", here, [("Origin", o)])) for name, (o, _) in cases.items()])
    wrong = {name: status for name, (status, _) in got.items() if status != cases[name][1]}
    assert not wrong, wrong


@pytest_twisted.ensureDeferred
async def test_any_origin_still_checks_the_host(reactor, node_dir):
    async with running_node(reactor, node_dir, "--allowed-origin", "*") as node:
        port = node.port
        here = f"127.0.0.1:{port}"
        cases = {
            "null": (here, "null", 101),
            "another site": (here, "http://evil.example", 101),
            "a rebound name": (f"evil.example:{port}", f"http://evil.example:{port}", 403),
        }
        got = await deferToThread(statuses, port, [
            (name, http_request("/ws", h, [("Origin", o)])) for name, (h, o, _) in cases.items()])
    wrong = {name: status for name, (status, _) in got.items() if status != cases[name][2]}
    assert not wrong, wrong


@pytest_twisted.ensureDeferred
async def test_foxnodes_own_client_and_peers_are_served(reactor, node_dir):
    # They send no Origin and a Host naming the address they dialed.
    async with running_node(reactor, node_dir) as node:
        for url in (node.url, f"ws://localhost:{node.port}/ws"):
            reply = await client.call(reactor, url, "time", timeout=TIMEOUT)
            assert reply.status == 200, (url, reply)


# -- options ---------------------------------------------------------------------------

def test_options_parse_origins_and_hosts():
    options = tap.Options()
    options.parseOptions(["--allowed-origin", "https://App.Example", "--allowed-origin", "*",
                          "--allowed-host", "Node.Example.", "--allowed-host", "[::1]",
                          "--max-http", "50", "--max-http-per-ip", "5", "--handshake-timeout", "3"])
    web = options.web_config()
    assert web.allowed_origins == (Origin("https", "app.example", 443),)
    assert web.any_origin is True
    assert web.allowed_hosts == (host_key("node.example"), host_key("::1"))
    assert (web.max_http, web.max_http_per_ip, web.request_timeout) == (50, 5, 3.0)


def test_options_defaults():
    options = tap.Options()
    options.parseOptions([])
    web = options.web_config()
    assert (web.allowed_origins, web.any_origin, web.allowed_hosts) == ((), False, ())
    assert (web.max_http, web.max_http_per_ip, web.request_timeout) == (128, 16, 10.0)


@pytest.mark.parametrize("argv, named", [
    (["--allowed-origin", "null"], "--allowed-origin null"),
    (["--allowed-origin", "app.example"], "--allowed-origin app.example"),
    (["--allowed-origin", "https://app.example/"], "--allowed-origin https://app.example/"),
    (["--allowed-host", "node.example:9000"], "--allowed-host node.example:9000"),
    (["--allowed-host", "user@node.example"], "--allowed-host user@node.example"),
])
def test_bad_options_are_one_usage_line(argv, named):
    with pytest.raises(usage.UsageError, match=named):
        tap.Options().parseOptions(argv)
