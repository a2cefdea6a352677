"""The README's first command: the main job on the embedded default, end to end."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_the_main_job_on_the_embedded_default(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "scripts/demo.py", "--exit", "--port", str(port), "--data-dir",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout and "3.0" in done.stdout.split("MACs")[-1].split("fewer")[0]
    assert (tmp_path / "out" / "model.pt").exists() and (tmp_path / "out" / "report.html").exists()
