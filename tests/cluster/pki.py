"""Certificates, keys and kubeconfigs for the test control plane, made with `cryptography`.

One CA signs everything: the API server's serving certificate, the client certificates of the admin,
controller-manager, scheduler and kubelet, and the API server's client certificate towards the kubelet.
Keys are ECDSA P-256 (fast to generate; every component accepts them). Files are written once per state
directory and reused when the cluster is started again.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=3650)


@dataclass(frozen=True, kw_only=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True, kw_only=True)
class ClientIdentity:
    """A client certificate's subject: `user` becomes the Kubernetes user name, `groups` its groups."""

    name: str
    user: str
    groups: tuple[str, ...] = ()


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{path}: expected an EC private key, found {type(key).__name__}")
    return key


def _subject(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def ensure_ca(directory: Path) -> CertPair:
    """Create the cluster CA in `directory` unless it exists."""
    pair = CertPair(cert=directory / "ca.crt", key=directory / "ca.key")
    if pair.cert.exists() and pair.key.exists():
        return pair
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = _subject("ember-test-ca")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(pair.key, key)
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pair


def _issue(
    ca: CertPair,
    out: CertPair,
    *,
    subject: x509.Name,
    usages: list[x509.ObjectIdentifier],
    dns_names: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
) -> CertPair:
    if out.cert.exists() and out.key.exists():
        return out
    ca_key = _load_key(ca.key)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(out.key, key)
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


def _alt_names(cert_path: Path) -> tuple[set[str], set[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return set(sans.get_values_for_type(x509.DNSName)), set(sans.get_values_for_type(x509.IPAddress))


def ensure_serving_cert(
    ca: CertPair, directory: Path, name: str, *, dns_names: tuple[str, ...], ips: tuple[str, ...]
) -> CertPair:
    """A TLS server certificate for `name`, valid for the given DNS names and IP addresses.

    A certificate kept from an earlier run is reissued if its names differ (the addresses served changed).
    """
    out = CertPair(cert=directory / f"{name}.crt", key=directory / f"{name}.key")
    if out.cert.exists() and _alt_names(out.cert) != (set(dns_names), {ipaddress.ip_address(ip) for ip in ips}):
        out.cert.unlink()
    return _issue(
        ca,
        out,
        subject=_subject(name),
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        dns_names=dns_names,
        ips=ips,
    )


def ensure_client_cert(ca: CertPair, directory: Path, identity: ClientIdentity) -> CertPair:
    """A TLS client certificate whose CN/O are the Kubernetes user and groups of `identity`."""
    return _issue(
        ca,
        CertPair(cert=directory / f"{identity.name}.crt", key=directory / f"{identity.name}.key"),
        subject=_subject(identity.user, identity.groups),
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )


def ensure_service_account_keys(directory: Path) -> CertPair:
    """The key pair the API server signs service-account tokens with (`cert` holds the public key)."""
    pair = CertPair(cert=directory / "sa.pub", key=directory / "sa.key")
    if pair.cert.exists() and pair.key.exists():
        return pair
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    _write_key(pair.key, key)
    pair.cert.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return pair


def write_kubeconfig(path: Path, *, server: str, ca: CertPair, client: CertPair, user: str) -> Path:
    """A kubeconfig for `server` that authenticates with `client`; file paths, so it stays readable."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "ember", "cluster": {"server": server, "certificate-authority": str(ca.cert)}}],
        "users": [{"name": user, "user": {"client-certificate": str(client.cert), "client-key": str(client.key)}}],
        "contexts": [{"name": "ember", "context": {"cluster": "ember", "user": user}}],
        "current-context": "ember",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
