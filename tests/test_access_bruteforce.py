"""Brute force on access codes and links: by one address, by many, with forged headers."""

import re
import time
from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from captcha.models import CaptchaStore
from django.conf import settings
from django.db.models import F
from django.test import Client
from django.utils import timezone

from accounts import credentials, net, selectors
from accounts.models import AuditEvent, Share
from tests.support.access import (
    legacy_link_path,
    link_token,
    make_share,
    open_link,
    post_link,
    share_of,
)

pytestmark = pytest.mark.django_db

ATTACKER = "203.0.113.66"


@pytest.fixture
def captcha_passes(monkeypatch):
    """These tests are about lockouts: the captcha that appears after 3 failures is answered
    with django-simple-captcha's test answer (the captcha itself is tested below). The app
    reads its settings once, at import."""
    monkeypatch.setattr("captcha.conf.settings.CAPTCHA_TEST_MODE", True)


def wrong_code_for(created) -> str:
    """A code with the share's public prefix and a wrong secret."""
    right = created.access_code.replace("-", "")
    secret = "".join("0" if ch != "0" else "1" for ch in right[4:])
    return credentials.format_code(right[:4] + secret)


def random_code() -> str:
    return credentials.format_code(credentials.new_prefix() + "0" * 12)


def post_code(client: Client, code: str, ip: str, **extra):
    data = {"code": code, "captcha_0": "x", "captcha_1": "PASSED"}
    return client.post("/access/", data, REMOTE_ADDR=ip, **extra)


class TestCodesFromOneAddress:
    def test_it_locks_the_address_after_5_failures_with_a_429(self, share, captcha_passes):
        client = Client()
        for _ in range(4):
            response = post_code(client, random_code(), ATTACKER)
            assert response.status_code == 200
            assert b"does not work" in response.content
        response = post_code(client, random_code(), ATTACKER)
        assert response.status_code == 429
        assert b"15 minutes" in response.content
        assert response["Retry-After"] == "900"
        assert AuditEvent.objects.filter(action=AuditEvent.Action.LOCKOUT).exists()

    def test_it_refuses_even_the_right_code_during_the_cool_off(self, share, captcha_passes):
        client = Client()
        for _ in range(5):
            post_code(client, random_code(), ATTACKER)
        response = post_code(client, share.access_code, ATTACKER)
        assert response.status_code == 429
        assert "recipient.share" not in client.session
        # Another address is not affected.
        other = Client()
        response = post_code(other, share.access_code, "198.51.100.1")
        assert response.status_code == 302 and response["Location"] == "/access/verify"

    def test_it_lets_the_address_in_again_after_the_cool_off(self, share, captcha_passes):
        client = Client()
        for _ in range(5):
            post_code(client, random_code(), ATTACKER)
        AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=16))
        response = post_code(client, share.access_code, ATTACKER)
        assert response.status_code == 302

    def test_it_ignores_a_forged_x_forwarded_for(self, share, captcha_passes):
        client = Client()
        for i in range(5):
            post_code(client, random_code(), ATTACKER, HTTP_X_FORWARDED_FOR=f"10.9.8.{i}")
        response = post_code(client, share.access_code, ATTACKER, HTTP_X_FORWARDED_FOR="10.1.1.1")
        assert response.status_code == 429
        assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {ATTACKER}

    def test_it_believes_only_trusted_proxies_and_their_last_hop(
        self, share, captcha_passes, settings
    ):
        settings.TRUSTED_PROXIES = ["192.0.2.10"]
        client = Client()
        for i in range(5):
            # The client wrote the left part; the proxy appended the real address.
            forged = f"10.9.8.{i}, {ATTACKER}"
            post_code(client, random_code(), "192.0.2.10", HTTP_X_FORWARDED_FOR=forged)
        assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {ATTACKER}
        response = post_code(
            client, share.access_code, "192.0.2.10", HTTP_X_FORWARDED_FOR=f"1.2.3.4, {ATTACKER}"
        )
        assert response.status_code == 429
        # Somebody else behind the same proxy still gets in.
        response = post_code(
            Client(), share.access_code, "192.0.2.10", HTTP_X_FORWARDED_FOR="198.51.100.7"
        )
        assert response.status_code == 302


