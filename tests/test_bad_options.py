"""Every option of ``twistd foxnode`` and of every ``foxnode`` subcommand,
given values that would make the command fail, or run and be useless: each
is refused by the real command, in a child process, with one line naming
the option or the fault, a non-zero exit and no traceback.

The tables below name every option that takes a value; an option added
later without bad values of its own makes ``test_every_*_option_has_bad_values``
fail. Every address is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from foxnode import cli, tap
from foxnode.testing import LOOPBACK, free_port, make_test_ca

BIN = Path(sys.executable).parent
TWISTD = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "foxnode"]
FOXNODE = [str(BIN / "foxnode")]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
#: A bad value that slipped through would start a node (or a devnet) that
#: never exits: this long, and the test fails.
DEADLINE = 60
#: Undecodable bytes on the command line (b"\xff") reach Python as this.
UNDECODABLE = "\udcff"


def bad_numbers(low: float, high: float, whole: bool) -> list[str]:
    """What a number option must refuse, given the range it accepts."""
    values = ["nan", "NaN", "inf", "-inf", "1e999", "abc", "", str(low - 1 if whole else low / 2),
              str(int(high) + 1 if whole else high * 2)]
    if low > 0:
        values += ["0", "-1"]
    if whole:
        values += ["1.5"]
    return values


# -- twistd foxnode -------------------------------------------------------------------

#: option -> its bad values; "{tmp}" is the test's directory, "{ca}" a
#: directory with a real key and certificate (server-key.pem, server-cert.pem,
#: ca.pem), "{file}" a regular file that is not PEM.
NODE_BAD: dict[str, list[str]] = {
    "port": bad_numbers(0, 65535, whole=True),
    "listen": [
        "", "garbage", "tcp:70000", "tcp:-1", "tcp:abc", "tcp:0:bogus=1", "tcp:0:interface=999.1.1.1",
        "ssl:0:interface=127.0.0.1:privateKey={tmp}/missing.pem",
        "ssl:0:interface=127.0.0.1:privateKey={ca}/server-key.pem:certKey={tmp}/missing.pem",
        "ssl:0:interface=127.0.0.1:privateKey={file}",
        "ssl:0:interface=127.0.0.1:privateKey={ca}/server-key.pem:certKey={ca}/ca.pem",
        "systemd:domain=INET:index=0", "unix:{tmp}/node.sock", "tcp:0:interface=127.0.0.1" + UNDECODABLE,
    ],
    # (A peers file in a directory that is not there yet is the store's to
    # report when it writes: the directory may be made meanwhile.)
    "peers-file": ["", "{tmp}"],
    "data-dir": ["", "{file}"],
    "advertise": ["", "garbage", "http://127.0.0.1:9/ws", "ws://127.0.0.1:99999/ws", "ws://" + UNDECODABLE + "/ws"],
    "network": ["", "x" * 65, "lab\x01net", "lab\nnet", "lab" + UNDECODABLE],
    "cafile": ["", "{tmp}/missing.pem", "{file}"],
    "peer": ["", "garbage", "ws://127.0.0.1:99999/ws", "ws://" + UNDECODABLE + "/ws"],
    "static-peer": ["", "garbage", "ws://127.0.0.1:99999/ws", "ws://127.0.0.1:9/ws#f",
                    "ws://" + UNDECODABLE + "/ws"],
    "trusted-peer": ["", "abc", "zz" * 32, "ab" * 31, "ab" * 33, UNDECODABLE],
    "trusted": ["", "garbage", "300.0.0.0/8", "127.0.0.1/33"],
    "allowed-origin": ["", "garbage", "null", "http://", "http://127.0.0.1:99999", "http://a b",
                       "http://" + UNDECODABLE],
    "allowed-host": ["", "127.0.0.1:9000", "a b", "user@host", "[::1", UNDECODABLE],
    "max-register-addrs": bad_numbers(1, 10_000, whole=True),
    "max-message-size": bad_numbers(1024, 1 << 26, whole=True),
    "max-depth": bad_numbers(8, 1000, whole=True),
    "rate": bad_numbers(0.01, 1e9, whole=False),
    # A bucket that can never hold one token refuses every request.
    "burst": bad_numbers(1, 1e9, whole=False) + ["0.5"],
    "peer-rate": bad_numbers(0.01, 1e9, whole=False),
    "peer-burst": bad_numbers(1, 1e9, whole=False) + ["0.5"],
    "max-in-flight": bad_numbers(1, 100_000, whole=True),
    "max-http": bad_numbers(1, 1_000_000, whole=True),
    "max-http-per-ip": bad_numbers(1, 1_000_000, whole=True),
    "max-connections": bad_numbers(1, 1_000_000, whole=True),
    "max-per-ip": bad_numbers(1, 1_000_000, whole=True),
    "ping-interval": bad_numbers(1, 86_400, whole=True),
    "ping-timeout": bad_numbers(1, 86_400, whole=True),
    # Autobahn's timers round down to whole seconds: below one, an upgrade
    # may be dropped before it could finish; "inf" drops every one.
    "handshake-timeout": bad_numbers(1, 86_400, whole=False) + ["0.5"],
    "max-peers": bad_numbers(1, 1_000_000, whole=True),
    "max-outbound": bad_numbers(0, 10_000, whole=True),
    "max-inbound": bad_numbers(0, 10_000, whole=True),
    "max-dialing": bad_numbers(1, 1000, whole=True),
    "dial-rate": bad_numbers(0.01, 1000, whole=False),
    "exchange-interval": bad_numbers(0.1, 86_400, whole=False),
    "max-backoff": bad_numbers(1, 86_400, whole=False),
    "max-payload": bad_numbers(1, 1 << 26, whole=True),
    "max-ttl": bad_numbers(1, 86_400, whole=True),
    # from 0: bad_numbers would offer 0/2, which is in range
    "min-pow": ["nan", "NaN", "inf", "-inf", "1e999", "abc", "", "-1", "-0.5", "2e12"],
    "send-queue": bad_numbers(1024, 1 << 30, whole=True),
    "max-store-bytes": bad_numbers(1 << 20, 1 << 44, whole=True),
    "frames": ["", "fast", "0", "own,autobahn", "auto" + UNDECODABLE],
    # refused at parsing (not a name, no such file), or at start (does not import)
    "plugin": ["", "not a module", "1abc", "a..b", "{tmp}/missing.py", "{file}", "{tmp}",
               "foxnode_no_such_plugin", "foxnode.no_such_plugin", "{tmp}/broken.py"],
    "link-latency": ["", "-40ms", "40ms:-1ms", "abc", "nan", "inf", "61s", "40ms:"],
    "link-loss": ["", "-1%", "100%", "1.5", "abc", "nan", "inf"],
    "link-bandwidth": ["", "0", "-1mbit", "fast", "nan", "inf", "1e999"],
    "link-rule": ["", "9000", "9000=latency=-1ms", "9001-9000=latency=1ms", "x=latency=1ms",
                  "9000=jitter=1ms", "0-9=latency=1ms", "9000=loss=100%"],
}


def node_options_taking_values() -> set[str]:
    # getopt's long options: "name=" takes a value (optParameters and the
    # opt_* methods with an argument, such as --peer), "name" is a flag.
    return {o[:-1] for o in tap.Options().longOpt if o.endswith("=")}


def test_every_node_option_has_bad_values():
    assert node_options_taking_values() == set(NODE_BAD)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("bad-options")
    ca = make_test_ca(tmp / "ca")
    not_pem = tmp / "not-pem.txt"
    not_pem.write_text("not a key, not a certificate\n")
    (tmp / "broken.py").write_text("from foxnode.plugin import op\nraise RuntimeError('broken plugin')\n")
    return {"tmp": str(tmp), "ca": str(ca.ca_cert.parent), "file": str(not_pem)}


#: twistd's ordinary log lines (start-up banner, "Site starting on ...").
_ORDINARY = re.compile(r"^\S+ \[(-|[\w.]+#(info|debug))\] ")


def assert_refused(result: subprocess.CompletedProcess, names: str) -> str:
    """One line says what is wrong and names ``names``; anything else is
    twistd's ordinary start-up log; no traceback; a non-zero exit."""
    out = result.stdout + result.stderr
    shown = f"exit {result.returncode}, output:\n{out}"
    assert result.returncode != 0, shown
    assert "Traceback" not in out, shown
    lines = out.splitlines()
    faults = [line for line in lines if not _ORDINARY.match(line)]
    assert len(faults) == 1, shown
    assert names in faults[0], shown
    return faults[0]


