"""The development certificate."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from relay.config import RelayConfig
from relay.tls import TLSSetupError, ensure_dev_certificate, resolve


def test_dev_certificate_is_created_once(tmp_path: Path) -> None:
    files = ensure_dev_certificate(tmp_path)
    assert files.cert == tmp_path / "tls" / "relay.crt" and files.ca_file == files.cert
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 364 <= days <= 366
    before = files.cert.read_bytes()
    assert ensure_dev_certificate(tmp_path).cert.read_bytes() == before
    # usable as a CA file and as a server certificate
    ssl.create_default_context(cafile=str(files.cert))
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(files.cert, files.key)


def test_resolve_refuses_missing_files(tmp_path: Path) -> None:
    config = RelayConfig(
        data_dir=tmp_path, tls_cert=tmp_path / "no.crt", tls_key=tmp_path / "no.key"
    )
    with pytest.raises(TLSSetupError, match="tls_cert"):
        resolve(config)


def test_the_relays_tls_objects_hand_records_straight_to_openssl(tmp_path: Path) -> None:
    from backhaul.sslobject import DirectSSLObject
    from relay.workers import server_config

    config = RelayConfig(dev=True, data_dir=tmp_path)
    server = server_config(object(), config, resolve(config))
    server.load()
    assert server.ssl is not None
    assert server.ssl.sslobject_class is DirectSSLObject
