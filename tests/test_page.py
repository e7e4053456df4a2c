"""The node's page in a real browser: Debian's headless Chromium driven by
Playwright, against three ``twistd foxnode`` processes on 127.0.0.1.

The page is loaded from node 0 while the network forms; the test sees the
two other nodes appear as connected peers and in the network picture, sends
an op from the form, subscribes to a topic in the page, and sees a message
published on another node arrive in the feed. Others make keys in the
page's op console and send private and signed messages from its form, and
put a hostile event into the page's WebSocket.

This test keeps clear of the Twisted reactor: the nodes are child processes,
Playwright's sync API drives the browser, and the message is published with
a plain WebSocket client (``websockets``), as any outside client would.
It skips only when Playwright is not installed or /usr/bin/chromium is
missing (.ci/run installs both).
"""

from __future__ import annotations

import json
import re
import os
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from foxnode.testing import NodeProcess, spawn_node, stop_all, wait_until_serving

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
#: how long the page may take to show what the nodes did (ms)
WAIT_MS = 20_000

pytestmark = [
    pytest.mark.skipif(sync_playwright is None,
                       reason="playwright is not installed (pip install playwright)"),
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"{CHROMIUM} is missing (apt-get install -y chromium)"),
]


def node_id_of(node: NodeProcess) -> str:
    with urllib.request.urlopen(f"{node.http}/healthz", timeout=5) as r:
        return json.load(r)["node_id"]


def publish(url: str, topic: str, payload: object) -> str:
    """Publish on the node at ``url`` as an outside client; the message id."""
    from websockets.sync.client import connect

    with connect(url, open_timeout=10, close_timeout=2) as ws:
        ws.send(json.dumps({"op": "publish", "args": {"topic": topic, "payload": payload}, "id": 1}))
        reply = json.loads(ws.recv(timeout=10))
    assert reply["status"] == 202, reply
    return reply["response"]["id"]


@pytest.fixture
def devnet(tmp_path: Path):
    """Three nodes on loopback; 1 and 2 bootstrap from 0. Peer exchange
    every second, so links between neighbours show up quickly."""
    fast = ("--exchange-interval", "1")
    nodes: list[NodeProcess] = []
    try:
        nodes.append(spawn_node(tmp_path / "node-0", *fast))
        for i in (1, 2):
            nodes.append(spawn_node(tmp_path / f"node-{i}", *fast, "--peer", nodes[0].url, wait=False))
        for node in nodes[1:]:
            wait_until_serving(node)
        yield nodes
    finally:
        stop_all(nodes)