def run_twistd(cwd: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TWISTD, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          errors="replace", timeout=DEADLINE)


def run_all(run, argvs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    # A few children at a time: each is mostly Python starting up.
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(run, argvs))


@pytest.mark.parametrize("option", sorted(NODE_BAD))
def test_bad_node_option_is_refused_in_one_line(option, files):
    tmp = files["tmp"]
    # Good values first: a bad value that slipped through would still start
    # a node only on loopback, in the test's directory.
    values = [v.format(**files) for v in NODE_BAD[option]]
    argvs = []
    for i, value in enumerate(values):
        # A directory each: the children run at once, and a node locks its
        # data directory and peers file.
        own = Path(tmp) / f"{option}-{i}"
        own.mkdir(exist_ok=True)
        base = ["--listen", f"tcp:0:interface={LOOPBACK}", "--peers-file", f"{own}/peers.json", "--data-dir", str(own)]
        argvs.append([*base, f"--{option}", value])
    results = run_all(lambda args: run_twistd(tmp, *args), argvs)
    for value, result in zip(values, results):
        line = assert_refused(result, f"--{option}")
        assert re.search(r"(^|#critical\] )(twistd foxnode|foxnode: cannot start): ", line), (value, line)


def test_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_twistd(str(tmp_path), "--listen", f"tcp:{port}:interface={LOOPBACK}",
                            "--peers-file", str(tmp_path / "peers.json"), "--data-dir", str(tmp_path))
    line = assert_refused(result, f"(--listen tcp:{port}:interface={LOOPBACK})")
    assert f"foxnode: cannot start: {LOOPBACK}:{port} is in use" in line


