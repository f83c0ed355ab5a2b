"""The production deployment, run: Debian's nginx with deploy/nginx/portal.conf and a certificate
from a throwaway CA, in front of gunicorn with deploy/gunicorn.conf.py, with production settings
(an https base URL, a random key, PostgreSQL, Redis, an SMS gateway reached over HTTP). The
patient's path is walked over HTTPS, through nginx, as a browser would; then every log is read.

Clients connect from other loopback addresses than nginx's own (127.0.0.2 for patients,
127.0.0.3 for an attacker): nginx, on 127.0.0.1, is the only trusted proxy, so the address the
portal records can be told apart from the proxy's and from what an attacker claims.

The only part played by the test is the SMS gateway's far end: a local HTTP server that takes
the portal's JSON posts and keeps them, where the one-time codes are read.
"""

import io
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from axes.models import AccessAttempt
from django.conf import settings as django_settings
from requests.adapters import HTTPAdapter

from accounts.models import AuditEvent
from accounts.selectors import failures_from_ip
from tests.conftest import synthetic_study
from tests.support import free_port
from tests.support.access import link_token, make_share
from tests.support.gunicorn import PortalServer
from tests.support.nginx import NginxServer, certificate_authority
from tests.support.stored import import_study

BASE_DIR = Path(django_settings.BASE_DIR)
GUNICORN_CONF = BASE_DIR / "deploy" / "gunicorn.conf.py"
PATIENT_ADDRESS = "127.0.0.2"
ATTACKER_ADDRESS = "127.0.0.3"
SPOOFED_ADDRESS = "203.0.113.66"


class SmsGateway:
    """The far end of an SMS gateway: takes `POST /v1/messages` with the bearer token."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.messages: list[dict[str, Any]] = []
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                if self.headers.get("Authorization") != f"Bearer {gateway.token}":
                    self.send_response(401)
                else:
                    gateway.messages.append(json.loads(body))
                    self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/messages"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def last_code(self) -> str:
        assert self.messages, "no SMS reached the gateway"
        match = re.search(r"\b(\d{6})\b", self.messages[-1]["body"])
        assert match, self.messages[-1]
        return match.group(1)


@pytest.fixture
def sms_gateway() -> Iterator[SmsGateway]:
    gateway = SmsGateway(secrets.token_urlsafe(24))
    gateway.thread.start()
    yield gateway
    gateway.server.shutdown()
    gateway.server.server_close()


class FromAddress(HTTPAdapter):
    """Connections from a chosen loopback address (Linux answers for all of 127.0.0.0/8)."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def browser(address: str, ca: Path) -> requests.Session:
    session = requests.Session()
    session.mount("https://", FromAddress(address))
    session.mount("http://", FromAddress(address))
    session.verify = str(ca)
    # No proxy or CA bundle from the environment: this CA only, straight to nginx.
    session.trust_env = False
    return session


def csrf_token(session: requests.Session) -> str:
    return str(session.cookies["__Host-portal_csrf"])


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the file, each of which must be one JSON object."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


