"""`make ui` (python -m pipeline.experiments.ui) for real: `mlflow ui` on a free loopback
port, whose links are printed only once it answers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import REPO, free_port, wait_for

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
        # mlflow ui's own group (its server and job consumers), found by the store it opened
        group = _group_of(str(tmp_path / "mlflow.db"))
        assert group is not None and _members(group)
    finally:
        ui.terminate()  # SIGTERM, as `kill` or a supervisor sends: nothing of it may stay
        ui.wait(timeout=60)
    wait_for(lambda: not _members(group), 30, f"mlflow ui's processes (group {group}) to end")


def _processes() -> dict[int, str]:
    """pid -> command line, of every process that is still there while it is read."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
    return found


def _group_of(marker: str) -> int | None:
    for pid, command in _processes().items():
        if marker in command and "mlflow" in command:
            with contextlib.suppress(ProcessLookupError):
                return os.getpgid(pid)
    return None


def _members(group: int) -> list[int]:
    members = []
    for pid in _processes():
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == group:
                members.append(pid)
    return members
