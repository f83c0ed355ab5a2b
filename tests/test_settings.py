"""Settings and system checks: the defaults start, a misconfiguration stops every process at
start-up, and the health check answers."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.test import Client
from pytest_django.fixtures import Settings

from portal import checks
from tests.support import free_port

BASE_DIR = Path(django_settings.BASE_DIR)


def manage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`manage.py` in a fresh process with the environment of a new installation (no
    configuration at all) plus `env`."""
    clean = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PORTAL_", "CELERY_", "EMAIL_"))
        and key not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}
    }
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_passes_with_the_defaults() -> None:
    result = manage("check", "--fail-level", "WARNING")

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.parametrize("ae_title", ["A_VERY_LONG_AE_TITLE", "BAD\\TITLE", "   "])
def test_an_invalid_ae_title_fails_the_checks_with_e002(ae_title: str) -> None:
    result = manage("check", env={"PORTAL_AE_TITLE": ae_title})

    assert result.returncode == 1
    assert "portal.E002" in result.stderr
    assert f"PORTAL_AE_TITLE {ae_title!r} is not a valid AE title." in result.stderr


def test_the_storage_scp_does_not_start_with_an_invalid_ae_title() -> None:
    port = free_port()

    result = manage(
        "run_storescp",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        env={"PORTAL_AE_TITLE": "SEVENTEEN_CHARS_X"},
    )

    assert result.returncode == 1
    assert "portal.E002" in result.stderr
    assert "listening" not in result.stdout
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_the_dicom_port_and_the_broker_scheme_are_checked(settings: Settings) -> None:
    settings.DICOM_PORT = 0
    settings.CELERY_BROKER_URL = "amqp://guest@rabbit//"

    found = {error.id: error.msg for error in checks.check_dicom_settings(None)}

    assert set(found) == {"portal.E003", "portal.E004"}
    assert "amqp://guest@rabbit//" in found["portal.E004"]


def test_valid_dicom_settings_give_no_error(settings: Settings) -> None:
    settings.DICOM_AE_TITLE = "PORTAL_PACS_01"
    settings.DICOM_PORT = 104
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/3"

    assert checks.check_dicom_settings(None) == []


def test_the_deploy_check_refuses_the_demo_secret_key(settings: Settings) -> None:
    settings.SECRET_KEY = django_settings.INSECURE_DEMO_KEY
    assert [e.id for e in checks.check_secret_key(None)] == ["portal.E001"]

    settings.SECRET_KEY = "k" * 64
    assert checks.check_secret_key(None) == []


@pytest.mark.django_db
def test_healthz_answers_200_json_and_is_never_cached(client: Client) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"status": "ok"}
    assert "no-store" in response["Cache-Control"]


@pytest.mark.django_db
def test_healthz_only_answers_get(client: Client) -> None:
    assert client.post("/healthz").status_code == 405
