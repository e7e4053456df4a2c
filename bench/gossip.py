"""Figure (6), the gossip hook: how a message spreads through N foxnodes;
and figure (7), the same network carrying sealed messages (clear, sym, asym,
signed: ``run_sealed``, at the end of this file).

##########################################################################
#  HOOK FOR FIGURE (6). Written against PROTOCOL.md ("Node ops"):        #
#    publish   {"topic", "payload"}  -> 202 {"id": <message id>}         #
#    subscribe {"topics": [...]}     -> 200, then pushes                 #
#              {"event": "message", "id", "topic", "payload", "origin"}  #
#  While foxnode answers 404 to ``publish`` this figure reports          #
#  "not available" (after probing one node) instead of failing.          #
##########################################################################

The network: N twistd nodes on 127.0.0.1; node 0 starts alone, node i > 0
gets ``--peer`` of one predecessor (node ``i - 1`` with ``--topology
chain``, a random earlier node with ``random-tree``, the default), so the
bootstrap graph is a connected tree; peer exchange may add edges.

The measurement: one WebSocket per node subscribes to one topic; then
``messages`` messages are published, one at a time, each from a randomly
chosen node. For each message we count the deliveries (every subscriber
should get it exactly once: N deliveries, no duplicates) and the time from
sending ``publish`` to the delivery at the last node (median, p50 and p99
over the messages every node got).

Copies: each node's ``/metrics`` is read before the first ``publish`` and
after the last message; the growth of
``foxnode_gossip_envelopes_received_total`` with ``outcome="accepted"`` and
``outcome="duplicate"`` (envelopes that came from peers, new or not), summed
over the nodes and divided by messages x nodes, is the number of copies a
node received per message. A node gets none for the messages it published
itself, so a perfect tree gives (N - 1) / N; each duplicate adds 1 / N.
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import time
import urllib.request
from typing import Any, Callable

from loadgen import percentile

TOPIC = "foxbench"

#: The counter of envelopes received from peers, by outcome.
RECEIVED_METRIC = "foxnode_gossip_envelopes_received_total"
#: The outcomes that are a copy of a message arriving at a node (the others
#: are refusals: tampered, forged, expired, ...).
COPY_OUTCOMES = ("accepted", "duplicate")
_SAMPLE = re.compile(r'^' + RECEIVED_METRIC + r'\{([^}]*)\}\s+(\S+)')
_OUTCOME = re.compile(r'outcome="([^"]*)"')
#: urllib without proxies: every address here is 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def metrics_url(ws_url: str) -> str:
    """``ws://127.0.0.1:PORT/ws`` -> ``http://127.0.0.1:PORT/metrics``."""
    base = ws_url.split("://", 1)[1].split("/", 1)[0]
    return f"http://{base}/metrics"


def received_counts(text: str) -> dict[str, float]:
    """``{outcome: value}`` of the received-envelopes counter in a /metrics page."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            o = _OUTCOME.search(m.group(1))
            if o:
                out[o.group(1)] = out.get(o.group(1), 0.0) + float(m.group(2))
    return out


def scrape_received(urls: list[str], timeout: float = 10.0) -> list[dict[str, float] | None]:
    """Each node's received-envelope counts (``None`` where /metrics failed)."""
    out: list[dict[str, float] | None] = []
    for url in urls:
        try:
            with _OPENER.open(metrics_url(url), timeout=timeout) as r:
                out.append(received_counts(r.read().decode("utf-8", "replace")))
        except Exception:
            out.append(None)
    return out


def copies_summary(before: list, after: list, messages: int) -> dict:
    """Copies received per node per message from two scrapes of every node."""
    n = len(before)
    failed = [i for i, (b, a) in enumerate(zip(before, after)) if b is None or a is None]
    if failed or not messages or not n:
        return {"copies_per_node_per_message": None, "metrics_failed_nodes": failed,
                "envelopes_received": None}
    by_outcome: dict[str, float] = {}
    per_node = []
    for b, a in zip(before, after):
        mine = 0.0
        for outcome in set(a) | set(b):
            d = a.get(outcome, 0.0) - b.get(outcome, 0.0)
            by_outcome[outcome] = by_outcome.get(outcome, 0.0) + d
            if outcome in COPY_OUTCOMES:
                mine += d
        per_node.append(mine / messages)
    copies = sum(by_outcome.get(o, 0.0) for o in COPY_OUTCOMES)
    return {
        "copies_per_node_per_message": round(copies / (messages * n), 4),
        "copies_per_message_max_node": round(max(per_node), 4),
        "envelopes_received": {k: int(v) for k, v in sorted(by_outcome.items())},
        "metrics_failed_nodes": [],
    }


