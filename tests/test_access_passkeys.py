"""Passkeys on the server side, attacked with a software authenticator: who may enrol one and
when, what a forged, replayed, late or unverified answer gets, and who is told.
(The enrolment and sign-in with Chromium's virtual authenticator are in test_recipient_browser.)"""

import hashlib
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from django.core import mail
from django.test import Client
from webauthn import base64url_to_bytes
from webauthn.helpers import bytes_to_base64url

from accounts import access, passkeys
from accounts.models import AuditEvent, PhysicianPasskey, ShareOTPDevice
from tests.support.access import make_share, open_link, sign_in

pytestmark = pytest.mark.django_db

ADDRESS = "dr@example.org"
PHYSICIAN = {"recipient": "physician", "channel": "email", "contact": ADDRESS}
ORIGIN = "http://127.0.0.1:8000"  # PORTAL_BASE_URL's origin in the tests

FLAG_UP, FLAG_UV, FLAG_AT = 0x01, 0x04, 0x40


@dataclass
class SoftAuthenticator:
    """A WebAuthn authenticator in Python (P-256, "none" attestation): it answers whatever
    the test tells it to, as an attacker's script would."""

    credential_id: bytes = field(default_factory=lambda: hashlib.sha256(b"cred").digest())
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    sign_count: int = 0

    def _cose_key(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        return cbor2.dumps(
            {
                1: 2,
                3: -7,
                -1: 1,
                -2: numbers.x.to_bytes(32, "big"),
                -3: numbers.y.to_bytes(32, "big"),
            }
        )

    @staticmethod
    def _client_data(kind: str, challenge: str, origin: str) -> bytes:
        data = {"type": kind, "challenge": challenge, "origin": origin, "crossOrigin": False}
        return json.dumps(data).encode()

    def register(
        self, options: dict[str, Any], *, origin: str = ORIGIN, verified: bool = True
    ) -> str:
        flags = FLAG_UP | FLAG_AT | (FLAG_UV if verified else 0)
        auth_data = (
            hashlib.sha256(options["rp"]["id"].encode()).digest()
            + bytes([flags])
            + struct.pack(">I", self.sign_count)
            + bytes(16)  # AAGUID
            + struct.pack(">H", len(self.credential_id))
            + self.credential_id
            + self._cose_key()
        )
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        client_data = self._client_data("webauthn.create", options["challenge"], origin)
        return json.dumps(
            {
                "id": bytes_to_base64url(self.credential_id),
                "rawId": bytes_to_base64url(self.credential_id),
                "type": "public-key",
                "response": {
                    "clientDataJSON": bytes_to_base64url(client_data),
                    "attestationObject": bytes_to_base64url(attestation),
                },
                "clientExtensionResults": {},
            }
        )

    def assert_(
        self, options: dict[str, Any], *, origin: str = ORIGIN, verified: bool = True
    ) -> str:
        self.sign_count += 1
        flags = FLAG_UP | (FLAG_UV if verified else 0)
        auth_data = (
            hashlib.sha256(options["rpId"].encode()).digest()
            + bytes([flags])
            + struct.pack(">I", self.sign_count)
        )
        client_data = self._client_data("webauthn.get", options["challenge"], origin)
        signature = self.key.sign(
            auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256())
        )
        return json.dumps(
            {
                "id": bytes_to_base64url(self.credential_id),
                "rawId": bytes_to_base64url(self.credential_id),
                "type": "public-key",
                "response": {
                    "clientDataJSON": bytes_to_base64url(client_data),
                    "authenticatorData": bytes_to_base64url(auth_data),
                    "signature": bytes_to_base64url(signature),
                },
                "clientExtensionResults": {},
            }
        )


def _post_json(client: Client, path: str, body: str = "{}") -> Any:
    return client.post(path, body, content_type="application/json")


def signed_in_by_email(created) -> Client:  # type: ignore[no-untyped-def]
    """A physician's session that has just typed the emailed one-time code."""
    client = Client()
    open_link(client, created)
    client.post("/access/verify", {"action": "send"})
    code = ShareOTPDevice.objects.get(share=created.share).token
    response = client.post("/access/verify", {"otp": code})
    assert response.status_code == 302
    return client


