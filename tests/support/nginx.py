"""Debian's nginx with the production site (deploy/nginx/portal.conf), run unprivileged-style
from a temporary folder: its configuration, pid, temporary files and logs all live there, and it
listens on free loopback ports. The site file stays the source: the values an operator would
edit (ports, certificate, static folder, upstream, log files) are replaced, and each must be
found, so that the test never silently runs another configuration than the file's.

`certificate_authority()` makes a throwaway CA and a server certificate it signed for
127.0.0.1: the client trusts that CA, as a browser trusts a real one.
"""

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import Service, free_port, terminate

NGINX = "/usr/sbin/nginx"
SITE = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "portal.conf"


class NginxError(RuntimeError):
    """nginx did not start."""


@dataclass(frozen=True)
class Certificates:
    ca: Path
    certificate: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def certificate_authority(folder: Path, host: str = "127.0.0.1") -> Certificates:
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Test CA"))
        .issuer_name(_name("Test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = Certificates(
        ca=folder / "ca.pem", certificate=folder / "server.pem", key=folder / "server.key"
    )
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.certificate.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files.key.chmod(0o600)
    return files


class NginxServer(Service):
    """nginx serving deploy/nginx/portal.conf over HTTPS on 127.0.0.1:`port`, in front of the
    portal on 127.0.0.1:`upstream_port`, static files from `static_root`."""

    def __init__(
        self,
        *,
        workdir: Path,
        upstream_port: int,
        static_root: Path,
        certificates: Certificates,
    ) -> None:
        self.workdir = workdir
        self.upstream_port = upstream_port
        self.static_root = static_root
        self.certificates = certificates
        self.port = free_port()
        self.http_port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.access_log = workdir / "access.log"
        self.error_log = workdir / "error.log"
        # Where nginx writes before it has read its configuration (and the main context's).
        self.startup_log = workdir / "startup.log"
        self.process: subprocess.Popen[bytes] | None = None

    def site(self) -> str:
        """deploy/nginx/portal.conf with this server's values in place of the example's."""
        text = SITE.read_text()
        replacements = {
            "listen 443 ssl http2;": f"listen 127.0.0.1:{self.port} ssl http2;",
            "listen [::]:443 ssl http2;": "",
            "listen 80;": f"listen 127.0.0.1:{self.http_port};",
            "listen [::]:80;": "",
            "server 127.0.0.1:8000;": f"server 127.0.0.1:{self.upstream_port};",
            "/etc/ssl/certs/images.example.org.pem": str(self.certificates.certificate),
            "/etc/ssl/private/images.example.org.key": str(self.certificates.key),
            "/srv/portal/static/": f"{self.static_root}/",
            "/var/log/nginx/portal.access.log": str(self.access_log),
            # At `info`, nginx writes more request lines (clients that hang up, time-outs):
            # more chances to catch a token where it should not be.
            "/var/log/nginx/portal.error.log warn": f"{self.error_log} info",
        }
        for example, value in replacements.items():
            if example not in text:
                raise NginxError(f"{SITE} no longer holds {example!r}: update the test")
            text = text.replace(example, value)
        return text

    def configuration(self) -> str:
        temp = self.workdir / "temp"
        # As root, nginx would hand its workers to `nobody`, who may not read the test's files.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        return (
            f"{user}daemon off;\n"
            "worker_processes 1;\n"
            f"pid {self.workdir / 'nginx.pid'};\n"
            f"error_log {self.startup_log} info;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            "    include /etc/nginx/mime.types;\n"
            "    default_type application/octet-stream;\n"
            f"    client_body_temp_path {temp / 'body'};\n"
            f"    proxy_temp_path {temp / 'proxy'};\n"
            f"    fastcgi_temp_path {temp / 'fastcgi'};\n"
            f"    uwsgi_temp_path {temp / 'uwsgi'};\n"
            f"    scgi_temp_path {temp / 'scgi'};\n"
            f"    access_log {self.workdir / 'default-access.log'};\n"
            f"{self.site()}\n"
            "}\n"
        )

    def start(self, timeout: float = 20.0) -> "NginxServer":
        (self.workdir / "temp").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "nginx.conf"
        config.write_text(self.configuration())
        command = [NGINX, "-p", str(self.workdir), "-c", str(config), "-e", str(self.startup_log)]
        checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
        if checked.returncode != 0:
            raise NginxError(f"nginx refuses the configuration:\n{checked.stderr}")
        with self.startup_log.open("ab") as output:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise NginxError(f"nginx exited:\n{self.logs()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise NginxError(f"nginx did not listen within {timeout} s:\n{self.logs()}")

    def stop(self) -> None:
        # SIGQUIT: a graceful stop, which flushes and closes the logs.
        terminate(self.process, signal.SIGQUIT)
        self.process = None

    def log_files(self) -> list[Path]:
        return [self.access_log, self.error_log, self.startup_log]

    def logs(self) -> str:
        text = ""
        for path in self.log_files():
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        return text