def test_a_port_in_use_fails_a_daemon_in_one_line(tmp_path):
    # Daemonized, the error reaches the terminal through twistd's parent,
    # and twistd removes its pid file.
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(BIN / "twistd"), "--pidfile", str(tmp_path / "twistd.pid"), "--logfile", str(tmp_path / "log"),
             "foxnode", "--listen", f"tcp:{port}:interface={LOOPBACK}",
             "--peers-file", str(tmp_path / "peers.json"), "--data-dir", str(tmp_path)],
            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert "is in use" in result.stderr
    assert not (tmp_path / "twistd.pid").exists()
    log = (tmp_path / "log").read_text()
    assert "Traceback" not in log
    faults = [line for line in log.splitlines() if not _ORDINARY.match(line)]
    assert len(faults) == 1, log
    assert faults[0].endswith(f" [foxnode.service#critical] foxnode: cannot start: {LOOPBACK}:{port} is in use "
                              f"(--listen tcp:{port}:interface={LOOPBACK})"), log


def test_options_parsed_outside_twistd_still_raise_usage_error():
    # Programs (and tests) that parse tap.Options themselves get the
    # UsageError, not an exit.
    from twisted.python.usage import UsageError

    with pytest.raises(UsageError, match="--burst 0.5"):
        tap.Options().parseOptions(["--burst", "0.5"])


# -- twistd foxnode-host ----------------------------------------------------------------

HOST = [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "foxnode-host"]

#: option -> its bad values (host.py); what follows "--" is twistd foxnode's
#: (NODE_BAD), and the options that make a node itself are the host's.
HOST_BAD: dict[str, list[str]] = {
    "nodes": bad_numbers(1, 1000, whole=True),
    "first": bad_numbers(0, 65534, whole=True),
    "base-port": bad_numbers(1, 65535, whole=True),
    "dir": [""],
    "bootstrap": ["", "ring", "tree" + UNDECODABLE],
}


def host_options_taking_values() -> set[str]:
    from foxnode import host

    return {o[:-1] for o in host.Options().longOpt if o.endswith("=")}


def test_every_host_option_has_bad_values():
    assert host_options_taking_values() == set(HOST_BAD)


def run_host(cwd: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*HOST, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          errors="replace", timeout=DEADLINE)


@pytest.mark.parametrize("option", sorted(HOST_BAD))
def test_bad_host_option_is_refused_in_one_line(option, tmp_path):
    # Good values first: one node on loopback, in the test's directory.
    good = ["--dir", str(tmp_path / "devnet"), "--nodes", "1", "--base-port", str(free_port())]
    argvs = [[*good, f"--{option}", value] for value in HOST_BAD[option]]
    results = run_all(lambda args: run_host(str(tmp_path), *args), argvs)
    for result in results:
        line = assert_refused(result, f"--{option}")
        assert line.startswith("twistd foxnode-host: "), line


@pytest.mark.parametrize("node_args, named", [
    (["--max-outbound", "-1"], "node option --max-outbound -1"),
    (["--port", "9000"], "--port: each node's own"),
    (["--listen", f"tcp:9000:interface={LOOPBACK}"], "--listen: each node's own"),
    (["--data-dir", "x"], "--data-dir: each node's own"),
])
def test_bad_node_options_of_a_host_are_one_line(node_args, named, tmp_path):
    result = run_host(str(tmp_path), "--dir", str(tmp_path / "devnet"), "--base-port", str(free_port()),
                      "--", *node_args)
    assert named in assert_refused(result, named)


