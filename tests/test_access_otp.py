"""The one-time code: sent only on request, 6 digits, 5 minutes, 5 wrong tries per share."""

import logging
import smtplib
import threading
from datetime import timedelta

import pytest
from django.core import mail
from django.core.mail.backends.base import BaseEmailBackend
from django.db import connection
from django.db.models import QuerySet
from django.test import Client
from django.utils import timezone

from accounts import selectors, services
from accounts.models import AuditEvent, Share, ShareOTPDevice
from tests.support.access import (
    last_code,
    make_share,
    make_study,
    open_link,
    share_of,
    sign_in,
    sms_messages,
)

pytestmark = pytest.mark.django_db


def send(client: Client):
    return client.post("/access/verify", {"action": "send"}, follow=True)


def type_otp(client: Client, otp: str):
    return client.post("/access/verify", {"otp": otp})


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


def allow_resend(created) -> None:
    ShareOTPDevice.objects.filter(share=created.share).update(
        last_generated_timestamp=timezone.now() - timedelta(seconds=61)
    )


class TestSending:
    def test_a_get_sends_nothing_and_uses_nothing_up(self, study, sms_dir):
        created = make_share(single_use=True)
        client = Client()
        open_link(client, created)
        for _ in range(3):
            response = client.get("/access/verify")
            assert response.status_code == 200
        assert (
            b"06 \xe2\x80\xa2\xe2\x80\xa2 \xe2\x80\xa2\xe2\x80\xa2 \xe2\x80\xa2\xe2\x80\xa2 42"
            in response.content
        )
        assert sms_messages(sms_dir) == []
        assert ShareOTPDevice.objects.get(share=created.share).token is None
        assert share_of(created).used_at is None
        # A mail scanner that followed the link did not spend the share: the patient still can.
        sign_in(Client(), created, sms_dir)
        assert share_of(created).used_at is not None

    def test_send_writes_one_sms_with_a_6_digit_code(self, share, sms_dir):
        client = Client()
        open_link(client, share)
        response = send(client)
        assert b"We have sent you a code" in response.content
        messages = sms_messages(sms_dir)
        assert len(messages) == 1
        assert messages[0]["to"] == "+33612345642"
        code = last_code(sms_dir)
        assert len(code) == 6 and code.isdigit()
        assert messages[0]["body"].endswith(f"@127.0.0.1 #{code}")
        event = AuditEvent.objects.get(share=share.share, action=AuditEvent.Action.OTP_SENT)
        assert code not in str(event.detail)

    def test_the_sms_binds_the_code_to_the_site_host_alone(self, share, sms_dir, settings):
        # WebOTP wants the bare host: no scheme, port, path or credentials.
        settings.BASE_URL = "https://staff@Portal.example.org:8443/images"
        client = Client()
        open_link(client, share)
        send(client)
        assert sms_messages(sms_dir)[0]["body"].endswith(
            f"\n\n@portal.example.org #{last_code(sms_dir)}"
        )

    def test_email_recipients_get_the_code_by_email(self, study):
        created = make_share(
            recipient="physician", channel="email", contact="dr.martin@example.org"
        )
        client = Client()
        open_link(client, created)
        response = client.get("/access/verify")
        assert "d•••@example.org" in response.content.decode()
        send(client)
        assert len(mail.outbox) == 1
        assert mail.outbox[0].to == ["dr.martin@example.org"]
        code = ShareOTPDevice.objects.get(share=created.share).token
        assert code and code in mail.outbox[0].body
        response = type_otp(client, code)
        assert response.status_code == 302

    def test_resending_waits_for_the_cooldown(self, share, sms_dir):
        client = Client()
        open_link(client, share)
        send(client)
        response = send(client)
        assert b"You can ask for another one in" in response.content
        assert len(sms_messages(sms_dir)) == 1
        allow_resend(share)
        send(client)
        assert len(sms_messages(sms_dir)) == 2
        assert last_code(sms_dir) == ShareOTPDevice.objects.get(share=share.share).token

    def test_a_failed_delivery_can_be_retried_at_once(self, share, settings, tmp_path):
        settings.SMS_BACKEND = "file"
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("")
        settings.SMS_FILE_PATH = str(blocker)
        client = Client()
        open_link(client, share)
        response = send(client)
        assert b"could not send the code" in response.content
        assert AuditEvent.objects.filter(
            share=share.share, action=AuditEvent.Action.OTP_SEND_FAILED
        ).exists()
        device = ShareOTPDevice.objects.get(share=share.share)
        assert device.generate_is_allowed()[0]


