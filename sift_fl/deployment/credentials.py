"""Throwaway TLS certificates and SuperNode authentication keys for a Flower deployment.

`python -m sift_fl.deployment.credentials certificates --out DIR` writes a self-signed CA
(`ca.crt`, `ca.key`) and a SuperLink server certificate signed by it (`server.pem`,
`server.key`) for the given host names and IP addresses. `python -m
sift_fl.deployment.credentials node-key --out PATH` writes a SuperNode key pair in OpenSSH
format: the private key at PATH, read by `flower-supernode --auth-supernode-private-key`,
and the public key at PATH.pub, registered with `flwr supernode register`.

Flower 1.42 accepts SuperNode keys on NIST elliptic curves only; these keys use P-384.
The certificates are meant for tests and trials: a production deployment uses
certificates from the organisation's own CA.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

CA_CERTIFICATE = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERTIFICATE = "server.pem"
SERVER_KEY = "server.key"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _subject_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def write_certificates(directory: str | Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 30) -> dict[str, Path]:
    """Write a self-signed CA and a server certificate for `hosts` into `directory`; return the paths by file name.

    The server certificate lists every entry of `hosts` as a subject alternative name (IP
    addresses as IP entries, other names as DNS entries), so a SuperNode that connects to
    any of them can verify it against `ca.crt`.
    """
    if not hosts:
        raise ValueError("hosts is empty; pass the SuperLink's address, e.g. 127.0.0.1")
    directory = Path(directory)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_after = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sift-fl throwaway CA")])
    ca_certificate = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    paths = {name: directory / name for name in (CA_CERTIFICATE, CA_KEY, SERVER_CERTIFICATE, SERVER_KEY)}
    _write(paths[CA_CERTIFICATE], ca_certificate.public_bytes(serialization.Encoding.PEM))
    _write(paths[CA_KEY], _private_pem(ca_key), private=True)
    _write(paths[SERVER_CERTIFICATE], server_certificate.public_bytes(serialization.Encoding.PEM))
    _write(paths[SERVER_KEY], _private_pem(server_key), private=True)
    logger.info("wrote a CA and a server certificate for %s to %s", ", ".join(hosts), directory)
    return paths


def write_node_key(path: str | Path, comment: str = "") -> tuple[Path, Path]:
    """Write a P-384 SuperNode key pair in OpenSSH format: the private key at `path`, the public key at `path`.pub."""
    private_path = Path(path)
    public_path = private_path.with_name(private_path.name + ".pub")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(private_path, private, private=True)
    _write(public_path, public + (f" {comment}".encode("utf-8") if comment else b"") + b"\n")
    logger.info("wrote SuperNode key pair %s and %s", private_path, public_path)
    return private_path, public_path


def main(argv: list[str] | None = None) -> int:
    """Run the `certificates` or `node-key` command."""
    parser = argparse.ArgumentParser(prog="python -m sift_fl.deployment.credentials", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    certificates = commands.add_parser("certificates", help="write a throwaway CA and a SuperLink server certificate")
    certificates.add_argument("--out", required=True, help="directory for ca.crt, ca.key, server.pem and server.key")
    certificates.add_argument(
        "--host", action="append", default=[], help="host name or IP address the certificate is valid for (repeatable; default: 127.0.0.1 and localhost)"
    )
    certificates.add_argument("--days", type=int, default=30, help="validity in days (default: 30)")
    node_key = commands.add_parser("node-key", help="write a SuperNode key pair (OpenSSH, P-384)")
    node_key.add_argument("--out", required=True, help="path of the private key; the public key goes to the same path plus .pub")
    node_key.add_argument("--comment", default="", help="comment appended to the public key, e.g. the site name")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "certificates":
        write_certificates(args.out, args.host or ["127.0.0.1", "localhost"], args.days)
    else:
        write_node_key(args.out, args.comment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
