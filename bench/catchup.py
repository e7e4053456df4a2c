"""Figure (8), catch-up (issue 14): a node that missed messages while it was
down, back on its data, and how long and how many bytes until it holds them
all again.

Two twistd foxnodes on 127.0.0.1: A, and B with ``--peer`` A. One message
published at A and seen in B's store (``/metrics``
``foxnode_history_messages``) says they are linked. Then, per case (a fresh
pair of nodes each):

* B is stopped (SIGTERM); ``missed`` messages are published at A, pipelined
  over a few WebSocket connections (each a ~200-byte JSON payload, ``ttl``
  3600); B is started again on the same data directory and B's ``/metrics``
  is polled until its store holds everything A's does. Seconds are counted
  from B's spawn, and from B serving ``/healthz``.
* Bytes: the growth of ``foxnode_catchup_bytes_total{direction="sent"}`` at
  A, plus B's (a fresh process: all of it), read once both have stopped
  growing: every catch-up frame (summaries, id lists, wants, pushes,
  dones) in both directions, as JSON text (WebSocket framing not counted).
* The bytes of the missed messages themselves: the growth of A's
  ``foxnode_history_bytes`` over the publishes, less ``ROW_OVERHEAD`` (400,
  foxnode/msgstore.py) per message: their envelopes' JSON as stored, which
  is as it travels. The naive alternative, every unexpired envelope sent
  again, costs A's whole store: ``foxnode_history_bytes`` less 400 per row.

The case "missed 10 %": before B is stopped for the last ``missed`` of
``total`` messages, it gets the first ``total - missed`` by the same
catch-up (stopped, published, started again; not measured), not by gossip:
published as fast as the harness can, gossip would overrun B's budget for
its peer (``--peer-rate``), and the nodes run with their own limits.
"""
from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
import urllib.request
from typing import Any, Callable

from foxnode.msgstore import ROW_OVERHEAD

TOPIC = "foxbench-catchup"
TTL = 3600
#: connections the publishes are pipelined over, and requests in flight on each
PUBLISH_CONNECTIONS = 4
PUBLISH_DEPTH = 256
POLL_S = 0.05
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')


class Unavailable(Exception):
    pass


def metrics_url(ws_url: str) -> str:
    base = ws_url.split("://", 1)[1].split("/", 1)[0]
    return f"http://{base}/metrics"


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    """The samples of a node's /metrics that figure 8 reads."""
    with _OPENER.open(metrics_url(url), timeout=timeout) as r:
        text = r.read().decode("utf-8", "replace")
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        if name in ("foxnode_history_messages", "foxnode_history_bytes"):
            out[name] = float(value)
        elif name == "foxnode_catchup_bytes_total" and 'direction="sent"' in (labels or ""):
            out["catchup_sent"] = float(value)
        elif name == "foxnode_catchup_envelopes_total":
            out["catchup_envelopes"] = out.get("catchup_envelopes", 0.0) + float(value)
    return out


def payload(seq: int) -> dict:
    """A payload of about 200 bytes of JSON, like a chat line with its metadata."""
    return {"seq": seq, "kind": "chat", "room": "lab-14", "author": f"user-{seq % 37:02d}",
            "sent": 1764700000 + seq,
            "text": ("catch-up bench message %06d: the quick brown fox jumps over the lazy dog; "
                     "pack my box with five dozen liquor jugs." % seq)}


async def publish_many(url: str, count: int, first_seq: int, timeout: float) -> list[str]:
    """``count`` publishes at ``url``, pipelined (``PUBLISH_CONNECTIONS`` x
    ``PUBLISH_DEPTH`` in flight); the ids, or Unavailable on a refusal."""
    import websockets

    ids: list[str] = []
    seqs = iter(range(first_seq, first_seq + count))

    async def one_connection() -> None:
        async with websockets.connect(url, proxy=None, open_timeout=10, close_timeout=2, max_size=1 << 22) as ws:
            inflight = 0
            done = False
            while True:
                while not done and inflight < PUBLISH_DEPTH:
                    seq = next(seqs, None)
                    if seq is None:
                        done = True
                        break
                    await ws.send(json.dumps({"op": "publish", "id": str(seq),
                                              "args": {"topic": TOPIC, "payload": payload(seq), "ttl": TTL}}))
                    inflight += 1
                if not inflight:
                    return
                msg = json.loads(await ws.recv())
                if not isinstance(msg, dict) or "status" not in msg:
                    continue
                inflight -= 1
                if msg.get("status") != 202:
                    raise Unavailable(f"publish answered {msg.get('status')}: {msg.get('error')}")
                ids.append(msg["response"]["id"])

    await asyncio.wait_for(asyncio.gather(*(one_connection() for _ in range(PUBLISH_CONNECTIONS))), timeout)
    return ids