class TestChecking:
    def test_the_right_code_opens_the_viewer_and_cannot_serve_twice(self, share, sms_dir):
        client = Client()
        sign_in(client, share, sms_dir)
        assert client.get("/viewer/").status_code == 200
        used = last_code(sms_dir)
        # Somebody who has the link and saw the used code gets nowhere with it.
        other = Client()
        open_link(other, share, REMOTE_ADDR="198.51.100.3")
        response = type_otp(other, used)
        assert response.status_code == 200
        assert b"This code is not right" in response.content
        assert other.get("/viewer/")["Location"] == "/access/"

    def test_an_expired_code_is_refused(self, share, sms_dir, fast_otp):
        client = Client()
        open_link(client, share)
        send(client)
        ShareOTPDevice.objects.filter(share=share.share).update(
            valid_until=timezone.now() - timedelta(seconds=1)
        )
        response = type_otp(client, last_code(sms_dir))
        assert response.status_code == 200
        assert b"This code is not right" in response.content

    def test_codes_last_5_minutes(self, share, sms_dir):
        client = Client()
        open_link(client, share)
        send(client)
        device = ShareOTPDevice.objects.get(share=share.share)
        assert (
            timedelta(minutes=4, seconds=50)
            < device.valid_until - timezone.now()
            <= timedelta(minutes=5)
        )

    def test_five_wrong_codes_lock_the_share_even_for_the_right_one(self, share, sms_dir, fast_otp):
        client = Client()
        open_link(client, share)
        send(client)
        code = last_code(sms_dir)
        for remaining in (4, 3, 2, 1):
            response = type_otp(client, wrong(code))
            assert response.status_code == 200
            assert f"You have {remaining} more tr".encode() in response.content
        response = type_otp(client, wrong(code))
        assert response.status_code == 429
        assert b"Too many attempts" in response.content
        assert type_otp(client, code).status_code == 429
        assert client.post("/access/verify", {"action": "send"}).status_code == 429
        # A fresh session from elsewhere, with the link: still locked.
        response = open_link(Client(), share, REMOTE_ADDR="198.51.100.4")
        assert response["Location"] == "/access/locked"
        assert (
            AuditEvent.objects.filter(share=share.share, action=AuditEvent.Action.LOCKOUT).count()
            == 1
        )

    def test_many_sessions_from_many_addresses_share_one_count(self, share, sms_dir, fast_otp):
        first = Client()
        open_link(first, share)
        send(first)
        code = last_code(sms_dir)
        for i in range(5):
            attacker = Client()
            open_link(attacker, share, REMOTE_ADDR=f"198.51.100.{10 + i}")
            last = attacker.post(
                "/access/verify", {"otp": wrong(code)}, REMOTE_ADDR=f"198.51.100.{10 + i}"
            )
        assert last.status_code == 429
        assert type_otp(first, code).status_code == 429

    def test_resending_does_not_reset_the_count(self, share, sms_dir, fast_otp):
        client = Client()
        open_link(client, share)
        send(client)
        for _ in range(3):
            type_otp(client, wrong(last_code(sms_dir)))
        allow_resend(share)
        send(client)
        assert len(sms_messages(sms_dir)) == 2
        response = type_otp(client, wrong(last_code(sms_dir)))
        assert b"You have 1 more try" in response.content
        response = type_otp(client, wrong(last_code(sms_dir)))
        assert response.status_code == 429

    def test_it_throttles_guesses_between_failures(self, share, sms_dir):
        client = Client()
        open_link(client, share)
        send(client)
        code = last_code(sms_dir)
        type_otp(client, wrong(code))
        response = type_otp(client, code)  # too soon after a failure, even when right
        assert b"Please wait" in response.content
        assert client.get("/viewer/")["Location"] == "/access/"
        ShareOTPDevice.objects.filter(share=share.share).update(
            throttling_failure_timestamp=timezone.now() - timedelta(seconds=2)
        )
        assert type_otp(client, code)["Location"] == "/viewer/"

    def test_the_lock_ends_with_the_cool_off_or_a_staff_unlock(self, share, sms_dir, fast_otp):
        client = Client()
        open_link(client, share)
        send(client)
        for _ in range(5):
            type_otp(client, "000000" if last_code(sms_dir) != "000000" else "111111")
        assert selectors.share_is_locked(share_of(share))
        Share.objects.filter(pk=share.share.pk).update(
            locked_until=timezone.now() - timedelta(seconds=1)
        )
        client = Client()
        open_link(client, share)
        allow_resend(share)
        send(client)
        assert type_otp(client, last_code(sms_dir))["Location"] == "/viewer/"

        # Locked again, then unlocked by staff.
        client = Client()
        open_link(client, share)
        allow_resend(share)
        send(client)
        for _ in range(5):
            type_otp(client, wrong(last_code(sms_dir)))
        assert selectors.share_is_locked(share_of(share))
        services.share_unlock(share=share_of(share))
        client = Client()
        open_link(client, share)
        allow_resend(share)
        send(client)
        assert type_otp(client, last_code(sms_dir))["Location"] == "/viewer/"

    def test_garbage_counts_as_a_wrong_code(self, share, sms_dir, fast_otp):
        client = Client()
        open_link(client, share)
        send(client)
        response = type_otp(client, "12ab<script>")
        assert b"You have 4 more tries" in response.content