@pytest.mark.timeout(120)
def test_node_page_in_a_browser(devnet: list[NodeProcess], tmp_path: Path) -> None:
    started = time.monotonic()
    ids = [node_id_of(n) for n in devnet]
    node0 = devnet[0]
    loopback = {"127.0.0.1", "localhost"}
    requests: list[str] = []
    errors: list[str] = []

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.on("websocket", lambda ws: requests.append(ws.url))
            page.on("pageerror", lambda e: errors.append(str(e)))

            page.goto(node0.http + "/")
            expect(page.locator("h1")).to_contain_text("FOXCHAIN")
            expect(page.locator("body")).to_contain_text("My Own Blockchain System")
            expect(page.locator("#node-id")).to_have_text(ids[0])
            expect(page.locator("#ws-state")).to_have_attribute("data-state", "live", timeout=WAIT_MS)

            # The two other nodes appear as connected peers and live connections.
            connected = page.locator("#peers li[data-state=connected]")
            expect(connected).to_have_count(2, timeout=WAIT_MS)
            assert sorted(connected.evaluate_all("els => els.map(e => e.dataset.nodeId)")) == sorted(ids[1:])
            expect(page.locator("#connected tr[data-node-id]")).to_have_count(2)
            expect(page.locator("#connected-count")).to_have_text("2")

            # The picture: three nodes, this one marked, and every link of
            # the triangle once node 1 and node 2 have found each other.
            circles = page.locator("#graph circle[data-node-id]")
            expect(circles).to_have_count(3, timeout=WAIT_MS)
            assert sorted(circles.evaluate_all("els => els.map(e => e.dataset.nodeId)")) == sorted(ids)
            expect(page.locator("#graph circle[data-role=self]")).to_have_attribute("data-node-id", ids[0])
            expect(page.locator("#graph line[data-link]")).to_have_count(3, timeout=WAIT_MS)

            # The form sends any op; the reply shows.
            page.fill("#request", '{"op": "peers"}')
            page.click("#send")
            reply = page.locator("#reply")
            expect(reply).to_have_attribute("data-status", "200", timeout=WAIT_MS)
            shown = json.loads(reply.text_content())
            assert shown["status"] == 200 and shown["error"] == "OK", shown
            assert {devnet[1].url, devnet[2].url} <= set(shown["response"]["peers"]), shown

            # Subscribe in the page, publish on node 2, see it in the feed;
            # markup in a payload stays text.
            page.fill("#topic", "lab-news")
            page.click("#subscribe-form button[type=submit]")
            expect(page.locator("#topics li[data-topic=lab-news]")).to_have_attribute(
                "data-state", "subscribed", timeout=WAIT_MS)
            text = "hello from node 2 <b>not bold</b>"
            message_id = publish(devnet[2].url, "lab-news", text)
            item = page.locator(f'#feed li.message[data-id="{message_id}"]')
            expect(item).to_have_count(1, timeout=WAIT_MS)
            expect(item).to_have_attribute("data-topic", "lab-news")
            expect(item).to_have_attribute("data-origin", ids[2])
            expect(item.locator(".payload")).to_have_text(text)
            assert page.locator("#feed b").count() == 0

            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()

    assert not errors, errors
    elsewhere = [u for u in requests if not u.startswith("data:") and urlsplit(u).hostname not in loopback]
    assert not elsewhere, f"the page asked other sites: {elsewhere}"
    assert time.monotonic() - started < 60


@pytest.mark.timeout(120)
def test_node_page_reconnects_after_a_restart(tmp_path: Path) -> None:
    """The page says when its node is gone, reconnects when it is back,
    and subscribes again: a message published after the restart arrives."""
    directory = tmp_path / "node"
    node = spawn_node(directory)
    errors: list[str] = []
    try:
        node_id = node_id_of(node)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(node.http + "/")
                state = page.locator("#ws-state")
                expect(state).to_have_attribute("data-state", "live", timeout=WAIT_MS)
                chat = page.locator("#topics li[data-topic=chat]")
                expect(chat).to_have_attribute("data-state", "subscribed", timeout=WAIT_MS)

                node.stop()
                expect(state).to_have_attribute("data-state", "closed", timeout=WAIT_MS)
                expect(state).to_contain_text("retrying")
                expect(chat).to_have_attribute("data-state", "pending")

                node = spawn_node(directory, port=node.port)
                expect(state).to_have_attribute("data-state", "live", timeout=WAIT_MS)
                expect(chat).to_have_attribute("data-state", "subscribed", timeout=WAIT_MS)
                expect(page.locator("#node-id")).to_have_text(node_id)
                message_id = publish(node.url, "chat", {"after": "restart"})
                item = page.locator(f'#feed li.message[data-id="{message_id}"]')
                expect(item).to_have_count(1, timeout=WAIT_MS)
                expect(item).to_have_class("message own")
                expect(item.locator(".payload")).to_have_text('{"after":"restart"}')
            finally:
                browser.close()
    finally:
        stop_all([node])
    assert not errors, errors


def console(page, request: dict) -> dict:
    """Send ``request`` from the page's op console; its reply, shown."""
    reply = page.locator("#reply")
    page.evaluate("() => document.getElementById('reply').removeAttribute('data-status')")
    page.fill("#request", json.dumps(request))
    page.click("#send")
    expect(reply).not_to_have_attribute("data-status", "", timeout=WAIT_MS)
    expect(reply).to_have_attribute("data-status", re.compile(r"\d+"), timeout=WAIT_MS)
    return json.loads(reply.text_content())