@pytest.mark.django_db(transaction=True)
def test_the_patient_path_through_nginx_and_gunicorn(
    tmp_path: Path, settings: Any, sms_gateway: SmsGateway
) -> None:
    redis_url = os.environ.get("REDIS_URL")
    assert redis_url, "this test runs the production configuration: set REDIS_URL"
    settings.SECRET_KEY = secrets.token_urlsafe(50)
    static_root = tmp_path / "static"
    web = PortalServer(workdir=tmp_path / "gunicorn", config=GUNICORN_CONF)
    nginx = NginxServer(
        workdir=tmp_path / "nginx",
        upstream_port=web.port,
        static_root=static_root,
        certificates=certificate_authority(tmp_path / "tls"),
    )
    web.extra_env.update(
        {
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "PORTAL_BASE_URL": nginx.url,
            "PORTAL_ALLOWED_HOSTS": "127.0.0.1",
            "PORTAL_TRUSTED_PROXIES": "127.0.0.1",
            "PORTAL_STATIC_ROOT": str(static_root),
            "CELERY_BROKER_URL": redis_url,
            "PORTAL_SMS_BACKEND": "http",
            "PORTAL_SMS_GATEWAY_URL": sms_gateway.url,
            "PORTAL_SMS_GATEWAY_TOKEN": sms_gateway.token,
            "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "EMAIL_HOST": "127.0.0.1",
            "EMAIL_PORT": str(free_port()),
        }
    )
    env = web.environment()

    # The production settings the servers run with pass Django's deployment check.
    checked = manage(env, "check", "--deploy", "--fail-level", "WARNING")
    assert checked.returncode == 0, checked.stderr
    assert "System check identified no issues" in checked.stdout
    collected = manage(env, "collectstatic", "--noinput")
    assert collected.returncode == 0, collected.stderr

    # A real study in the store, which gunicorn shares with this process.
    web.extra_env["PORTAL_STORE_DIR"] = str(settings.STORE_DIR)
    study = import_study(
        synthetic_study(
            patient_name="DUPONT^Marie",
            patient_id="PAT-NGINX",
            charset="ISO_IR 100",
            modalities=(("CT", 3), ("MR", 2)),
        ),
        tmp_path / "import",
    )
    created = make_share(study.uid)
    token = link_token(created)
    ca = nginx.certificates.ca
    with web, nginx:
        patient = browser(PATIENT_ADDRESS, ca)

        # The home page: HSTS and the CSP arrive through nginx.
        home = patient.get(nginx.url + "/", timeout=30)
        assert home.status_code == 200
        assert home.headers["Strict-Transport-Security"].startswith("max-age=63072000")
        assert "default-src 'self'" in home.headers["Content-Security-Policy"]
        assert home.headers["Referrer-Policy"] == "no-referrer"
        # Static files come from nginx, from the collected folder, with HSTS as well.
        stylesheet = re.search(r'href="(/static/[^"]+\.css)"', home.text)
        assert stylesheet, home.text[:500]
        css = patient.get(nginx.url + stylesheet.group(1), timeout=30)
        assert css.status_code == 200
        assert "immutable" in css.headers["Cache-Control"]
        assert css.headers["Strict-Transport-Security"].startswith("max-age=63072000")

        # A link issued before the fragment form: the token in the path.
        legacy = browser(PATIENT_ADDRESS, ca).get(
            f"{nginx.url}/s/{token}", allow_redirects=False, timeout=30
        )
        assert legacy.status_code == 302 and legacy.headers["Location"] == "/access/verify"

        # The link as the /s/ page's script posts it, then the one-time code.
        assert patient.get(nginx.url + "/s/", timeout=30).status_code == 200
        opened = patient.post(
            nginx.url + "/s/",
            data={"token": token, "csrfmiddlewaretoken": csrf_token(patient)},
            allow_redirects=False,
            timeout=30,
        )
        assert opened.status_code == 302 and opened.headers["Location"] == "/access/verify"
        assert patient.get(nginx.url + "/access/verify", timeout=30).status_code == 200
        sent = patient.post(
            nginx.url + "/access/verify",
            data={"action": "send", "csrfmiddlewaretoken": csrf_token(patient)},
            allow_redirects=False,
            timeout=30,
        )
        assert sent.status_code == 302
        assert sms_gateway.messages[-1]["to"] == "+33612345642"
        otp = sms_gateway.last_code()
        confirmed = patient.post(
            nginx.url + "/access/verify",
            data={"otp": otp, "csrfmiddlewaretoken": csrf_token(patient)},
            allow_redirects=False,
            timeout=30,
        )
        assert confirmed.status_code == 302 and confirmed.headers["Location"] == "/viewer/"
        # The audit trail has the patient's address, as nginx saw it.
        opened_from = AuditEvent.objects.filter(action=AuditEvent.Action.OTP_OK)
        assert list(opened_from.values_list("ip_address", flat=True)) == [PATIENT_ADDRESS]
        viewer = patient.get(nginx.url + "/viewer/", timeout=30)
        assert viewer.status_code == 200
        assert "default-src 'self'" in viewer.headers["Content-Security-Policy"]
        assert "no-store" in viewer.headers["Cache-Control"]

        # The whole study as a ZIP, streamed through nginx to the end.
        with patient.get(
            f"{nginx.url}/download/{study.uid}.zip", stream=True, timeout=60
        ) as zipped:
            assert zipped.status_code == 200
            assert "no-store" in zipped.headers["Cache-Control"]
            archive = zipfile.ZipFile(io.BytesIO(zipped.content))
        assert archive.testzip() is None
        names = archive.namelist()
        assert "DICOMDIR" in names
        assert len([n for n in names if n.startswith("DICOM/")]) == study.instance_count
        # Patient data never landed in nginx's temporary files.
        assert [p for p in (nginx.workdir / "temp").rglob("*") if p.is_file()] == []

        # The access code typed from the handout, by another visitor.
        typist = browser(PATIENT_ADDRESS, ca)
        assert typist.get(nginx.url + "/access/", timeout=30).status_code == 200
        typed = typist.post(
            nginx.url + "/access/",
            data={"code": created.access_code, "csrfmiddlewaretoken": csrf_token(typist)},
            allow_redirects=False,
            timeout=30,
        )
        assert typed.status_code == 302 and typed.headers["Location"] == "/access/verify"

        # An attacker guesses codes and claims to be someone else: the lockout counts the
        # address nginx saw, neither the claimed one nor the proxy's.
        attacker = browser(ATTACKER_ADDRESS, ca)
        assert attacker.get(nginx.url + "/access/", timeout=30).status_code == 200
        for guess in ("AAAA-BBBB-CCCC", "DDDD-EEEE-FFFF", "GGGG-HHHH-JJJJ"):
            refused = attacker.post(
                nginx.url + "/access/",
                data={"code": guess, "csrfmiddlewaretoken": csrf_token(attacker)},
                headers={"X-Forwarded-For": SPOOFED_ADDRESS},
                allow_redirects=False,
                timeout=30,
            )
            assert refused.status_code == 200
        assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {ATTACKER_ADDRESS}
        assert failures_from_ip(ATTACKER_ADDRESS) == 3
        assert failures_from_ip(SPOOFED_ADDRESS) == failures_from_ip("127.0.0.1") == 0

        # /healthz names the PACS nodes: nginx lets only this machine ask.
        assert patient.get(nginx.url + "/healthz", timeout=30).status_code == 403
        health = browser("127.0.0.1", ca).get(nginx.url + "/healthz", timeout=30)
        assert health.status_code == 200 and health.json()["database"] == "ok"
        # Plain HTTP only redirects.
        plain = patient.get(
            f"http://127.0.0.1:{nginx.http_port}/s/{token}", allow_redirects=False, timeout=30
        )
        assert plain.status_code == 301
        assert plain.headers["Location"].startswith("https://127.0.0.1/s/")

        # gunicorn gone: nginx writes each failed request, its request line included, into its
        # error log; but not a legacy link's.
        web.stop()
        assert patient.get(nginx.url + "/access/", timeout=30).status_code == 502
        assert patient.get(f"{nginx.url}/s/{token}", timeout=30).status_code == 502
    # (Both servers are stopped: their logs are complete.)
    assert 'request: "GET /access/ HTTP/1.1", upstream:' in nginx.error_log.read_text()

    logs = {path: path.read_text(errors="replace") for path in nginx.log_files()}
    logs |= {path: path.read_text(errors="replace") for path in (web.access_log, web.error_log)}
    logs[web.app_log] = web.app_log.read_text(errors="replace")
    raw_token = token.split(".", 1)[0]
    code_letters = created.access_code.replace("-", "")
    for path, text in logs.items():
        for secret in (
            token,
            raw_token,
            created.access_code,
            code_letters,
            sms_gateway.token,
            # The patient's name, shown on the viewer page.
            "DUPONT",
        ):
            assert secret not in text, f"{path.name} holds a secret"
        # A fraction of a second in a time stamp may hold any six digits; the code may not.
        assert not re.search(rf"(?<![\d.]){otp}(?!\d)", text), f"{path.name} holds the code"

    # nginx's access log: JSON lines, the legacy link redacted, no query string anywhere.
    proxied = json_lines(nginx.access_log)
    paths = {line["path"] for line in proxied}
    assert {"/", "/s/", "/s/[redacted]", "/access/verify", "/viewer/"} <= paths
    assert not any("?" in path for path in paths)
    assert {line["client"] for line in proxied} == {PATIENT_ADDRESS, ATTACKER_ADDRESS, "127.0.0.1"}
    # gunicorn's access log: JSON lines, its request ids nginx's own (a trusted proxy's
    # X-Request-ID is kept), the static file never reached it.
    served = json_lines(web.access_log)
    assert "/s/[redacted]" in {line["path"] for line in served}
    assert stylesheet.group(1) not in {line["path"] for line in served}
    assert {line["request_id"] for line in served} <= {line["request_id"] for line in proxied}
    assert {line["client"] for line in served} == {"127.0.0.1"}
    # The portal's own lines (and gunicorn's error log) are JSON too, with the request id.
    application = json_lines(web.app_log)
    assert any(line.get("request_id") in {r["request_id"] for r in served} for line in application)
    json_lines(web.error_log)
