"""The deployment files agree with the code: the environment file names every variable the
settings read, the systemd units start what the README says with their hardening, and the
gunicorn configuration loads (deploy/nginx/portal.conf is run by tests/test_deploy_nginx.py)."""

import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

BASE_DIR = Path(settings.BASE_DIR)
DEPLOY = BASE_DIR / "deploy"
UNITS = {
    "portal-web.service": "gunicorn --config /opt/portal/deploy/gunicorn.conf.py portal.wsgi",
    "portal-worker.service": "celery -A portal worker",
    "portal-beat.service": "celery -A portal beat",
    "portal-storescp.service": "manage.py run_storescp",
}
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "PrivateTmp": "yes",
    "ReadWritePaths": "/srv/portal/store",
    "CapabilityBoundingSet": "",
}


def test_the_environment_file_names_every_variable_the_settings_read() -> None:
    source = (BASE_DIR / "portal" / "settings.py").read_text()
    read = set(re.findall(r'env\.\w+\(\s*"([A-Z_]+)"', source))
    example = (DEPLOY / "portal.env.example").read_text()
    named = set(re.findall(r"^#? ?([A-Z_]+?)(?:_FILE)?=", example, re.MULTILINE))

    assert read, "no variable found in the settings"
    assert sorted(read - named) == []


def test_the_environment_file_gives_secrets_as_files() -> None:
    example = (DEPLOY / "portal.env.example").read_text()
    for secret in (
        "PORTAL_SECRET_KEY",
        "DATABASE_URL",
        "EMAIL_HOST_PASSWORD",
        "PORTAL_SMS_GATEWAY_TOKEN",
    ):
        assert re.search(rf"^{secret}_FILE=/etc/portal/secrets/", example, re.MULTILINE)
        assert not re.search(rf"^{secret}=", example, re.MULTILINE)


@pytest.mark.parametrize(("unit", "command"), UNITS.items())
def test_each_unit_runs_its_part_hardened(unit: str, command: str) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / unit)
    service = parser["Service"]

    assert command in service["ExecStart"]
    assert service["EnvironmentFile"] == "/etc/portal/portal.env"
    assert service["User"] == "portal"
    for key, value in HARDENING.items():
        assert service[key] == value, key


def test_the_gunicorn_configuration_loads() -> None:
    """gunicorn's own check of the file, as the unit runs it: threads, a logger that redacts."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            str(DEPLOY / "gunicorn.conf.py"),
            "--print-config",
            "portal.wsgi",
        ],
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    printed = dict(
        line.split("=", 1) for line in result.stdout.replace(" ", "").splitlines() if "=" in line
    )
    assert printed["worker_class"] == "gthread"
    assert printed["logger_class"] == "portal.access_log.JsonLogger"
    assert int(printed["timeout"]) >= 300
    assert printed["control_socket_disable"] == "True"
