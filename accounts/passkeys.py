"""Passkeys (WebAuthn, through py_webauthn) for referring physicians.

A physician who proved their mailbox with an emailed code may enrol a passkey; a later share
sent to the same address then takes the passkey instead of an emailed code (the link is still
needed: the passkey replaces the second factor only). The relying party is PORTAL_BASE_URL's
host, and only that origin is accepted.
"""

import json
import time
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.sessions.backends.base import SessionBase
from django.db import IntegrityError, transaction
from django.utils import timezone
from webauthn import (
    base64url_to_bytes,
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import bytes_to_base64url
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)
from webauthn.registration.verify_registration_response import VerifiedRegistration

from accounts.models import PhysicianPasskey, Share

_CHALLENGE = "passkey.challenge"
# A challenge not answered within this many seconds is refused, whatever the browser was told.
CHALLENGE_SECONDS = 5 * 60


class PasskeyError(Exception):
    """The browser's answer was not a valid passkey response for this challenge."""


def rp_id() -> str:
    return urlsplit(settings.BASE_URL).hostname or "localhost"


def expected_origin() -> str:
    parts = urlsplit(settings.BASE_URL)
    return f"{parts.scheme}://{parts.netloc}"


def _passkeys(share: Share) -> Any:
    """The passkeys that sign in for this share's address: idle ones no longer do
    (PhysicianPasskeyQuerySet.usable), and the physician enrols again as a new one would."""
    return PhysicianPasskey.objects.usable().filter(email__iexact=share.contact)


def should_offer(share: Share) -> bool:
    return share.recipient == Share.Recipient.PHYSICIAN and not _passkeys(share).exists()


def may_add(share: Share) -> bool:
    """At most PORTAL_PASSKEYS_PER_ADDRESS passkeys open one address's shares: each is a way
    in, and one who got hold of a link and an emailed code once must not pile them up."""
    return bool(_passkeys(share).count() < settings.PASSKEYS_PER_ADDRESS)


def can_sign_in(share: Share) -> bool:
    return share.recipient == Share.Recipient.PHYSICIAN and _passkeys(share).exists()


def remember_challenge(session: SessionBase, challenge: bytes, purpose: str, subject: str) -> None:
    """Keep a WebAuthn challenge in the session for one purpose ("register", "login"…) and one
    subject (a share, a member of staff)."""
    session[_CHALLENGE] = {
        "c": bytes_to_base64url(challenge),
        "p": purpose,
        "s": subject,
        "t": int(time.time()),
    }


def recall_challenge(session: SessionBase, purpose: str, subject: str) -> bytes:
    # A challenge serves once, for the purpose and subject it was made for, and not for long.
    stored = session.pop(_CHALLENGE, None)
    if not stored or stored.get("p") != purpose or stored.get("s") != subject:
        raise PasskeyError("no challenge pending")
    if not 0 <= int(time.time()) - int(stored.get("t", 0)) <= CHALLENGE_SECONDS:
        raise PasskeyError("challenge expired")
    return base64url_to_bytes(stored["c"])


# --- the WebAuthn checks, shared by the physicians' passkeys and the staff's (staff_passkeys) ---


def registration_verified(credential: str, challenge: bytes) -> VerifiedRegistration:
    """The browser's registration answer checked against our challenge, relying party and
    origin, with user verification required."""
    try:
        return verify_registration_response(
            credential=credential,
            expected_challenge=challenge,
            expected_rp_id=rp_id(),
            expected_origin=expected_origin(),
            require_user_verification=True,
        )
    except (WebAuthnException, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise PasskeyError(str(exc)) from exc


def credential_id(credential: str) -> bytes:
    """The id of the credential a browser's authentication answer names."""
    try:
        return base64url_to_bytes(json.loads(credential)["rawId"])
    except (ValueError, KeyError, TypeError) as exc:
        raise PasskeyError("malformed credential") from exc


def assertion_sign_count(
    credential: str, challenge: bytes, *, public_key: bytes, sign_count: int
) -> int:
    """The browser's authentication answer checked against our challenge and the stored
    public key and counter (a cloned authenticator shows as a counter going back); returns
    the new counter."""
    try:
        verified = verify_authentication_response(
            credential=credential,
            expected_challenge=challenge,
            expected_rp_id=rp_id(),
            expected_origin=expected_origin(),
            credential_public_key=public_key,
            credential_current_sign_count=sign_count,
            require_user_verification=True,
        )
    except (WebAuthnException, ValueError, KeyError) as exc:
        raise PasskeyError(str(exc)) from exc
    return verified.new_sign_count


def _remember(session: SessionBase, challenge: bytes, purpose: str, share: Share) -> None:
    remember_challenge(session, challenge, purpose, f"share:{share.pk}")


def _recall(session: SessionBase, purpose: str, share: Share) -> bytes:
    return recall_challenge(session, purpose, f"share:{share.pk}")


def registration_options(share: Share, session: SessionBase) -> str:
    existing = list(_passkeys(share))
    user_handle = bytes(existing[0].user_handle) if existing else None
    options = generate_registration_options(
        rp_id=rp_id(),
        rp_name="Image portal",
        user_name=share.contact,
        user_id=user_handle,
        user_display_name=share.contact,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.PREFERRED,
            user_verification=UserVerificationRequirement.REQUIRED,
        ),
        exclude_credentials=[
            PublicKeyCredentialDescriptor(id=bytes(p.credential_id)) for p in existing
        ],
    )
    _remember(session, options.challenge, "register", share)
    session["passkey.user"] = bytes_to_base64url(options.user.id)
    return options_to_json(options)


def register(share: Share, session: SessionBase, credential: str) -> PhysicianPasskey:
    challenge = _recall(session, "register", share)
    user_handle = base64url_to_bytes(session.pop("passkey.user", ""))
    verified = registration_verified(credential, challenge)
    try:
        with transaction.atomic():
            # Idle passkeys of this address are gone for good: the same authenticator may be
            # enrolled again, and they do not count against the limit.
            PhysicianPasskey.objects.idle().filter(email__iexact=share.contact).delete()
            if not may_add(share):
                raise PasskeyError("this address has as many passkeys as it may")
            return PhysicianPasskey.objects.create(
                email=share.contact.lower(),
                user_handle=user_handle,
                credential_id=verified.credential_id,
                public_key=verified.credential_public_key,
                sign_count=verified.sign_count,
                enrolled_with=share,
            )
    except IntegrityError as exc:
        # The same authenticator answered again (a replayed or repeated registration).
        raise PasskeyError("this passkey is already registered") from exc


def authentication_options(share: Share, session: SessionBase) -> str:
    options = generate_authentication_options(
        rp_id=rp_id(),
        allow_credentials=[
            PublicKeyCredentialDescriptor(id=bytes(p.credential_id)) for p in _passkeys(share)
        ],
        user_verification=UserVerificationRequirement.REQUIRED,
    )
    _remember(session, options.challenge, "login", share)
    return options_to_json(options)


def authenticate(share: Share, session: SessionBase, credential: str) -> PhysicianPasskey:
    challenge = _recall(session, "login", share)
    raw_id = credential_id(credential)
    with transaction.atomic():
        passkey = _passkeys(share).select_for_update().filter(credential_id=raw_id).first()
        if passkey is None:
            raise PasskeyError("unknown credential for this address")
        passkey.sign_count = assertion_sign_count(
            credential,
            challenge,
            public_key=bytes(passkey.public_key),
            sign_count=passkey.sign_count,
        )
        passkey.last_used_at = timezone.now()
        passkey.save(update_fields=["sign_count", "last_used_at"])
    return passkey
