"""A team MLflow tracking server: PostgreSQL for runs and the model registry, artifacts proxied
by the server (``--artifacts-destination``), everything on this machine only.

    python -m pipeline.tracking.server run   [--state .tracking] [--port 5000]   # Ctrl-C stops
    python -m pipeline.tracking.server stop  [--state .tracking]

State lives in one folder (default ``.tracking/`` beside the repo, git-ignored) and survives
restarts: ``pg/`` (the database cluster), ``artifacts/``, ``logs/``. PostgreSQL listens on a
unix socket inside ``pg/`` only (no TCP port), with ``trust`` auth for that socket: the socket
folder is private to its owner, so no password exists anywhere. The MLflow server binds to
127.0.0.1 unless ``--host`` says otherwise. As root, PostgreSQL runs as the ``postgres`` user
(it refuses to run as root); otherwise as the invoking user.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.tracking.services import ServerError, run_foreground, stop_group, wait_healthy

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
DATABASE = "mlflow"
DEFAULT_STATE = Path(__file__).resolve().parents[2] / ".tracking"
PG_WAIT_S = 60


class TrackingServer:
    """PostgreSQL + ``mlflow server`` over one state folder; start/stop each part apart, so
    tests can take the MLflow server away mid-run while the database stays up."""

    def __init__(
        self, state: Path, host: str = "127.0.0.1", port: int = 5000, workers: int = 2
    ) -> None:
        self.state = state.resolve()
        self.host, self.port, self.workers = host, port, workers
        self.pg_dir = self.state / "pg"
        self.logs = self.state / "logs"
        self.mlflow_proc: subprocess.Popen[bytes] | None = None
        self.cafile: Path | None = None  # the certificate /health is checked against (TLS)

    @property
    def uri(self) -> str:
        """What clients export as ``MLFLOW_TRACKING_URI``."""
        return f"http://{'127.0.0.1' if self.host == '0.0.0.0' else self.host}:{self.port}"

    @property
    def backend_uri(self) -> str:
        # psycopg2 takes a socket folder as host: no TCP, nothing to authenticate but the
        # folder's permissions.
        return f"postgresql+psycopg2://{self._pg_user()}@/{DATABASE}?host={self.pg_dir}"

    # -- PostgreSQL -------------------------------------------------------------------------

    def _pg_user(self) -> str:
        return "postgres" if os.geteuid() == 0 else _current_user()

    def _as_pg(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A PostgreSQL binary, run as the cluster's owner; bounded in time."""
        command = [str(arg) for arg in args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=PG_WAIT_S + 30, check=False
        )
        if check and result.returncode != 0:
            raise ServerError(f"{' '.join(command)} failed: {result.stderr.strip()}")
        return result

    def start_postgres(self) -> None:
        if not (PG_BIN / "initdb").is_file():
            raise ServerError(
                f"PostgreSQL 15 not found in {PG_BIN}; install it with scripts/install_postgres.sh"
            )
        self.logs.mkdir(parents=True, exist_ok=True)
        if not (self.pg_dir / "PG_VERSION").is_file():
            self._init_cluster()
        if self._as_pg(PG_BIN / "pg_ctl", "status", "-D", self.pg_dir, check=False).returncode:
            self._as_pg(
                PG_BIN / "pg_ctl", "start", "-w", "-t", str(PG_WAIT_S), "-D", self.pg_dir,
                "-l", self.pg_dir / "postgres.log",
                "-o", f"-c listen_addresses='' -c unix_socket_directories='{self.pg_dir}'",
            )  # fmt: skip
        databases = self._psql("SELECT datname FROM pg_database").split()
        if DATABASE not in databases:
            self._as_pg(PG_BIN / "createdb", "-h", self.pg_dir, DATABASE)

    def _init_cluster(self) -> None:
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.pg_dir, "postgres", "postgres")
            probe = self._as_pg("test", "-w", self.pg_dir, check=False)
            if probe.returncode:
                raise ServerError(
                    f"{self.pg_dir}: the postgres user cannot reach it (a parent folder is "
                    "private); choose a --state folder it can reach"
                )
        self._as_pg(
            PG_BIN / "initdb", "-D", self.pg_dir, "-U", self._pg_user(), "--auth-local=trust",
            "--auth-host=reject", "--encoding=UTF8", "--no-instructions",
        )  # fmt: skip
        self.pg_dir.chmod(0o700)

    def _psql(self, sql: str) -> str:
        return self._as_pg(PG_BIN / "psql", "-h", self.pg_dir, "-d", "postgres", "-Atc", sql).stdout

    def stop_postgres(self) -> None:
        if (self.pg_dir / "postmaster.pid").is_file():
            self._as_pg(
                PG_BIN / "pg_ctl", "stop", "-w", "-t", str(PG_WAIT_S), "-m", "fast",
                "-D", self.pg_dir, check=False,
            )  # fmt: skip

    # -- MLflow -----------------------------------------------------------------------------

    def mlflow_command(self) -> list[str]:
        """The ``mlflow server`` command line (a team server adds accounts, TLS, S3)."""
        artifacts = self.state / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).parent / "mlflow"
        return [
            str(mlflow), "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(artifacts),
            "--host", self.host, "--port", str(self.port), "--workers", str(self.workers),
        ]  # fmt: skip

    def mlflow_env(self) -> dict[str, str]:
        """The server's environment: ours, without MLflow 3's server-side job runner (a dozen
        huey consumers, for GenAI features: a core at start-up, nothing this pipeline logs)."""
        return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def start_mlflow(self) -> None:
        """Start ``mlflow server`` and wait (bounded) until ``/health`` answers."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / "mlflow.log"
        command = self.mlflow_command()
        with log_path.open("ab") as log:
            # its own process group: stopping it takes its uvicorn workers along
            self.mlflow_proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.mlflow_env(),
            )
        (self.state / "mlflow.pid").write_text(str(self.mlflow_proc.pid))
        try:
            wait_healthy(self.mlflow_proc, self.uri, "mlflow server", cafile=self.cafile)
        except ServerError as error:
            if self.mlflow_proc.poll() is None:
                self.stop_mlflow()
            raise ServerError(f"{error}; see {log_path}") from None

    def stop_mlflow(self) -> None:
        pid_file = self.state / "mlflow.pid"
        if self.mlflow_proc is not None:
            stop_group(self.mlflow_proc.pid, self.mlflow_proc)
            self.mlflow_proc.wait(timeout=30)
            self.mlflow_proc = None
        elif pid_file.is_file():
            stop_group(int(pid_file.read_text()))
        pid_file.unlink(missing_ok=True)

    def start(self) -> None:
        self.start_postgres()
        try:
            self.start_mlflow()
        except BaseException:
            self.stop_postgres()
            raise

    def stop(self) -> None:
        self.stop_mlflow()
        self.stop_postgres()

    def running(self) -> bool:
        return self.mlflow_proc is not None and self.mlflow_proc.poll() is None

    def foreground(self, banner: str) -> None:
        """Run until Ctrl-C, SIGTERM (``stop``, through ``run.pid``) or MLflow's exit."""
        run_foreground(
            self,
            "tracking server",
            banner,
            pid_file=self.state / "run.pid",
            exited=f"mlflow server exited; see {self.logs / 'mlflow.log'}",
        )


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("action", choices=["run", "stop"])
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--host", default=os.environ.get("TRACKING_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("TRACKING_PORT", "5000")))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    server = TrackingServer(args.state, args.host, args.port, args.workers)
    if args.action == "stop":
        run_pid = args.state / "run.pid"
        if run_pid.is_file():  # a foreground `run`: let it stop both parts itself
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(run_pid.read_text()), signal.SIGTERM)
            deadline = time.monotonic() + 60
            while run_pid.is_file() and time.monotonic() < deadline:
                time.sleep(0.2)
        server.stop()
        print(f"tracking server in {server.state} stopped")
        return

    server.foreground(
        f"MLflow tracking server up: PostgreSQL in {server.pg_dir}, artifacts in "
        f"{server.state / 'artifacts'}, logs in {server.logs}. Point clients at it:\n\n"
        f"    export MLFLOW_TRACKING_URI={server.uri}\n\n"
        "Ctrl-C or `make tracking-server-stop` stops it; the data stays for the next start.",
    )
    print("tracking server stopped; its data stays in", server.state)


if __name__ == "__main__":
    main()
