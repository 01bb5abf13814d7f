"""The local CA and the server certificate of the SASL_SSL listener (``cryptography``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from .layout import HOST, BrokerError, Layout, log


def _pem_key(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: str, key: object, issuer: str, issuer_key: object, *, ca: bool, days: int
) -> bytes:
    """A PEM certificate for `key`, signed by `issuer_key`: a CA, or a server for localhost."""
    import ipaddress  # noqa: PLC0415
    from datetime import UTC, datetime, timedelta  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    now = datetime.now(UTC)
    public = key.public_key()  # type: ignore[attr-defined]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),  # type: ignore[attr-defined]
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    signed = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    return signed.public_bytes(serialization.Encoding.PEM)


def _new_key() -> object:
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_ca(directory: Path, common_name: str) -> tuple[Path, Path]:
    """A self-signed CA (RSA 2048, ten years): returns (certificate PEM, key PEM)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    cert, key_file = directory / "ca.pem", directory / "ca.key"
    cert.write_bytes(_certificate(common_name, key, common_name, key, ca=True, days=3650))
    key_file.write_bytes(_pem_key(key))
    key_file.chmod(0o600)
    return cert, key_file


def ensure_certificates(layout: Layout) -> None:
    """Make the CA and the server certificate (SAN IP:127.0.0.1, DNS:localhost) once."""
    if layout.ca_pem.exists() and layout.server_pem.exists():
        return
    log(f"making a CA and a server certificate in {layout.tls}")
    try:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    except ImportError:
        raise BrokerError(
            "making the broker's certificates needs the `cryptography` package (a dev "
            "dependency): run `uv run python kafka/broker.py ...` (or `just ...`)"
        ) from None
    shutil.rmtree(layout.tls, ignore_errors=True)
    work = layout.home / "tls.partial"
    shutil.rmtree(work, ignore_errors=True)
    ca_name = "loader-ws-candles local Kafka CA"
    ca_cert, ca_key_file = make_ca(work, ca_name)
    ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
    server_key = _new_key()
    server_cert = _certificate("localhost", server_key, ca_name, ca_key, ca=False, days=825)
    # Kafka's PEM key store: the private key (PKCS#8, here unencrypted, so no
    # ssl.key.password) followed by the certificate chain, leaf first.
    bundle = work / "server.pem"
    bundle.write_bytes(_pem_key(server_key) + server_cert + ca_cert.read_bytes())
    bundle.chmod(0o600)
    work.rename(layout.tls)
