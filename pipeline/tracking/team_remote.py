"""Switch one clone's DVC remote to the team's S3 object store, in one command:

    python -m pipeline.tracking.team_remote https://HOST:9000 --cert team-cert.pem

It writes ``.dvc/config.local`` only (git-ignored): a remote ``team`` (``s3://dvc/mnist-gan``
at that endpoint, checked against the team's certificate, botocore's checksums as
``.dvc/s3.config`` says) made this clone's default. The
committed default, the folder remote ``shared``, stays the offline default for everyone else;
``dvc remote default --local --unset`` goes back to it. The access keys come from
``$AWS_ACCESS_KEY_ID``/``$AWS_SECRET_ACCESS_KEY`` when DVC runs, never from a file in git.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.core import stage
from pipeline.core.errors import UserError

REMOTE = "team"
URL = "s3://dvc/mnist-gan"
AWS_CONFIG = Path(".dvc/s3.config")


def switch(repo: Path, endpoint: str, cert: Path | None) -> None:
    """Add (or replace) remote ``team`` in ``repo``'s .dvc/config.local as its default."""
    if urlsplit(endpoint).scheme not in ("http", "https") or not urlsplit(endpoint).hostname:
        raise UserError(f"ENDPOINT: got {endpoint!r}; use https://HOST:PORT of the object store")
    if cert is not None and not cert.is_file():
        raise UserError(f"--cert: {cert} is not a file; use the team's certificate (cert.pem)")
    dvc = [str(Path(sys.executable).parent / "dvc"), "remote"]
    commands = [
        ["add", "--local", "--force", "--default", REMOTE, URL],
        ["modify", "--local", REMOTE, "endpointurl", endpoint],
        # botocore's checksums off unless required (.dvc/s3.config says why)
        ["modify", "--local", REMOTE, "configpath", str((repo / AWS_CONFIG).resolve())],
    ]
    if cert is not None:
        commands.append(["modify", "--local", REMOTE, "ssl_verify", str(cert.resolve())])
    for command in commands:
        done = subprocess.run(
            [*dvc, *command], cwd=repo, capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode:
            raise UserError(f"dvc remote {' '.join(command)}: {done.stderr.strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("endpoint", help="the object store, https://HOST:PORT")
    parser.add_argument("--cert", type=Path, help="the team's certificate (when self-signed)")
    args = parser.parse_args()
    switch(Path.cwd(), args.endpoint, args.cert)
    print(f"DVC remote of this clone: {REMOTE} ({URL} at {args.endpoint}); make push / make pull")


if __name__ == "__main__":
    stage.run(main)
