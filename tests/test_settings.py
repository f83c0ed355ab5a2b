"""Settings and system checks: the defaults start, a misconfiguration stops every process at
start-up, and the health check answers."""

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.test import Client
from pytest_django.fixtures import Settings

from portal import checks
from studies import dicom
from tests.support import free_port

BASE_DIR = Path(django_settings.BASE_DIR)


# The one setting a new installation cannot do without (with DEBUG off, the portal refuses to
# start with the demo key).
NEW_KEY = secrets.token_urlsafe(50)


def new_installation(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a new installation (nothing configured but its secret key, unless
    `env` gives the key another way or turns debug mode on) plus `env`."""
    clean = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PORTAL_", "CELERY_", "EMAIL_"))
        and key not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE"}
    }
    env = env or {}
    if not {"PORTAL_SECRET_KEY", "PORTAL_SECRET_KEY_FILE", "PORTAL_DEBUG"} & set(env):
        clean["PORTAL_SECRET_KEY"] = NEW_KEY
    clean.update(env)
    return clean


def manage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`manage.py` in a fresh process with the environment of a new installation plus `env`."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env=new_installation(env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_passes_with_the_defaults() -> None:
    result = manage("check", "--fail-level", "WARNING")

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.parametrize("ae_title", ["A_VERY_LONG_AE_TITLE", "BAD\\TITLE", "   ", "PORTÄL"])
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
    assert response.json()["status"] == "ok"
    assert "no-store" in response["Cache-Control"]


@pytest.mark.django_db
def test_healthz_only_answers_get(client: Client) -> None:
    assert client.post("/healthz").status_code == 405


def test_the_storage_scp_refuses_an_invalid_ae_title_given_as_an_option() -> None:
    port = free_port()

    result = manage("run_storescp", "--bind", "127.0.0.1", "--port", str(port), "--aet", "BAD\\AE")

    assert result.returncode == 1
    assert "--aet 'BAD\\\\AE' is not a valid AE title" in result.stderr
    assert "listening" not in result.stdout
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize(
    "name",
    [
        "DICOM_CONNECT_TIMEOUT",
        "DICOM_DIMSE_TIMEOUT",
        "DICOM_NETWORK_TIMEOUT",
        "DICOM_RETRIEVE_TIMEOUT",
        "DICOMWEB_TIMEOUT",
    ],
)
@pytest.mark.parametrize("value", [0.0, -5.0])
def test_a_timeout_of_zero_or_less_is_an_error(settings: Settings, name: str, value: float) -> None:
    setattr(settings, name, value)

    found = {error.id: error.msg for error in checks.check_dicom_settings(None)}

    assert set(found) == {"portal.E005"}
    assert found["portal.E005"] == (
        f"PORTAL_{name} is {value:g}: a timeout must be more than 0 seconds."
    )


def test_an_in_memory_broker_is_an_error_unless_tasks_run_in_the_caller(
    settings: Settings,
) -> None:
    settings.CELERY_BROKER_URL = "memory://"
    settings.CELERY_TASK_ALWAYS_EAGER = False
    assert [e.id for e in checks.check_dicom_settings(None)] == ["portal.E006"]

    settings.CELERY_TASK_ALWAYS_EAGER = True
    assert checks.check_dicom_settings(None) == []


def test_the_file_system_broker_is_a_warning_for_a_deployment(settings: Settings) -> None:
    settings.CELERY_BROKER_URL = "filesystem://localhost/"
    warnings = checks.check_broker_for_deployment(None)
    assert [w.id for w in warnings] == ["portal.W001"]
    assert "redis://" in (warnings[0].hint or "")

    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/0"
    assert checks.check_broker_for_deployment(None) == []


def test_the_file_system_broker_fails_check_deploy_at_the_warning_level(tmp_path: Path) -> None:
    """A production configuration that forgot CELERY_BROKER_URL: that is its only issue."""
    production = {
        "PORTAL_SECRET_KEY": secrets.token_urlsafe(64),
        "PORTAL_BASE_URL": "https://portal.example.org",
        "PORTAL_ALLOWED_HOSTS": "portal.example.org",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'deploy.sqlite3'}",
        "PORTAL_BROKER_DIR": str(tmp_path / "broker"),
        "PORTAL_STORE_DIR": str(tmp_path / "store"),
        "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        "PORTAL_SMS_BACKEND": "http",
        "PORTAL_SMS_GATEWAY_URL": "https://sms.example.org/v1/messages",
        "PORTAL_SMS_GATEWAY_TOKEN": secrets.token_urlsafe(32),
    }

    result = manage("check", "--deploy", "--fail-level", "WARNING", env=production)

    assert result.returncode == 1
    assert "portal.W001" in result.stderr
    assert "System check identified 1 issue" in result.stderr

    with_redis = manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        env={**production, "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0"},
    )
    assert with_redis.returncode == 0, with_redis.stderr


def test_a_store_the_portal_cannot_write_to_is_an_error(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    settings.STORE_DIR = tmp_path / "a-file" / "store"

    found = {error.id: error.msg for error in checks.check_dicom_settings(None)}

    assert set(found) == {"portal.E007"}
    assert found["portal.E007"] == (
        f"PORTAL_STORE_DIR {str(settings.STORE_DIR)!r} is not a folder the portal can write to "
        "(Not a directory)."
    )


def test_the_store_check_creates_the_store_and_leaves_nothing_in_it(
    settings: Settings, tmp_path: Path
) -> None:
    settings.STORE_DIR = tmp_path / "new" / "store"

    assert checks.check_dicom_settings(None) == []
    assert list((tmp_path / "new" / "store").iterdir()) == []


def test_redis_hands_a_message_to_another_worker_only_after_the_lease() -> None:
    result = manage(
        "shell",
        "-c",
        "from django.conf import settings as s; "
        "print(s.RETRIEVAL_LEASE, s.CELERY_BROKER_TRANSPORT_OPTIONS['visibility_timeout'])",
        env={"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0", "PORTAL_RETRIEVAL_LEASE": "600"},
    )

    assert result.returncode == 0, result.stderr
    lease, visibility = map(int, result.stdout.splitlines()[-1].split())
    assert lease == 600
    assert visibility > lease


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("1.2.840.10008.1.2", True),
        ("1.2.840.10008.1.2\n", False),
        ("1.2.840.10008.1.2\r", False),
        ("1.2.3/../4", False),
        ("", False),
        ("1." + "2" * 63, False),
    ],
)
def test_a_uid_is_digits_and_dots_and_nothing_after(value: str, valid: bool) -> None:
    assert dicom.is_valid_uid(value) is valid


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("PORTAL", True),
        ("  PACS_01 ", True),
        ("ÉCHO", False),
        ("PAC\u00a0S", False),
        ("A\\B", False),
        ("TAB\tAE", False),
        ("", False),
        ("SEVENTEEN_CHARS_X", False),
    ],
)
def test_an_ae_title_is_printable_ascii_without_backslash(value: str, valid: bool) -> None:
    assert dicom.is_valid_ae_title(value) is valid


def python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Python in a fresh process with the environment of a new installation plus `env`."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=BASE_DIR,
        env=new_installation({**env, "DJANGO_SETTINGS_MODULE": "portal.settings"}),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_importing_the_settings_creates_no_folder_and_starting_the_apps_does(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "fresh"
    folder.mkdir()
    env = {
        "DATABASE_URL": f"sqlite:///{folder / 'db' / 'portal.sqlite3'}",
        "PORTAL_BROKER_DIR": str(folder / "broker"),
    }
    imported = python("import portal.settings", env)
    assert imported.returncode == 0, imported.stderr
    assert list(folder.iterdir()) == []

    started = python("import django; django.setup()", env)
    assert started.returncode == 0, started.stderr
    assert (folder / "db").is_dir()
    assert {p.name for p in (folder / "broker").iterdir()} == {"queue", "processed", "control"}


def test_a_secret_may_come_from_a_file(tmp_path: Path) -> None:
    """Containers and systemd hand secrets out as files: PORTAL_SECRET_KEY_FILE names one."""
    key = secrets.token_urlsafe(64)
    (tmp_path / "secret_key").write_text(key + "\n")  # as `echo KEY > file` writes it

    result = python(
        "from django.conf import settings; print(repr(settings.SECRET_KEY))",
        {"PORTAL_SECRET_KEY_FILE": str(tmp_path / "secret_key")},
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr(key)


def test_a_lease_of_zero_is_an_error(settings: Settings) -> None:
    settings.RETRIEVAL_LEASE = 0
    assert [e.id for e in checks.check_dicom_settings(None)] == ["portal.E008"]


def test_a_redis_visibility_timeout_shorter_than_a_retrieval_is_a_warning(
    settings: Settings,
) -> None:
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/0"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 600}
    warnings = checks.check_broker_redelivery(None)
    assert [w.id for w in warnings] == ["portal.W002"]
    assert "(600 s) is shorter than a retrieval may last (3630 s" in warnings[0].msg

    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 4 * 3600}
    assert checks.check_broker_redelivery(None) == []
    settings.CELERY_BROKER_URL = "filesystem://localhost/"
    assert checks.check_broker_redelivery(None) == []


def test_the_default_redis_settings_pass_the_redelivery_check() -> None:
    result = manage(
        "check", "--fail-level", "WARNING", env={"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0"}
    )
    assert result.returncode == 0, result.stderr
    assert "portal.W002" not in result.stderr
