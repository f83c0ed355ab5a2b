"""Link tokens reach no log line, whichever logger writes it, in debug mode too (the demo).

Django's CSRF failure (`Forbidden (CSRF cookie not set.): /s/<token>`) is logged on
django.security.csrf and, with DEBUG on, went out through the console handler Django gives its
`django` logger, which knew nothing of the redaction filter. Played against a real
`manage.py runserver`, reading everything it prints.
"""

import logging
import secrets
import subprocess
import sys
import time
from pathlib import Path

import requests
from django.conf import settings

from tests.support import free_port, terminate
from tests.test_settings import BASE_DIR, new_installation


def runserver(tmp_path: Path, port: int) -> "subprocess.Popen[str]":
    env = new_installation(
        {
            "PORTAL_DEBUG": "true",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
            "PORTAL_BROKER_DIR": str(tmp_path / "broker"),
            "PORTAL_STORE_DIR": str(tmp_path / "store"),
        }
    )
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=BASE_DIR,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    process = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
        cwd=BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return process
        except requests.ConnectionError:
            time.sleep(0.2)
    terminate(process)
    raise AssertionError("runserver did not start")


def test_a_debug_server_logs_csrf_failures_and_404s_without_the_token(tmp_path: Path) -> None:
    token = secrets.token_urlsafe(32)
    port = free_port()
    process = runserver(tmp_path, port)
    try:
        base = f"http://127.0.0.1:{port}"
        # A form post without its CSRF cookie, and a path that matches nothing.
        forbidden = requests.post(f"{base}/s/{token}", data={"token": token}, timeout=10)
        missing = requests.get(f"{base}/s/{token}/nothing", timeout=10)
        assert forbidden.status_code == 403
        assert missing.status_code == 404
    finally:
        terminate(process)
    output = process.stdout.read() if process.stdout else ""

    assert "Forbidden (CSRF cookie not set.): /s/[redacted]" in output
    assert "Not Found: /s/[redacted]" in output
    assert token not in output


def test_every_handler_and_logger_redacts_root_included() -> None:
    config = settings.LOGGING
    configured = [
        *config["handlers"].values(),
        *config["loggers"].values(),
        config["root"],
    ]

    assert all("redact_links" in entry["filters"] for entry in configured)
    # Django's own logger keeps none of the handlers Django gave it.
    assert logging.getLogger("django").handlers == []


def test_a_record_of_a_child_logger_is_redacted_on_its_way_out(caplog) -> None:
    token = secrets.token_urlsafe(32)
    root = logging.getLogger()
    handler = root.handlers[0]
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    capture = Capture()
    capture.filters = list(handler.filters)
    root.addHandler(capture)
    try:
        logging.getLogger("django.security.csrf").warning("Forbidden (%s): %s", "x", f"/s/{token}")
    finally:
        root.removeHandler(capture)

    assert records == ["Forbidden (x): /s/[redacted]"]
