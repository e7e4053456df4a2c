"""The load generator: raw-socket WebSocket clients on asyncio, in several
worker processes, so that plain Python can keep a server busy.

Why raw sockets: a client built on a full WebSocket library spends about as
much CPU per message as the server it measures, and on a 2-core machine it
would measure itself. Here a request frame is built once (masked with a
fixed key, which servers accept) and a reply is recognised by its frame
header and the three digits of its ``"status"``; the per-message cost is a
few microseconds, far below any of the servers'.

Three modes, all bounded in time:

``closed``
    each connection keeps ``depth`` requests in flight and sends a new one
    for every reply (closed loop with pipelining); reports requests/s and
    latency percentiles over the measuring window;
``open``
    requests leave at a fixed total ``rate`` (open loop), whatever the
    replies do; latency is measured from the time each request was *due*
    (so a stalled server is charged for the queue it causes);
``idle``
    opens ``connections`` WebSockets, one request each, keeps them open and
    idle until the parent has measured the server, then closes them.

Every address is given by the caller; run.py only ever passes 127.0.0.1.
Replies to one connection come back in request order (all three servers
guarantee it), so a FIFO of send times per connection gives latencies.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import multiprocessing as mp
import os
import queue as queue_mod
import random
import resource
import time
from typing import Any, Callable

#: A fixed masking key: RFC 6455 wants client frames masked; servers do not
#: check how unpredictable the key is, and a fixed key lets us pre-build frames.
MASK = bytes([0x5A, 0xC3, 0x1F, 0x77])

#: At most this many latencies are kept per worker (reservoir sample).
MAX_SAMPLES = 200_000


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _mask(payload: bytes, key: bytes = MASK) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame (FIN set)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + MASK + _mask(payload)


CLOSE_FRAME = client_frame((1000).to_bytes(2, "big"), opcode=0x8)


class Payloads:
    """What the connections of one worker send: one fixed frame, or a fresh
    frame per request (``register`` with distinct addresses)."""

    def __init__(self, kind: str, worker: int, fixed: bytes | None = None) -> None:
        self.kind = kind
        self.worker = worker
        self.counter = 0
        self.fixed = client_frame(fixed) if fixed is not None else None

    def frames(self, n: int) -> bytes:
        if self.fixed is not None:
            return self.fixed * n
        out = []
        for _ in range(n):
            out.append(client_frame(register_payload(self.worker, self.counter)))
            self.counter += 1
        return b"".join(out)


def register_address(worker: int, n: int) -> str:
    """A distinct loopback address for (worker, n): 127.W.x.y, port from n.
    Nothing listens there; if a node dials it, it reaches only this machine."""
    return f"ws://127.{1 + worker % 250}.{(n >> 8) & 255}.{n & 255}:{1024 + (n >> 16)}/ws"


def register_payload(worker: int, n: int) -> bytes:
    return b'{"op":"register","args":{"addr":"' + register_address(worker, n).encode() + b'"}}'


class RawWS(asyncio.Protocol):
    """A minimal client WebSocket: handshake, masked text frames out,
    unmasked frames in, pings answered."""

    def __init__(self, host: str, port: int, path: str, on_replies: Callable[["RawWS", int, float, list], None]) -> None:
        self.host, self.port, self.path = host, port, path
        self.on_replies = on_replies
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.open = False
        self.closed = False
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self.sent_at: collections.deque = collections.deque()
        self.first_reply: bytes | None = None

    # -- asyncio ----------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((
            f"GET {self.path} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.open = False
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during handshake: {exc}"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 16384:
                    self.transport.abort()
                return
            status_line = bytes(buf[:buf.find(b"\r\n")])
            if b" 101 " not in status_line + b" ":
                if not self.opened.done():
                    self.opened.set_exception(ConnectionError(f"handshake refused: {status_line!r}"))
                self.transport.abort()
                return
            del buf[:end + 4]
            self.open = True
            if not self.opened.done():
                self.opened.set_result(self)
        now = time.monotonic()
        statuses = []
        i = 0
        n = len(buf)
        while n - i >= 2:
            b0 = buf[i]
            b1 = buf[i + 1]
            ln = b1 & 0x7F
            h = 2
            if ln == 126:
                if n - i < 4:
                    break
                ln = (buf[i + 2] << 8) | buf[i + 3]
                h = 4
            elif ln == 127:
                if n - i < 10:
                    break
                ln = int.from_bytes(buf[i + 2:i + 10], "big")
                h = 10
            if b1 & 0x80:
                h += 4  # servers never mask; be lenient all the same
            if n - i < h + ln:
                break
            op = b0 & 0x0F
            p = i + h
            if op in (0x1, 0x2, 0x0):
                if b0 & 0x80:  # FIN: a whole message (servers here do not fragment)
                    head = bytes(buf[p:p + 16])
                    j = head.find(b":")
                    try:
                        statuses.append(int(head[j + 1:j + 5].strip(b" ,")))
                    except ValueError:
                        statuses.append(0)
                    if self.first_reply is None:
                        self.first_reply = bytes(buf[p:p + ln])
            elif op == 0x9:  # ping
                self.transport.write(client_frame(bytes(buf[p:p + ln]), opcode=0xA))
            elif op == 0x8:  # close
                self.closed = True
                self.transport.write(CLOSE_FRAME)
                self.transport.close()
            i += h + ln
        if i:
            del buf[:i]
        if statuses:
            self.on_replies(self, len(statuses), now, statuses)

    # -- use ----------------------------------------------------------------------
    def send(self, frames: bytes, count: int, when: float | list) -> None:
        if self.closed or self.transport is None:
            return
        if isinstance(when, list):
            self.sent_at.extend(when)
        else:
            self.sent_at.extend([when] * count)
        self.transport.write(frames)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            try:
                self.transport.write(CLOSE_FRAME)
            finally:
                self.transport.close()
            self.closed = True


class Stats:
    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.window = (float("inf"), float("-inf"))
        self.completed = 0
        self.bad = 0
        self.bad_example: int | None = None
        self.total_replies = 0
        self.last_reply = 0.0
        self.latencies: list[float] = []
        self._seen = 0
        self._rng = random.Random(1)

    def record(self, sent: float, now: float, status: int) -> None:
        self.total_replies += 1
        self.last_reply = now
        lo, hi = self.window
        if status != self.expect:
            self.bad += 1
            self.bad_example = status
        # a reply counts when it arrives inside the measuring window
        if not lo <= now <= hi:
            return
        self.completed += 1
        lat = now - sent
        self._seen += 1
        if len(self.latencies) < MAX_SAMPLES:
            self.latencies.append(lat)
        else:
            j = self._rng.randrange(self._seen)
            if j < MAX_SAMPLES:
                self.latencies[j] = lat


async def _connect_all(host: str, port: int, path: str, count: int, concurrency: int,
                       on_replies: Callable, deadline: float) -> tuple[list[RawWS], list[str]]:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(max(1, concurrency))
    conns: list[RawWS] = []
    errors: list[str] = []

    async def one() -> None:
        async with sem:
            left = deadline - time.monotonic()
            if left <= 0:
                errors.append("connect deadline passed")
                return
            proto = RawWS(host, port, path, on_replies)
            try:
                await asyncio.wait_for(loop.create_connection(lambda: proto, host, port), left)
                await asyncio.wait_for(proto.opened, max(0.1, deadline - time.monotonic()))
            except (OSError, ConnectionError, asyncio.TimeoutError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                if proto.transport is not None:
                    proto.transport.abort()
                return
            conns.append(proto)

    await asyncio.gather(*(one() for _ in range(count)))
    return conns, errors


async def _wait_event(event: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not event.is_set():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.005)
    return True


async def _worker_async(spec: dict, wid: int, ready_q: Any, go: Any, start_at: Any, release: Any) -> dict:
    mode = spec["mode"]
    host, port, path = spec["host"], spec["port"], spec.get("path", "/ws")
    n_conn = spec["conns_per_worker"][wid]
    payloads = Payloads(spec.get("kind", "fixed"), wid, spec.get("payload", b'{"op":"time"}') if spec.get("kind", "fixed") == "fixed" else None)
    stats = Stats(spec.get("expect", 200))
    depth = spec.get("depth", 1)
    # fixed work: this worker sends exactly ``quota`` requests, then stops
    quota = spec["quota_per_worker"][wid] if spec.get("total") else None
    state: dict[str, Any] = {"sending": False, "left": quota}

    def send_more(conn: RawWS, count: int, now: float) -> None:
        left = state["left"]
        if left is not None:
            count = min(count, left)
            state["left"] = left - count
        if count > 0:
            conn.send(payloads.frames(count), count, now)

    def on_replies(conn: RawWS, count: int, now: float, statuses: list) -> None:
        sent_at = conn.sent_at
        for st in statuses:
            sent = sent_at.popleft() if sent_at else now
            stats.record(sent, now, st)
        if mode == "closed" and state["sending"]:
            send_more(conn, count, now)

    conns, errors = await _connect_all(host, port, path, n_conn, spec.get("connect_concurrency", 16),
                                       on_replies, time.monotonic() + spec.get("connect_timeout", 60.0))
    if mode == "idle":
        # one request each, so every connection is fully set up on the server
        t = time.monotonic()
        for c in conns:
            c.send(payloads.frames(1), 1, t)
        end = time.monotonic() + spec.get("connect_timeout", 60.0)
        while stats.total_replies < len(conns) and time.monotonic() < end:
            await asyncio.sleep(0.01)
    ready_q.put(("ready", wid, len(conns), errors[:3], len(errors), stats.total_replies))
    if not await _wait_event(go, spec.get("go_timeout", 120.0)):
        for c in conns:
            c.close()
        return {"wid": wid, "error": "no go signal"}
    t0 = start_at.value
    warmup, duration = spec.get("warmup", 1.0), spec.get("duration", 3.0)
    w_lo, w_hi = t0 + warmup, t0 + warmup + duration
    stats.window = (w_lo, w_hi)
    cpu0 = None

    if mode == "idle":
        await _wait_event(release, spec.get("hold", 120.0))
        for c in conns:
            c.close()
        await asyncio.sleep(0.05)
        return {"wid": wid, "connections": len(conns), "connect_errors": len(errors), "replies": stats.total_replies}

    delay = t0 - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    if mode == "closed":
        state["sending"] = True
        now = time.monotonic()
        for c in conns:
            send_more(c, depth, now)
        while time.monotonic() < w_hi:
            if cpu0 is None and time.monotonic() >= w_lo:
                cpu0 = time.process_time()
            if quota is not None and stats.total_replies >= quota:
                break
            await asyncio.sleep(min(0.01 if quota is not None else 0.05, max(0.0, w_hi - time.monotonic())))
        state["sending"] = False
    elif mode == "open":
        rate = spec["rate"] / spec["workers"]
        interval = 1.0 / rate
        sent = 0
        k = 0
        live = [c for c in conns if not c.closed]
        max_out = spec.get("max_outstanding", 100_000)
        while live:
            now = time.monotonic()
            if now >= w_hi:
                break
            if cpu0 is None and now >= w_lo:
                cpu0 = time.process_time()
            due = int((now - t0) * rate) - sent
            if due > 0:
                # spread the due requests over the connections, in order
                per: dict[int, list] = {}
                for _ in range(due):
                    per.setdefault(k % len(live), []).append(t0 + sent * interval)
                    sent += 1
                    k += 1
                for idx, whens in per.items():
                    c = live[idx]
                    if len(c.sent_at) < max_out:
                        c.send(payloads.frames(len(whens)), len(whens), whens)
            await asyncio.sleep(0.001)
    cpu1 = time.process_time()
    # let the requests still in flight come back (bounded), then close
    end = time.monotonic() + spec.get("drain", 3.0)
    while any(c.sent_at and not c.closed for c in conns) and time.monotonic() < end:
        await asyncio.sleep(0.01)
    for c in conns:
        c.close()
    await asyncio.sleep(0.05)
    first = next((c.first_reply for c in conns if c.first_reply is not None), None)
    return {
        "wid": wid,
        "connections": len(conns),
        "connect_errors": len(errors),
        "completed": stats.completed,
        "bad": stats.bad,
        "bad_example": stats.bad_example,
        "replies": stats.total_replies,
        "latencies": stats.latencies,
        "cpu": (cpu1 - cpu0) if cpu0 is not None else 0.0,
        "t0": t0,
        "last_reply": stats.last_reply,
        "first_reply": first[:300] if first else None,
        "first_reply_peers": first.count(b"ws://") if first else None,
    }


def _worker(spec: dict, wid: int, ready_q: Any, result_q: Any, go: Any, start_at: Any, release: Any) -> None:
    raise_fd_limit()
    try:
        result = asyncio.run(_worker_async(spec, wid, ready_q, go, start_at, release))
    except BaseException as e:  # report, never hang the parent
        result = {"wid": wid, "error": f"{type(e).__name__}: {e}"}
        ready_q.put(("failed", wid, 0, [result["error"]], 1, 0))
    result_q.put(result)


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class LoadRun:
    """One measurement with ``workers`` client processes.

    ``on_window(start, end)`` lets the caller sample the server (CPU time)
    at the edges of the measuring window; ``on_ready()`` (idle mode) is
    called while every connection is open and idle.
    """

    def __init__(self, spec: dict) -> None:
        self.spec = dict(spec)
        workers = max(1, min(spec.get("workers", 2), spec["connections"]))
        self.spec["workers"] = workers
        self.spec["conns_per_worker"] = _split(spec["connections"], workers)
        if spec.get("total"):
            # fixed work (``total`` requests, then stop): no warm-up, the
            # window is bounded by ``duration`` as a time limit
            self.spec["quota_per_worker"] = _split(spec["total"], workers)
            self.spec["warmup"] = 0.0

    def run(self, on_ready: Callable[[], Any] | None = None,
            on_window: Callable[[str], None] | None = None) -> dict:
        spec = self.spec
        ctx = mp.get_context("spawn")
        ready_q, result_q = ctx.Queue(), ctx.Queue()
        go, release = ctx.Event(), ctx.Event()
        start_at = ctx.Value("d", 0.0)
        procs = [ctx.Process(target=_worker, args=(spec, w, ready_q, result_q, go, start_at, release), daemon=True)
                 for w in range(spec["workers"])]
        for p in procs:
            p.start()
        opened, connect_errors, examples = 0, 0, []
        results: list[dict] = []
        hard_end = time.monotonic() + spec.get("connect_timeout", 60.0) + 30
        try:
            got = 0
            while got < len(procs):
                try:
                    tag, wid, n_ok, errs, n_err, _ = ready_q.get(timeout=max(0.1, hard_end - time.monotonic()))
                except queue_mod.Empty:
                    raise RuntimeError("load workers did not get ready in time")
                got += 1
                opened += n_ok
                connect_errors += n_err
                examples.extend(errs)
            ready_info = {"opened": opened, "connect_errors": connect_errors, "connect_error_examples": examples[:3]}
            ready_value = None
            t0 = time.monotonic() + 0.2
            start_at.value = t0
            go.set()
            if spec["mode"] == "idle":
                if on_ready is not None:
                    ready_value = on_ready()
                release.set()
            else:
                w_lo = t0 + spec.get("warmup", 1.0)
                w_hi = w_lo + spec.get("duration", 3.0)
                if on_window is not None:
                    time.sleep(max(0.0, w_lo - time.monotonic()))
                    on_window("start")
                    if not spec.get("total"):
                        time.sleep(max(0.0, w_hi - time.monotonic()))
                        on_window("end")
            end = time.monotonic() + spec.get("warmup", 1.0) + spec.get("duration", 3.0) + spec.get("drain", 3.0) + 30
            while len(results) < len(procs):
                try:
                    results.append(result_q.get(timeout=max(0.1, end - time.monotonic())))
                except queue_mod.Empty:
                    raise RuntimeError("load workers did not report in time")
                if spec.get("total") and on_window is not None and len(results) == 1:
                    on_window("end")  # the first worker is done: close enough to the end of the work
        finally:
            go.set()
            release.set()
            for p in procs:
                p.join(timeout=5)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=2)
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise RuntimeError(f"load worker failed: {errors[0]}")
        out: dict[str, Any] = {"mode": spec["mode"], "workers": spec["workers"], **ready_info}
        if spec["mode"] == "idle":
            out["ready_value"] = ready_value
            return out
        lat = sorted(x for r in results for x in r["latencies"])
        duration = spec.get("duration", 3.0)
        completed = sum(r["completed"] for r in results)
        if spec.get("total"):
            # elapsed: from the start to the last reply of all
            duration = max(1e-6, max(r["last_reply"] for r in results) - results[0]["t0"])
            out["elapsed_s"] = round(duration, 3)
        out["window_s"] = duration
        out.update({
            "completed": completed,
            "rps": completed / duration,
            "bad_status": sum(r["bad"] for r in results),
            "bad_example": next((r["bad_example"] for r in results if r["bad_example"] is not None), None),
            "p50_ms": _ms(percentile(lat, 50)),
            "p99_ms": _ms(percentile(lat, 99)),
            "max_ms": _ms(lat[-1] if lat else None),
            "client_cpu": sum(r["cpu"] for r in results) / duration,
            "first_reply": next((r["first_reply"] for r in results if r["first_reply"]), None),
            "first_reply_peers": next((r["first_reply_peers"] for r in results if r["first_reply"]), None),
        })
        if out["first_reply"] is not None:
            out["first_reply"] = out["first_reply"].decode("utf-8", "replace")
        return out


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 3)
