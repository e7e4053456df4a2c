"""Slow HTTP clients (issue 11, item 7): each request must arrive whole
within --handshake-timeout however its bytes trickle, and connections not
yet upgraded to WebSocket are capped per client address and in all.

Real sockets on loopback; clients bind 127.0.0.x source addresses so that,
with ``--trusted 127.9.9.9/32``, they are outsiders to the node.
"""

from __future__ import annotations

import http.client
import resource
import select
import socket
import subprocess
import time
from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread

from foxnode import client
from foxnode.testing import (LOOPBACK, NodeProcess, free_port, running_node, stop_all,
                             twistd_command, wait_for, wait_until_serving)

OUTSIDERS = ("--trusted", "127.9.9.9/32")
HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def connect(port: int, source: str) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=10, source_address=(source, 0))
    sock.setblocking(False)
    return sock


def closed(sock: socket.socket) -> bool:
    """Whether the node has ended the connection (whatever it sent first)."""
    try:
        while select.select([sock], [], [], 0)[0]:
            if not sock.recv(65536):
                return True
    except OSError:
        return True
    return False


def trickle(sock: socket.socket, data: bytes) -> bool:
    """Send ``data`` without waiting; False once the node has closed."""
    try:
        sock.send(data)
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:
        return False
    return not closed(sock)


def slowloris(port: int, seconds: float, first: bytes = HEAD, source: str = "127.0.0.2",
              every: float = 0.3) -> float | None:
    """Send ``first``, then one header byte every ``every`` seconds; how long
    the node kept the connection, or None if it still did after ``seconds``."""
    sock = connect(port, source)
    try:
        started = time.monotonic()
        trickle(sock, first)
        while time.monotonic() - started < seconds:
            if not trickle(sock, b"x"):
                return time.monotonic() - started
            time.sleep(every)
        return None
    finally:
        sock.close()


def healthz(port: int, source: str, timeout: float = 5.0) -> int:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()


# -- the deadline -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_header_trickling_in_is_closed_at_the_deadline(reactor, node_dir):
    async with running_node(reactor, node_dir, "--handshake-timeout", "1.5", *OUTSIDERS) as node:
        # Twisted's idle timeout restarts on every byte: it alone never fires here.
        kept = await deferToThread(slowloris, node.port, 8)
        assert kept is not None, "a header trickling in held the connection for 8 s"
        assert kept < 1.5 + 3, kept
        # The operator's own clients are held to it too.
        kept = await deferToThread(slowloris, node.port, 8, HEAD, "127.9.9.9")
        assert kept is not None and kept < 1.5 + 3, kept
        await wait_for(reactor, lambda: node.service.site.gate.total == 0, what="the gate to empty")


@pytest_twisted.ensureDeferred
async def test_a_body_trickling_in_is_closed_at_the_deadline(reactor, node_dir):
    first = b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n"
    async with running_node(reactor, node_dir, "--handshake-timeout", "1.5", *OUTSIDERS) as node:
        kept = await deferToThread(slowloris, node.port, 8, first)
    assert kept is not None and kept < 1.5 + 3, kept


def send_body(port: int, head: bytes, body_chunks: list[bytes]) -> tuple[bytes, int]:
    """Send a request and as much of its body as the node takes; what the
    node answered, and how many body bytes went out before it closed."""
    sock = socket.create_connection((LOOPBACK, port), timeout=10)
    sent = 0
    try:
        sock.sendall(head)
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break
            sent += len(chunk)
        answer = b""
        sock.settimeout(10)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except OSError:
            pass
        return answer, sent
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_request_bodies_are_bounded_in_any_framing(reactor, node_dir):
    # twisted.web would spool either body to a temporary file on disk.
    async with running_node(reactor, node_dir) as node:
        announced = (b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
                     % (1 << 30))
        answer, sent = await deferToThread(send_body, node.port, announced, [b"x" * 65536] * 64)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b"Request body too large" in answer
        chunked = b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"%x\r\n%s\r\n" % (65536, b"y" * 65536)
        answer, sent = await deferToThread(send_body, node.port, chunked, [chunk] * 64)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        # A small body is read as usual and the request served.
        small = (b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n"
                 b"Connection: close\r\n\r\n0123456789")
        answer, _ = await deferToThread(send_body, node.port, small, [])
        assert answer.startswith(b"HTTP/1.1 "), answer[:200]
        assert not answer.startswith(b"HTTP/1.1 413"), answer[:200]


def keep_alive(port: int, pauses: list[float], dribble_last: bool) -> list[Any]:
    """Requests on one connection, each sent whole after a pause; then,
    if ``dribble_last``, one more trickling in. What became of each."""
    sock = socket.create_connection((LOOPBACK, port), timeout=10, source_address=("127.0.0.2", 0))
    outcomes: list[Any] = []
    try:
        for pause in pauses:
            time.sleep(pause)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            reply = sock.recv(65536)
            outcomes.append(reply.split(b"\r\n", 1)[0])
        if dribble_last:
            sock.setblocking(False)
            started = time.monotonic()
            trickle(sock, HEAD)
            while time.monotonic() - started < 8:
                if not trickle(sock, b"x"):
                    break
                time.sleep(0.3)
            outcomes.append(time.monotonic() - started)
    finally:
        sock.close()
    return outcomes


@pytest_twisted.ensureDeferred
async def test_each_keep_alive_request_has_its_own_deadline(reactor, node_dir):
    async with running_node(reactor, node_dir, "--handshake-timeout", "1.5", *OUTSIDERS) as node:
        # Prompt requests on one connection for longer than one deadline: served.
        first, second, third, dribbled = await deferToThread(keep_alive, node.port, [0, 1.0, 1.0], True)
        assert [first, second, third] == [b"HTTP/1.1 200 OK"] * 3
        # The next request trickling in is closed at its own deadline.
        assert dribbled < 1.5 + 3, dribbled


