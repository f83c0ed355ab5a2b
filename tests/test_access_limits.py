"""Abuse of the unauthenticated recipient URLs, played against gunicorn with two workers and
Redis as the shared cache: the link token in logs, junk requests, parallel guesses, and a
guessing campaign spread over many addresses."""

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from django.contrib.sessions.models import Session
from django.core import mail
from django.test import Client
from playwright.sync_api import expect, sync_playwright

from accounts import credentials
from accounts.models import AuditEvent
from tests.support.access import last_code, link_token, make_share, make_study
from tests.support.gunicorn import PortalServer
from tests.test_recipient_browser import CHROMIUM_ARGS

needs_redis = pytest.mark.skipif(
    not os.environ.get("REDIS_URL"), reason="two workers share their counters through Redis"
)


def _csrf(server: PortalServer) -> str:
    response = requests.get(server.url + "/access/", timeout=10)
    return str(response.cookies["csrftoken"])


def _post_code(server: PortalServer, csrf: str, code: str, **headers: str) -> int:
    data = {"code": code, "captcha_0": "x", "captcha_1": "PASSED", "csrfmiddlewaretoken": csrf}
    response = requests.post(
        server.url + "/access/",
        data=data,
        cookies={"csrftoken": csrf},
        headers={"Connection": "close", **headers},
        allow_redirects=False,
        timeout=30,
    )
    return response.status_code


def _evaluated() -> int:
    """Codes that reached the hash check and failed (a refusal unchecked says "locked-out")."""
    failed = AuditEvent.objects.filter(action=AuditEvent.Action.CODE_FAILED)
    return failed.exclude(detail__reason="locked-out").count()


def _random_code() -> str:
    return credentials.format_code(credentials.new_prefix() + "0" * 12)


