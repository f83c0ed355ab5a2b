"""Passkeys on the server side: who may ask for options, and what a bad answer gets.
(The enrolment and sign-in with a real authenticator are in test_recipient_browser.)"""

import json

import pytest
from django.test import Client

from accounts.models import AuditEvent, PhysicianPasskey
from tests.access_fixtures import *  # noqa: F403
from tests.access_fixtures import make_share, open_link, sign_in

pytestmark = pytest.mark.django_db

PHYSICIAN = {"recipient": "physician", "channel": "email", "contact": "dr@example.org"}


def _enrolled(created) -> None:  # type: ignore[no-untyped-def]
    PhysicianPasskey.objects.create(
        email="dr@example.org",
        user_handle=b"h" * 32,
        credential_id=b"c" * 32,
        public_key=b"k" * 64,
        enrolled_with=created.share,
    )


def test_patients_get_no_passkey_endpoints(share, sms_dir) -> None:  # type: ignore[no-untyped-def]
    client = Client()
    open_link(client, share)
    assert client.post("/access/passkey/login/options").status_code == 404
    sign_in(client, share, sms_dir)
    assert client.post("/access/passkey/register/options").status_code == 404
    assert client.get("/access/passkey")["Location"] == "/viewer/"


def test_enrolment_needs_a_verified_session(study) -> None:  # type: ignore[no-untyped-def]
    created = make_share(**PHYSICIAN)
    client = Client()
    open_link(client, created)
    response = client.post("/access/passkey/register/options")
    assert response.status_code == 302 and response["Location"] == "/access/"


def test_sign_in_options_list_only_that_physicians_passkeys(study) -> None:  # type: ignore[no-untyped-def]
    created = make_share(**PHYSICIAN)
    _enrolled(created)
    PhysicianPasskey.objects.create(
        email="other@example.org",
        user_handle=b"o" * 32,
        credential_id=b"o" * 32,
        public_key=b"k" * 64,
    )
    client = Client()
    open_link(client, created)
    assert b"Sign in with my passkey" in client.get("/access/verify").content
    options = json.loads(client.post("/access/passkey/login/options").content)
    assert options["rpId"] == "127.0.0.1"
    assert [c["id"] for c in options["allowCredentials"]] == [
        "Y2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2M"
    ]
    assert options["userVerification"] == "required"


def test_a_bad_answer_is_refused_and_recorded(study) -> None:  # type: ignore[no-untyped-def]
    created = make_share(**PHYSICIAN)
    _enrolled(created)
    client = Client()
    open_link(client, created)
    client.post("/access/passkey/login/options")
    forged = {
        "id": "Y2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2M",
        "rawId": "Y2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2M",
        "type": "public-key",
        "response": {"clientDataJSON": "e30", "authenticatorData": "AA", "signature": "AA"},
    }
    response = client.post(
        "/access/passkey/login", json.dumps(forged), content_type="application/json"
    )
    assert response.status_code == 400
    assert client.get("/viewer/")["Location"] == "/access/"
    assert AuditEvent.objects.filter(share=created.share, action="passkey_failed").exists()
    # The challenge served once: a replay finds none.
    response = client.post(
        "/access/passkey/login", json.dumps(forged), content_type="application/json"
    )
    assert response.status_code == 400


def test_a_passkey_enrolled_for_one_address_does_not_open_anothers_share(study) -> None:  # type: ignore[no-untyped-def]
    created = make_share(**PHYSICIAN)
    _enrolled(created)
    stranger = make_share(recipient="physician", channel="email", contact="x@example.org")
    client = Client()
    open_link(client, stranger)
    assert b"passkey" not in client.get("/access/verify").content
    assert client.post("/access/passkey/login/options").status_code == 404