# -- foxnode ---------------------------------------------------------------------------

URL = f"ws://{LOOPBACK}:9/ws"
#: the shipped scenario: a good FILE for foxnode experiment
EXAMPLE = str(Path(__file__).resolve().parent.parent / "examples" / "gossip-kill.toml")
SECONDS = ["nan", "inf", "-inf", "1e999", "abc", "", "0", "-1", "86401"]

#: (subcommand, argument) -> (argv with {} for the bad value, bad values);
#: the argument is named as argparse names it in its errors.
CLI_BAD: dict[tuple[str, str], tuple[list[str], list[str]]] = {
    ("call", "URL"): (["call", "{}", "info"],
                      ["", "garbage", "http://127.0.0.1:9/ws", "ws://127.0.0.1:99999/ws", "ws://" + UNDECODABLE + "/ws"]),
    ("call", "OP"): (["call", URL, "{}"], ["", "in\x01fo", "in" + UNDECODABLE, "x" * 65]),
    ("call", "ARGS-JSON"): (["call", URL, "info", "{}"],
                            ["{addr", "[1,NaN]", "Infinity", "1e999", '{"a": "\\ud800"}', '{"a": "' + UNDECODABLE + '"}']),
    ("call", "--id"): (["call", "--id", "{}", URL, "info"], ["a\x01", "a" + UNDECODABLE]),
    ("call", "--timeout"): (["call", "--timeout", "{}", URL, "info"], SECONDS + ["0.05"]),
    ("call", "--max-message-size"): (["call", "--max-message-size", "{}", URL, "info"],
                                     ["nan", "inf", "abc", "", "0", "-1", "1023", str((1 << 30) + 1), "1.5"]),
    ("watch", "--max-message-size"): (["watch", "--max-message-size", "{}", URL, "news"],
                                      ["nan", "inf", "abc", "", "0", "-1", "1023", str((1 << 30) + 1)]),
    ("call", "--cafile"): (["call", "--cafile", "{}", f"wss://{LOOPBACK}:9/ws", "info"],
                           ["", "/no/such/ca.pem"]),
    ("call", "--key"): (["call", "--key", "{}", URL, "publish"], ["", "k\x01", "k" + UNDECODABLE, "x" * 129]),
    ("call", "--sign"): (["call", "--sign", "{}", URL, "publish"], ["", "k\x01", "k" + UNDECODABLE, "x" * 129]),
    ("call", "--to"): (["call", "--to", "{}", URL, "publish"],
                       ["", "abc", "ab" * 63, "ab" * 65, "g" * 128, "ab" * 63 + UNDECODABLE]),
    ("watch", "--key"): (["watch", "--key", "{}", URL, "news"], ["", "k\x01", "k" + UNDECODABLE, "x" * 129]),
    ("call", "--since"): (["call", "--since", "{}", URL, "history"],
                          ["", "abc", "-1", "nan", "inf", "1e999", "10x", "-5m", "m", "1" + UNDECODABLE]),
    ("watch", "--since"): (["watch", "--since", "{}", URL, "news"], ["", "abc", "-1", "nan", "-5m", "h"]),
    # a subscription neither encrypts nor signs: any value is refused
    ("watch", "--to"): (["watch", "--to", "{}", URL, "news"], ["ab" * 64, ""]),
    ("watch", "--sign"): (["watch", "--sign", "{}", URL, "news"], ["k1", ""]),
    ("watch", "URL"): (["watch", "{}", "news"], ["", "garbage", "ws://127.0.0.1:99999/ws"]),
    ("watch", "TOPIC"): (["watch", URL, "{}"], ["", "ne\x01ws", "news" + UNDECODABLE, "x" * 257]),
    ("watch", "--timeout"): (["watch", "--timeout", "{}", URL, "news"], SECONDS + ["0.05"]),
    ("watch", "--cafile"): (["watch", "--cafile", "{}", f"wss://{LOOPBACK}:9/ws", "news"], ["", "/no/such/ca.pem"]),
    ("attach", "URL"): (["attach", "{}"], ["", "garbage", "http://127.0.0.1:9/ws", "ws://127.0.0.1:99999/ws"]),
    ("attach", "--timeout"): (["attach", "--timeout", "{}", URL], SECONDS + ["0.05"]),
    ("attach", "--max-message-size"): (["attach", "--max-message-size", "{}", URL],
                                       ["nan", "inf", "abc", "", "0", "-1", "1023", str((1 << 30) + 1)]),
    ("attach", "--cafile"): (["attach", "--cafile", "{}", f"wss://{LOOPBACK}:9/ws"], ["", "/no/such/ca.pem"]),
    ("attach", "--history"): (["attach", "--history", "{}", URL], ["/", "/no/such/dir/history", "a\x01"]),
    ("devnet", "--nodes/-n"): (["devnet", "--nodes", "{}"], ["0", "-1", "1001", "abc", "nan", "inf", "", "1.5"]),
    ("devnet", "--latency"): (["devnet", "--latency", "{}"], ["", "-40ms", "40ms:-1ms", "abc", "nan", "61s"]),
    ("devnet", "--loss"): (["devnet", "--loss", "{}"], ["", "-1%", "100%", "abc", "nan"]),
    ("devnet", "--bandwidth"): (["devnet", "--bandwidth", "{}"], ["", "0", "fast", "nan", "-1mbit"]),
    ("devnet", "--per-process"): (["devnet", "--per-process", "{}"], ["0", "-1", "1001", "abc", "nan", "", "1.5"]),
    ("devnet", "--base-port"): (["devnet", "--base-port", "{}"], ["0", "-1", "65536", "abc", "nan", ""]),
    ("devnet", "--page-port"): (["devnet", "--page-port", "{}"], ["-1", "65536", "abc", "nan", ""]),
    ("devnet", "--dir"): (["devnet", "--dir", "{}"], [""]),
    ("devnet", "--network"): (["devnet", "--network", "{}"], ["", "x" * 65, "lab\x01net", "lab" + UNDECODABLE]),
    ("devnet", "--start-timeout"): (["devnet", "--start-timeout", "{}"], SECONDS + ["0.5"]),
    ("devnet", "--connect-timeout"): (["devnet", "--connect-timeout", "{}"], SECONDS + ["0.5"]),
    ("devnet", "--stop-timeout"): (["devnet", "--stop-timeout", "{}"], SECONDS + ["0.5"]),
    ("devnet", "--plugin"): (["devnet", "--plugin", "{}"], ["", "a..b", "no-dash", "1st.module", "no/such.py", "notes/"]),
    ("experiment", "ACTION"): (["experiment", "{}", EXAMPLE], ["", "walk", "Run"]),
    ("experiment", "FILE"): (["experiment", "run", "{}"], ["", "/no/such/scenario.toml", "/", UNDECODABLE]),
    ("experiment", "--out"): (["experiment", "run", EXAMPLE, "--out", "{}"], [""]),
    ("experiment", "--dir"): (["experiment", "run", EXAMPLE, "--dir", "{}"], [""]),
}


