"""TLS material for the relay: the relay never serves plain HTTP.

In development (``--dev``) a self-signed ECDSA P-256 certificate for localhost is created once
and reused, so agents and the admin CLI can pin it with ``--ca-file`` across restarts. It is
marked CA:TRUE because OpenSSL only accepts a self-signed leaf as a trust anchor when it is a
CA certificate (RFC 5280 §4.2.1.9).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backhaul.keys import write_private
from relay import RelayError
from relay.config import RelayConfig, ensure_data_dir

DEV_VALIDITY = dt.timedelta(days=365)
#: Regenerate a dev certificate this long before it would expire.
DEV_RENEW_MARGIN = dt.timedelta(days=7)


class TLSSetupError(RelayError):
    """No usable certificate and key: the relay refuses to start without TLS."""


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path
    #: The file a client should trust (set only for the dev certificate).
    ca_file: Path | None = None


def _dev_paths(data_dir: Path) -> tuple[Path, Path]:
    return data_dir / "tls" / "relay.crt", data_dir / "tls" / "relay.key"


def _still_valid(cert_path: Path, key_path: Path) -> bool:
    if not (cert_path.is_file() and key_path.is_file()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        return False
    return cert.not_valid_after_utc - DEV_RENEW_MARGIN > dt.datetime.now(dt.UTC)


def generate_dev_certificate(
    cert_path: Path, key_path: Path, extra_addresses: tuple[str, ...] = ()
) -> None:
    """A self-signed certificate for localhost, 127.0.0.1, ::1 and ``extra_addresses``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    addresses = ("127.0.0.1", "::1", *extra_addresses)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost")]
        + [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + DEV_VALIDITY)
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def ensure_dev_certificate(data_dir: Path) -> TLSFiles:
    """Create the dev certificate on first use; later starts reuse it so pins stay valid."""
    cert_path, key_path = _dev_paths(ensure_data_dir(data_dir))
    if not _still_valid(cert_path, key_path):
        generate_dev_certificate(cert_path, key_path)
    return TLSFiles(cert_path, key_path, ca_file=cert_path)


def resolve(config: RelayConfig) -> TLSFiles:
    """The certificate and key to serve: the configured pair first, else the dev pair."""
    if config.tls_cert is not None and config.tls_key is not None:
        for label, path in (("tls_cert", config.tls_cert), ("tls_key", config.tls_key)):
            if not path.is_file():
                raise TLSSetupError(f"{label}: file not found: {path}")
        return TLSFiles(config.tls_cert, config.tls_key)
    if config.dev:
        return ensure_dev_certificate(config.data_dir)
    raise TLSSetupError(
        "no TLS certificate: set tls_cert and tls_key (or run with --dev for a local certificate)"
    )