def _connect(url: str, **kw: Any) -> Any:
    """websockets.connect, never through a proxy (every URL here is 127.0.0.1)."""
    import websockets

    return websockets.connect(url, proxy=None, **kw)


async def _call(ws: Any, op: str, args: Any = None, rid: str = "1", timeout: float = 10.0) -> dict:
    req: dict[str, Any] = {"op": op, "id": rid}
    if args is not None:
        req["args"] = args
    await ws.send(json.dumps(req))
    end = time.monotonic() + timeout
    while True:
        raw = await asyncio.wait_for(ws.recv(), max(0.01, end - time.monotonic()))
        msg = json.loads(raw)
        if isinstance(msg, dict) and "status" in msg and msg.get("id") == rid:
            return msg


async def probe_publish(url: str) -> dict:
    """Ask one node to ``publish``; says whether the op exists."""
    async with _connect(url, open_timeout=10, close_timeout=2) as ws:
        reply = await _call(ws, "publish", {"topic": TOPIC, "payload": {"probe": True}}, rid="probe")
    return reply


def predecessors(n: int, topology: str, seed: int = 6) -> list[int | None]:
    rng = random.Random(seed)
    out: list[int | None] = [None]
    for i in range(1, n):
        out.append(i - 1 if topology == "chain" else rng.randrange(i))
    return out


async def wait_connected(urls: list[str], preds: list[int | None], timeout: float) -> dict:
    """Until every node i > 0 has its outbound connection up (``info``'s
    ``connected``), bounded by ``timeout``."""
    end = time.monotonic() + timeout
    pending = set(range(len(urls)))
    degrees: dict[int, int] = {}
    while pending and time.monotonic() < end:
        for i in sorted(pending):
            try:
                async with _connect(urls[i], open_timeout=5, close_timeout=1) as ws:
                    reply = await _call(ws, "info", rid="info", timeout=5)
            except (OSError, asyncio.TimeoutError, Exception):
                continue
            connected = (reply.get("response") or {}).get("connected") or []
            degrees[i] = len(connected)
            if len(urls) == 1 or connected:
                pending.discard(i)
        if pending:
            await asyncio.sleep(0.3)
    return {"all_connected": not pending, "unconnected": sorted(pending),
            "mean_degree": (sum(degrees.values()) / len(degrees)) if degrees else 0.0}