def enrol(client: Client, authenticator: SoftAuthenticator, **answer: Any) -> Any:
    options = _post_json(client, "/access/passkey/register/options")
    assert options.status_code == 200, options.content
    credential = authenticator.register(json.loads(options.content), **answer)
    return _post_json(client, "/access/passkey/register", credential)


def passkey_sign_in(client: Client, authenticator: SoftAuthenticator, **answer: Any) -> Any:
    options = _post_json(client, "/access/passkey/login/options")
    assert options.status_code == 200, options.content
    return _post_json(
        client,
        "/access/passkey/login",
        authenticator.assert_(json.loads(options.content), **answer),
    )


def _enrolled(created) -> None:  # type: ignore[no-untyped-def]
    PhysicianPasskey.objects.create(
        email=ADDRESS,
        user_handle=b"h" * 32,
        credential_id=b"c" * 32,
        public_key=b"k" * 64,
        enrolled_with=created.share,
    )


class TestEnrolment:
    def test_a_physician_enrols_once_per_session_and_is_told_by_email(self, study) -> None:  # type: ignore[no-untyped-def]
        created = make_share(**PHYSICIAN)
        client = signed_in_by_email(created)
        mail.outbox.clear()
        response = enrol(client, SoftAuthenticator())
        assert response.status_code == 200 and json.loads(response.content)["ok"] is True
        passkey = PhysicianPasskey.objects.get()
        assert passkey.email == ADDRESS and passkey.enrolled_with_id == created.share.pk
        assert AuditEvent.objects.filter(
            share=created.share, action=AuditEvent.Action.PASSKEY_ENROLLED
        ).exists()
        # The owner of the mailbox hears of it at once.
        assert [m.to for m in mail.outbox] == [[ADDRESS]]
        assert "passkey" in mail.outbox[0].subject.lower()
        # The same session cannot add a second one (say, the attacker's own).
        assert _post_json(client, "/access/passkey/register/options").status_code == 404
        assert client.get("/access/passkey")["Location"] == "/viewer/"
        assert PhysicianPasskey.objects.count() == 1

    def test_enrolment_closes_five_minutes_after_the_emailed_code(self, study) -> None:  # type: ignore[no-untyped-def]
        created = make_share(**PHYSICIAN)
        client = signed_in_by_email(created)
        session = client.session
        session[access.VERIFIED_AT] -= access.PASSKEY_ENROL_WINDOW + 1
        session.save()
        # A session left open on a shared computer cannot be used to add a passkey later.
        assert client.get("/access/passkey")["Location"] == "/viewer/"
        assert _post_json(client, "/access/passkey/register/options").status_code == 404
        assert client.get("/viewer/").status_code == 200

    def test_options_asked_in_time_do_not_outlive_the_window(self, study) -> None:  # type: ignore[no-untyped-def]
        created = make_share(**PHYSICIAN)
        client = signed_in_by_email(created)
        options = json.loads(_post_json(client, "/access/passkey/register/options").content)
        session = client.session
        session[access.VERIFIED_AT] -= access.PASSKEY_ENROL_WINDOW + 1
        session.save()
        credential = SoftAuthenticator().register(options)
        assert _post_json(client, "/access/passkey/register", credential).status_code == 404
        assert not PhysicianPasskey.objects.exists()

    def test_a_session_opened_with_a_passkey_cannot_enrol_another(self, study) -> None:  # type: ignore[no-untyped-def]
        authenticator = SoftAuthenticator()
        first = make_share(**PHYSICIAN)
        assert enrol(signed_in_by_email(first), authenticator).status_code == 200
        second = make_share(**PHYSICIAN)
        client = Client()
        open_link(client, second)
        response = passkey_sign_in(client, authenticator)
        assert response.status_code == 200, response.content
        assert client.get("/viewer/").status_code == 200
        assert client.session[access.VERIFIED_BY] == access.BY_PASSKEY
        # One passkey must not breed others.
        assert _post_json(client, "/access/passkey/register/options").status_code == 404
        assert client.get("/access/passkey")["Location"] == "/viewer/"

    def test_a_repeated_registration_is_a_clean_error(self, study) -> None:  # type: ignore[no-untyped-def]
        authenticator = SoftAuthenticator()
        created = make_share(**PHYSICIAN)
        assert enrol(signed_in_by_email(created), authenticator).status_code == 200
        # A later session registers the very same credential again (a browser would have
        # excluded it; a script does not).
        response = enrol(signed_in_by_email(created), authenticator)
        assert response.status_code == 400
        assert json.loads(response.content)["error"] == "Your passkey could not be saved."
        assert PhysicianPasskey.objects.count() == 1
        assert AuditEvent.objects.filter(
            share=created.share, action=AuditEvent.Action.PASSKEY_FAILED
        ).exists()

    def test_a_registration_for_another_origin_is_refused(self, study) -> None:  # type: ignore[no-untyped-def]
        created = make_share(**PHYSICIAN)
        client = signed_in_by_email(created)
        response = enrol(client, SoftAuthenticator(), origin="https://portal.evil.example")
        assert response.status_code == 400
        assert not PhysicianPasskey.objects.exists()

    def test_a_registration_without_user_verification_is_refused(self, study) -> None:  # type: ignore[no-untyped-def]
        created = make_share(**PHYSICIAN)
        client = signed_in_by_email(created)
        options = json.loads(_post_json(client, "/access/passkey/register/options").content)
        assert options["authenticatorSelection"]["userVerification"] == "required"
        credential = SoftAuthenticator().register(options, verified=False)
        assert _post_json(client, "/access/passkey/register", credential).status_code == 400
        assert not PhysicianPasskey.objects.exists()

    def test_a_registration_challenge_expires_after_five_minutes(self, study) -> None:  # type: ignore[no-untyped-def]
        created = make_share(**PHYSICIAN)
        client = signed_in_by_email(created)
        options = json.loads(_post_json(client, "/access/passkey/register/options").content)
        # Keep the session inside its enrolment window: only the challenge is old.
        session = client.session
        session["passkey.challenge"]["t"] -= passkeys.CHALLENGE_SECONDS + 1
        session.save()
        credential = SoftAuthenticator().register(options)
        assert _post_json(client, "/access/passkey/register", credential).status_code == 400
        assert not PhysicianPasskey.objects.exists()


