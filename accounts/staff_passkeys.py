"""Passkeys (WebAuthn) as a second factor for members of staff.

The relying party, the origin and the one-use challenges are those of the physicians' passkeys
(accounts.passkeys); what differs is whose they are: a staff passkey is a django-otp device of
its user (accounts.models.StaffPasskey), so that signing in with it verifies the session as a
TOTP code does. A passkey follows the password: the browser is offered the user's own
credentials only.
"""

import hashlib

from django.contrib.sessions.backends.base import SessionBase
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.translation import gettext as _
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
)
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from accounts.models import StaffPasskey, User
from accounts.passkeys import (
    PasskeyError,
    assertion_sign_count,
    credential_id,
    recall_challenge,
    registration_verified,
    remember_challenge,
    rp_id,
)

__all__ = [
    "PasskeyError",
    "authenticate",
    "authentication_options",
    "register",
    "registration_options",
]

# At most this many passkeys per member of staff: each is a way in.
MAX_PASSKEYS = 10


def _subject(user: User) -> str:
    return f"staff:{user.pk}"


def _user_handle(user: User) -> bytes:
    # WebAuthn asks for an opaque handle with nothing personal in it: a digest of the key.
    return hashlib.sha256(f"staff:{user.pk}".encode()).digest()


def _descriptors(user: User) -> list[PublicKeyCredentialDescriptor]:
    return [
        PublicKeyCredentialDescriptor(id=bytes(p.credential_id))
        for p in StaffPasskey.objects.filter(user=user, confirmed=True)
    ]


def registration_options(user: User, session: SessionBase) -> str:
    options = generate_registration_options(
        rp_id=rp_id(),
        rp_name=_("Image portal"),
        user_name=user.get_username(),
        user_id=_user_handle(user),
        user_display_name=user.get_full_name() or user.get_username(),
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.PREFERRED,
            user_verification=UserVerificationRequirement.REQUIRED,
        ),
        exclude_credentials=_descriptors(user),
    )
    remember_challenge(session, options.challenge, "staff-register", _subject(user))
    return options_to_json(options)


def register(user: User, session: SessionBase, credential: str) -> StaffPasskey:
    challenge = recall_challenge(session, "staff-register", _subject(user))
    verified = registration_verified(credential, challenge)
    count = StaffPasskey.objects.filter(user=user).count()
    if count >= MAX_PASSKEYS:
        raise PasskeyError("as many passkeys as allowed")
    name = _("Passkey added on %(date)s") % {
        "date": timezone.localdate().isoformat(),
    }
    try:
        with transaction.atomic():
            return StaffPasskey.objects.create(
                user=user,
                name=name[:64],
                confirmed=True,
                credential_id=verified.credential_id,
                public_key=verified.credential_public_key,
                sign_count=verified.sign_count,
                created_at=timezone.now(),
            )
    except IntegrityError as exc:
        raise PasskeyError("this passkey is already registered") from exc


def authentication_options(user: User, session: SessionBase) -> str:
    descriptors = _descriptors(user)
    if not descriptors:
        raise PasskeyError("no passkey")
    options = generate_authentication_options(
        rp_id=rp_id(),
        allow_credentials=descriptors,
        user_verification=UserVerificationRequirement.REQUIRED,
    )
    remember_challenge(session, options.challenge, "staff-login", _subject(user))
    return options_to_json(options)


def authenticate(user: User, session: SessionBase, credential: str) -> StaffPasskey:
    """The user's passkey that signed this challenge, its counter and last use updated; else
    PasskeyError."""
    challenge = recall_challenge(session, "staff-login", _subject(user))
    raw_id = credential_id(credential)
    with transaction.atomic():
        passkey = (
            StaffPasskey.objects.select_for_update()
            .filter(user=user, confirmed=True, credential_id=raw_id)
            .first()
        )
        if passkey is None:
            raise PasskeyError("not one of this user's passkeys")
        passkey.sign_count = assertion_sign_count(
            credential,
            challenge,
            public_key=bytes(passkey.public_key),
            sign_count=passkey.sign_count,
        )
        passkey.set_last_used_timestamp(commit=False)
        passkey.save(update_fields=["sign_count", "last_used_at"])
    return passkey
