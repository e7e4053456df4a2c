"""The devnet's live page (foxnode.devnetpage, static/devnet.js, static/network.js).

- A real ``foxnode devnet`` of three nodes: the page's ``/state`` lists the
  nodes and links the nodes' own ``info`` reports, a message published
  through ``/publish`` reaches every node and ``/state`` shows when each got
  it; bad requests get a clear 4xx in JSON and the devnet keeps running.
- Chromium against the page fed by a fake devnet of 1000 nodes and about
  13,000 links, served in-process: it draws, no task on the page's main
  thread takes over 200 ms while it loads, lays out and animates a message
  spreading, and it follows a node going down and a link appearing.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread

from foxnode import codec, devnetpage
from test_cli import Devnet, free_ports

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def get(url: str) -> tuple[int, Any]:
    return request(url, None, "GET")


def request(url: str, body: bytes | None, method: str = "POST",
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, decoded JSON body) of one request, 4xx and 5xx too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def node_links(ws_urls: list[str], ids: list[str]) -> set[tuple[int, int]]:
    """The links every node's own ``info`` reports, by node index."""
    from websockets.sync.client import connect

    index = {node_id: i for i, node_id in enumerate(ids)}
    links = set()
    for i, url in enumerate(ws_urls):
        with connect(url, open_timeout=10, close_timeout=2) as ws:
            ws.send(json.dumps({"op": "info", "id": 1}))
            reply = json.loads(ws.recv(timeout=10))
        for peer in reply["response"]["connected"]:
            j = index[peer["node_id"]]
            links.add((min(i, j), max(i, j)))
    return links


def wait(what: str, condition: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.2)


# -- a real devnet --------------------------------------------------------------------


def test_the_page_shows_the_nodes_links_and_a_message_spreading(tmp_path):
    base = free_ports(4)
    net = Devnet(tmp_path / "devnet", base + 1, "--page-port", str(base), "--connect-timeout", "20")
    try:
        page = net.expect(r"^devnet page: (http://127\.0\.0\.1:\d+/)$")[1]
        assert page == f"http://127.0.0.1:{base}/"
        found = net.addresses(3)
        net.expect(r"^all 3 nodes connected$", timeout=30)
        ids = [found[f"node-{i}"][2] for i in range(3)]
        urls = [found[f"node-{i}"][0] for i in range(3)]

        status, state = get(page + "state")
        assert status == 200
        assert state["nodes"] == 3 and state["up"] == [1, 1, 1] and state["ids"] == ids

        # The page's links are what the nodes say (the watcher looks every 2 s).
        def same_links() -> bool:
            shown = {tuple(link) for link in get(page + "state")[1]["links"]}
            return shown == node_links(urls, ids) and len(shown) >= 2

        wait("the page's links are the nodes' own", same_links, timeout=15)

        status, reply = request(page + "publish", b'{"node": 1}', headers={"content-type": "application/json"})
        assert status == 202 and reply["node"] == 1, reply

        def received() -> dict | None:
            for m in get(page + "state")[1]["messages"]:
                if m["id"] == reply["id"] and len(m["got"]) == 3:
                    return m
            return None

        message = wait("every node got the message", received)
        assert message["origin"] == 1 and set(message["got"]) == {"0", "1", "2"}
        assert all(0 <= t < 5 for t in message["got"].values())

        # Bad requests: a clear 4xx in JSON, and the devnet goes on.
        cases = [
            (request(page + "publish", b'{"node": 7}'), 404, "no node-7"),
            (request(page + "publish", b'{"node": '), 400, "not JSON"),
            (request(page + "publish", b'[1, 2]'), 400, "JSON object"),
            (request(page + "publish", b'{"node": "zero"}'), 400, "node number"),
            (request(page + "publish", b'{"nodes": 1}'), 400, "unknown field"),
            (request(page + "publish", b"x" * 100_000), 413, "too large"),
            (get(page + "publish"), 405, "not allowed"),
            (request(page + "state", b"{}"), 405, "not allowed"),
            (get(page + "nothing-here"), 404, "no such path"),
            (request(page + "state", None, "GET", {"Host": "rebound.example"}), 403, "loopback"),
        ]
        for (status, body), want, text in cases:
            assert status == want, (want, body)
            assert text in body["error"] and body["status"] == want
        assert net.process.poll() is None
        assert get(page + "state")[0] == 200
        with urllib.request.urlopen(page, timeout=5) as r:
            assert b"network.js" in r.read()
        assert net.stop(signal.SIGINT) == 0
        assert "Traceback" not in "\n".join(net.lines) + net.process.stderr.read()
    finally:
        net.kill()


