"""A production process does not start with the demo's secret key, and `check --deploy` fails
while live one-time codes would stay on the machine (printed, written to files, kept in memory)
instead of reaching recipients. Each played as an operator meets it: a fresh process with the
environment of a new installation."""

import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import free_port
from tests.test_settings import BASE_DIR, manage, new_installation, python

SETUP = "import django; django.setup(); print('started')"


def test_it_refuses_to_start_with_the_demo_key_when_debug_is_off() -> None:
    result = python(SETUP, {"PORTAL_DEBUG": "false"})

    assert result.returncode == 1
    assert "started" not in result.stdout
    assert "django.core.exceptions.ImproperlyConfigured: PORTAL_SECRET_KEY is not set" in (
        result.stderr
    )
    assert "PORTAL_SECRET_KEY_FILE" in result.stderr


def test_it_refuses_the_demo_key_even_when_set_explicitly() -> None:
    from django.conf import settings

    result = python(SETUP, {"PORTAL_SECRET_KEY": settings.INSECURE_DEMO_KEY})

    assert result.returncode == 1
    assert "ImproperlyConfigured: PORTAL_SECRET_KEY is not set" in result.stderr


def test_the_demo_starts_with_the_demo_key_in_debug_mode() -> None:
    result = python(SETUP, {"PORTAL_DEBUG": "true"})

    assert result.returncode == 0, result.stderr
    assert "started" in result.stdout


def test_it_starts_with_a_key_of_its_own() -> None:
    result = python(SETUP, {"PORTAL_SECRET_KEY": secrets.token_urlsafe(50)})

    assert result.returncode == 0, result.stderr


def test_gunicorn_refuses_to_start_with_the_demo_key(tmp_path: Path) -> None:
    """gunicorn runs no system checks: the refusal must come from the settings themselves."""
    port = free_port()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "portal.wsgi",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
        ],
        cwd=BASE_DIR,
        env=new_installation(
            {"PORTAL_DEBUG": "false", "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert "PORTAL_SECRET_KEY is not set" in result.stderr
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def production(tmp_path: Path) -> dict[str, str]:
    """A real production configuration: its own key, https, PostgreSQL, Redis, an SMTP relay
    and an SMS gateway reached over https with a token."""
    return {
        "PORTAL_SECRET_KEY": secrets.token_urlsafe(64),
        "PORTAL_BASE_URL": "https://images.example.org",
        "PORTAL_ALLOWED_HOSTS": "images.example.org",
        "PORTAL_TRUSTED_PROXIES": "127.0.0.1",
        "DATABASE_URL": "postgres://portal:secret@db.example.org:5432/portal",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
        "PORTAL_STORE_DIR": str(tmp_path / "store"),
        "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        "EMAIL_HOST": "smtp.example.org",
        "PORTAL_SMS_BACKEND": "http",
        "PORTAL_SMS_GATEWAY_URL": "https://sms.example.org/v1/messages",
        "PORTAL_SMS_GATEWAY_TOKEN": secrets.token_urlsafe(32),
    }


def check_deploy(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return manage("check", "--deploy", "--fail-level", "WARNING", env=env)


def test_a_production_configuration_passes_the_deploy_check(tmp_path: Path) -> None:
    result = check_deploy(production(tmp_path))

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.parametrize(
    ("change", "check_id", "message"),
    [
        (
            {"EMAIL_BACKEND": "django.core.mail.backends.console.EmailBackend"},
            "accounts.E010",
            "EMAIL_BACKEND is django.core.mail.backends.console.EmailBackend: one-time codes",
        ),
        (
            {"EMAIL_BACKEND": "django.core.mail.backends.filebased.EmailBackend"},
            "accounts.E010",
            "EMAIL_BACKEND is django.core.mail.backends.filebased.EmailBackend",
        ),
        (
            {"EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend"},
            "accounts.E010",
            "EMAIL_BACKEND is django.core.mail.backends.locmem.EmailBackend",
        ),
        (
            {"PORTAL_SMS_BACKEND": "console"},
            "accounts.E011",
            "PORTAL_SMS_BACKEND is 'console': one-time codes would be printed",
        ),
        ({"PORTAL_SMS_BACKEND": "file"}, "accounts.E011", "PORTAL_SMS_BACKEND is 'file'"),
        (
            {"PORTAL_SMS_GATEWAY_URL": ""},
            "accounts.E002",
            "PORTAL_SMS_BACKEND is http but PORTAL_SMS_GATEWAY_URL is not set.",
        ),
        (
            {"PORTAL_SMS_GATEWAY_TOKEN": ""},
            "accounts.E012",
            "PORTAL_SMS_BACKEND is http but PORTAL_SMS_GATEWAY_TOKEN is not set",
        ),
    ],
)
def test_the_deploy_check_fails_while_codes_would_not_reach_recipients(
    tmp_path: Path, change: dict[str, str], check_id: str, message: str
) -> None:
    result = check_deploy({**production(tmp_path), **change})

    assert result.returncode == 1
    assert f"({check_id}) {message}" in result.stderr
    assert "System check identified 1 issue" in result.stderr


def test_the_defaults_of_a_new_installation_fail_the_deploy_check(tmp_path: Path) -> None:
    """Console mail and console SMS, as the demo has them: both refused, as errors."""
    result = manage(
        "check",
        "--deploy",
        env={
            "PORTAL_BASE_URL": "https://images.example.org",
            "PORTAL_STORE_DIR": str(tmp_path / "store"),
            "PORTAL_BROKER_DIR": str(tmp_path / "broker"),
            "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        },
    )

    assert result.returncode == 1
    assert "accounts.E010" in result.stderr and "accounts.E011" in result.stderr
