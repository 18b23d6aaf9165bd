"""The team tracking server: the PostgreSQL-backed MLflow server of :mod:`server` with
accounts (MLflow's ``basic-auth`` app, its tables in their own database of the same cluster),
HTTPS on the address the operator chooses, and artifacts in the S3 object store.

    python -m pipeline.tracking.team run [--state .tracking] [--host H] [--port 5443]

Secrets come from the environment (see :mod:`credentials`): the admin password
(``MLFLOW_AUTH_ADMIN_PASSWORD[_FILE]``), the Flask secret
(``MLFLOW_FLASK_SERVER_SECRET_KEY[_FILE]``) and the object store's keys; it refuses to start,
in one line, with MLflow's stock admin password or without a secret. New accounts get READ on
everything and MANAGE on what they create (MLflow's per-experiment permissions).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.core import stage
from pipeline.core.errors import UserError
from pipeline.tracking import credentials, tls
from pipeline.tracking.object_store import keys_from_env
from pipeline.tracking.server import (
    DATABASE,
    DEFAULT_STATE,
    PG_BIN,
    TrackingServer,
)

AUTH_DATABASE = "mlflow_auth"
ARTIFACTS = "s3://mlflow/artifacts"


class TeamServer(TrackingServer):
    """:class:`TrackingServer` with accounts, TLS and S3 artifacts. ``secrets`` holds the
    admin password and the Flask key (passed to ``mlflow server`` in its environment only);
    ``s3`` the object store's endpoint and keys; ``cert`` the certificate and key."""

    def __init__(
        self,
        state: Path,
        host: str,
        port: int,
        secrets: dict[str, str],
        s3: tuple[str, tuple[str, str]],
        cert: tuple[Path, Path],
        workers: int = 2,
    ) -> None:
        super().__init__(state, host, port, workers)
        self.secrets, self.s3, self.cert = secrets, s3, cert
        self.cafile = cert[0]

    @property
    def uri(self) -> str:
        return f"https://{self.host}:{self.port}"

    def start_postgres(self) -> None:
        super().start_postgres()
        if AUTH_DATABASE not in self._psql("SELECT datname FROM pg_database").split():
            self._as_pg(PG_BIN / "createdb", "-h", self.pg_dir, AUTH_DATABASE)

    def auth_config(self) -> Path:
        """basic_auth.ini, no secret in it: the password reaches MLflow in its environment."""
        path = self.state / "basic_auth.ini"
        auth_uri = self.backend_uri.replace(f"@/{DATABASE}?", f"@/{AUTH_DATABASE}?")
        path.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {auth_uri}\n"
            "admin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # A password check is a PBKDF2 hash, per request: remembered for a minute it costs
            # the server a fraction of the CPU. A changed or deleted password may then work
            # for up to a minute more on the workers that did not handle the change.
            "auth_cache_ttl_seconds = 60\n"
        )
        return path

    def mlflow_command(self) -> list[str]:
        command = super().mlflow_command()
        command[command.index("--artifacts-destination") + 1] = ARTIFACTS
        cert, key = self.cert
        return [
            *command,
            "--app-name", "basic-auth",
            # clients may name the server by the operator's address, with or without the port
            "--allowed-hosts", f"{self.host},{self.host}:{self.port},localhost,127.0.0.1",
            # a client's kept-alive connection must not hold a stop for long
            "--uvicorn-opts",
            f"--ssl-certfile {cert} --ssl-keyfile {key} --timeout-graceful-shutdown 5",
        ]  # fmt: skip

    def mlflow_env(self) -> dict[str, str]:
        endpoint, (key_id, secret) = self.s3
        env = {
            **super().mlflow_env(),
            **self.secrets,
            **credentials.S3_CHECKSUMS,
            "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config()),
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            credentials.ACCESS_KEY_ID: key_id,
            credentials.SECRET_ACCESS_KEY: secret,
        }
        for name in (credentials.ADMIN_PASSWORD, credentials.SECRET_KEY):
            env.pop(f"{name}_FILE", None)
        if endpoint.startswith("https:"):
            env["AWS_CA_BUNDLE"] = str(self.cert[0])
        return env


def secrets_from_env() -> dict[str, str]:
    """The admin password and Flask key, checked: one line when one is missing or weak."""
    password = credentials.require_secret(
        credentials.ADMIN_PASSWORD, "the password of the server's `admin` account"
    )
    credentials.check_password(credentials.ADMIN_PASSWORD, password)
    key = credentials.require_secret(
        credentials.SECRET_KEY, "a long random string (e.g. `openssl rand -hex 32`)"
    )
    return {credentials.ADMIN_PASSWORD: password, credentials.SECRET_KEY: key}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("action", choices=["run"])
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--host", default=os.environ.get("TRACKING_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("TEAM_PORT", 5443)))
    parser.add_argument(
        "--s3", default=os.environ.get("MLFLOW_S3_ENDPOINT_URL"), help="the object store"
    )
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.host in ("0.0.0.0", "::", ""):
        raise UserError(
            f"TRACKING_HOST: got {args.host!r}; name the address teammates reach (it goes into "
            "the certificate and the Host names the server allows)"
        )
    secrets = secrets_from_env()  # everything checked before anything starts
    keys = keys_from_env()
    cert = tls.server_certificate(args.host, args.state / "tls")
    s3 = args.s3 or f"https://{args.host}:{os.environ.get('OBJECT_STORE_PORT', 9000)}"
    server = TeamServer(args.state, args.host, args.port, secrets, (s3, keys), cert, args.workers)
    server.foreground(
        f"Team MLflow server up (accounts, TLS, artifacts in {s3}). Give teammates the "
        f"certificate {cert[0]}, an account (python -m pipeline.tracking.accounts add NAME) "
        f"and:\n\n    export MLFLOW_TRACKING_URI={server.uri}\n"
        f"    export MLFLOW_TRACKING_SERVER_CERT_PATH=/path/to/{cert[0].name}\n\n"
        "Ctrl-C or `make tracking-server-stop` stops it; the data stays for the next start.",
    )


if __name__ == "__main__":
    stage.run(main)