# -- a thousand nodes in a browser ---------------------------------------------------


class FakeConn:
    """The devnet's connection to a node, as far as the page uses it:
    ``publish`` answers at once, and the fake network spreads the message."""

    def __init__(self, net: "FakeNet", index: int) -> None:
        self.net, self.index = net, index

    def request(self, op: str, args: Any = None, timeout: float | None = None) -> Any:
        assert op == "publish" and args["topic"] == devnetpage.TOPIC
        mid = f"{random.getrandbits(128):032x}"
        self.net.spread(mid, self.index)
        return succeed(codec.Reply(202, "Accepted", {"id": mid}))


class FakeNode:
    def __init__(self, net: "FakeNet", index: int) -> None:
        self.index, self.node_id = index, f"{index:064x}"
        self.name = f"node-{index}"
        self.peers: tuple[int, ...] = ()
        self.up = True
        self.conn = FakeConn(net, index)

    def running(self) -> bool:
        return self.up


class FakeNet:
    """A devnet of ``count`` nodes and about ``links`` random links, without
    a node: what foxnode.devnetpage reads of foxnode.devnet.Devnet."""

    def __init__(self, reactor: Any, count: int, links: int, seed: int = 17) -> None:
        self.reactor = reactor
        self.version = 0
        self.nodes = [FakeNode(self, i) for i in range(count)]
        rng = random.Random(seed)
        edges: set[tuple[int, int]] = {(i - 1, i) for i in range(1, count)}  # connected
        while len(edges) < links:
            a, b = rng.sample(range(count), 2)
            edges.add((min(a, b), max(a, b)))
        self.peers: list[set[int]] = [set() for _ in range(count)]
        for a, b in edges:
            self.peers[a].add(b)
            self.peers[b].add(a)
        self._apply()
        self.spreads = devnetpage.Spreads(reactor)

    def _apply(self) -> None:
        for node, peers in zip(self.nodes, self.peers):
            node.peers = tuple(sorted(peers))
        self.version += 1

    def link(self, a: int, b: int) -> None:
        self.peers[a].add(b)
        self.peers[b].add(a)
        self._apply()

    def down(self, i: int) -> None:
        self.nodes[i].up = False
        self._apply()

    def spread(self, mid: str, origin: int, hop: float = 0.3) -> None:
        """Deliver ``mid`` hop by hop from ``origin``, ``hop`` seconds a hop."""
        self.spreads.published(mid, origin, self.reactor.seconds())
        seen, front, delay = {origin}, [origin], 0.0
        while front:
            self.reactor.callLater(delay, self._deliver, mid, front)
            nxt = [b for a in front for b in self.peers[a] if b not in seen and self.nodes[b].up]
            seen.update(nxt)
            front, delay = list(dict.fromkeys(nxt)), delay + hop

    def _deliver(self, mid: str, nodes: list[int]) -> None:
        for i in nodes:
            self.spreads.on_event(self.nodes[i], codec.Event("message", {"id": mid, "topic": devnetpage.TOPIC}))


#: Installed before the page's scripts: every long task, and the longest gap
#: between two animation frames, from the first moment.
WATCH = """
window.__long = [];
try {
  new PerformanceObserver((list) => { for (const e of list.getEntries()) window.__long.push([e.startTime, e.duration]); })
    .observe({entryTypes: ['longtask']});
} catch (e) { window.__long = null; }
window.__gap = 0;
(() => { let last = performance.now();
  const tick = (t) => { window.__gap = Math.max(window.__gap, t - last); last = t; requestAnimationFrame(tick); };
  requestAnimationFrame(tick); })();
"""

