"""The systemd units in contrib/systemd: systemd accepts them, their
command lines are valid ``twistd foxnode`` command lines, and the
socket-activated one really serves on the socket systemd hands over.

``systemd-analyze`` and ``systemd-socket-activate`` come with Debian's
``systemd`` package; without them those tests skip and say why.
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from foxnode import tap
from foxnode.testing import LOOPBACK, free_port

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
SERVICES = ["foxnode.service", "foxnode-socket.service"]
ALL_UNITS = [*SERVICES, "foxnode.socket"]
VENV_TWISTD = "/opt/foxnode/bin/twistd"


def unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]}, repeated keys kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(name: str, section: str, key: str) -> list[str]:
    return [v for k, v in unit(name).get(section, []) if k == key]


def exec_start(name: str, state: Path) -> list[str]:
    """The unit's ExecStart as argv, as systemd would run it with an empty
    FOXNODE_OPTS and the state directory at ``state``."""
    (line,) = values(name, "Service", "ExecStart")
    line = line.replace("%S/foxnode", str(state)).replace("$FOXNODE_OPTS", "")
    return shlex.split(line)


# -- the units themselves -------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_service_runs_twistd_foxnode_from_the_venv_with_its_state_directory(name):
    argv = exec_start(name, Path("/var/lib/foxnode"))
    assert argv[:4] == [VENV_TWISTD, "--nodaemon", "--pidfile=", "foxnode"]
    options = tap.Options()
    options.parseOptions(argv[4:])  # every option is one twistd foxnode knows
    assert options["data-dir"] == "/var/lib/foxnode"
    assert options["peers-file"] == "/var/lib/foxnode/peers.json"
    service = dict(unit(name)["Service"])
    assert service["StateDirectory"] == "foxnode"
    assert service["DynamicUser"] == "yes"
    assert service["Restart"] == "on-failure"
    assert service["CapabilityBoundingSet"] == ""
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert "@system-service" in values(name, "Service", "SystemCallFilter")
    assert "AF_INET" in service["RestrictAddressFamilies"].split()


def test_plain_service_listens_itself_and_socket_service_adopts_the_socket():
    plain = tap.Options()
    plain.parseOptions(exec_start("foxnode.service", Path("/state"))[4:])
    assert plain["listen"] == "tcp:9000"
    socketed = tap.Options()
    socketed.parseOptions(exec_start("foxnode-socket.service", Path("/state"))[4:])
    assert socketed["listen"] == "systemd:domain=INET:index=0"
    # domain=INET needs an IPv4 socket: a bare port would be dual-stack IPv6.
    assert values("foxnode.socket", "Socket", "ListenStream") == ["0.0.0.0:9000"]
    assert values("foxnode.socket", "Socket", "Service") == ["foxnode-socket.service"]
    assert "foxnode.socket" in values("foxnode-socket.service", "Unit", "Requires")
    assert "foxnode.service" in values("foxnode-socket.service", "Unit", "Conflicts")
    assert "foxnode.service" in values("foxnode.socket", "Unit", "Conflicts")


def test_both_services_are_the_same_apart_from_how_they_listen():
    def service(name):
        return [(k, v) for k, v in unit(name)["Service"] if k != "ExecStart"]

    assert service("foxnode.service") == service("foxnode-socket.service")
    plain, socketed = (exec_start(n, Path("/s")) for n in SERVICES)
    assert [a for a in plain if a not in ("--port", "9000")] == \
        [a for a in socketed if a not in ("--listen", "systemd:domain=INET:index=0")]


def test_units_parse_as_ini():
    for name in ALL_UNITS:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str
        parser.read_string((UNITS / name).read_text())
        assert parser.sections()[0] == "Unit"


# -- systemd's own checks ------------------------------------------------------------------


def _systemd_root(tmp_path: Path) -> Path:
    """A root for ``systemd-analyze --root``: the system's own units, ours
    in /etc/systemd/system, and a stub /opt/foxnode/bin/twistd (verify
    checks that ExecStart's program is executable)."""
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    for system in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if system.is_dir():
            shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
            break
    else:
        pytest.skip("no system unit directory to verify against")
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for name in ALL_UNITS:
        shutil.copy(UNITS / name, etc / name)
    stub = root / VENV_TWISTD.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return root


@pytest.mark.parametrize("name", ALL_UNITS)
def test_systemd_analyze_verify(name, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    root = _systemd_root(tmp_path)
    result = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", f"/etc/systemd/system/{name}"],
        capture_output=True, text=True, timeout=60,
    )
    if "--root" in result.stderr and ("unrecognized" in result.stderr or "not supported" in result.stderr):
        pytest.skip(f"this systemd-analyze cannot verify under --root: {result.stderr.strip()}")
    # Unknown keys and bad values are only warnings (exit 0): none allowed.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


# -- socket activation for real --------------------------------------------------------------


def test_socket_service_serves_on_the_socket_systemd_hands_over(tmp_path):
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (Debian: apt-get install systemd)")
    twistd = Path(sys.executable).with_name("twistd")
    if not twistd.exists():
        pytest.skip("no twistd beside this Python")
    state = tmp_path / "state"
    state.mkdir()
    argv = exec_start("foxnode-socket.service", state)
    argv[0] = str(twistd)
    (fdname,) = values("foxnode.socket", "Socket", "FileDescriptorName")
    port = free_port()
    log = open(tmp_path / "node.log", "wb")
    # As foxnode.socket, but on loopback: systemd-socket-activate listens,
    # then execs the unit's command line with LISTEN_FDS/LISTEN_FDNAMES.
    process = subprocess.Popen(
        [activate, f"--fdname={fdname}", "-l", f"{LOOPBACK}:{port}", *argv],
        stdout=log, stderr=subprocess.STDOUT, cwd=state,
    )
    try:
        health = None
        deadline = time.monotonic() + 20
        while health is None and time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "node.log").read_text()
            try:
                with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/healthz", timeout=10) as r:
                    health = r.read()
            except OSError:
                time.sleep(0.1)
        assert health is not None and b'"status":"ok"' in health, (tmp_path / "node.log").read_text()
        assert (state / "node.key").is_file()
        log_text = (tmp_path / "node.log").read_text()
        assert f'"{LOOPBACK}"' in log_text, "the node does not see the client's IPv4 address"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    assert "Server Shut Down." in (tmp_path / "node.log").read_text()