class TestCodesFromManyAddresses:
    def test_it_locks_the_share_when_guesses_come_from_many_addresses(self, share, captcha_passes):
        for i in range(5):
            response = post_code(Client(), wrong_code_for(share), f"198.51.100.{i + 1}")
        assert response.status_code == 429
        # The patient's own, right code from a fresh address waits for the cool-off too.
        response = post_code(Client(), share.access_code, "192.0.2.200")
        assert response.status_code == 429
        # Other shares are not affected.
        other = make_share()
        response = post_code(Client(), other.access_code, "192.0.2.201")
        assert response.status_code == 302

    def test_staff_unlock_lifts_the_share_lockout(self, share, captcha_passes):
        from accounts import services

        for i in range(5):
            post_code(Client(), wrong_code_for(share), f"198.51.100.{i + 1}")
        services.share_unlock(share=share_of(share))
        response = post_code(Client(), share.access_code, "192.0.2.200")
        assert response.status_code == 302
        assert AuditEvent.objects.filter(
            share=share.share, action=AuditEvent.Action.SHARE_UNLOCKED
        ).exists()

    def test_failures_on_a_share_are_in_its_history(self, share, captcha_passes):
        post_code(Client(), wrong_code_for(share), "198.51.100.9")
        event = AuditEvent.objects.get(share=share.share, action=AuditEvent.Action.CODE_FAILED)
        assert event.ip_address == "198.51.100.9"
        assert share.access_code.replace("-", "")[4:] not in str(event.detail)


def signed_unknown_token() -> str:
    """What an attacker holding the signing key could make: correctly signed, opening nothing."""
    return credentials.sign_link_token(credentials.new_link_token())


def signed_unknown_link() -> str:
    """The same in a link of the older form, token in the path."""
    return "/s/" + signed_unknown_token()


def forged_link() -> str:
    return "/s/" + credentials.new_link_token() + ".1xXGFt.forged"


def stale_link(monkeypatch) -> str:
    """Correctly signed, but longer ago than any share can live."""
    with monkeypatch.context() as m:
        past = time.time() - (settings.SHARE_MAX_DAYS + 1) * 86400
        m.setattr("django.core.signing.time.time", lambda: past)
        return signed_unknown_link()


class TestLinks:
    def test_it_locks_an_address_that_tries_signed_links(self, share):
        client = Client()
        for _ in range(4):
            response = post_link(client, signed_unknown_token(), REMOTE_ADDR=ATTACKER)
            assert response.status_code == 302 and response["Location"] == "/access/"
        response = post_link(client, signed_unknown_token(), REMOTE_ADDR=ATTACKER)
        assert response.status_code == 302 and response["Location"] == "/access/locked"
        response = open_link(client, share, REMOTE_ADDR=ATTACKER)
        assert response["Location"] == "/access/locked"
        assert client.get("/access/locked", REMOTE_ADDR=ATTACKER).status_code == 429
        # The real owner, elsewhere, still gets in.
        response = open_link(Client(), share, REMOTE_ADDR="198.51.100.50")
        assert response["Location"] == "/access/verify"

    def test_links_of_the_older_form_count_the_same(self, share):
        client = Client()
        for _ in range(5):
            response = client.get(signed_unknown_link(), REMOTE_ADDR=ATTACKER)
        # Never a 4xx at /s/<token>: Django would log the path, and with it the token.
        assert response.status_code == 302 and response["Location"] == "/access/locked"
        response = post_link(client, link_token(share), REMOTE_ADDR=ATTACKER)
        assert response["Location"] == "/access/locked"
        response = Client().get(legacy_link_path(share), REMOTE_ADDR="198.51.100.50")
        assert response["Location"] == "/access/verify"

    def test_a_locked_share_answers_the_right_link_with_the_lockout_page(self, share):
        Share.objects.filter(pk=share.share.pk).update(
            locked_until=timezone.now() + timedelta(minutes=15)
        )
        client = Client()
        response = open_link(client, share)
        assert response["Location"] == "/access/locked"
        assert "recipient.share" not in client.session

    def test_the_posted_token_needs_the_csrf_token(self, share):
        client = Client(enforce_csrf_checks=True)
        response = post_link(client, link_token(share))
        assert response.status_code == 403
        assert "recipient.share" not in client.session
        page = client.get("/s/")
        assert page.status_code == 200
        csrf = client.cookies[settings.CSRF_COOKIE_NAME].value
        response = client.post(
            "/s/", {"token": link_token(share), "csrfmiddlewaretoken": csrf}, HTTP_ORIGIN="null"
        )
        assert response["Location"] == "/access/verify"