class TestSignIn:
    @pytest.fixture
    def enrolled(self, study):  # type: ignore[no-untyped-def]
        authenticator = SoftAuthenticator()
        assert enrol(signed_in_by_email(make_share(**PHYSICIAN)), authenticator).status_code == 200
        return authenticator

    def test_a_passkey_opens_a_later_share_without_an_email(self, enrolled) -> None:  # type: ignore[no-untyped-def]
        created = make_share(**PHYSICIAN)
        mail.outbox.clear()
        client = Client()
        open_link(client, created)
        assert passkey_sign_in(client, enrolled).status_code == 200
        assert client.get("/viewer/").status_code == 200
        assert mail.outbox == []
        assert AuditEvent.objects.filter(
            share=created.share, action=AuditEvent.Action.PASSKEY_OK
        ).exists()

    def test_an_assertion_for_another_origin_is_refused(self, enrolled) -> None:  # type: ignore[no-untyped-def]
        created = make_share(**PHYSICIAN)
        client = Client()
        open_link(client, created)
        response = passkey_sign_in(client, enrolled, origin="https://portal.evil.example")
        assert response.status_code == 400
        assert client.get("/viewer/")["Location"] == "/access/"

    def test_an_assertion_without_user_verification_is_refused(self, enrolled) -> None:  # type: ignore[no-untyped-def]
        created = make_share(**PHYSICIAN)
        client = Client()
        open_link(client, created)
        assert passkey_sign_in(client, enrolled, verified=False).status_code == 400
        assert client.get("/viewer/")["Location"] == "/access/"

    def test_a_sign_in_challenge_expires_after_five_minutes(self, enrolled) -> None:  # type: ignore[no-untyped-def]
        created = make_share(**PHYSICIAN)
        client = Client()
        open_link(client, created)
        options = json.loads(_post_json(client, "/access/passkey/login/options").content)
        session = client.session
        session["passkey.challenge"]["t"] = int(time.time()) - passkeys.CHALLENGE_SECONDS - 1
        session.save()
        response = _post_json(client, "/access/passkey/login", enrolled.assert_(options))
        assert response.status_code == 400
        assert client.get("/viewer/")["Location"] == "/access/"


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
    assert [base64url_to_bytes(c["id"]) for c in options["allowCredentials"]] == [b"c" * 32]
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
    assert AuditEvent.objects.filter(
        share=created.share, action=AuditEvent.Action.PASSKEY_FAILED
    ).exists()
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
