"""The deployment files agree with the code: the environment file names every variable the
settings read, the systemd units start what the README says with their hardening, and the
gunicorn configuration loads (deploy/nginx/portal.conf is run by tests/test_deploy_nginx.py)."""

import configparser
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from django.conf import settings

from tests.support.gunicorn import PortalServer

BASE_DIR = Path(settings.BASE_DIR)
DEPLOY = BASE_DIR / "deploy"
GUNICORN_CONF = DEPLOY / "gunicorn.conf.py"
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
    # Writable: the store (and, for the worker, the audit archive), nothing else.
    writable = service["ReadWritePaths"].split()
    assert writable[0] == "/srv/portal/store"
    assert set(writable) <= {"/srv/portal/store", "/srv/portal/audit"}


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


@pytest.mark.django_db(transaction=True)
def test_no_access_log_format_can_show_a_credential(tmp_path: Path) -> None:
    """An operator who asks gunicorn (text logs) for the request line, the query string, the
    referrer, the cookie and Authorization headers and the environment still gets no token."""
    hostile = (
        "%(r)s %(U)s %(q)s %(f)s %({cookie}i)s %({authorization}i)s %({referer}i)s"
        " %({query_string}e)s %({raw_uri}e)s %({x-request-id}o)s"
    )
    link, query, session, bearer = (secrets.token_urlsafe(24) for _ in range(4))
    env = {
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "PORTAL_LOG_FORMAT": "text",
        "GUNICORN_CMD_ARGS": f"--access-logformat {shlex.quote(hostile)}",
    }
    with PortalServer(workdir=tmp_path / "gunicorn", config=GUNICORN_CONF, env=env) as web:
        response = requests.get(
            f"{web.url}/s/{link}?access_token={query}",
            headers={
                "Cookie": f"portal_session={session}",
                "Authorization": f"Bearer {bearer}",
                "Referer": f"https://elsewhere.example/s/{link}",
            },
            allow_redirects=False,
            timeout=30,
        )
        assert response.status_code in {302, 404}
    line = web.access_log.read_text().strip().splitlines()[-1]

    assert line.startswith("GET /s/[redacted] HTTP/1.1 /s/[redacted] - - - - - - - ")
    assert line.endswith(response.headers["X-Request-ID"])
    for secret in (link, query, session, bearer):
        assert secret not in web.logs()