@pytest.mark.timeout(120)
def test_private_messages_from_the_page(tmp_path: Path) -> None:
    """PROTOCOL.md "Private, signed and paid-for messages" from the page:
    a sym key made from a password in the op console, a subscription with
    it, a message published with it and a proof-of-work target from the
    private-message form, shown decrypted with "sym" and its pow; a signed
    clear message shown with its signer, an unsigned one as "unsigned"; one
    sent "to" a public key, opened by a subscription with its key pair."""
    node = spawn_node(tmp_path / "node")
    errors: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(node.http + "/")
                expect(page.locator("#ws-state")).to_have_attribute("data-state", "live", timeout=WAIT_MS)

                # Keys, made through the console: the page is on loopback, the operator.
                sym = console(page, {"op": "newkey", "args": {"type": "sym", "password": "fox and hound"}})
                assert sym["status"] == 200 and sym["response"]["type"] == "sym", sym
                sym_id = sym["response"]["id"]
                signer = console(page, {"op": "newkey", "args": {"type": "asym"}})
                assert signer["status"] == 200, signer
                signer_id, signer_key = signer["response"]["id"], signer["response"]["public_key"]

                # Subscribe with the sym key; the chip says so.
                page.fill("#topic", "secret")
                page.fill("#subscribe-key", sym_id)
                page.click("#subscribe-form button[type=submit]")
                chip = page.locator(f'#topics li[data-topic=secret][data-keyid="{sym_id}"]')
                expect(chip).to_have_attribute("data-state", "subscribed", timeout=WAIT_MS)

                # Publish with it from the private-message form, with a PoW target.
                text = "meet at <b>dawn</b>"
                page.fill("#publish-topic", "secret")
                page.fill("#payload", text)
                page.fill("#publish-key", sym_id)
                page.fill("#publish-pow", "0.01")
                page.click("#publish-form button[type=submit]")
                result = page.locator("#publish-result")
                expect(result).to_have_attribute("data-status", "202", timeout=WAIT_MS)
                expect(result).to_contain_text("sym")
                item = page.locator("#feed li.message[data-topic=secret]")
                expect(item).to_have_count(1, timeout=WAIT_MS)
                expect(item).to_have_attribute("data-encrypted", "sym")
                expect(item.locator(".payload")).to_have_text(text)
                expect(item.locator(".encrypted")).to_have_text("sym")
                expect(item.locator(".signer")).to_have_text("unsigned")
                pow_reached = float(item.get_attribute("data-pow"))
                assert pow_reached >= 0.01, pow_reached
                expect(item.locator(".pow")).to_contain_text("pow ")
                assert page.locator("#feed b").count() == 0

                # A signed clear message to "chat" (subscribed by default): its signer shows.
                page.fill("#publish-topic", "chat")
                page.fill("#payload", '{"signed": true}')
                page.fill("#publish-key", "")
                page.fill("#publish-pow", "")
                page.fill("#publish-sign", signer_id)
                page.click("#publish-form button[type=submit]")
                expect(result).to_contain_text("signed", timeout=WAIT_MS)
                signed = page.locator("#feed li.message[data-topic=chat]")
                expect(signed).to_have_count(1, timeout=WAIT_MS)
                expect(signed).to_have_attribute("data-from", signer_key)
                expect(signed).to_have_attribute("data-encrypted", "none")
                expect(signed.locator(".encrypted")).to_have_text("clear")
                # The digits of the signing (Ed25519) half, which the signature
                # proves; the X25519 half in front is anyone's to copy.
                expect(signed.locator(".signer")).to_have_text("signed by " + signer_key[64:76] + "…")
                expect(signed.locator(".signer")).to_have_attribute("title", signer_key)

                # The same form, sent through the console: the decrypted copy
                # needs the key, so the sym subscription shows it, the clear one does not.
                page.fill("#publish-topic", "secret")
                page.fill("#payload", "second")
                page.fill("#publish-key", sym_id)
                page.click("#publish-to-console")
                sent = console(page, json.loads(page.input_value("#request")))
                assert sent["status"] == 202, sent
                second = page.locator(f'#feed li.message[data-id="{sent["response"]["id"]}"]')
                expect(second).to_have_count(1, timeout=WAIT_MS)
                expect(second).to_have_attribute("data-encrypted", "sym")
                expect(second).to_have_attribute("data-from", signer_key)
                expect(second.locator(".payload")).to_have_text("second")

                # To a public key: a subscription with the asym key's id opens it.
                page.fill("#topic", "inbox")
                page.fill("#subscribe-key", signer_id)
                page.click("#subscribe-form button[type=submit]")
                expect(page.locator(f'#topics li[data-topic=inbox][data-keyid="{signer_id}"]')).to_have_attribute(
                    "data-state", "subscribed", timeout=WAIT_MS)
                page.fill("#publish-topic", "inbox")
                page.fill("#payload", "for the key holder")
                page.fill("#publish-key", "")
                page.fill("#publish-sign", "")
                page.fill("#publish-to", signer_key)
                page.click("#publish-form button[type=submit]")
                expect(result).to_contain_text("asym", timeout=WAIT_MS)
                sealed = page.locator("#feed li.message[data-topic=inbox]")
                expect(sealed).to_have_count(1, timeout=WAIT_MS)
                expect(sealed).to_have_attribute("data-encrypted", "asym")
                expect(sealed.locator(".payload")).to_have_text("for the key holder")
                expect(sealed.locator(".signer")).to_have_text("unsigned")
                page.screenshot(path=str(tmp_path / "private.png"), full_page=True)
            finally:
                browser.close()
    finally:
        stop_all([node])
    assert not errors, errors


