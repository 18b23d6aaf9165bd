"""Secrets and client settings of a team server, read from the environment only.

A secret comes from ``$NAME`` or from the file ``$NAME_FILE`` names (so it need not sit in a
shell's history or a process's environment listing); nothing here prints or logs one. The
names are the ones MLflow, botocore and DVC read themselves, so one export serves every tool.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pipeline.core.errors import UserError

ADMIN_PASSWORD = "MLFLOW_AUTH_ADMIN_PASSWORD"  # what MLflow's auth app creates its admin with
SECRET_KEY = "MLFLOW_FLASK_SERVER_SECRET_KEY"  # the auth app's CSRF key, equal in every worker
ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"  # the object store's keys (rclone, MLflow's server, DVC)
SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
USERNAME = "MLFLOW_TRACKING_USERNAME"  # a client's account
PASSWORD = "MLFLOW_TRACKING_PASSWORD"
CERT_PATH = "MLFLOW_TRACKING_SERVER_CERT_PATH"  # the certificate a client trusts
# The admin password older MLflow versions shipped in basic_auth.ini: publicly known.
STOCK_ADMIN_PASSWORD = "password1234"
MIN_PASSWORD = 12  # MLflow's own rule for account passwords
# botocore >= 1.36 adds CRC checksums to every upload and checks them on downloads; S3
# stores other than AWS (rclone's among them, in some versions) reject or lack them.
S3_CHECKSUMS = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


def read_secret(name: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """``$name``, else the contents of ``$name_FILE`` (one trailing newline dropped), else
    None. A named file that cannot be read is one line naming the variable."""
    if environ.get(name):
        return environ[name]
    file = environ.get(f"{name}_FILE")
    if not file:
        return None
    try:
        return Path(file).read_text().removesuffix("\n") or None
    except OSError as error:
        raise UserError(
            f"{name}_FILE: cannot read {file!r} ({error.strerror}); name a readable file"
        ) from None


def require_secret(name: str, what: str, environ: Mapping[str, str] = os.environ) -> str:
    """:func:`read_secret`, or one line saying which variables to set and why."""
    value = read_secret(name, environ)
    if value is None:
        raise UserError(f"{name}: not set (nor {name}_FILE); set one of them to {what}")
    return value


def check_password(name: str, password: str) -> None:
    """One line when ``password`` is MLflow's stock one or shorter than MLflow allows."""
    if password == STOCK_ADMIN_PASSWORD:
        raise UserError(
            f"{name}: MLflow's stock admin password is publicly known; choose another "
            f"(at least {MIN_PASSWORD} characters)"
        )
    if len(password) < MIN_PASSWORD:
        raise UserError(
            f"{name}: {len(password)} characters; MLflow accounts need at least {MIN_PASSWORD}"
        )


def tracking_verify(environ: Mapping[str, str] = os.environ) -> str | bool:
    """What a client's HTTPS requests verify against: the certificate file
    ``$MLFLOW_TRACKING_SERVER_CERT_PATH`` names (as MLflow's own client does), else the
    system's authorities."""
    return environ.get(CERT_PATH) or True


def tracking_auth(environ: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """The client's account (``$MLFLOW_TRACKING_USERNAME``/``PASSWORD``), when set."""
    user, password = environ.get(USERNAME), read_secret(PASSWORD, environ)
    return (user, password) if user and password is not None else None
