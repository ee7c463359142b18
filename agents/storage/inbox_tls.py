"""TLS for the replication stream: each target agent has its own self-signed certificate, made once with
openssl in its state directory. The certificate travels to the source inside the (authenticated, encrypted)
XMPP answer that opens the inbox, and the source trusts exactly that certificate, so no CA and no host name
are involved: the pin is the authentication.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path

from agents.storage.driver import StorageError

_NAME = "vertebra-inbox"


def ensure_certificate(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) in `directory`, made on first use (an EC P-256 key, ten years)."""
    cert, key = directory / "inbox-cert.pem", directory / "inbox-key.pem"
    if cert.is_file() and key.is_file():
        return cert, key
    openssl = shutil.which("openssl")
    if openssl is None:
        raise StorageError("TLS replication needs the openssl program (apt-get install openssl), or create "
                           "the action with tls=false", code="environment")
    directory.mkdir(parents=True, exist_ok=True)
    new_cert, new_key = cert.with_suffix(".new"), key.with_suffix(".new")
    old_umask = os.umask(0o077)
    try:
        proc = subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-days", "3650", "-subj", f"/CN={_NAME}", "-keyout", str(new_key), "-out", str(new_cert),
             "-addext", f"subjectAltName=DNS:{_NAME}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,digitalSignature,keyCertSign"],
            capture_output=True, text=True, check=False)
    finally:
        os.umask(old_umask)
    if proc.returncode != 0:
        raise StorageError(f"openssl could not make the inbox certificate: {proc.stderr.strip()}",
                           code="environment")
    os.replace(new_key, key)
    os.replace(new_cert, cert)
    return cert, key


def server_context(directory: Path) -> tuple[ssl.SSLContext, str]:
    """The inbox's TLS context and its certificate (PEM) to hand to senders."""
    cert, key = ensure_certificate(directory)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx, cert.read_text()


def client_context(pem: str) -> ssl.SSLContext:
    """A sender's context trusting exactly the inbox certificate `pem`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=pem)
    # The pinned certificate is the identity; the inbox's address is whatever the target advertised.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
