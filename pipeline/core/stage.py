"""What every ``stages/*.py`` shares: the project's Python, a quiet TensorFlow start-up,
logging set-up, and expected failures printed as one clear message with a non-zero exit
instead of a traceback.

:func:`prepare_process` runs from ``stages/__init__.py``, before any stage module is
imported (some import TensorFlow at the top), and only in a process started as
``python -m stages.<name>``. It uses only the standard library: it may be running under
a Python that lacks the project's packages, which is what it is there to fix.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
# What every stage imports; missing = the wrong Python (a plain shell), not a broken install.
BASE_PACKAGES = ("numpy", "pydantic", "yaml", "tqdm")
SETUP_HINT = "run `make setup`, then `source .venv/bin/activate` (or `make shell`)"

# TensorFlow's C++ start-up lines that say nothing on a working machine: written before its
# logging is set up, so TF_CPP_MIN_LOG_LEVEL cannot hide them.
STARTUP_NOISE = (
    r"All log messages before absl::InitializeLog\(\) is called",
    r"oneDNN custom operations are on",
    r"cpu_feature_guard\.cc",
    r"To enable the following instructions: AVX",
)
# ... and on a machine without an NVIDIA device only: there, no CUDA is the expected state.
# Where /dev/nvidia* exists, a failed cuInit is a real error and stays.
NO_GPU_NOISE = (r"failed call to cuInit", r"Could not find cuda drivers on your machine")

# The filter process: copies its stdin to its stdout line by line, dropping lines that match
# argv[1]. It ignores Ctrl-C and SIGTERM (the stage handles those and still logs), and ends
# when the stage's end closes the pipe.
_FILTER = """
import os, re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
drop, pending = re.compile(sys.argv[1].encode()), b""
def read():
    try:
        return os.read(0, 65536)
    except OSError:  # a pty whose other end closed
        return b""
while chunk := read():
    *lines, pending = (pending + chunk).split(b"\\n")
    kept = b"".join(line + b"\\n" for line in lines if not drop.search(line))
    last_cr = pending.rfind(b"\\r")  # progress bars redraw with \\r: pass them on at once
    if last_cr >= 0:
        kept, pending = kept + pending[: last_cr + 1], pending[last_cr + 1 :]
    os.write(1, kept)
if not drop.search(pending):
    os.write(1, pending)
"""


def started_as_stage() -> bool:
    """True in a process started as ``python -m stages.<name>`` (what dvc.yaml runs)."""
    argv = getattr(sys, "orig_argv", [])
    return len(argv) >= 3 and argv[1] == "-m" and argv[2].startswith("stages.")


def prepare_process() -> None:
    """Run the stage under the project's environment, with TensorFlow's start-up quiet."""
    if not started_as_stage():
        return
    use_project_python()
    quiet_tensorflow_startup()


def use_project_python() -> None:
    """A stage started by a Python without the project's packages (``dvc repro`` from a
    plain shell: dvc.yaml says ``python``) restarts under ``<repo>/.venv``; with no .venv
    there, it stops with one line that says what to run."""
    missing = [name for name in BASE_PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        return
    root = Path(os.environ.get("DVC_ROOT") or ROOT)
    venv_python = root / ".venv" / "bin" / "python"
    venv = venv_python.parent.parent.resolve()
    if venv_python.is_file() and Path(sys.prefix).resolve() != venv:  # not already tried
        os.execv(venv_python, [str(venv_python), *sys.orig_argv[1:]])
    state = "lacks them too" if venv_python.is_file() else "does not exist"
    sys.exit(
        f"error: {sys.executable} lacks {', '.join(missing)}: not the project's environment, "
        f"and {venv_python} {state}; {SETUP_HINT}"
    )


def quiet_tensorflow_startup() -> None:
    """Hide TensorFlow's INFO logs and its known start-up noise, keep its warnings and
    errors: this process's stderr (fd 2, where TensorFlow's C++ code writes) goes through a
    small filter process. A terminal stays a terminal (a pty), so progress bars still draw."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow reads it when it loads
    noise = STARTUP_NOISE + (() if list(Path("/dev").glob("nvidia[0-9]*")) else NO_GPU_NOISE)
    sys.stderr.flush()
    if os.isatty(2):
        import fcntl
        import pty
        import termios

        reader, writer = pty.openpty()
        size = fcntl.ioctl(2, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(writer, termios.TIOCSWINSZ, size)  # tqdm sizes its bar from it
        modes = termios.tcgetattr(writer)
        modes[1] &= ~termios.OPOST  # bytes pass unchanged; the real terminal does \n -> \r\n
        termios.tcsetattr(writer, termios.TCSANOW, modes)
    else:
        reader, writer = os.pipe()
    command = [sys.executable, "-S", "-c", _FILTER, "|".join(noise)]
    fltr = subprocess.Popen(command, stdin=reader, stdout=2)  # to the real stderr
    os.close(reader)
    real_stderr = os.dup(2)
    os.dup2(writer, 2)
    os.close(writer)

    @atexit.register
    def _drain() -> None:  # the filter's last lines come out before this process ends
        sys.stderr.flush()
        os.dup2(real_stderr, 2)  # closes our end: the filter reads to the end and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            fltr.wait(timeout=10)


def run(main: Callable[[], object]) -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # TensorFlow's Python side logs through absl, at INFO even for routine work ("Sharding
    # callback duration: 49 microseconds" on every checkpoint): its warnings are enough.
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        main()
    except UserError as exc:
        logging.getLogger("stage").error("%s", exc)
        raise SystemExit(1) from None