# -- the caps ---------------------------------------------------------------------------

def flood(port: int, count: int, source: str, probe_from: str) -> tuple[int, int, int]:
    """``count`` slow connections from ``source``, kept trickling while
    /healthz is asked from ``probe_from``; (/healthz status or 0, how many the
    node closed at once, how many it kept)."""
    socks = []
    try:
        for _ in range(count):
            try:
                sock = connect(port, source)
            except OSError:
                break
            trickle(sock, HEAD)
            socks.append(sock)
        time.sleep(0.5)
        open_socks = [s for s in socks if trickle(s, b"x")]
        try:
            status = healthz(port, probe_from)
        except OSError:
            status = 0
        kept = sum(1 for s in open_socks if trickle(s, b"x"))
        return status, len(socks) - len(open_socks), kept
    finally:
        for s in socks:
            s.close()


def test_slow_connections_from_one_address_leave_healthz_answering(tmp_path):
    # In a process with few file descriptors, as a small VM or container
    # has them: 240 slow connections used to take them all.
    directory = tmp_path / "node"
    directory.mkdir()
    port = free_port()
    limit = 128

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    log_path = directory / "twistd.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(twistd_command(directory, port, *OUTSIDERS),
                                   stdout=log_file, stderr=subprocess.STDOUT, cwd=directory,
                                   preexec_fn=few_descriptors)
    node = NodeProcess(process, port, directory, log_path)
    try:
        wait_until_serving(node)
        status, refused, kept = flood(port, 240, "127.0.0.2", "127.0.0.3")
        assert status == 200, f"/healthz did not answer ({refused} refused, {kept} kept):\n{node.log()[-2000:]}"
        assert kept <= 16 and refused >= 240 - 16, (refused, kept)
        assert node.process.poll() is None
        assert "refused an HTTP connection from 127.0.0.2" in node.log()
        assert "Traceback" not in node.log()
    finally:
        stop_all([node])


def hold(port: int, sources: list[str]) -> list[socket.socket]:
    socks = []
    for source in sources:
        sock = connect(port, source)
        trickle(sock, HEAD)
        socks.append(sock)
    return socks


def refused_at_once(port: int, source: str) -> bool:
    sock = connect(port, source)
    try:
        trickle(sock, HEAD)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if closed(sock):
                return True
            time.sleep(0.05)
        return False
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_the_total_cap_holds_for_everyone(reactor, node_dir):
    async with running_node(reactor, node_dir, "--max-http", "10", "--max-http-per-ip", "4",
                            "--handshake-timeout", "60", *OUTSIDERS) as node:
        gate = node.service.site.gate
        sources = ["127.0.2.1"] * 4 + ["127.0.2.2"] * 4 + ["127.9.9.9"] * 2
        socks = await deferToThread(hold, node.port, sources)
        try:
            await wait_for(reactor, lambda: gate.total == 10, what=lambda: f"10 counted ({gate.total})")
            # An outsider from a fresh address, and the operator: no room.
            assert await deferToThread(refused_at_once, node.port, "127.0.2.3")
            assert await deferToThread(refused_at_once, node.port, "127.9.9.9")
            assert all(await deferToThread(lambda: [trickle(s, b"x") for s in socks])), \
                "a connection within the caps was closed"
        finally:
            for s in socks:
                s.close()
        await wait_for(reactor, lambda: gate.total == 0 and not gate.per_ip, what="the gate to empty")
        assert await deferToThread(healthz, node.port, "127.0.2.3") == 200


@pytest_twisted.ensureDeferred
async def test_the_operator_is_not_held_to_the_per_address_cap(reactor, node_dir):
    async with running_node(reactor, node_dir, "--max-http-per-ip", "2",
                            "--handshake-timeout", "60", *OUTSIDERS) as node:
        gate = node.service.site.gate
        socks = await deferToThread(hold, node.port, ["127.9.9.9"] * 5 + ["127.0.2.1"] * 2)
        try:
            await wait_for(reactor, lambda: gate.total == 7, what=lambda: f"7 counted ({gate.total})")
            assert await deferToThread(refused_at_once, node.port, "127.0.2.1")
            # Another outsider address has its own count.
            assert await deferToThread(healthz, node.port, "127.0.2.2") == 200
        finally:
            for s in socks:
                s.close()
        await wait_for(reactor, lambda: gate.total == 0 and not gate.per_ip, what="the gate to empty")


@pytest_twisted.ensureDeferred
async def test_websocket_connections_leave_the_http_count(reactor, node_dir):
    async with running_node(reactor, node_dir, "--max-http", "3") as node:
        gate = node.service.site.gate
        conns = [await client.connect(reactor, node.url) for _ in range(6)]
        try:
            assert gate.total == 0
            for conn in conns:
                assert (await conn.request("time")).status == 200
            assert await deferToThread(healthz, node.port, "127.0.0.1") == 200
        finally:
            for conn in conns:
                conn.close()
            for conn in conns:
                await conn.when_closed()
        await wait_for(reactor, lambda: gate.total == 0 and not gate.per_ip, what="the gate to empty")


def test_ipv6_clients_are_counted_by_their_64():
    from foxnode.web import HTTPGate

    assert HTTPGate.client_key("2001:db8:1:2:aaaa::1") == HTTPGate.client_key("2001:db8:1:2:bbbb::9")
    assert HTTPGate.client_key("2001:db8:1:3::1") != HTTPGate.client_key("2001:db8:1:2::1")
    assert HTTPGate.client_key("::ffff:127.0.0.2") == "127.0.0.2"