class TestSingleUse:
    def test_it_is_used_up_by_the_one_time_code_only(self, study, sms_dir):
        created = make_share(single_use=True)
        client = Client()
        open_link(client, created)
        send(client)
        assert share_of(created).used_at is None
        type_otp(client, last_code(sms_dir))
        assert share_of(created).used_at is not None
        # The session that used it keeps it until it ends; nobody opens it again.
        assert client.get("/viewer/").status_code == 200
        response = open_link(Client(), created)
        assert response["Location"] == "/access/"

    def test_a_session_waiting_for_its_code_loses_a_share_used_up_meanwhile(self, study, sms_dir):
        created = make_share(single_use=True)
        slow = Client()
        open_link(slow, created)
        sign_in(Client(), created, sms_dir)
        assert slow.get("/access/verify")["Location"] == "/access/"


class TestOverTheShareLifetime:
    """A cool-off must not hand out five fresh guesses for ever, nor may codes be sent without
    end: an attacker holding the link has the whole life of the share to try."""

    def test_after_one_cool_off_five_more_wrong_codes_lock_it_for_staff(
        self, share, sms_dir, fast_otp
    ):
        client = Client()
        open_link(client, share)
        send(client)
        code = last_code(sms_dir)
        for _ in range(5):
            type_otp(client, wrong(code))
        assert selectors.share_is_locked(share_of(share))
        # The cool-off passes: five more tries, no more.
        Share.objects.filter(pk=share.share.pk).update(
            locked_until=timezone.now() - timedelta(seconds=1)
        )
        for remaining in (4, 3, 2, 1):
            response = type_otp(client, wrong(code))
            assert f"You have {remaining} more tr".encode() in response.content
        response = type_otp(client, wrong(code))
        assert response.status_code == 429
        assert b"The hospital can open it again for you" in response.content
        assert "Retry-After" not in response
        # However long the attacker waits, nothing opens it again, not even the right code.
        Share.objects.filter(pk=share.share.pk).update(
            locked_until=timezone.now() - timedelta(days=3)
        )
        assert type_otp(client, code).status_code == 429
        assert client.post("/access/verify", {"action": "send"}).status_code == 429
        with_link = Client()
        assert open_link(with_link, share)["Location"] == "/access/locked"
        page = with_link.get("/access/locked")
        assert page.status_code == 429 and b"The hospital can open it again" in page.content
        assert share_of(share).otp_failures == 10
        lockouts = AuditEvent.objects.filter(share=share.share, action=AuditEvent.Action.LOCKOUT)
        assert [e.detail["final"] for e in lockouts.order_by("pk")] == [False, True]
        # Staff unlock it, and the recipient starts afresh.
        services.share_unlock(share=share_of(share))
        fresh = Client()
        open_link(fresh, share)
        allow_resend(share)
        send(fresh)
        assert type_otp(fresh, last_code(sms_dir))["Location"] == "/viewer/"

    def test_right_codes_do_not_reset_the_lifetime_count(self, share, sms_dir, fast_otp):
        for _round in range(2):
            client = Client()
            open_link(client, share)
            allow_resend(share)
            send(client)
            for _ in range(4):
                type_otp(client, wrong(last_code(sms_dir)))
            assert type_otp(client, last_code(sms_dir))["Location"] == "/viewer/"
        client = Client()
        open_link(client, share)
        allow_resend(share)
        send(client)
        response = type_otp(client, wrong(last_code(sms_dir)))
        assert b"You have 1 more try" in response.content
        response = type_otp(client, wrong(last_code(sms_dir)))
        assert response.status_code == 429
        assert b"The hospital can open it again for you" in response.content

    def test_at_most_ten_codes_are_sent_a_day(self, share, sms_dir):
        client = Client()
        open_link(client, share)
        for _ in range(10):
            allow_resend(share)
            send(client)
        assert len(sms_messages(sms_dir)) == 10
        allow_resend(share)
        response = send(client)
        assert b"You have asked for many codes today" in response.content
        assert len(sms_messages(sms_dir)) == 10
        assert (
            AuditEvent.objects.filter(
                share=share.share, action=AuditEvent.Action.OTP_SEND_LIMIT
            ).count()
            == 1
        )
        # The code already sent still works…
        assert share_of(share).otp_device.token == last_code(sms_dir)
        # …and a day later codes can be sent again.
        # (Past the model's refusal: audit events cannot be changed by the application.)
        QuerySet.update(
            AuditEvent.objects.filter(share=share.share, action=AuditEvent.Action.OTP_SENT),
            at=timezone.now() - timedelta(hours=24, minutes=1),
        )
        send(client)
        assert len(sms_messages(sms_dir)) == 11

    def test_an_smtp_error_does_not_put_the_address_in_the_log(self, study, settings, caplog):
        settings.EMAIL_BACKEND = "tests.test_access_otp.RefusingEmailBackend"
        created = make_share(
            recipient="physician", channel="email", contact="dr.secret@example.org"
        )
        client = Client()
        open_link(client, created)
        with caplog.at_level(logging.DEBUG):
            response = send(client)
        assert b"could not send the code" in response.content
        assert "SMTPRecipientsRefused" in caplog.text
        assert "dr.secret" not in caplog.text
        assert "dr.secret" not in str(
            list(AuditEvent.objects.filter(action=AuditEvent.Action.OTP_SEND_FAILED).values())
        )


