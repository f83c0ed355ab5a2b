"""Physicians' passkeys can be removed, expire unused and are few: staff list and delete them
(command and admin; audited, the physician told), an idle one no longer signs in, and an
address cannot pile them up."""

import json
from datetime import timedelta
from typing import Any

import pytest
from django.core import mail
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.utils import timezone

from accounts.models import AuditEvent, PhysicianPasskey
from tests.support.access import make_share, open_link
from tests.support.staff import admin_user, staff_client
from tests.test_access_passkeys import (
    ADDRESS,
    PHYSICIAN,
    SoftAuthenticator,
    _post_json,
    enrol,
    passkey_sign_in,
    signed_in_by_email,
)

pytestmark = pytest.mark.django_db


def _enrolled(authenticator: SoftAuthenticator) -> PhysicianPasskey:
    assert enrol(signed_in_by_email(make_share(**PHYSICIAN)), authenticator).status_code == 200
    return PhysicianPasskey.objects.get(credential_id=authenticator.credential_id)


def _list(capsys: Any, *args: str) -> Any:
    call_command("passkeys", "list", *args, "--json")
    return json.loads(capsys.readouterr().out)


class TestStaffRemoval:
    def test_it_lists_and_deletes_and_the_passkey_no_longer_opens(
        self, study: Any, capsys: Any
    ) -> None:
        authenticator = SoftAuthenticator()
        passkey = _enrolled(authenticator)
        listed = _list(capsys)
        assert [(row["id"], row["email"], row["usable"]) for row in listed] == [
            (passkey.pk, ADDRESS, True)
        ]
        assert _list(capsys, "--email", "other@example.org") == []

        mail.outbox.clear()
        call_command("passkeys", "delete", str(passkey.pk), "--json")
        assert json.loads(capsys.readouterr().out)["deleted"]["id"] == passkey.pk
        assert not PhysicianPasskey.objects.exists()
        event = AuditEvent.objects.get(action=AuditEvent.Action.PASSKEY_DELETED)
        assert event.detail["passkey"] == passkey.pk and ADDRESS not in json.dumps(event.detail)
        # The physician hears of it, at the address the passkey served.
        assert [m.to for m in mail.outbox] == [[ADDRESS]]
        assert "removed" in mail.outbox[0].subject

        # The attacker who had enrolled it is back to needing the physician's mailbox.
        client = Client()
        open_link(client, make_share(**PHYSICIAN))
        assert _post_json(client, "/access/passkey/login/options").status_code == 404
        assert client.get("/viewer/")["Location"] == "/access/"

    def test_deleting_an_unknown_passkey_is_a_clean_error(self) -> None:
        with pytest.raises(CommandError, match="No passkey 999"):
            call_command("passkeys", "delete", "999")

    def test_the_admin_deletes_with_the_audit_event_and_the_email(self, study: Any) -> None:

        admin_client = staff_client(admin_user())
        passkey = _enrolled(SoftAuthenticator())
        mail.outbox.clear()
        page = admin_client.get("/admin/accounts/physicianpasskey/")
        assert page.status_code == 200 and ADDRESS.encode() in page.content
        response = admin_client.post(
            "/admin/accounts/physicianpasskey/",
            {"action": "delete_passkeys", "_selected_action": [passkey.pk]},
        )
        assert response.status_code == 302
        assert not PhysicianPasskey.objects.exists()
        event = AuditEvent.objects.get(action=AuditEvent.Action.PASSKEY_DELETED)
        assert event.actor is not None and event.actor.username == "admin"
        assert [m.to for m in mail.outbox] == [[ADDRESS]]

    def test_the_enrolment_email_says_how_removal_works(self, study: Any, settings: Any) -> None:
        settings.SUPPORT_CONTACT = "01 23 45 67 89"
        mail.outbox.clear()
        _enrolled(SoftAuthenticator())
        body = mail.outbox[-1].body
        assert "cannot be removed from this site" in body
        assert "contact the hospital: its staff delete it" in body
        assert "not been used for 180 days" in body
        assert "01 23 45 67 89" in body


class TestIdlePasskeys:
    def test_an_idle_passkey_no_longer_signs_in_and_may_be_enrolled_again(
        self, study: Any, settings: Any
    ) -> None:
        settings.PASSKEY_IDLE_DAYS = 30
        authenticator = SoftAuthenticator()
        passkey = _enrolled(authenticator)
        long_ago = timezone.now() - timedelta(days=31)
        PhysicianPasskey.objects.filter(pk=passkey.pk).update(
            created_at=long_ago - timedelta(days=5), last_used_at=long_ago
        )
        # A lost phone found a month later: the passkey does not open the next share.
        created = make_share(**PHYSICIAN)
        client = Client()
        open_link(client, created)
        assert _post_json(client, "/access/passkey/login/options").status_code == 404
        # The physician is offered the emailed code, then enrolment again, as a new one is;
        # the same authenticator may come back.
        client = signed_in_by_email(created)
        assert client.get("/access/passkey").status_code == 200
        assert enrol(client, authenticator).status_code == 200
        assert PhysicianPasskey.objects.get().pk != passkey.pk

    def test_a_passkey_in_use_stays_usable(self, study: Any, settings: Any) -> None:
        settings.PASSKEY_IDLE_DAYS = 30
        authenticator = SoftAuthenticator()
        passkey = _enrolled(authenticator)
        PhysicianPasskey.objects.filter(pk=passkey.pk).update(
            created_at=timezone.now() - timedelta(days=300),
            last_used_at=timezone.now() - timedelta(days=29),
        )
        client = Client()
        open_link(client, make_share(**PHYSICIAN))
        assert passkey_sign_in(client, authenticator).status_code == 200


class TestPerAddressLimit:
    def test_enrolment_is_refused_past_the_limit(self, study: Any, settings: Any) -> None:
        settings.PASSKEYS_PER_ADDRESS = 2
        _enrolled(SoftAuthenticator(credential_id=b"1" * 32))
        # Two sessions of later shares: one asks for options before the other enrols.
        late = signed_in_by_email(make_share(**PHYSICIAN))
        options = json.loads(_post_json(late, "/access/passkey/register/options").content)
        _enrolled(SoftAuthenticator(credential_id=b"2" * 32))
        third = SoftAuthenticator(credential_id=b"3" * 32).register(options)
        assert _post_json(late, "/access/passkey/register", third).status_code == 404
        # A fresh session is not even offered one.
        client = signed_in_by_email(make_share(**PHYSICIAN))
        assert _post_json(client, "/access/passkey/register/options").status_code == 404
        assert client.get("/access/passkey")["Location"] == "/viewer/"
        assert PhysicianPasskey.objects.count() == 2

    def test_idle_passkeys_do_not_count(self, study: Any, settings: Any) -> None:
        settings.PASSKEYS_PER_ADDRESS = 1
        old = _enrolled(SoftAuthenticator(credential_id=b"1" * 32))
        PhysicianPasskey.objects.filter(pk=old.pk).update(
            created_at=timezone.now() - timedelta(days=400)
        )
        _enrolled(SoftAuthenticator(credential_id=b"2" * 32))
        kept = PhysicianPasskey.objects.values_list("credential_id", flat=True)
        assert [bytes(credential) for credential in kept] == [b"2" * 32]