def cli_arguments_taking_values() -> set[tuple[str, str]]:
    """Every argument of every subcommand that takes a value, named as
    argparse's error messages name it."""
    found = set()

    def walk(command: str, p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(name, sub)
            elif action.nargs != 0:
                found.add((command, "/".join(action.option_strings) or action.metavar or action.dest))

    walk("", cli.parser())
    return found


def test_every_cli_argument_has_bad_values():
    assert cli_arguments_taking_values() == set(CLI_BAD)


def run_foxnode(cwd: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*FOXNODE, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          errors="replace", timeout=DEADLINE)


@pytest.mark.parametrize("command, argument", sorted(CLI_BAD))
def test_bad_cli_argument_is_refused_in_one_line(command, argument, tmp_path):
    template, values = CLI_BAD[(command, argument)]
    argvs = [[v if a == "{}" else a for a in template] for v in values]
    if command == "devnet":
        # Should a bad value slip through: one node, on loopback, here. The
        # good values go first, so that the bad one is the one parsed last.
        good = ["--dir", str(tmp_path / "devnet"), "--nodes", "1", "--base-port", str(free_port())]
        argvs = [["devnet", *good, *argv[1:]] for argv in argvs]
    results = run_all(lambda args: run_foxnode(str(tmp_path), *args), argvs)
    for argv, result in zip(argvs, results):
        shown = f"{argv}: exit {result.returncode}\n{result.stdout}{result.stderr}"
        assert result.returncode == cli.EXIT_USAGE, shown
        assert result.stdout == "", shown
        assert "Traceback" not in result.stderr, shown
        lines = result.stderr.splitlines()
        assert len(lines) == 1, shown
        assert lines[0].startswith(f"foxnode {command}: argument {argument}: "), shown
