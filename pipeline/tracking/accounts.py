"""Accounts on the team tracking server, made by its admin in one line:

    MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD_FILE=admin.txt \\
        python -m pipeline.tracking.accounts add alice --password-file alice.txt

``$MLFLOW_TRACKING_URI`` names the server (and ``$MLFLOW_TRACKING_SERVER_CERT_PATH`` its
certificate), as for every client. The new account reads everything and manages only what it
creates (the server's ``default_permission = READ``; MLflow gives a creator MANAGE on its
experiments and registered models). No password is printed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import requests

from pipeline.core import stage
from pipeline.core.errors import UserError
from pipeline.tracking import credentials

CREATE_USER = "/api/2.0/mlflow/users/create"


def add_account(uri: str, admin: tuple[str, str], name: str, password: str) -> None:
    """Create account ``name`` through the auth app's REST API, as ``admin``; one line on any
    refusal (the password is checked first, as MLflow would)."""
    credentials.check_password("--password-file", password)
    try:
        answer = requests.post(
            f"{uri.rstrip('/')}{CREATE_USER}",
            json={"username": name, "password": password},
            auth=admin,
            verify=credentials.tracking_verify(),
            timeout=30,
        )
    except requests.exceptions.SSLError:
        raise UserError(
            f"{credentials.CERT_PATH}: the certificate of {uri} is not trusted; set it to the "
            "server's certificate file"
        ) from None
    except requests.RequestException as error:
        reason = type(error).__name__
        raise UserError(f"MLFLOW_TRACKING_URI: {uri} unreachable ({reason})") from None
    if answer.status_code in (401, 403):
        raise UserError(
            f"{credentials.USERNAME}: {uri} answered {answer.status_code} to user "
            f"{admin[0]!r}; accounts are made by the server's admin"
        )
    if answer.status_code != 200:
        said = f"{answer.status_code}: {answer.text[:120]!r}"
        raise UserError(f"account {name!r}: {uri} answered {said}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="create a teammate's account")
    add.add_argument("name")
    add.add_argument("--password-file", type=Path, required=True, help="the new password")
    args = parser.parse_args()
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith("https://"):
        raise UserError(
            f"MLFLOW_TRACKING_URI: got {uri!r}; set it to the team server's https:// address"
        )
    admin = credentials.tracking_auth()
    if admin is None:
        raise UserError(
            f"{credentials.USERNAME}/{credentials.PASSWORD}: not set; set them to the admin "
            "account (the password may come from MLFLOW_TRACKING_PASSWORD_FILE)"
        )
    try:
        password = args.password_file.read_text().removesuffix("\n")
    except OSError as error:
        reason = f"cannot read {args.password_file} ({error.strerror})"
        raise UserError(f"--password-file: {reason}") from None
    add_account(uri, admin, args.name, password)
    print(f"account {args.name!r} created on {uri}: reads every run, edits its own")


if __name__ == "__main__":
    stage.run(main)