async def measure(urls: list[str], messages: int, per_message_timeout: float, seed: int = 6) -> dict:
    n = len(urls)
    rng = random.Random(seed)
    deliveries: dict[int, list[tuple[int, float]]] = {}  # bench seq -> [(node, t)]
    socks = []
    before: list = []
    after: list = []
    try:
        for i, url in enumerate(urls):
            ws = await _connect(url, open_timeout=10, close_timeout=1, max_size=1 << 20)
            socks.append(ws)
            reply = await _call(ws, "subscribe", {"topics": [TOPIC]}, rid=f"sub{i}")
            if reply.get("status") != 200:
                return {"available": False, "reason": f"subscribe answered {reply.get('status')}: {reply.get('error')}"}

        async def reader(i: int, ws: Any) -> None:
            try:
                async for raw in ws:
                    msg = json.loads(raw)
                    if isinstance(msg, dict) and msg.get("event") == "message" and msg.get("topic") == TOPIC:
                        payload = msg.get("payload")
                        if isinstance(payload, dict) and "bench_seq" in payload:
                            deliveries.setdefault(payload["bench_seq"], []).append((i, time.monotonic()))
            except Exception:
                return

        readers = [asyncio.ensure_future(reader(i, ws)) for i, ws in enumerate(socks)]
        before = await asyncio.get_running_loop().run_in_executor(None, scrape_received, urls)
        publisher_socks = {}
        per_msg = []
        for seq in range(messages):
            origin = rng.randrange(n)
            if origin not in publisher_socks:
                publisher_socks[origin] = await _connect(urls[origin], open_timeout=10, close_timeout=1)
            pws = publisher_socks[origin]
            t0 = time.monotonic()
            reply = await _call(pws, "publish", {"topic": TOPIC, "payload": {"bench_seq": seq, "t": time.time()}},
                                rid=f"pub{seq}")
            if reply.get("status") == 404:
                return {"available": False, "reason": f"publish answered 404: {reply.get('error')}"}
            # until every node has it, or the time limit, or no new delivery
            # for ``quiet`` seconds (a node cut off would cost the full limit)
            end = t0 + per_message_timeout
            quiet = min(2.0, per_message_timeout)
            while time.monotonic() < end:
                got = deliveries.get(seq, [])
                if len({i for i, _ in got}) >= n:
                    break
                if got and time.monotonic() - max(t for _, t in got) > quiet:
                    break
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.2)  # late duplicates
            got = deliveries.get(seq, [])
            nodes = {i for i, _ in got}
            times = sorted(t for _, t in got)
            per_msg.append({
                "seq": seq, "origin": origin, "publish_status": reply.get("status"),
                "delivered_nodes": len(nodes), "deliveries": len(got), "duplicates": len(got) - len(nodes),
                "missing_nodes": sorted(set(range(n)) - nodes),
                "time_to_last_ms": round((times[-1] - t0) * 1000, 2) if len(nodes) == n else None,
                "time_to_last_delivered_ms": round((times[-1] - t0) * 1000, 2) if times else None,
                "time_to_median_ms": round((times[len(times) // 2] - t0) * 1000, 2) if times else None,
            })
        # every message waited for its late duplicates: the counters are final
        after = await asyncio.get_running_loop().run_in_executor(None, scrape_received, urls)
        for r in readers:
            r.cancel()
        for ws in publisher_socks.values():
            await ws.close()
    finally:
        for ws in socks:
            try:
                await ws.close()
            except Exception:
                pass
    complete = [m for m in per_msg if m["time_to_last_ms"] is not None]
    lasts = sorted(m["time_to_last_ms"] for m in complete)
    delivered_lasts = sorted(m["time_to_last_delivered_ms"] for m in per_msg if m["time_to_last_delivered_ms"] is not None)
    medians = sorted(m["time_to_median_ms"] for m in per_msg if m["time_to_median_ms"] is not None)
    never = sorted(set.intersection(*(set(m["missing_nodes"]) for m in per_msg))) if per_msg else []
    return {
        "available": True,
        "nodes": n,
        "messages": messages,
        "expected_deliveries": n * messages,
        "deliveries": sum(m["deliveries"] for m in per_msg),
        "delivered_fraction": sum(m["delivered_nodes"] for m in per_msg) / float(n * messages) if messages else None,
        "duplicates": sum(m["duplicates"] for m in per_msg),
        "fully_delivered_messages": len(complete),
        "time_to_last_node_ms_median": lasts[len(lasts) // 2] if lasts else None,
        "time_to_last_node_ms_max": lasts[-1] if lasts else None,
        "time_to_last_node_ms_p50": percentile(lasts, 50),
        "time_to_last_node_ms_p99": percentile(lasts, 99),
        "time_to_last_delivered_ms_median": delivered_lasts[len(delivered_lasts) // 2] if delivered_lasts else None,
        "time_to_half_ms_median": medians[len(medians) // 2] if medians else None,
        "nodes_never_reached": never,
        **copies_summary(before, after, len(per_msg)),
        "per_message": per_msg,
    }


def start_network(start_node: Callable[..., Any], servers: list, nodes: int, topology: str,
                  connect_timeout: float, log: Callable[[str], None] = print) -> tuple[float, dict]:
    """Start ``nodes`` nodes into ``servers`` (the caller stops them), node
    i > 0 with ``--peer`` of its predecessor, and wait for their peer
    connections; (seconds to start them, ``wait_connected``'s summary)."""
    preds = predecessors(nodes, topology)
    t_start = time.monotonic()
    for i in range(nodes):
        peer = servers[preds[i]].url if preds[i] is not None else None
        servers.append(start_node(peer))
    started_s = time.monotonic() - t_start
    log(f"  gossip: {nodes} nodes up in {started_s:.1f}s, waiting for their connections")
    conn = asyncio.run(wait_connected([s.url for s in servers], preds, connect_timeout))
    if not conn["all_connected"]:
        log(f"  gossip: nodes without a peer connection after {connect_timeout:.0f}s: {conn['unconnected']} "
            f"(their --peer: {[preds[i] for i in conn['unconnected']]})")
    return started_s, conn


def run_gossip(start_node: Callable[..., Any], stop_all: Callable[[list], None], nodes: int, messages: int,
               topology: str = "random-tree", connect_timeout: float = 60.0, per_message_timeout: float = 10.0,
               log: Callable[[str], None] = print) -> dict:
    """``start_node(peer_url or None) -> server`` starts one foxnode and
    returns an object with ``.url`` (its ws:// address on 127.0.0.1);
    ``stop_all(servers)`` stops them."""
    servers: list = []
    try:
        probe = start_node(None)
        servers.append(probe)
        try:
            reply = asyncio.run(probe_publish(probe.url))
        except Exception as e:
            return {"available": False, "reason": f"publish probe failed: {type(e).__name__}: {e}"}
        if reply.get("status") == 404:
            return {"available": False, "reason": f"publish answered 404: {reply.get('error')}"}
        stop_all(servers)
        servers = []
        started_s, conn = start_network(start_node, servers, nodes, topology, connect_timeout, log)
        result = asyncio.run(measure([s.url for s in servers], messages, per_message_timeout))
        result.update({"topology": topology, "startup_s": round(started_s, 2), "connectivity": conn})
        return result
    finally:
        stop_all(servers)


# -- figure (7): sealed messages over the same network ---------------------------------
#
# PROTOCOL.md "Keys" and "Private, signed and paid-for messages": publish
# takes ``key`` (a sym key id), ``to`` (a public key, hex) or ``sign`` (an
# asym key id); subscribe takes ``key`` and ``from``. The keys are made with
# the operator ops (the harness is on 127.0.0.1, a trusted client):
#
# * sym: ``newkey {"type": "sym", "password": ...}`` on every node (the same
#   password gives the same key everywhere);
# * asym: ``newkey {"type": "asym"}`` on the first node, its private key
#   (``getkey`` with ``secret``) ``addkey``'d on every other, so that every
#   subscriber opens what is sent ``to`` its public key;
# * signed: ``newkey {"type": "asym"}`` on the publishing node, published
#   with ``sign``, subscribed to with ``from`` its public key (not
#   encrypted: a subscription without a key gets it, with "from").

#: The modes of figure 7, clear (the reference) first.
SEALING_MODES = ("clear", "sym", "asym", "signed")
SEALING_PASSWORD = "bench"
#: What a delivered event of each mode says in "encrypted".
_ENCRYPTED = {"clear": None, "sym": "sym", "asym": "asym", "signed": None}
#: Seconds to wait after a message's last delivery before closing its CPU
#: window (late copies, announcements), as figure 6 waits for duplicates.
LATE_S = 0.2


def sealed_topic(mode: str) -> str:
    return f"{TOPIC}-{mode}"


def _task_cpu_ns(pid: int) -> int | None:
    """CPU time of every thread of ``pid``, in ns (``/proc/PID/task/*/schedstat``:
    nanoseconds, where ``/proc/PID/stat`` counts 10 ms ticks); None if
    unreadable."""
    import os

    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return total


def _stat_cpu_s(pid: int) -> float:
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class NodesCPU:
    """CPU seconds used so far by a set of processes: per thread in ns from
    schedstat where the kernel has it, else utime + stime from /proc/PID/stat."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = list(pids)
        self.source = "schedstat" if all(_task_cpu_ns(p) for p in self.pids) else "stat"

    def __call__(self) -> float:
        if self.source == "schedstat":
            return sum((_task_cpu_ns(p) or 0) for p in self.pids) / 1e9
        return sum(_stat_cpu_s(p) for p in self.pids)


async def _one_call(url: str, op: str, args: Any, rid: str) -> dict:
    async with _connect(url, open_timeout=10, close_timeout=1) as ws:
        return await _call(ws, op, args, rid=rid, timeout=30)


def _need(reply: dict, what: str) -> dict:
    if reply.get("status") != 200 or not isinstance(reply.get("response"), dict):
        raise _Unavailable(f"{what} answered {reply.get('status')}: {reply.get('error')}")
    return reply["response"]


class _Unavailable(Exception):
    pass


async def sealing_keys(urls: list[str], publisher: int, concurrency: int = 4) -> dict:
    """Make the keys of figure 7 on every node; what to publish and
    subscribe with, per mode (see above)."""
    recipient = _need(await _one_call(urls[0], "newkey", {"type": "asym"}, "k-asym"), "newkey asym")
    secret = _need(await _one_call(urls[0], "getkey", {"id": recipient["id"], "secret": True}, "k-get"),
                   "getkey secret")
    signer = _need(await _one_call(urls[publisher], "newkey", {"type": "asym"}, "k-sign"), "newkey asym (signer)")
    sym_ids: list[str | None] = [None] * len(urls)
    asym_ids: list[str | None] = [None] * len(urls)
    asym_ids[0] = recipient["id"]
    gate = asyncio.Semaphore(concurrency)  # scrypt: ~0.1 s and 32 MiB per node

    async def node(i: int) -> None:
        async with gate:
            async with _connect(urls[i], open_timeout=10, close_timeout=1) as ws:
                sym_ids[i] = _need(await _call(ws, "newkey", {"type": "sym", "password": SEALING_PASSWORD},
                                               rid=f"k-sym{i}", timeout=30), "newkey sym")["id"]
                if i != 0:
                    asym_ids[i] = _need(await _call(ws, "addkey", {"type": "asym",
                                                                    "private_key": secret["private_key"]},
                                                    rid=f"k-add{i}", timeout=30), "addkey asym")["id"]

    await asyncio.gather(*(node(i) for i in range(len(urls))))
    subscribe = [{"clear": {"topics": [sealed_topic("clear")]},
                  "sym": {"topics": [sealed_topic("sym")], "key": sym_ids[i]},
                  "asym": {"topics": [sealed_topic("asym")], "key": asym_ids[i]},
                  "signed": {"topics": [sealed_topic("signed")], "from": [signer["public_key"]]}}
                 for i in range(len(urls))]
    publish = {"clear": {}, "sym": {"key": sym_ids[publisher]}, "asym": {"to": recipient["public_key"]},
               "signed": {"sign": signer["id"]}}
    return {"subscribe": subscribe, "publish": publish, "signer": signer["public_key"],
            "recipient": recipient["public_key"]}


def _mode_row(mode: str, n: int, msgs: list[dict], idle_rate: float) -> dict:
    complete = [m for m in msgs if m["time_to_last_ms"] is not None]
    lasts = sorted(m["time_to_last_ms"] for m in complete)
    cpu = sum(m["cpu_s"] for m in msgs)
    window = sum(m["window_s"] for m in msgs)
    count = len(msgs)
    return {
        "mode": mode,
        "messages": count,
        "expected_deliveries": n * count,
        "deliveries": sum(m["deliveries"] for m in msgs),
        "delivered_fraction": (sum(m["delivered_nodes"] for m in msgs) / float(n * count)) if count else None,
        "duplicates": sum(m["duplicates"] for m in msgs),
        "wrong_view": sum(m["wrong_view"] for m in msgs),
        "publish_refused": sum(1 for m in msgs if m["publish_status"] != 202),
        "fully_delivered_messages": len(complete),
        "time_to_last_node_ms_p50": percentile(lasts, 50),
        "time_to_last_node_ms_p99": percentile(lasts, 99),
        "time_to_last_node_ms_max": lasts[-1] if lasts else None,
        "publish_reply_ms_p50": percentile(sorted(m["publish_reply_ms"] for m in msgs), 50),
        # every node's CPU in the message's window, and less what the nodes
        # use when no message flows (the idle windows' rate x the window)
        "cpu_ms_per_message": round(cpu / count * 1000, 3) if count else None,
        "cpu_ms_per_message_net": round((cpu - idle_rate * window) / count * 1000, 3) if count else None,
    }


def _ratio(x: Any, y: Any) -> float | None:
    return round(x / y, 3) if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y > 0 else None


async def measure_sealed(urls: list[str], messages: int, per_message_timeout: float, cpu: Callable[[], float],
                         machine_busy: Callable[[], float] | None = None, seed: int = 7) -> dict:
    """``messages`` messages of each mode from one node, the modes in turn
    (clear, sym, asym, signed, rotated by one every round, then an idle
    window as long as the round's mean): time from ``publish`` to the last
    node, and the nodes' CPU (``cpu()``, seconds) in each message's window."""
    n = len(urls)
    publisher = random.Random(seed).randrange(n)
    try:
        t = time.monotonic()
        keys = await sealing_keys(urls, publisher)
        key_setup_s = round(time.monotonic() - t, 2)
    except _Unavailable as e:
        return {"available": False, "reason": str(e)}
    topic_mode = {sealed_topic(m): m for m in SEALING_MODES}
    deliveries: dict[int, list[tuple[int, float, bool]]] = {}  # seq -> [(node, t, as expected)]
    socks: list = []
    per_msg: list[dict] = []
    idle: list[dict] = []
    try:
        for i, url in enumerate(urls):
            ws = await _connect(url, open_timeout=10, close_timeout=1, max_size=1 << 20)
            socks.append(ws)
            for mode in SEALING_MODES:
                reply = await _call(ws, "subscribe", keys["subscribe"][i][mode], rid=f"sub{i}-{mode}")
                if reply.get("status") != 200:
                    return {"available": False, "reason": f"subscribe ({mode}) answered {reply.get('status')}: "
                                                          f"{reply.get('error')}"}

        async def reader(i: int, ws: Any) -> None:
            try:
                async for raw in ws:
                    msg = json.loads(raw)
                    if not (isinstance(msg, dict) and msg.get("event") == "message"):
                        continue
                    mode = topic_mode.get(msg.get("topic"))
                    payload = msg.get("payload")
                    if mode is None or not isinstance(payload, dict) or "bench_seq" not in payload:
                        continue
                    want_from = keys["signer"] if mode == "signed" else None
                    ok = msg.get("encrypted") == _ENCRYPTED[mode] and msg.get("from") == want_from
                    deliveries.setdefault(payload["bench_seq"], []).append((i, time.monotonic(), ok))
            except Exception:
                return

        readers = [asyncio.ensure_future(reader(i, ws)) for i, ws in enumerate(socks)]
        pws = await _connect(urls[publisher], open_timeout=10, close_timeout=1)
        own = time.process_time

        def marks() -> tuple[float, float, float, float]:
            return (time.monotonic(), cpu(), machine_busy() if machine_busy else 0.0, own())

        def window(a: tuple, b: tuple) -> dict:
            return {"window_s": b[0] - a[0], "cpu_s": b[1] - a[1],
                    "other_s": max(0.0, (b[2] - a[2]) - (b[1] - a[1]) - (b[3] - a[3])) if machine_busy else None}

        await asyncio.sleep(0.5)  # the subscriptions settle
        seq = 0
        for r in range(messages):
            k = r % len(SEALING_MODES)
            windows = []
            for mode in SEALING_MODES[k:] + SEALING_MODES[:k]:
                a = marks()
                t0 = time.monotonic()
                args = {"topic": sealed_topic(mode), "payload": {"bench_seq": seq, "t": time.time()},
                        **keys["publish"][mode]}
                reply = await _call(pws, "publish", args, rid=f"pub{seq}")
                t_reply = time.monotonic()
                if reply.get("status") == 404 and seq == 0:
                    return {"available": False, "reason": f"publish answered 404: {reply.get('error')}"}
                end = t0 + per_message_timeout
                quiet = min(2.0, per_message_timeout)
                while reply.get("status") == 202 and time.monotonic() < end:
                    got = deliveries.get(seq, [])
                    if len({i for i, _, _ in got}) >= n:
                        break
                    if got and time.monotonic() - max(t for _, t, _ in got) > quiet:
                        break
                    await asyncio.sleep(0.002)
                await asyncio.sleep(LATE_S)
                b = marks()
                got = deliveries.get(seq, [])
                nodes = {i for i, _, _ in got}
                times = sorted(t for _, t, _ in got)
                w = window(a, b)
                windows.append(w["window_s"])
                per_msg.append({
                    "seq": seq, "mode": mode, "publish_status": reply.get("status"),
                    "publish_error": reply.get("error"),
                    "publish_reply_ms": round((t_reply - t0) * 1000, 2),
                    "delivered_nodes": len(nodes), "deliveries": len(got), "duplicates": len(got) - len(nodes),
                    "wrong_view": sum(1 for _, _, ok in got if not ok),
                    "time_to_last_ms": round((times[-1] - t0) * 1000, 2) if len(nodes) == n else None,
                    **{k2: (round(v, 6) if v is not None else None) for k2, v in w.items()},
                })
                seq += 1
            # an idle window: what the nodes use with no message flowing
            a = marks()
            await asyncio.sleep(sum(windows) / len(windows))
            idle.append({k2: (round(v, 6) if v is not None else None) for k2, v in window(a, marks()).items()})
        for rd in readers:
            rd.cancel()
        await pws.close()
    finally:
        for ws in socks:
            try:
                await ws.close()
            except Exception:
                pass
    idle_window = sum(w["window_s"] for w in idle)
    idle_rate = sum(w["cpu_s"] for w in idle) / idle_window if idle_window > 0 else 0.0
    rows = [_mode_row(mode, n, [m for m in per_msg if m["mode"] == mode], idle_rate) for mode in SEALING_MODES]
    clear = rows[0]
    for row in rows:
        row["time_p50_vs_clear"] = _ratio(row["time_to_last_node_ms_p50"], clear["time_to_last_node_ms_p50"])
        row["time_p99_vs_clear"] = _ratio(row["time_to_last_node_ms_p99"], clear["time_to_last_node_ms_p99"])
        row["cpu_vs_clear"] = _ratio(row["cpu_ms_per_message_net"], clear["cpu_ms_per_message_net"])
    windows_all = per_msg + idle
    others = [w["other_s"] for w in windows_all if w.get("other_s") is not None]
    total_window = sum(w["window_s"] for w in windows_all)
    first_refusal = next((m for m in per_msg if m["publish_status"] != 202), None)
    return {
        "available": True,
        "nodes": n,
        "messages_per_mode": messages,
        "publisher": publisher,
        "key_setup_s": key_setup_s,
        "idle_cpu_cores": round(idle_rate, 4),
        "other_cpu": round(sum(others) / total_window, 3) if others and total_window > 0 else None,
        "publish_refusal_example": (f"{first_refusal['mode']}: {first_refusal['publish_status']} "
                                    f"{first_refusal['publish_error']}") if first_refusal else None,
        "rows": rows,
        "per_message": per_msg,
        "idle_windows": idle,
    }


def run_sealed(start_node: Callable[..., Any], stop_all: Callable[[list], None], nodes: int, messages: int,
               topology: str = "random-tree", connect_timeout: float = 60.0, per_message_timeout: float = 10.0,
               machine_busy: Callable[[], float] | None = None, log: Callable[[str], None] = print) -> dict:
    """Figure (7): ``start_node``/``stop_all`` as for ``run_gossip``; each
    server also has ``.pid`` (the node's process, whose CPU is counted)."""
    servers: list = []
    try:
        started_s, conn = start_network(start_node, servers, nodes, topology, connect_timeout, log)
        cpu = NodesCPU([s.pid for s in servers])
        result = asyncio.run(measure_sealed([s.url for s in servers], messages, per_message_timeout, cpu,
                                            machine_busy))
        result.update({"topology": topology, "startup_s": round(started_s, 2), "connectivity": conn,
                       "cpu_source": cpu.source})
        return result
    finally:
        stop_all(servers)
