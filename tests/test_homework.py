"""README's "The homework: add an op" works as written: its plugin and
its test, copied out of the README into a directory of their own, pass
when run as a student runs them (pytest in that directory, a real twistd
node), and the plugin's op answers between processes as the README says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.rst"


def homework_blocks() -> list[str]:
    text = README.read_text()
    start = text.index("The homework: add an op\n-----------------------\n")
    end = text.index("\n---", start + 60)
    section = text[start:end]
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", section)
    return ["\n".join(line[4:] for line in block.splitlines()).strip() + "\n" for block in blocks]


def test_the_homework_section_has_a_plugin_and_its_test():
    plugin, test = homework_blocks()
    assert "@op(" in plugin and len(plugin.strip().splitlines()) <= 16
    assert "serving_node" in test and "greet.py" in test


def test_the_readmes_homework_test_passes_as_a_student_runs_it(tmp_path):
    plugin, test = homework_blocks()
    (tmp_path / "greet.py").write_text(plugin)
    (tmp_path / "test_greet.py").write_text(test)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_greet.py"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