#: Pixels of the canvas that are not blank, and those in the colour of a
#: node that got the message.
PIXELS = """() => {
  // The test's own reading of the canvas is slow (millions of bytes): it
  // notes when it ran, so that its long task is not blamed on the page.
  const start = performance.now();
  (window.__probes = window.__probes || []).push([start, Infinity]);
  const c = document.getElementById('c'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let ink = 0, orange = 0, red = 0;
  for (let k = 0; k < d.length; k += 4) {
    if (d[k + 3] > 0) ink++;
    if (d[k] === 255 && d[k + 1] === 136 && d[k + 2] === 0 && d[k + 3] === 255) orange++;
    if (d[k] === 221 && d[k + 1] === 34 && d[k + 2] === 34 && d[k + 3] === 255) red++;
  }
  window.__probes[window.__probes.length - 1][1] = performance.now();
  return {ink, orange, red};
}"""

#: The page's own long tasks: those that do not overlap the test's probes.
PAGE_LONG = """() => window.__long === null ? null : window.__long.filter(([s, d]) =>
  !(window.__probes || []).some(([a, b]) => s < b + 5 && s + d > a - 5)).map(([s, d]) => d)"""


def browse(url: str, reactor: Any, net: FakeNet) -> dict[str, Any]:
    """Drive the page in Chromium (in a thread: the reactor serves it)."""
    from playwright.sync_api import sync_playwright

    seen: dict[str, Any] = {"errors": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: seen["errors"].append(str(e)))
            page.add_init_script(WATCH)
            page.goto(url)
            started = time.monotonic()
            page.wait_for_function("() => window.devnetPage && devnetPage.graph && devnetPage.graph.nodes === 1000"
                                   " && devnetPage.layered && !devnetPage.dirty", timeout=15_000)
            seen["load_seconds"] = time.monotonic() - started
            seen["loaded"] = page.evaluate(PIXELS)
            # A message from the page's button, spreading hop by hop.
            page.fill("#at", "0")
            page.click("#publish")
            page.wait_for_function("() => devnetPage.shown && Object.keys(devnetPage.shown.got).length >= 990",
                                   timeout=15_000)
            page.wait_for_function("() => devnetPage.play === null", timeout=15_000)
            seen["spread"] = page.evaluate(PIXELS)
            seen["frames_idle_before"] = page.evaluate("devnetPage.frame")
            page.wait_for_timeout(600)
            seen["frames_idle_after"] = page.evaluate("devnetPage.frame")
            # A node goes down and a link appears: the stream says so.
            links = page.evaluate("devnetPage.graph.linkCount")
            a, b = next((a, b) for a in range(10, 1000) for b in range(a + 2, 1000) if b not in net.peers[a])
            expected = links - len(net.peers[5]) + 1
            reactor.callFromThread(net.down, 5)
            reactor.callFromThread(net.link, a, b)
            page.wait_for_function("([n, a, b]) => devnetPage.graph.up[5] === 0 && devnetPage.graph.linkCount === n"
                                   " && devnetPage.linked(a, b)",
                                   arg=[expected, a, b], timeout=10_000)
            page.wait_for_timeout(500)
            seen["after"] = page.evaluate(PIXELS)
            seen["long"] = page.evaluate(PAGE_LONG)
            seen["all_long"] = page.evaluate("window.__long")
            seen["gap"] = page.evaluate("window.__gap")
            seen["probes"] = page.evaluate("window.__probes")
            seen["first_graph"] = page.evaluate("devnetPage.firstGraph")
        finally:
            browser.close()
    return seen


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is missing")
@pytest_twisted.ensureDeferred
async def test_a_thousand_nodes_draw_without_freezing_the_browser(reactor):
    pytest.importorskip("playwright.sync_api")
    net = FakeNet(reactor, 1000, 13_000)
    page = devnetpage.DevnetPage(net, net.spreads)
    port = await devnetpage.listen(reactor, page, 0)
    try:
        seen = await deferToThread(browse, f"http://127.0.0.1:{port.getHost().port}/", reactor, net)
    finally:
        page.close()
        await port.stopListening()
    assert not seen["errors"], seen["errors"]
    assert seen["loaded"]["ink"] > 20_000, seen["loaded"]  # links and nodes, not a blank canvas
    assert seen["spread"]["orange"] > 990 * 6, seen["spread"]  # 4x4 squares, some overlapping
    # Nothing animating, nothing changed: no frame drawn.
    assert seen["frames_idle_after"] == seen["frames_idle_before"]
    assert seen["after"]["red"] >= 4, seen["after"]  # node-5, down
    assert seen["long"] is not None, "no longtask observer in this Chromium"
    assert max(seen["long"], default=0) < 200, json.dumps([seen["all_long"], seen["probes"], seen["first_graph"]])
    print("load", seen["load_seconds"], "long tasks", seen["long"], "longest frame gap", seen["gap"])


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is missing")
def test_the_experiment_page_draws_with_the_same_module(tmp_path):
    """The experiment's network.html inlines static/network.js: it draws a
    thousand nodes and a message spreading, in one file."""
    pytest.importorskip("playwright.sync_api")
    from playwright.sync_api import sync_playwright

    from foxnode.experiment import write_network_page

    rng = random.Random(5)
    graph: dict[int, list[int]] = {i: [] for i in range(1000)}
    for _ in range(6500):
        a, b = rng.sample(range(1000), 2)
        graph[a].append(b)
        graph[b].append(a)
    got = {str(i): round(rng.random(), 3) for i in range(1000) if i != 7}
    path = tmp_path / "network.html"
    write_network_page(path, 1000, [graph], [{"id": "m1", "origin": 0, "sent": 1.0, "graph": 0, "got": got}])
    assert "FoxNet" in path.read_text()
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.as_uri())
            page.click("#play")
            page.wait_for_function("() => document.getElementById('t').value === '1000'", timeout=10_000)
            page.wait_for_timeout(200)
            pixels = page.evaluate(PIXELS)
        finally:
            browser.close()
    assert not errors, errors
    assert pixels["orange"] > 900 * 6 and pixels["red"] >= 4, pixels  # node-7 never got it


