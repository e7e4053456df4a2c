"""``foxnode experiment run FILE``: scenarios checked before anything
starts, the shipped example run at a small size, and Ctrl-C keeping the
partial report.

Every address used here is on 127.0.0.1.
"""

from __future__ import annotations

import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import orjson
import pytest

from foxnode import devnet
from foxnode.experiment import ScenarioError, parse_scenario

BIN = Path(sys.executable).parent
FOXNODE = [str(BIN / "foxnode")]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gossip-kill.toml"
PARTITION = EXAMPLE.with_name("partition-heal.toml")


def free_ports(count: int) -> int:
    for _ in range(100):
        base = random.randrange(20000, 30000)
        if not any(devnet.port_in_use(base + i) for i in range(count)):
            return base
    raise AssertionError("no free port range")


@pytest.mark.parametrize("text, named", [
    ("[network]\nnodes = 10\nnodez = 3\n", "network.nodez: unknown key"),
    ("[network]\nnodes = 10\n[extra]\n", "extra: unknown key"),
    ("[network]\nnodes = 1001\n", "network.nodes = 1001: give a whole number from 2 to 1000"),
    ("[network]\nnodes = 0\n", "network.nodes = 0"),
    ("[network]\nnodes = 1.5\n", "network.nodes = 1.5"),
    ("[network]\nnodes = 100\nbase_port = 65500\n", "network.base_port = 65500"),
    ("[network]\nnodes = 10\nlatency = \"-40ms\"\n", "network.latency = '-40ms'"),
    ("[network]\nnodes = 10\nloss = \"100%\"\n", "network.loss = '100%'"),
    ("[network]\nnodes = 10\n[[timeline]]\nat = -1\naction = \"kill\"\nshare = 0.2\n", "timeline[0].at = -1"),
    ("[network]\nnodes = 10\n[[timeline]]\nat = 1\naction = \"kill\"\nshare = 2\n", "timeline[0].share = 2"),
    ("[network]\nnodes = 10\n[[timeline]]\nat = 1\naction = \"explode\"\n", "timeline[0].action = 'explode'"),
    ("[network]\nnodes = 10\n[[timeline]]\nat = 1\naction = \"restart\"\nshare = 1\n", "timeline[0].share: unknown"),
    ("[network]\nnodes = 10\n[[timeline]]\nat = 1\naction = \"publish\"\nrate = 1\n", "timeline[0].count: missing"),
    ("[network]\nnodes = 10\n[measure]\nplots = 1\n", "measure.plots = 1"),
    ("", "network: missing"),
    ("[network]\nnodes = 10\nwarmup = -1\n", "network.warmup = -1"),
    ("[network]\nnodes = 10\n[[timeline]]\nat = 1\naction = \"churn\"\nshare = 0.1\nevery = 0\nduration = 5\n",
     "timeline[0].every = 0"),
    ("[network]\nnodes = 10\n[[timeline]]\nat = 1\naction = \"churn\"\nshare = 0.1\nevery = 2\n",
     "timeline[0].duration: missing"),
    ("[network]\nnodes = 10\n[[timeline]]\nat = 1\naction = \"partition\"\nsplit = 1\n", "timeline[0].split = 1"),
    ("[network]\nnodes = 10\n[[timeline]]\nat = 1\naction = \"heal\"\nsplit = 0.5\n", "timeline[0].split: unknown"),
])
def test_a_bad_scenario_is_one_line_naming_the_key(text, named):
    with pytest.raises(ScenarioError) as e:
        parse_scenario(tomllib.loads(text))
    assert named in str(e.value)
    assert "\n" not in str(e.value)


def test_the_example_parses():
    with open(EXAMPLE, "rb") as f:
        s = parse_scenario(tomllib.load(f))
    assert s.nodes == 40 and s.latency == "40ms:10ms"
    assert [e.action for e in s.timeline] == ["publish", "kill", "publish", "restart", "publish"]


