"""`make ui` (python -m pipeline.experiments.ui) for real: `mlflow ui` on a free loopback
port, whose links are printed only once it answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import REPO, free_port

pytestmark = pytest.mark.slow


def test_links_are_printed_once_the_ui_answers(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = [sys.executable, "-m", "pipeline.experiments.ui", "--port", str(port)]
    ui = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert ui.stdout is not None
        began, seen = time.monotonic(), []
        while len(seen) < 200 and (line := ui.stdout.readline()):  # mlflow ui writes here too
            seen.append(line)
            if f"http://127.0.0.1:{port}/" in line:
                break
        waited = time.monotonic() - began
        assert line.startswith(f"http://127.0.0.1:{port}/"), seen
        assert "no runs in experiment" in line  # an empty store: says what to run
        # The moment the link is printed, it answers (it took seconds to get there).
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as reply:
            assert reply.status == 200
        assert waited > 0.5
    finally:
        ui.terminate()
        ui.wait(timeout=60)