@pytest.mark.timeout(120)
def test_feed_escapes_what_the_network_sent(tmp_path: Path) -> None:
    """A hostile event (markup in "from", "encrypted", "pow", the topic, the
    payload), put into the page's own WebSocket, stays text: nothing of it
    becomes an element or runs."""
    node = spawn_node(tmp_path / "node")
    errors: list[str] = []
    hostile = '<img src=x onerror="window.pwned=1">'
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.on("pageerror", lambda e: errors.append(str(e)))
                routes: list = []

                def handler(ws) -> None:
                    ws.connect_to_server()
                    routes.append(ws)

                page.route_web_socket(re.compile(r".*/ws$"), handler)
                page.goto(node.http + "/")
                expect(page.locator("#ws-state")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
                expect(page.locator("#topics li[data-topic=chat]")).to_have_attribute(
                    "data-state", "subscribed", timeout=WAIT_MS)
                event = {"event": "message", "id": "x" + hostile, "topic": "chat" + hostile,
                         "payload": hostile, "origin": hostile, "created": 1, "subscription": hostile,
                         "from": hostile, "encrypted": hostile, "pow": hostile}
                routes[0].send(json.dumps(event))
                item = page.locator("#feed li.message")
                expect(item).to_have_count(1, timeout=WAIT_MS)
                expect(item.locator(".payload")).to_have_text(hostile)
                expect(item.locator(".signer")).to_have_attribute("title", hostile)
                expect(item).to_have_attribute("data-encrypted", "none")
                assert page.locator("#feed img").count() == 0
                assert page.evaluate("() => window.pwned") is None
            finally:
                browser.close()
    finally:
        stop_all([node])
    assert not errors, errors


@pytest.mark.timeout(120)
def test_the_page_shows_the_chain_when_the_plugin_is_loaded(tmp_path: Path) -> None:
    """With ``--plugin chain`` the page shows the head and the last blocks,
    and its button mines one; without it, nothing of the chain shows."""
    node = spawn_node(tmp_path / "node", "--plugin", "chain")
    plain = spawn_node(tmp_path / "plain")
    errors: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(node.http + "/")
                expect(page.locator("#foxchain")).to_be_visible(timeout=WAIT_MS)
                expect(page.locator("#chain-height")).to_have_text("0")
                expect(page.locator("#chain-blocks tr[data-key]")).to_have_count(1)
                page.click("#chain-mine")
                expect(page.locator("#chain-result")).to_contain_text("mined block 1", timeout=WAIT_MS)
                expect(page.locator("#chain-height")).to_have_text("1", timeout=WAIT_MS)
                rows = page.locator("#chain-blocks tr[data-key]")
                expect(rows).to_have_count(2)
                expect(rows.first).to_contain_text('"from the page"')
                other = browser.new_page()
                other.goto(plain.http + "/")
                expect(other.locator("#ws-state")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
                other.wait_for_timeout(2000)  # a refresh or more
                assert other.locator("#foxchain").is_hidden()
            finally:
                browser.close()
    finally:
        stop_all([node, plain])
    assert not errors, errors
