"""The emergency close of recipient access: the CISO closes it while the portal is under
attack, every recipient URL on every process answers 503, live recipient sessions end, staff
work goes on, and reopening does not resume the sessions the close ended."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib.sessions.backends.db import SessionStore
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from accounts import selectors, services
from accounts.models import AuditEvent, User
from tests.support import free_port, terminate
from tests.support.access import make_share, make_study, sign_in
from tests.support.staff import admin_user, staff_client

BASE_DIR = Path(__file__).resolve().parent.parent
RECIPIENT_URLS = [
    "/",
    "/s/",
    "/access/",
    "/access/verify",
    "/viewer/",
    "/dicomweb/studies",
    "/download/1.2.3.zip",
    "/ohif/viewer",
]


def session_cookie(client: Client) -> str:
    return client.cookies[django_settings.SESSION_COOKIE_NAME].value


def _database_url() -> str:
    """The test database, as the servers started here must name it."""
    database = connection.settings_dict
    if database["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{database['NAME']}"
    user, host, port = database["USER"], database["HOST"] or "127.0.0.1", database["PORT"]
    password = f":{database['PASSWORD']}" if database["PASSWORD"] else ""
    return f"postgres://{user}{password}@{host}:{port or 5432}/{database['NAME']}"


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PORTAL_SECRET_KEY": django_settings.SECRET_KEY,
        "DATABASE_URL": _database_url(),
        "PORTAL_STORE_DIR": str(django_settings.STORE_DIR),
        "PORTAL_BROKER_DIR": str(tmp_path / "broker"),
        # Plain static file names: these servers run without collectstatic.
        "PORTAL_DEBUG": "true",
    }


def _gunicorn(port: int, env: dict[str, str]) -> "subprocess.Popen[bytes]":
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "portal.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
        ],
        cwd=BASE_DIR,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"gunicorn on {port} did not start"
            time.sleep(0.1)


def get(port: int, path: str, *, cookie: str = "", language: str = "en") -> tuple[int, Any, str]:
    connection_ = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    headers = {"Accept-Language": language}
    if cookie:
        headers["Cookie"] = f"{django_settings.SESSION_COOKIE_NAME}={cookie}"
    connection_.request("GET", path, headers=headers)
    response = connection_.getresponse()
    body = response.read().decode("utf-8", "replace")
    connection_.close()
    return response.status, response, body


def manage(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "manage.py", *args, "--json"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture
def two_nodes(transactional_db: Any, tmp_path: Path) -> Iterator[tuple[int, int]]:
    """Two gunicorn servers on the one database, as two machines behind a load balancer."""
    env = _env(tmp_path)
    ports = free_port(), free_port()
    servers = [_gunicorn(port, env) for port in ports]
    try:
        for port in ports:
            _wait_for(port)
        yield ports
    finally:
        for server in servers:
            terminate(server)


@pytest.mark.django_db(transaction=True)
def test_it_closes_every_recipient_url_on_every_node_and_ends_live_sessions(
    two_nodes: tuple[int, int], tmp_path: Path, sms_dir: Path
) -> None:
    first, second = two_nodes
    env = _env(tmp_path)
    make_study()
    # Alice looks at her images; Bob signed in too but is away from his screen.
    alice, bob = Client(), Client()
    sign_in(alice, make_share(), sms_dir)
    sign_in(bob, make_share(contact="+33612345643"), sms_dir)
    alice_cookie, bob_cookie = session_cookie(alice), session_cookie(bob)
    assert get(first, "/viewer/", cookie=alice_cookie)[0] == 200
    assert get(second, "/viewer/", cookie=bob_cookie)[0] == 200

    closed = manage(env, "recipients", "close", "--message", "<b>Maintenance</b> until 14:00")
    assert closed["closed"] is True

    for port in two_nodes:
        for path in RECIPIENT_URLS:
            status, response, body = get(port, path)
            assert status == 503, (port, path, status)
            assert response.getheader("Retry-After") == "300"
            assert "no-store" in response.getheader("Cache-Control")
            assert "Temporarily unavailable" in body
            # The message is shown, as text.
            assert "&lt;b&gt;Maintenance&lt;/b&gt; until 14:00" in body
            assert "<b>Maintenance" not in body
        # Staff work and the load balancer's probe are unaffected.
        assert get(port, "/staff/login/")[0] == 200
        assert get(port, "/healthz")[0] == 200
        status, _response, body = get(port, "/viewer/", language="fr")
        assert status == 503 and "Temporairement indisponible" in body

    # Alice's next request (on the other node) ends her session.
    assert get(second, "/viewer/", cookie=alice_cookie)[0] == 503
    assert not SessionStore().exists(alice_cookie)

    state = manage(env, "recipients", "status")
    assert state["closed"] is True and state["message"] == "<b>Maintenance</b> until 14:00"
    assert manage(env, "recipients", "open")["closed"] is False

    # Reopened: neither session resumes, not even Bob's, which made no request meanwhile.
    for port, cookie in ((first, alice_cookie), (first, bob_cookie), (second, bob_cookie)):
        status, response, _body = get(port, "/viewer/", cookie=cookie)
        assert status == 302 and response.getheader("Location") == "/access/"
    assert get(first, "/access/")[0] == 200
    # A recipient who starts again gets in.
    carol = Client()
    sign_in(carol, make_share(contact="+33612345644"), sms_dir)
    assert get(second, "/viewer/", cookie=session_cookie(carol))[0] == 200

    actions = list(
        AuditEvent.objects.filter(
            action__in=[AuditEvent.Action.RECIPIENTS_CLOSED, AuditEvent.Action.RECIPIENTS_OPENED]
        )
        .order_by("at", "pk")
        .values_list("action", flat=True)
    )
    assert actions == [AuditEvent.Action.RECIPIENTS_CLOSED, AuditEvent.Action.RECIPIENTS_OPENED]
    ended = AuditEvent.objects.filter(
        action=AuditEvent.Action.SESSION_EXPIRED, detail__reason="recipients_closed"
    )
    assert ended.count() == 2


@pytest.mark.django_db
class TestTheCloseInOneProcess:
    def test_it_is_open_by_default(self) -> None:
        assert selectors.recipients_closed() is None
        assert Client().get("/access/").status_code == 200

    def test_static_files_and_the_language_switch_stay_up(self, settings: Any) -> None:
        services.recipients_close(message="")
        client = Client()
        assert client.get("/access/").status_code == 503
        response = client.post("/i18n/setlang/", {"language": "fr", "next": "/access/"})
        assert response.status_code == 302
        assert "Temporairement indisponible" in client.get("/access/").content.decode()

    def test_a_staff_session_is_not_touched(
        self,
    ) -> None:

        admin_client = staff_client(admin_user())
        services.recipients_close(message="")
        assert admin_client.get("/admin/").status_code == 200
        assert admin_client.get("/admin/accounts/share/").status_code == 200

    def test_the_admin_closes_and_opens_with_audit_events(
        self,
    ) -> None:

        admin_client = staff_client(admin_user())
        admin = User.objects.get(username="admin")
        page = admin_client.get("/admin/accounts/recipientaccess/")
        assert page.status_code == 200 and b"Recipient access is open." in page.content
        response = admin_client.post(
            "/admin/accounts/recipientaccess/", {"action": "close", "message": "Back at 14:00"}
        )
        assert response.status_code == 302
        closure = selectors.recipients_closed()
        assert closure is not None and closure.message == "Back at 14:00"
        assert b"Back at 14:00" in Client().get("/viewer/").content
        event = AuditEvent.objects.get(action=AuditEvent.Action.RECIPIENTS_CLOSED)
        assert event.actor == admin and event.ip_address == "127.0.0.1"
        admin_client.post("/admin/accounts/recipientaccess/", {"action": "open"})
        assert selectors.recipients_closed() is None
        assert AuditEvent.objects.get(action=AuditEvent.Action.RECIPIENTS_OPENED).actor == admin

    def test_a_user_without_the_permission_cannot_close(self) -> None:
        # A sharer does not reach the admin at all (403 even when signed in with a second
        # factor); an administrator without the permission reaches it but cannot close.
        clerk = User.objects.create_user("clerk", password="x" * 16, is_staff=True)
        response = staff_client(clerk).post("/admin/accounts/recipientaccess/", {"action": "close"})
        assert response.status_code == 403
        deputy = User.objects.create_user(
            "deputy", password="x" * 16, is_staff=True, role=User.Role.ADMIN
        )
        response = staff_client(deputy).post(
            "/admin/accounts/recipientaccess/", {"action": "close"}
        )
        assert response.status_code == 403
        assert selectors.recipients_closed() is None

    def test_the_state_is_read_once_per_request(self, share: Any, sms_dir: Path) -> None:
        client = Client()
        sign_in(client, share, sms_dir)
        with CaptureQueriesContext(connection) as queries:
            client.get("/dicomweb/studies")
        reads = [q for q in queries.captured_queries if "recipientaccess" in q["sql"]]
        assert len(reads) == 1

    def test_status_prints_json(self, capsys: Any) -> None:
        call_command("recipients", "close", "--message", "Attaque", "--json")
        closed = json.loads(capsys.readouterr().out)
        assert closed["closed"] is True and closed["message"] == "Attaque"
        call_command("recipients", "status", "--json")
        assert json.loads(capsys.readouterr().out)["closed"] is True
        # Closing twice keeps the first moment and records both.
        since = closed["since"]
        call_command("recipients", "close", "--json")
        assert json.loads(capsys.readouterr().out)["since"] == since
        assert AuditEvent.objects.filter(action=AuditEvent.Action.RECIPIENTS_CLOSED).count() == 2
