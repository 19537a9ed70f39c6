import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def test_plot_metrics_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    run = tmp_path / "run_a"
    run.mkdir()
    lines = [json.dumps({"step": 0, "eval_loss": 7.6})]
    lines += [json.dumps({"step": s, "loss": float(7 - s / 50 + rng.normal(0, 0.05)),
                          "tokens_per_second": float(3000 + rng.normal(0, 50))}) for s in range(10, 201, 10)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\nnot json\n")
    out = tmp_path / "curves.png"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "plot_metrics.py"), str(run), f"--out={out}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "skipped 1 unreadable line" in r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    r = subprocess.run([sys.executable, str(REPO / "tools" / "plot_metrics.py"), str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "does not exist" in r.stderr