@pytest.mark.parametrize("text, named", [
    ("[network]\nnodes = 10\nlatency = \"-40ms\"\n", "network.latency"),
    ("[network]\nnodes = 5000\n", "network.nodes"),
    ("[network]\nnodes = 10\ncolour = 1\n", "network.colour: unknown key"),
    ("not = [toml", "not TOML"),
])
def test_the_command_refuses_a_bad_scenario_in_one_line_before_anything_starts(text, named, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = subprocess.run(FOXNODE + ["experiment", "run", str(path)], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("foxnode experiment: argument FILE: "), result.stderr
    assert named in lines[0]
    assert result.stdout == ""
    assert not any(p.name.endswith(("-nodes", "-report")) for p in tmp_path.iterdir())


def small_example(tmp_path: Path, nodes: int = 6, per_process: int = 3, example: Path = EXAMPLE,
                  faster: float = 2.0) -> Path:
    """The shipped example at a small size, on free ports, its timeline
    run ``faster`` times as fast (the suite's time is counted)."""
    text = example.read_text()
    text = re.sub(r"(?m)^at = (\d+)", lambda m: f"at = {int(m[1]) / faster:g}", text)
    text = re.sub(r"(?m)^rate = (\d+)", lambda m: f"rate = {int(m[1]) * faster:g}", text)
    text = re.sub(r"(?m)^settle = (\d+)", lambda m: f"settle = {int(m[1]) / faster:g}", text)
    text = re.sub(r"(?m)^nodes = \d+", f"nodes = {nodes}", text)
    text = re.sub(r"(?m)^per_process = \d+", f"per_process = {per_process}", text)
    text = re.sub(r"(?m)^base_port = \d+", f"base_port = {free_ports(nodes)}", text)
    path = tmp_path / "small.toml"
    path.write_text(text)
    return path


def test_the_shipped_example_runs_at_a_small_size_and_writes_its_report(tmp_path):
    path = small_example(tmp_path)
    result = subprocess.run(FOXNODE + ["experiment", "run", str(path)], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    report_dir = tmp_path / "small-report"
    report = orjson.loads((report_dir / "report.json").read_bytes())
    assert report["interrupted"] is False
    assert report["links"]["emulation"] == "wrapper"
    assert report["messages"] == 40
    assert report["delivery"] >= 0.95, report["delivery"]
    assert [e["action"] for e in report["events"]] == ["publish", "kill", "publish", "restart", "publish"]
    killed = report["events"][1]["nodes"]
    assert len(killed) == 3  # half of the 2 processes: one, all its nodes
    for name in ("delivery.png", "copies.png", "latency.png", "connections.png"):
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "devnet stopped" in result.stdout
    # The network page: the data inline, every message's spread over its graph.
    page = (report_dir / "network.html").read_text()
    data = orjson.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S)[1])
    assert data["nodes"] == 6 and data["graphs"] and data["messages"]
    assert report["memory"]["rss_per_node_mib"] < 60
    # The nodes' CPU over the timeline, what a student compares runs by.
    assert 0 < report["cpu"]["timeline_cores"] < os.cpu_count() + 1
    assert report["cpu"]["timeline_seconds"] > 0
    assert all(m["hops"] is None or m["best"] == pytest.approx(m["hops"] * 0.04) for m in report["per_message"])


def test_ctrl_c_stops_every_node_and_keeps_the_partial_report(tmp_path):
    path = small_example(tmp_path, nodes=4, per_process=2)
    process = subprocess.Popen(FOXNODE + ["experiment", "run", str(path)], cwd=tmp_path, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in process.stdout] and lines.put(None), daemon=True).start()
    seen = []
    try:
        deadline = time.monotonic() + 120
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "".join(seen)
            seen.append(line)
            if "publishing" in line:
                break
        time.sleep(2)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            # SIGTERM first: the command stops its nodes (in sessions of their own).
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    rest = []
    while (line := lines.get(timeout=10)) is not None:
        rest.append(line)
    out = "".join(seen + rest)
    report = orjson.loads((tmp_path / "small-report" / "report.json").read_bytes())
    assert report["interrupted"] is True
    assert report["messages"] >= 1
    assert "devnet stopped" in out, out
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", out)]
    assert pids
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # A zombie is gone too (its parent, the command, has exited).
        state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
        assert state in ("Z", "X"), f"node process {pid} still runs"


def test_the_partition_example_splits_the_network_and_heals_it(tmp_path):
    path = small_example(tmp_path, example=PARTITION)
    result = subprocess.run(FOXNODE + ["experiment", "run", str(path)], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    report = orjson.loads((tmp_path / "small-report" / "report.json").read_bytes())
    assert [e["action"] for e in report["events"]] == ["publish", "partition", "publish", "heal", "publish"]
    assert report["events"][1]["split"] == 3
    during = [m for m in report["per_message"] if m["partitioned"]]
    after = report["per_message"][-10:]
    # What was published on one side reaches the other side too, once the
    # partition heals: the nodes catch up on what they lacked (issue 14).
    assert len(during) == 10 and [m["delivered"] for m in during] == [6] * 10, during
    assert all(m["delivered"] == m["expected"] == 6 for m in after), after
    assert "partitioned node-0..node-2 | node-3..node-5" in result.stdout


def test_churn_kills_and_restarts_a_share_again_and_again(tmp_path):
    path = tmp_path / "churn.toml"
    path.write_text(f"""
[network]
nodes = 4
per_process = 1
base_port = {free_ports(4)}

[[timeline]]
at = 0
action = "publish"
count = 12
rate = 2

[[timeline]]
at = 0.5
action = "churn"
share = 0.25
every = 2
duration = 4

[measure]
settle = 2
plots = false
""")
    result = subprocess.run(FOXNODE + ["experiment", "run", str(path)], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    report = orjson.loads((tmp_path / "churn-report" / "report.json").read_bytes())
    actions = [e["action"] for e in report["events"]]
    assert actions == ["publish", "kill", "restart", "kill", "restart"], actions
    assert all(len(e["nodes"]) == 1 for e in report["events"][1:])
    assert report["messages"] == 12 and report["delivery"] > 0.5
    assert not (tmp_path / "churn-report" / "delivery.png").exists()  # plots = false