def wait_holding(url: str, count: int, timeout: float, proc_alive: Callable[[], bool] | None = None) -> float | None:
    """Poll ``url``'s store until it holds ``count`` messages: the monotonic
    time it did, or None at the timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if scrape(url).get("foxnode_history_messages", 0) >= count:
                return time.monotonic()
        except OSError:
            pass
        if proc_alive is not None and not proc_alive():
            raise Unavailable("node B exited while catching up")
        time.sleep(POLL_S)
    return None


def settled(urls: list[str], key: str, quiet: float = 0.5, timeout: float = 10.0) -> list[dict]:
    """Scrapes of ``urls`` once ``key`` has not changed on any for ``quiet`` s."""
    end = time.monotonic() + timeout
    last = [scrape(u) for u in urls]
    stable_since = time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.1)
        now = [scrape(u) for u in urls]
        if [m.get(key) for m in now] != [m.get(key) for m in last]:
            stable_since = time.monotonic()
        last = now
        if time.monotonic() - stable_since >= quiet:
            break
    return last


def run_case(start_node: Callable[..., Any], stop_node: Callable[[Any], None], total: int, missed: int,
             timeout: float, log: Callable[[str], None] = print) -> dict:
    """One measurement: B misses the last ``missed`` of ``total`` messages
    (A holds ``total`` + 1, the link probe). ``start_node(peer, directory)``
    starts a foxnode and returns once it serves /healthz, with ``.url``,
    ``.dir``, ``.proc``; ``stop_node(server)`` stops it (SIGTERM)."""
    live: list = []

    def start(peer: str | None = None, directory: str | None = None) -> Any:
        s = start_node(peer, directory)
        live.append(s)
        return s

    def stop(s: Any) -> None:
        if s in live:
            live.remove(s)
        stop_node(s)

    try:
        a = start()
        b = start(a.url)
        asyncio.run(publish_many(a.url, 1, -1, timeout))
        if wait_holding(b.url, 1, timeout) is None:
            raise Unavailable(f"B did not get the probe message within {timeout:.0f}s: not linked")
        held = 1
        if total > missed:
            # B gets the first total - missed by an (unmeasured) catch-up
            stop(b)
            asyncio.run(publish_many(a.url, total - missed, 0, timeout))
            held += total - missed
            b = start(a.url, b.dir)
            if wait_holding(b.url, held, timeout, lambda: b.proc.poll() is None) is None:
                raise Unavailable(f"B did not catch up the first {total - missed} within {timeout:.0f}s")
        stop(b)
        a0 = scrape(a.url)
        t = time.monotonic()
        ids = asyncio.run(publish_many(a.url, missed, total - missed, timeout))
        publish_s = time.monotonic() - t
        a1 = scrape(a.url)
        want = held + missed
        if a1.get("foxnode_history_messages") != want or len(set(ids)) != missed:
            raise Unavailable(f"A holds {a1.get('foxnode_history_messages')} messages, expected {want}")
        t_spawn = time.monotonic()
        b = start(a.url, b.dir)
        t_ready = time.monotonic()
        t_done = wait_holding(b.url, want, timeout, lambda: b.proc.poll() is None)
        if t_done is None:
            got = scrape(b.url).get("foxnode_history_messages")
            raise Unavailable(f"B held {got} of {want} messages {timeout:.0f}s after it was back")
        a2, b2 = settled([a.url, b.url], "catchup_sent")
        if b2.get("foxnode_history_messages") != want:
            raise Unavailable(f"B holds {b2.get('foxnode_history_messages')} messages, expected {want}")
        sent_a = a2.get("catchup_sent", 0.0) - a1.get("catchup_sent", 0.0)
        sent_b = b2.get("catchup_sent", 0.0)
        catchup_bytes = int(sent_a + sent_b)
        message_bytes = int((a1["foxnode_history_bytes"] - a0["foxnode_history_bytes"])
                            - ROW_OVERHEAD * (a1["foxnode_history_messages"] - a0["foxnode_history_messages"]))
        resend_bytes = int(a1["foxnode_history_bytes"] - ROW_OVERHEAD * a1["foxnode_history_messages"])
        seconds = t_done - t_spawn
        r = {
            "total": total + 1, "missed": missed,
            "seconds_from_spawn": round(seconds, 3),
            "seconds_from_healthz": round(t_done - t_ready, 3),
            "startup_s": round(t_ready - t_spawn, 3),
            "catchup_bytes": catchup_bytes,
            "catchup_bytes_sent_by_a": int(sent_a), "catchup_bytes_sent_by_b": int(sent_b),
            "message_bytes": message_bytes,
            "resend_all_bytes": resend_bytes,
            "bytes_ratio": round(catchup_bytes / message_bytes, 4) if message_bytes > 0 else None,
            "vs_resend_all": round(catchup_bytes / resend_bytes, 4) if resend_bytes > 0 else None,
            "messages_per_s": round(missed / seconds, 1) if seconds > 0 else None,
            "messages_per_s_from_healthz": round(missed / (t_done - t_ready), 1) if t_done > t_ready else None,
            "caught_up_envelopes_b": int(b2.get("catchup_envelopes", 0)),
            "publish_s": round(publish_s, 3),
            "publish_rps": round(missed / publish_s, 1) if publish_s > 0 else None,
            "mean_envelope_bytes": round(message_bytes / missed, 1) if missed else None,
        }
        log(f"  [8] missed {missed} of {total + 1}: held all {r['seconds_from_spawn']:.2f} s after spawn "
            f"({r['seconds_from_healthz']:.2f} s after /healthz), catch-up {catchup_bytes:,} B "
            f"(A {int(sent_a):,}, B {int(sent_b):,}), messages {message_bytes:,} B, ratio {r['bytes_ratio']}, "
            f"vs resend-all {r['vs_resend_all']}")
        return r
    finally:
        for s in list(live):
            stop(s)


def _p50(rows: list[dict], key: str) -> Any:
    xs = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def run_catchup(start_node: Callable[..., Any], stop_node: Callable[[Any], None], messages: int, runs: int,
                timeout: float, machine_busy: Callable[[], float] | None = None,
                log: Callable[[str], None] = print) -> dict:
    """Figure (8): two cases, B missed all ``messages`` and B missed the last
    10 % of them; each case ``runs`` times (fresh nodes every time), the
    runs alternating, each row the medians."""
    cases = [("missed all", messages, messages), ("missed 10 %", messages, max(1, messages // 10))]
    per_case: dict[str, list[dict]] = {name: [] for name, _, _ in cases}
    t0 = time.monotonic()
    busy0 = machine_busy() if machine_busy else None
    try:
        for _ in range(runs):
            for name, total, missed in cases:
                per_case[name].append(run_case(start_node, stop_node, total, missed, timeout, log))
    except Unavailable as e:
        return {"available": False, "reason": str(e)}
    except (asyncio.TimeoutError, TimeoutError):
        return {"available": False, "reason": f"a step took over {timeout:g} s (--catchup-timeout)"}
    except Exception as e:
        # a node that would not start, a /metrics that did not answer, ...:
        # said, not raised, as the other figures do
        return {"available": False, "reason": f"{type(e).__name__}: {e}"}
    elapsed = time.monotonic() - t0
    rows = []
    for name, total, missed in cases:
        got = per_case[name]
        row = {"case": name, "messages": total + 1, "missed": missed, "runs": len(got)}
        for key in ("seconds_from_spawn", "seconds_from_healthz", "startup_s", "catchup_bytes",
                    "catchup_bytes_sent_by_a", "catchup_bytes_sent_by_b", "message_bytes", "resend_all_bytes",
                    "bytes_ratio", "vs_resend_all", "messages_per_s", "messages_per_s_from_healthz",
                    "mean_envelope_bytes", "publish_rps"):
            row[key] = _p50(got, key)
        # per run too: the ratio of the 10 % case depends on whether the
        # missed messages share a minute of creation with held ones
        row["bytes_ratio_runs"] = [r["bytes_ratio"] for r in got]
        row["per_run"] = got
        rows.append(row)
    out = {"available": True, "messages": messages, "runs": runs, "ttl": TTL, "rows": rows,
           "elapsed_s": round(elapsed, 1),
           "bytes_source": "foxnode_catchup_bytes_total{direction=\"sent\"} of A (growth) + B; message bytes: "
                           "growth of A's foxnode_history_bytes less ROW_OVERHEAD per message"}
    if busy0 is not None and elapsed > 0:
        # the whole machine's busy cores over the figure, ours included
        out["machine_busy_cores"] = round((machine_busy() - busy0) / elapsed, 2)
    return out
