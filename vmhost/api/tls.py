"""TLS for the API: mutual TLS contexts and the rule about plain HTTP.

The agent serves HTTPS with `server_context(cert, key, ca)`: TLS 1.2 or
newer, and every client must present a certificate signed by `ca` (mutual
TLS; there is no other authentication). Clients use
`client_context(cert, key, ca)`: the agent's certificate must be signed by
`ca` and name the host in the URL.

Plain HTTP is for loopback only: `check_listen` refuses any other address
without TLS unless the operator said --insecure.

Every problem with the files raises TlsError (a ValueError) naming the
file, so a command line can print it as it is.
"""
from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

# cryptography is imported where a certificate or key is read, not with this
# module: `vmhost serve` without TLS never needs it (~70-100 ms of every start).

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TlsError(ValueError):
    """A certificate, key or CA file is missing, unreadable or unusable."""


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """The agent's context: presents `cert` (with `key`), requires a client
    certificate signed by a CA in `ca`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.verify_mode = ssl.CERT_REQUIRED
    context.options |= ssl.OP_NO_RENEGOTIATION
    _load_chain(context, cert, key, "server")
    _load_ca(context, ca)
    return context


def client_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext:
    """A client's context: presents `cert` (with `key`; both None: no client
    certificate, which a vmhost agent refuses), trusts the CAs in `ca` (None:
    the system's CAs), and checks that the agent's certificate names the
    host it is reached by."""
    if key is not None and cert is None:
        raise TlsError("a TLS key without a certificate: give the client certificate too")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = MINIMUM_VERSION
    if ca is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_ca(context, ca)
    if cert is not None:
        _load_chain(context, cert, key, "client")
    return context


def server_context_or_none(cert: str | None, key: str | None,
                           ca: str | None) -> ssl.SSLContext | None:
    """For `vmhost serve --tls-cert/--tls-key/--tls-ca`: None if none of the
    three is given, the server context if all are, TlsError otherwise."""
    given = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
    missing = [name for name, value in given.items() if not value]
    if len(missing) == len(given):
        return None
    if missing:
        raise TlsError(f"--tls-cert, --tls-key and --tls-ca go together; missing {', '.join(missing)}")
    assert cert and key and ca
    return server_context(cert, key, ca)


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (also as ::ffff:127.x.y.z)."""
    host = host.strip("[]")
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False  # another name: it may resolve to anything
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def check_listen(host: str, tls: bool, insecure: bool) -> None:
    """Refuse (ValueError) plain HTTP on an address other hosts can reach,
    unless the operator asked for it with --insecure."""
    if tls or insecure or is_loopback(host):
        return
    shown = host.strip("[]") or "all addresses"
    raise ValueError(f"refusing to listen on {shown} without TLS: give --tls-cert/--tls-key/"
                     "--tls-ca, or --insecure to accept plain HTTP on a non-loopback address")


# --- loading and checking files ----------------------------------------------------

def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TlsError(f"{what} {path}: no such file") from None
    except PermissionError:
        raise TlsError(f"{what} {path}: permission denied") from None
    except IsADirectoryError:
        raise TlsError(f"{what} {path}: is a directory, not a file") from None
    except OSError as e:
        raise TlsError(f"{what} {path}: cannot read: {e.strerror or e}") from None


def _certificates(path: str, what: str) -> list[x509.Certificate]:
    from cryptography import x509
    data = _read(path, what)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise TlsError(f"{what} {path}: no PEM certificate in it")
    return certificates


def _load_chain(context: ssl.SSLContext, cert: str, key: str | None, role: str) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    what = f"TLS {role} certificate"
    leaf = _certificates(cert, what)[0]
    if key is not None:
        key_what = f"TLS {role} key"
        data = _read(key, key_what)
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except TypeError:  # encrypted
            raise TlsError(f"{key_what} {key}: the key is encrypted; give an unencrypted key") from None
        except (ValueError, UnsupportedAlgorithm):
            raise TlsError(f"{key_what} {key}: not a PEM private key") from None
        if _public_bytes(private.public_key()) != _public_bytes(leaf.public_key()):
            raise TlsError(f"{key_what} {key} does not match the certificate {cert}")
    _warn_if_expired(leaf, cert, what)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:  # e.g. a combined file whose key is unusable
        files = cert if key is None else f"{cert} with key {key}"
        raise TlsError(f"{what} {files}: cannot be used: {e}") from None


def _load_ca(context: ssl.SSLContext, ca: str) -> None:
    what = "TLS CA file"
    for certificate in _certificates(ca, what):
        _warn_if_expired(certificate, ca, what)
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"{what} {ca}: cannot be used: {e}") from None


def _warn_if_expired(certificate: x509.Certificate, path: str, what: str) -> None:
    # Not refused: the peers refuse it, and say so, which is clearer from
    # their side; the agent still starts.
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = _validity(certificate)
    if not_after < now:
        log.warning("%s %s expired on %s", what, path, not_after)
    elif not_before > now:
        log.warning("%s %s is not valid before %s", what, path, not_before)


def _validity(certificate: x509.Certificate) -> tuple[datetime.datetime, datetime.datetime]:
    if hasattr(certificate, "not_valid_after_utc"):  # cryptography 42 and newer
        return certificate.not_valid_before_utc, certificate.not_valid_after_utc
    utc = datetime.timezone.utc
    return (certificate.not_valid_before.replace(tzinfo=utc),
            certificate.not_valid_after.replace(tzinfo=utc))


def _public_bytes(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.public_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)