def test_the_watcher_asks_at_most_100_nodes_at_once_spread_over_its_interval(tmp_path):
    """At 1000 nodes the watcher's ``info`` requests: never over
    ``IN_FLIGHT`` at once, spread over the interval, each node once."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    from foxnode import devnet

    clock = Clock()
    net = devnet.Devnet(clock, tmp_path, 1000, 20000, "foxchain", per_process=50)

    class Running:
        running = True

    for node in net.nodes:
        node.process = Running()
    asked: list[tuple[float, int]] = []
    waiting: list[Deferred] = []

    def info(node: Any, timeout: float = 2.0) -> Deferred:
        asked.append((clock.seconds(), node.index))
        d: Deferred = Deferred()
        waiting.append(d)
        return d

    net._info = info  # type: ignore[method-assign]
    interval = devnet.watch_interval(1000)
    assert interval == 5.0
    done = ensure(net._poll_connections(interval / 2))
    for _ in range(400):
        assert len(waiting) <= devnet.IN_FLIGHT
        answered, waiting[:] = list(waiting), []
        for d in answered:
            d.callback({"connected": []})
        clock.advance(0.05)
        if done.called:
            break
    assert done.called
    assert sorted(i for _, i in asked) == list(range(1000))
    starts = sorted({t for t, _ in asked})
    assert len(starts) == 10 and starts[-1] - starts[0] >= interval / 2 * 0.8


def ensure(coroutine: Any) -> Any:
    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(coroutine)


class StreamRequest:
    """An event stream's request, as the page uses it; records writes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer = None
        self.finished = Deferred()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred:
        return self.finished

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def finish(self) -> None:
        self.finished.callback(None)


def test_a_page_that_stops_reading_is_not_written_to_until_it_reads_again():
    # Its transport pauses the stream when the send buffer is full; writing
    # on would grow that buffer with every push, without bound.
    from twisted.internet.task import Clock

    clock = Clock()
    net = FakeNet(clock, 20, 40)
    page = devnetpage.DevnetPage(net, net.spreads)
    request = StreamRequest()
    assert page.open_stream(request)
    opened = len(request.written)
    request.producer.pauseProducing()
    for i in range(10):
        net.link(0, 2 + i)
        clock.advance(devnetpage.PUSH_EVERY)
    assert len(request.written) == opened
    request.producer.resumeProducing()
    assert len(request.written) == opened + 1
    assert b"event: graph" in request.written[-1] and b"event: spread" in request.written[-1]
    net.link(1, 15)
    clock.advance(devnetpage.PUSH_EVERY)
    assert len(request.written) == opened + 2
    page.close()
    assert page.streams == [] and request.producer is None
