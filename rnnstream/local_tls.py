"""Throwaway TLS material for the local brokers (:mod:`rnnstream.kafka_broker`,
:mod:`rnnstream.mqtt_broker`): a fresh CA, a server certificate it signs for ``127.0.0.1`` and
``localhost``, and a random client password, written with the ``openssl`` command-line tool at every broker
start. Nothing here is fit for production: the CA key sits beside the certificates.

Files written to ``directory`` (mode 0600 for the secrets):

* ``ca.pem``: the CA certificate, what a client trusts (``ssl_cafile`` / ``ssl.ca.location`` / paho's
  ``ca_certs``);
* ``server-cert.pem``, ``server-key.pem``: the server's certificate and unencrypted private key (PEM);
* ``server.p12``: the same pair as a PKCS#12 keystore (Kafka), locked with ``keystore_password``;
* ``password``: the client password (``${file:...}`` in a config), for user :data:`USERNAME`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

USERNAME = "rnnstream"
"""The one client user the local brokers know (SASL/PLAIN for Kafka, a password-file user for MQTT)."""
DAYS = 7
"""Validity of the throwaway certificates (days)."""
_CURVE = "prime256v1"  # EC keys: generated in milliseconds, accepted by Java, OpenSSL and librdkafka


class TlsSetupError(RuntimeError):
    """``openssl`` is missing or failed."""


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the TLS material written by :func:`make_tls_files` (the password is in a file, not here)."""

    directory: Path

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def cert_file(self) -> Path:
        return self.directory / "server-cert.pem"

    @property
    def key_file(self) -> Path:
        return self.directory / "server-key.pem"

    @property
    def keystore(self) -> Path:
        return self.directory / "server.p12"

    @property
    def password_file(self) -> Path:
        return self.directory / "password"

    @property
    def keystore_password_file(self) -> Path:
        return self.directory / "keystore-password"

    def password(self) -> str:
        """The client password of :data:`USERNAME`."""
        return self.password_file.read_text().strip()

    def keystore_password(self) -> str:
        """The password of ``server.p12``."""
        return self.keystore_password_file.read_text().strip()


def _openssl(command: str, *more: str, cwd: Path) -> None:
    """Run ``openssl <command words> <more>`` in ``cwd``; ``more`` holds arguments that may contain spaces."""
    args = [*command.split(), *more]
    tool = shutil.which("openssl")
    if tool is None:
        raise TlsSetupError("'openssl' not found on PATH (apt-get install -y openssl): needed for broker TLS")
    proc = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60)
    if proc.returncode != 0:
        raise TlsSetupError(f"openssl {args[0]} failed: {proc.stderr.strip()[-2000:]}")


def _write_secret(path: Path, value: str) -> None:
    path.touch(mode=0o600)
    path.write_text(value + "\n")


def make_tls_files(directory: Path) -> TlsFiles:
    """Write a fresh CA, a server certificate for 127.0.0.1/localhost, a PKCS#12 keystore and a random
    client password to ``directory`` (replaced if it exists). Raises :class:`TlsSetupError`."""
    files = TlsFiles(Path(directory).resolve())
    shutil.rmtree(files.directory, ignore_errors=True)
    files.directory.mkdir(parents=True, mode=0o700)
    d = files.directory
    _write_secret(files.password_file, secrets.token_urlsafe(18))
    _write_secret(files.keystore_password_file, secrets.token_urlsafe(18))
    key = f"-newkey ec -pkeyopt ec_paramgen_curve:{_CURVE} -nodes"
    ca_ext = "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
    ca = f"req -x509 {key} -days {DAYS} {ca_ext} -keyout ca-key.pem -out ca.pem"
    _openssl(ca, "-subj", "/CN=rnnstream local test CA", cwd=d)
    _openssl(f"req {key} -keyout server-key.pem -out server.csr -subj /CN=127.0.0.1", cwd=d)
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    sign = "x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out server-cert.pem"
    _openssl(f"{sign} -days {DAYS} -extfile server.ext", cwd=d)
    p12 = "pkcs12 -export -in server-cert.pem -inkey server-key.pem -out server.p12 -name server"
    _openssl(p12, "-passout", f"file:{files.keystore_password_file}", cwd=d)
    for name in ("server-key.pem", "ca-key.pem", "server.p12"):
        os.chmod(d / name, 0o600)
    return files