class TestCrossSiteLockout:
    """Any web page can make its visitors' browsers request /s/<anything>: five
    <img src="https://portal/s/junk"> must not lock out the visitor's address (for a hospital,
    the address of its whole network)."""

    HOSPITAL = "192.0.2.77"
    IMAGE = {
        "Sec-Fetch-Mode": "no-cors",
        "Sec-Fetch-Dest": "image",
        "Sec-Fetch-Site": "cross-site",
    }

    def test_links_with_a_bad_or_stale_signature_are_not_counted(self, share, monkeypatch):
        junk = [forged_link() for _ in range(6)] + [stale_link(monkeypatch) for _ in range(6)]
        junk += ["/s/junk", "/s/" + "A" * 300]
        for path in junk:
            response = Client().get(path, REMOTE_ADDR=self.HOSPITAL)
            # The same answer as any refused link…
            assert response.status_code == 302 and response["Location"] == "/access/"
        # …but nothing counted, nobody locked out.
        assert not AccessAttempt.objects.exists()
        response = Client().get(legacy_link_path(share), REMOTE_ADDR=self.HOSPITAL)
        assert response["Location"] == "/access/verify"

    def test_a_page_full_of_images_locks_nobody(self, share):
        # Even correctly signed links (which would count if navigated to) are not checked when
        # the browser fetches them as images.
        for _ in range(8):
            response = Client().get(
                signed_unknown_link(), REMOTE_ADDR=self.HOSPITAL, headers=self.IMAGE
            )
            assert response.status_code == 302 and response["Location"] == "/access/"
        assert not AccessAttempt.objects.exists()
        # Nor does a real link loaded as an image open anything (or replace a session).
        client = Client()
        response = client.get(
            legacy_link_path(share), REMOTE_ADDR=self.HOSPITAL, headers=self.IMAGE
        )
        assert response["Location"] == "/access/"
        assert "recipient.share" not in client.session
        # The patient, clicking the link, gets in.
        response = client.get(
            legacy_link_path(share), REMOTE_ADDR=self.HOSPITAL, HTTP_SEC_FETCH_MODE="navigate"
        )
        assert response["Location"] == "/access/verify"

    def test_a_posted_token_that_is_no_navigation_is_not_counted(self, share):
        # A cross-site form cannot post (CSRF); a same-site fetch() is no navigation either.
        for _ in range(8):
            response = post_link(
                Client(),
                signed_unknown_token(),
                REMOTE_ADDR=self.HOSPITAL,
                HTTP_SEC_FETCH_MODE="cors",
            )
            assert response.status_code == 302 and response["Location"] == "/access/"
        assert not AccessAttempt.objects.exists()
        response = post_link(
            Client(), link_token(share), REMOTE_ADDR=self.HOSPITAL, HTTP_SEC_FETCH_MODE="navigate"
        )
        assert response["Location"] == "/access/verify"

    def test_failures_during_a_lockout_do_not_prolong_it(self, share):
        for _ in range(5):
            Client().get(signed_unknown_link(), REMOTE_ADDR=ATTACKER)
        assert Client().get(signed_unknown_link(), REMOTE_ADDR=ATTACKER)["Location"] == (
            "/access/locked"
        )
        AccessAttempt.objects.update(attempt_time=F("attempt_time") - timedelta(minutes=10))
        # Ten minutes into the cool-off, five more failures are refused…
        for _ in range(5):
            response = Client().get(signed_unknown_link(), REMOTE_ADDR=ATTACKER)
            assert response["Location"] == "/access/locked"
        # …and the cool-off still ends 15 minutes after the fifth failure, not after the last.
        AccessAttempt.objects.update(attempt_time=F("attempt_time") - timedelta(minutes=6))
        response = Client().get(legacy_link_path(share), REMOTE_ADDR=ATTACKER)
        assert response["Location"] == "/access/verify"


