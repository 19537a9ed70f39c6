"""Every command-line tool answers --help (exit 0, a usage line) without doing any work."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py"))


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_help(tool):
    r = subprocess.run([sys.executable, str(REPO / "tools" / tool), "--help"], capture_output=True, text=True,
                       timeout=180, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage" in r.stdout.lower() and "--" in r.stdout
