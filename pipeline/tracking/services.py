"""Running a service's process: wait until it answers, stop its whole process group, and
hold it in the foreground until Ctrl-C or SIGTERM. Shared by the tracking server, the team
server, the object store and the MLflow UI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

# `mlflow server` answers after 8-25 s on a quiet machine, minutes on a busy one
HEALTH_WAIT_S = 300


class ServerError(RuntimeError):
    """A start or stop that failed, with a message saying why and where the log is."""


def wait_healthy(
    proc: subprocess.Popen[bytes],
    uri: str,
    name: str,
    wait_s: float = HEALTH_WAIT_S,
    cafile: Path | None = None,
    path: str = "/health",
) -> None:
    """Return once ``uri`` + ``path`` answers below 400; :class:`ServerError` when ``proc``
    exits first or ``wait_s`` passes (polled every half second: bounded in count and time).
    ``cafile``: the certificate an https server must present."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{name} exited ({proc.returncode})")
        if healthy(uri, cafile=cafile, path=path):
            return
        time.sleep(0.5)
    raise ServerError(f"{name} not healthy after {wait_s:.0f} s")


def healthy(
    uri: str, timeout: float = 2.0, cafile: Path | None = None, path: str = "/health"
) -> bool:
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    try:
        with urllib.request.urlopen(f"{uri}{path}", timeout=timeout, context=context) as answer:
            return bool(answer.status < 400)
    except urllib.error.HTTPError as error:  # an S3 store answers 403 to anonymous calls
        return error.code < 500 and path != "/health"
    except (urllib.error.URLError, OSError):
        return False


def stop_group(pid: int, proc: subprocess.Popen[bytes] | None = None, wait_s: float = 20) -> None:
    """SIGTERM the process group; once its leader has gone, or after ``wait_s``, SIGKILL
    whatever is left of the group (MLflow's job consumers can outlive a leader that exited
    on SIGTERM). Our own child is polled: an exited child stays a zombie until reaped."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and _alive(pid, proc):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _alive(pid: int, proc: subprocess.Popen[bytes] | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class GroupProcess:
    """A service that is one child process leading a process group of its own (started
    with ``start_new_session=True`` into ``proc``): stopped whole, running while it is."""

    proc: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc.pid, self.proc)
            self.proc.wait(timeout=30)
            self.proc = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Service(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def running(self) -> bool: ...


def run_foreground(
    service: Service, name: str, banner: str, pid_file: Path | None = None, exited: str = ""
) -> None:
    """Start ``service``, print ``banner``, and wait until it exits (then print ``exited``
    on stderr), Ctrl-C or SIGTERM (what a ``stop`` command sends to the pid in ``pid_file``);
    it is stopped either way. A start that fails is one line on stderr and exit status 1."""
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM ends the wait below like Ctrl-C does
    if pid_file is not None:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(str(os.getpid()))
    try:
        service.start()
        print(banner, flush=True)
        while service.running():
            time.sleep(1)
        if exited:
            print(exited, file=sys.stderr)
    except KeyboardInterrupt:
        pass
    except ServerError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        service.stop()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