class TestUnknownClientAddress:
    """Without a believable client address every such client would share one lockout bucket:
    one attacker could lock out all of them (or, with the bucket ignored, none)."""

    def test_a_request_without_an_address_is_refused_not_counted(self, share) -> None:
        client = Client(raise_request_exception=False)
        response = client.post("/access/", {"code": random_code()}, REMOTE_ADDR="")
        assert response.status_code == 500
        response = client.get(signed_unknown_link(), REMOTE_ADDR="unix:/run/portal.sock")
        assert response.status_code == 500
        assert not AccessAttempt.objects.exists()
        with pytest.raises(net.ClientAddressUnknown, match="PORTAL_TRUSTED_UNIX_SOCKET"):
            Client().post("/access/", {"code": random_code()}, REMOTE_ADDR="")

    def test_a_trusted_unix_socket_proxy_gives_the_address(self, share, settings) -> None:
        settings.TRUSTED_UNIX_SOCKET = True
        for i in range(5):
            Client().get(
                signed_unknown_link(),
                REMOTE_ADDR="",
                HTTP_X_FORWARDED_FOR=f"10.0.0.{i}, {ATTACKER}",
            )
        assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {ATTACKER}
        response = Client().get(
            legacy_link_path(share), REMOTE_ADDR="", HTTP_X_FORWARDED_FOR=ATTACKER
        )
        assert response["Location"] == "/access/locked"
        response = Client().get(
            legacy_link_path(share), REMOTE_ADDR="", HTTP_X_FORWARDED_FOR="198.51.100.8"
        )
        assert response["Location"] == "/access/verify"
        # Such a proxy must say whom it forwards for.
        with pytest.raises(net.ClientAddressUnknown):
            Client().get(signed_unknown_link(), REMOTE_ADDR="")


class TestCaptcha:
    def _captcha_answer(self, html: str) -> tuple[str, str]:
        key = re.search(r'name="captcha_0" value="([0-9a-f]+)"', html)
        assert key, "no captcha in the page"
        return key.group(1), CaptchaStore.objects.get(hashkey=key.group(1)).response

    def test_it_asks_for_a_captcha_after_3_failures_from_one_address(self, share):
        client = Client()
        for _ in range(3):
            response = client.post("/access/", {"code": random_code()}, REMOTE_ADDR=ATTACKER)
            assert response.status_code == 200
        html = response.content.decode()
        assert 'name="captcha_1"' in html
        # Without the answer the code is not even checked (and so not counted).
        before = selectors.failures_from_ip(ATTACKER)
        assert before == 3
        response = client.post("/access/", {"code": share.access_code}, REMOTE_ADDR=ATTACKER)
        assert response.status_code == 200 and "recipient.share" not in client.session
        assert selectors.failures_from_ip(ATTACKER) == before
        # A wrong answer is refused too.
        key, _answer = self._captcha_answer(response.content.decode())
        response = client.post(
            "/access/",
            {"code": share.access_code, "captcha_0": key, "captcha_1": "wrong"},
            REMOTE_ADDR=ATTACKER,
        )
        assert "recipient.share" not in client.session
        # With the answer, the right code works.
        key, answer = self._captcha_answer(response.content.decode())
        response = client.post(
            "/access/",
            {"code": share.access_code, "captcha_0": key, "captcha_1": answer},
            REMOTE_ADDR=ATTACKER,
        )
        assert response.status_code == 302 and response["Location"] == "/access/verify"

    def test_the_captcha_image_is_drawn_locally(self, share):
        client = Client()
        for _ in range(3):
            response = client.post("/access/", {"code": random_code()}, REMOTE_ADDR=ATTACKER)
        src = re.search(r'<img src="(/captcha/image/[0-9a-f]+/)"', response.content.decode())
        assert src
        image = client.get(src.group(1), REMOTE_ADDR=ATTACKER)
        assert image.status_code == 200
        assert image["Content-Type"] == "image/png"
        assert image.content[:8] == b"\x89PNG\r\n\x1a\n"

    def test_a_fresh_address_gets_no_captcha(self, share):
        response = Client().get("/access/", REMOTE_ADDR="198.51.100.77")
        assert b"captcha" not in response.content
