"""Memory per node and start-up time of ``foxnode devnet`` against N.

    python bench/scale.py --sizes 10,50,100          # a minute or two
    python bench/scale.py --sizes 1000 --base-port 9000

For each N: ``foxnode devnet --nodes N`` (packing as it does by default:
one process per node up to 30 nodes, 50 nodes per process above) on
127.0.0.1; the seconds until every node serves (``nodes up: N/N``) and
until every node has a live peer connection (``all N nodes connected``),
then, after ``--settle`` seconds, the resident memory (VmRSS) of every
node process, summed, divided by N (the devnet command's own process is
not counted: it is the watcher, not the network). Then Ctrl-C (SIGINT),
and the time the devnet takes to stop. Writes ``bench/results/scale.json``
and prints a table in reStructuredText for BENCHMARKS.rst.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FOXNODE = [str(Path(sys.executable).with_name("foxnode"))]


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def one(n: int, base_port: int, settle: float, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"scale-{n}-") as tmp:
        started = time.monotonic()
        p = subprocess.Popen(FOXNODE + ["devnet", "--nodes", str(n), "--base-port", str(base_port),
                                        "--dir", str(Path(tmp) / "devnet"), "--connect-timeout", str(timeout),
                                        "--start-timeout", str(timeout)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in p.stdout] and lines.put(None), daemon=True).start()
        up = connected = None
        pids: list[int] = []
        out = []
        deadline = started + 2 * timeout + 30
        try:
            while connected is None:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                if line is None:
                    raise RuntimeError("devnet ended:\n" + "".join(out[-20:]))
                out.append(line)
                pids += [int(x) for x in re.findall(r"\(pid (\d+)\)", line)]
                if line.startswith(f"nodes up: {n}/{n}"):
                    up = time.monotonic() - started
                if line.startswith(f"all {n} nodes connected") or line.startswith("a single node"):
                    connected = time.monotonic() - started
                if line.startswith("not connected after"):
                    raise RuntimeError(line)
            time.sleep(settle)
            rss = sum(rss_kib(pid) for pid in pids)
            watcher = rss_kib(p.pid)
            last = [l for l in out if l.startswith("live peer connections")][-1:] or [""]
        finally:
            stop_began = time.monotonic()
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
        stopped = time.monotonic() - stop_began
    return {"nodes": n, "processes": len(pids), "serving_s": round(up, 2), "connected_s": round(connected, 2),
            "rss_total_mib": round(rss / 1024, 1), "rss_per_node_mib": round(rss / 1024 / n, 2),
            "devnet_watcher_mib": round(watcher / 1024, 1), "stop_s": round(stopped, 2),
            "connections": last[0].strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,50,100")
    ap.add_argument("--base-port", type=int, default=21000)
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    opts = ap.parse_args()
    rows = []
    for n in [int(x) for x in opts.sizes.split(",")]:
        row = one(n, opts.base_port, opts.settle, opts.timeout)
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    previous = []
    if Path(opts.out).exists():
        previous = [r for r in json.loads(Path(opts.out).read_text()) if r["nodes"] not in {r["nodes"] for r in rows}]
    everything = sorted(previous + rows, key=lambda r: r["nodes"])
    Path(opts.out).write_text(json.dumps(everything, indent=2) + "\n")
    print("\n.. list-table::\n   :header-rows: 1\n")
    print("   * - N\n     - processes\n     - all serving (s)\n     - all with a peer (s)\n"
          "     - RSS per node (MiB)\n     - RSS in all (MiB)\n     - stop (s)")
    for r in everything:
        print(f"   * - {r['nodes']}\n     - {r['processes']}\n     - {r['serving_s']}\n     - {r['connected_s']}\n"
              f"     - {r['rss_per_node_mib']}\n     - {r['rss_total_mib']}\n     - {r['stop_s']}")


if __name__ == "__main__":
    main()
