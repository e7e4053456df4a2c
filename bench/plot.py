"""Gossip propagation against network size, from a result of ``run.py``.

    python bench/plot.py [--result bench/results/latest.json] [--out bench/gossip-propagation.png]

Two panels over the network sizes of the gossip sweep (``run.py
--gossip-sizes``, which ``--report`` runs): the time from ``publish`` to the
delivery at the last node (p50 and p99 over the messages), and the copies of
a message each node received (goal: at most 1.5), with the delivery ratio
written at each point. A result without a sweep plots figure 6's one size.
Matplotlib with the Agg backend: no display needed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

#: Goal 6 of issue 7: copies received per node per message.
COPIES_GOAL = 1.5


def gossip_sizes(result: dict) -> list[dict]:
    """The sweep's runs (every size), or figure 6's single run; only the
    runs that measured something."""
    fig = (result.get("figures") or {}).get("6_gossip") or {}
    runs = fig.get("sizes") or ([fig] if fig.get("available") else [])
    return sorted((r for r in runs if r.get("available")), key=lambda r: r["nodes"])


def plot(result: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = gossip_sizes(result)
    if not runs:
        fig6 = (result.get("figures") or {}).get("6_gossip") or {}
        raise RuntimeError(f"no gossip run measured anything to plot: {fig6.get('reason', fig6)}")
    meta = result.get("meta") or {}
    settings = meta.get("settings") or {}
    nodes = [r["nodes"] for r in runs]
    p50 = [r.get("time_to_last_node_ms_p50") for r in runs]
    p99 = [r.get("time_to_last_node_ms_p99") for r in runs]
    copies = [r.get("copies_per_node_per_message") for r in runs]

    def pts(ys: list) -> tuple[list, list]:
        keep = [(x, y) for x, y in zip(nodes, ys) if y is not None]
        return [x for x, _ in keep], [y for _, y in keep]

    fig, (ax_t, ax_c) = plt.subplots(2, 1, sharex=True, figsize=(7.5, 6.5),
                                     gridspec_kw={"height_ratios": [3, 2]})
    for ys, label, style in ((p99, "p99", "s-"), (p50, "p50", "o-")):
        xs, vs = pts(ys)
        ax_t.plot(xs, vs, style, label=label)
        for x, v in zip(xs, vs):
            ax_t.annotate(f"{v:.0f}" if v >= 10 else f"{v:.1f}", (x, v), textcoords="offset points",
                          xytext=(0, 6), ha="center", fontsize=8)
    ax_t.set_ylabel("time to the last node (ms)")
    ax_t.set_ylim(0, max([v for v in p50 + p99 if v is not None] + [1.0]) * 1.2)
    ax_t.grid(True, alpha=0.3)
    ax_t.legend(loc="upper left")
    messages = sorted({r.get("messages") for r in runs if r.get("messages") is not None})
    title = "foxnode gossip: from publish to delivery at the last node"
    if meta.get("quick"):
        title += "  [QUICK RUN: not a benchmark]"
    sub = (f"{'/'.join(str(m) for m in messages)} messages per size, "
           f"{settings.get('gossip_topology', 'random-tree')} bootstrap, a twistd process per node, "
           f"{(meta.get('finished') or '')[:10]}")
    ax_t.set_title(f"{title}\n{sub}", fontsize=9.5)

    xs, cs = pts(copies)
    ax_c.plot(xs, cs, "o-", color="tab:green", label="copies received per node per message")
    ax_c.axhline(COPIES_GOAL, color="tab:red", linestyle="--", linewidth=1, label=f"goal: at most {COPIES_GOAL:g}")
    for r in runs:
        c = r.get("copies_per_node_per_message")
        frac = r.get("delivered_fraction")
        if c is None:
            continue
        label = f"{c:.2f}"
        if frac is not None:
            label += f"\n{frac * 100:.0f}% delivered" if frac < 1 else "\n100%"
        ax_c.annotate(label, (r["nodes"], c), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    top = max([COPIES_GOAL] + [c for c in cs]) * 1.35
    ax_c.set_ylim(0, top)
    ax_c.set_ylabel("copies / node / message")
    ax_c.set_xlabel("network size (nodes)")
    ax_c.set_xticks(nodes)
    ax_c.grid(True, alpha=0.3)
    ax_c.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="plot gossip propagation time against network size")
    p.add_argument("--result", default=os.path.join(HERE, "results", "latest.json"), help="run.py's JSON result")
    p.add_argument("--out", default=os.path.join(HERE, "gossip-propagation.png"), help="PNG to write")
    cfg = p.parse_args(argv)
    with open(cfg.result) as f:
        result = json.load(f)
    print(f"wrote {plot(result, cfg.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
