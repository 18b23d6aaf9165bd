"""The certificate a team server presents: the operator's, or one made here for a test
network (self-signed, the host's address in subjectAltName, so clients that trust this one
file can verify it with no authority behind it).

    python -m pipeline.tracking.tls HOST DIR    # DIR/cert.pem (give to clients), DIR/key.pem
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

from pipeline.core.errors import UserError

CERT = "TRACKING_CERT"  # the operator's certificate (PEM; a chain may follow it) ...
KEY = "TRACKING_KEY"  # ... and its private key; both or neither


def make_certificate(host: str, folder: Path, days: int = 365) -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` (an IP address or a DNS name) and for
    127.0.0.1/localhost, in ``folder``/cert.pem and key.pem (the key readable by its owner
    only); kept when both exist."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for name in dict.fromkeys([host, "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def server_certificate(
    host: str, folder: Path, environ: Mapping[str, str] = os.environ
) -> tuple[Path, Path]:
    """The operator's ``$TRACKING_CERT``/``$TRACKING_KEY`` when set (checked to exist), else
    :func:`make_certificate` in ``folder``."""
    cert, key = environ.get(CERT), environ.get(KEY)
    if not cert and not key:
        return make_certificate(host, folder)
    for name, value in ((CERT, cert), (KEY, key)):
        if not value or not Path(value).is_file():
            raise UserError(
                f"{name}: got {value!r}; set {CERT} and {KEY} to PEM files (both), or "
                "neither for a self-signed certificate made for the test network"
            )
    return Path(str(cert)), Path(str(key))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host")
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    cert, _ = make_certificate(args.host, args.folder)
    print(f"certificate for {args.host}: {cert} (give it to clients)")


if __name__ == "__main__":
    main()