@pytest.mark.django_db(transaction=True)
def test_the_link_token_reaches_no_log_and_no_audit_row(tmp_path: Path, monkeypatch) -> None:
    """The whole patient path in Chromium against gunicorn: the link (`/s/#<token>`), the
    one-time code, the viewer. Neither gunicorn's access log, the application's log nor any
    audit row holds the token."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    make_study()
    with PortalServer(workdir=tmp_path / "gunicorn") as server:
        monkeypatch.setattr("django.conf.settings.BASE_URL", server.url)
        created = make_share()
        token = link_token(created)
        assert created.url == f"{server.url}/s/#{token}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
            )
            page = browser.new_page()
            page.goto(created.url)
            expect(page).to_have_url(server.url + "/access/verify")
            page.get_by_role("button", name="Send me a code").click()
            expect(page.get_by_text("We have sent you a code")).to_be_visible()
            page.get_by_label("One-time code").fill(last_code(server.sms_dir))
            page.get_by_role("button", name="Confirm").click()
            expect(page).to_have_url(server.url + "/viewer/")
            history = page.evaluate("window.history.length")
            assert token not in page.url
            browser.close()
        logs = server.logs()
    assert '"POST /s/ HTTP/1.1" 302' in logs and '"GET /viewer/ HTTP/1.1" 200' in logs
    raw = token.split(".", 1)[0]
    assert raw not in logs
    audit = [str(e) for e in AuditEvent.objects.values()]
    assert any("link_opened" in e for e in audit) and history >= 1
    assert not any(raw in e for e in audit)


@pytest.mark.django_db
def test_junk_links_write_no_session(study) -> None:
    before = Session.objects.count()
    for i in range(200):
        client = Client()
        response = client.get("/s/x" + str(i), REMOTE_ADDR="203.0.113.40", follow=True)
        assert response.status_code == 200
        assert b"This link or code does not work" in response.content
        client.post("/s/", {"token": "junk"}, REMOTE_ADDR="203.0.113.40")
        client.get("/access/verify", REMOTE_ADDR="203.0.113.40")
    assert Session.objects.count() == before


@pytest.mark.django_db
def test_the_request_budget_answers_429_to_one_address_only(settings) -> None:
    settings.RECIPIENT_REQUESTS_PER_MINUTE = 10
    settings.TRUSTED_PROXIES = ["127.0.0.1"]
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)  # the whole test within one minute's budget
    for path in ["/access/", "/s/", "/captcha/refresh/"] * 3 + ["/access/"]:
        assert Client().get(path, HTTP_X_FORWARDED_FOR="203.0.113.50").status_code != 429
    response = Client().get("/access/", HTTP_X_FORWARDED_FOR="203.0.113.50")
    assert response.status_code == 429
    assert 1 <= int(response["Retry-After"]) <= 60
    assert Client().get("/captcha/refresh/", HTTP_X_FORWARDED_FOR="203.0.113.50").status_code == 429
    # Another address still passes; pages that are no recipient entry are not counted.
    assert Client().get("/access/", HTTP_X_FORWARDED_FOR="198.51.100.50").status_code == 200
    assert Client().get("/healthz", HTTP_X_FORWARDED_FOR="203.0.113.50").status_code == 200


@needs_redis
@pytest.mark.django_db(transaction=True)
def test_the_request_budget_holds_across_two_workers(tmp_path: Path) -> None:
    env = {"PORTAL_RECIPIENT_REQUESTS_PER_MINUTE": "20", "PORTAL_TRUSTED_PROXIES": "127.0.0.1"}
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)
    with PortalServer(workdir=tmp_path / "gunicorn", env=env) as server:
        attacker = {"X-Forwarded-For": "203.0.113.60", "Connection": "close"}
        with ThreadPoolExecutor(8) as pool:
            statuses = list(
                pool.map(
                    lambda _i: (
                        requests.get(
                            server.url + "/s/x", headers=attacker, allow_redirects=False, timeout=30
                        ).status_code
                    ),
                    range(40),
                )
            )
        assert statuses.count(429) == 20, statuses
        other = {"X-Forwarded-For": "198.51.100.60"}
        assert requests.get(server.url + "/access/", headers=other, timeout=10).status_code == 200
        assert len(server.worker_pids()) == 2


@needs_redis
@pytest.mark.django_db(transaction=True)
def test_parallel_guesses_are_checked_five_times_at_most(tmp_path: Path) -> None:
    """40 wrong codes at once from one address, over two workers: no more are checked than the
    lockout allows (5); then 40 at once at one share from 40 addresses."""
    make_study()
    created = make_share()
    env = {"PORTAL_RECIPIENT_REQUESTS_PER_MINUTE": "0", "PORTAL_TRUSTED_PROXIES": "127.0.0.1"}
    with PortalServer(workdir=tmp_path / "gunicorn", env=env) as server:
        csrf = _csrf(server)
        attacker = {"X-Forwarded-For": "203.0.113.70"}
        with ThreadPoolExecutor(40) as pool:
            statuses = list(
                pool.map(lambda _i: _post_code(server, csrf, _random_code(), **attacker), range(40))
            )
        assert _evaluated() <= 5, statuses
        assert statuses.count(429) >= 35
        before = _evaluated()
        right = created.access_code.replace("-", "")
        wrong = credentials.format_code(right[:4] + ("1" if right[4] == "0" else "0") + right[5:])
        with ThreadPoolExecutor(40) as pool:
            statuses = list(
                pool.map(
                    lambda i: _post_code(
                        server, csrf, wrong, **{"X-Forwarded-For": f"198.51.100.{i + 1}"}
                    ),
                    range(40),
                )
            )
        assert _evaluated() - before <= 5, statuses
        assert len(server.worker_pids()) == 2


@needs_redis
@pytest.mark.django_db(transaction=True)
def test_parallel_guesses_meet_the_captcha_after_three(tmp_path: Path) -> None:
    env = {"PORTAL_RECIPIENT_REQUESTS_PER_MINUTE": "0", "PORTAL_TRUSTED_PROXIES": "127.0.0.1"}
    with PortalServer(workdir=tmp_path / "gunicorn", env=env) as server:
        csrf = _csrf(server)

        def guess(_i: int) -> int:
            data = {"code": _random_code(), "csrfmiddlewaretoken": csrf}
            return requests.post(
                server.url + "/access/",
                data=data,
                cookies={"csrftoken": csrf},
                headers={"X-Forwarded-For": "203.0.113.80", "Connection": "close"},
                timeout=30,
            ).status_code

        with ThreadPoolExecutor(40) as pool:
            list(pool.map(guess, range(40)))
        # Without the captcha's answer, no more than 3 were checked.
        assert _evaluated() <= 3


@pytest.mark.django_db
def test_a_guessing_campaign_from_many_addresses_raises_one_alert(settings) -> None:
    settings.TRUSTED_PROXIES = ["192.0.2.10"]
    settings.ALERT_FAILURES_PER_MINUTE = 10
    settings.SECURITY_EMAIL = "security@hospital.example"
    make_study()
    make_share()
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)
    for i in range(25):
        Client().post(
            "/access/",
            {"code": _random_code()},
            REMOTE_ADDR="192.0.2.10",
            HTTP_X_FORWARDED_FOR=f"198.51.100.{i + 1}",
        )
    alerts = AuditEvent.objects.filter(action=AuditEvent.Action.FAILURE_ALERT)
    assert alerts.count() == 1
    assert alerts.get().detail["failures"] == 11
    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == ["security@hospital.example"]
    assert re.search(r"\b11 links or access codes failed", str(mail.outbox[0].body))
    # Nobody was locked out: one failure per address, on as many shares.
    assert _evaluated() == 25


@pytest.mark.django_db
def test_with_auto_close_a_guessing_campaign_closes_recipient_access(settings) -> None:
    settings.TRUSTED_PROXIES = ["192.0.2.10"]
    settings.ALERT_FAILURES_PER_MINUTE = 10
    settings.AUTO_CLOSE = True
    make_study()
    make_share()
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)
    answers = [
        Client()
        .post(
            "/access/",
            {"code": _random_code()},
            REMOTE_ADDR="192.0.2.10",
            HTTP_X_FORWARDED_FOR=f"198.51.100.{i + 1}",
        )
        .status_code
        for i in range(15)
    ]
    assert 503 in answers  # the guesses after the alert meet the closed portal
    assert AuditEvent.objects.filter(action=AuditEvent.Action.RECIPIENTS_CLOSED).count() == 1
    page = Client().get("/access/", REMOTE_ADDR="203.0.113.9")
    assert page.status_code == 503 and "safety reasons" in page.content.decode()
