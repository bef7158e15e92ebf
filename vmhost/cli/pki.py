"""`vmhost pki init DIR [--force]`: a CA, a server and a client certificate,
for trying mutual TLS out (not a production PKI: the CA key is not kept,
so nothing more can be signed with it, and there is no revocation).

Writes into DIR:

    ca.pem           the CA certificate (give it to both sides as --tls-ca)
    server.pem       the agent's certificate, for localhost, 127.0.0.1 and ::1
    server-key.pem   its key (mode 0600)
    client.pem       a client certificate
    client-key.pem   its key (mode 0600)

Keys are ECDSA P-256; certificates are made with the `cryptography`
package. Existing files are not overwritten unless --force is given.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

FILES = ("ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem")
SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1", "::1")
CA_DAYS = 3650
CERT_DAYS = 825


def init(directory: str, force: bool = False) -> dict[str, str]:
    """Make the CA and both certificates in `directory` (created if need be).
    Returns {"ca": path, "server_cert", "server_key", "client_cert",
    "client_key"}. Raises FileExistsError, naming them, if any of the files
    exists and not `force`; then nothing is written."""
    paths = {name: os.path.join(directory, name) for name in FILES}
    if not force:
        existing = [path for path in paths.values() if os.path.lexists(path)]
        if existing:
            raise FileExistsError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                                  "give --force to replace them")
    os.makedirs(directory, exist_ok=True)

    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)  # clock skew
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmhost"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "vmhost test CA")])
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key(), now, CA_DAYS)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_key_usage(cert_sign=True), critical=True)
               .sign(ca_key, hashes.SHA256()))

    def issue(common_name: str, usage: x509.ObjectIdentifier,
              names: list[x509.GeneralName]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmhost"),
                             x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (_builder(subject, ca_name, key.public_key(), now, CERT_DAYS)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(_key_usage(cert_sign=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server_names: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
    server_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in SERVER_ADDRESSES]
    server_cert, server_key = issue("localhost", ExtendedKeyUsageOID.SERVER_AUTH, server_names)
    client_cert, client_key = issue("vmhost client", ExtendedKeyUsageOID.CLIENT_AUTH, [])

    # Keys first: a certificate without its key is of no use.
    _write(paths["server-key.pem"], _key_pem(server_key), 0o600)
    _write(paths["client-key.pem"], _key_pem(client_key), 0o600)
    _write(paths["ca.pem"], _cert_pem(ca_cert), 0o644)
    _write(paths["server.pem"], _cert_pem(server_cert), 0o644)
    _write(paths["client.pem"], _cert_pem(client_cert), 0o644)
    return {"ca": paths["ca.pem"], "server_cert": paths["server.pem"],
            "server_key": paths["server-key.pem"], "client_cert": paths["client.pem"],
            "client_key": paths["client-key.pem"]}


def main(argv: list[str] | None = None, prog: str = "vmhost pki") -> int:
    """`vmhost pki init DIR [--force]`; argv is what follows `pki`."""
    parser = argparse.ArgumentParser(prog=prog, description="certificates for trying out mutual TLS")
    sub = parser.add_subparsers(dest="command", required=True)
    init_parser = sub.add_parser(
        "init", help="make a CA, a server and a client certificate in DIR",
        description=f"Write {', '.join(FILES)} into DIR (server certificate for localhost, "
                    "127.0.0.1 and ::1).")
    init_parser.add_argument("directory", metavar="DIR")
    init_parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    try:
        paths = init(args.directory, force=args.force)
    except FileExistsError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{prog}: cannot write into {args.directory}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(FILES)} into {args.directory}")
    print("serve:  vmhost serve --tls-cert {server_cert} --tls-key {server_key} --tls-ca {ca} "
          "--listen 127.0.0.1:54321".format(**paths))
    print("call:   vmhost-client --url https://localhost:54321/jsonrpc --tls-cert {client_cert} "
          "--tls-key {client_key} --tls-ca {ca} Host ping".format(**paths))
    return 0


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             now: datetime.datetime, days: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
                         decipher_only=False)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _write(path: str, data: bytes, mode: int) -> None:
    """Whole file or nothing, with `mode` from the start (a key is never
    readable by others, not even for a moment)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


if __name__ == "__main__":
    sys.exit(main())