class RefusingEmailBackend(BaseEmailBackend):
    """An SMTP server that refuses the recipient, quoting the address as real ones do."""

    def send_messages(self, email_messages):
        to = email_messages[0].to[0]
        raise smtplib.SMTPRecipientsRefused({to: (550, f"5.1.1 <{to}>: unknown user".encode())})


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("throttle_factor", [0, 1])
def test_parallel_wrong_codes_cannot_pass_the_limit(sms_dir, settings, throttle_factor):
    """Twelve sessions (from twelve addresses) type wrong codes at the same instant. The rows
    each request holds decide: five wrong codes are counted, no more, whatever django-otp's
    throttle (0: none at all) lets through. Run it on PostgreSQL with DATABASE_URL."""
    settings.OTP_THROTTLE_FACTOR = throttle_factor
    make_study()
    created = make_share()
    first = Client()
    open_link(first, created)
    send(first)
    code = last_code(sms_dir)
    clients = []
    for i in range(12):
        client = Client(REMOTE_ADDR=f"198.51.100.{100 + i}")
        open_link(client, created)
        clients.append(client)
    barrier = threading.Barrier(len(clients))
    statuses: list[int] = []

    def guess(client: Client) -> None:
        try:
            barrier.wait(timeout=30)
            statuses.append(type_otp(client, wrong(code)).status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=guess, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(statuses) == 12
    row = share_of(created)
    device = ShareOTPDevice.objects.get(share=created.share)
    counted = AuditEvent.objects.filter(
        share=created.share, action=AuditEvent.Action.OTP_FAILED
    ).count()
    assert row.otp_failures == device.throttling_failure_count == counted
    assert counted <= 5
    if throttle_factor == 0:
        # Nothing but the limit held them back: exactly five counted, the rest refused.
        assert counted == 5
        assert sorted(statuses) == [200] * 4 + [429] * 8
        assert type_otp(first, code).status_code == 429
