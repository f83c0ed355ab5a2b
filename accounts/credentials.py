"""The secrets a share is opened with: its link token and its typed access code.

Neither is ever stored. The link token (128 random bits) is signed with its issue time, so a
forged or stale link is refused before any database lookup, and stored as a SHA-256 hash (a
128-bit random value needs no salt or stretching). The access code is what a patient types from
a printed handout: Crockford base32, grouped by four, read case- and dash-insensitively. Its first
group is a public lookup prefix (unique among shares that can still be opened; it finds the
share row and keys the per-share lockout);
the other three groups are the secret, 60 bits, stored as a salted Argon2 hash.

A viewer token is what an external DICOMweb viewer (Weasis, a script) sends as
`Authorization: Bearer …`: minted by a verified recipient session for one study of its share,
signed with its issue time and read for `settings.VIEWER_TOKEN_MINUTES` only. It is not stored
at all: its signature and age are checked at every request, and so is the share it names
(accounts.selectors.share_for_viewer_token), so that revoking, expiring or locking the share
ends every token minted from it.
"""

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.hashers import Argon2PasswordHasher
from django.core import signing

# Crockford's alphabet has no I, L, O or U: nothing to confuse with 1, 0 or V.
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_READ_AS = str.maketrans({"I": "1", "L": "1", "O": "0"})
PREFIX_LENGTH = 4
SECRET_LENGTH = 12  # 12 × 5 bits = 60 bits
CODE_LENGTH = PREFIX_LENGTH + SECRET_LENGTH
TOKEN_BYTES = 16  # 128 bits
_LINK_SALT = "accounts.share-link"
_VIEWER_SALT = "accounts.viewer-token"
# A token is about 150 characters; anything much longer is refused before it is decoded.
_VIEWER_TOKEN_MAX_CHARS = 300


class AccessCodeHasher(Argon2PasswordHasher):
    """Argon2id with OWASP's minimum cost: the 60-bit secret part needs no more, and every
    typed code costs one hash, including codes that match nothing."""

    time_cost = 2
    memory_cost = 19456
    parallelism = 1


_hasher = AccessCodeHasher()
# A hash of a secret nobody has: verified against when nothing matched, so that an unknown
# code takes as long as a known one.
_DUMMY_HASH = _hasher.encode(secrets.token_hex(16), _hasher.salt())


@dataclass(frozen=True)
class NewAccessCode:
    prefix: str
    secret: str
    hashed_secret: str

    @property
    def display(self) -> str:
        return format_code(self.prefix + self.secret)


def _random_crockford(length: int) -> str:
    return "".join(secrets.choice(CROCKFORD) for _ in range(length))


def format_code(code: str) -> str:
    return "-".join(code[i : i + 4] for i in range(0, len(code), 4))


def new_access_code(prefix: str | None = None) -> NewAccessCode:
    prefix = prefix or new_prefix()
    secret = _random_crockford(SECRET_LENGTH)
    return NewAccessCode(prefix, secret, _hasher.encode(secret, _hasher.salt()))


def new_prefix() -> str:
    return _random_crockford(PREFIX_LENGTH)


def normalize_code(typed: str) -> str | None:
    """The code as stored (16 Crockford characters), or None when it cannot be one."""
    cleaned = "".join(ch for ch in typed.upper() if ch not in " -\u2010\u2011\u2012\u2013\t")
    cleaned = cleaned.translate(_READ_AS)
    if len(cleaned) != CODE_LENGTH or any(ch not in CROCKFORD for ch in cleaned):
        return None
    return cleaned


def split_code(code: str) -> tuple[str, str]:
    return code[:PREFIX_LENGTH], code[PREFIX_LENGTH:]


def code_secret_matches(secret: str, hashed: str | None) -> bool:
    """Always runs the hasher once, whether or not there is a hash to check against."""
    if hashed is None:
        _hasher.verify(secret, _DUMMY_HASH)
        return False
    return _hasher.verify(secret, hashed)


def new_link_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_link_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def sign_link_token(token: str) -> str:
    # "." cannot appear in a URL-safe base64 token, and keeps the link free of ":".
    return signing.TimestampSigner(salt=_LINK_SALT, sep=".").sign(token)


def unsign_link_token(signed: str) -> str | None:
    """The raw token of a link we issued less than settings.SHARE_MAX_DAYS ago (the longest a
    share can live, so such a link is refused unread), else None."""
    if len(signed) > 200:
        return None
    try:
        return signing.TimestampSigner(salt=_LINK_SALT, sep=".").unsign(
            signed, max_age=timedelta(days=settings.SHARE_MAX_DAYS)
        )
    except signing.BadSignature:
        return None


@dataclass(frozen=True)
class ViewerGrant:
    """What a valid viewer token names: a share and one study of it."""

    share_id: int
    study_instance_uid: str
    # When it was minted (seconds since the epoch): an emergency close ends older ones.
    issued_at: float


def _viewer_signer() -> signing.TimestampSigner:
    # "." is neither in URL-safe base64 nor outside RFC 6750's b64token (":" would be).
    return signing.TimestampSigner(salt=_VIEWER_SALT, sep=".")


def sign_viewer_token(*, share_id: int, study_instance_uid: str) -> str:
    """A new viewer token. The random nonce makes every token distinct (two minted in the same
    second for the same study are still two tokens); it is not a secret, the signature is."""
    payload = {
        "share": share_id,
        "study": study_instance_uid,
        "nonce": secrets.token_urlsafe(TOKEN_BYTES),
        "iat": int(time.time()),
    }
    return _viewer_signer().sign_object(payload)


def unsign_viewer_token(token: str) -> ViewerGrant | None:
    """What a viewer token we signed less than settings.VIEWER_TOKEN_MINUTES ago names, else
    None (forged, tampered with, too old, or not one of ours)."""
    if len(token) > _VIEWER_TOKEN_MAX_CHARS:
        return None
    try:
        payload = _viewer_signer().unsign_object(
            token, max_age=timedelta(minutes=settings.VIEWER_TOKEN_MINUTES)
        )
    except signing.BadSignature:
        return None
    if not isinstance(payload, dict):
        return None
    share_id, study, issued = payload.get("share"), payload.get("study"), payload.get("iat")
    if not isinstance(share_id, int) or not isinstance(study, str) or not isinstance(issued, int):
        return None
    return ViewerGrant(share_id=share_id, study_instance_uid=study, issued_at=issued)


def lockout_key_for_code(code: str | None, typed: str) -> str:
    """What axes counts failures of a typed code against: its public prefix, so that guesses
    at one share from many addresses still add up. Text that cannot be a code has no share:
    it counts against its own digest (and, like everything, against its address)."""
    if code is None:
        return "code:?" + hashlib.sha256(typed.encode()).hexdigest()[:16]
    return "code:" + code[:PREFIX_LENGTH]


def lockout_key_for_link(token: str) -> str:
    """What axes counts failures of a correctly signed link against. (A link whose signature is
    bad or stale is never counted: it cannot open anything, and counting it would let any web
    page lock its visitors' address out with a few <img src=".../s/junk">.)"""
    return "link:" + hash_link_token(token)[:16]


# --- staff recovery codes ----------------------------------------------------------------------
RECOVERY_CODE_LENGTH = 12  # 60 bits, as the access code's secret part


def new_recovery_code() -> tuple[str, str]:
    """A recovery code for a member of staff, as shown (grouped by four) and as stored (a
    salted Argon2 hash of its 12 characters: the clear code is never stored)."""
    code = _random_crockford(RECOVERY_CODE_LENGTH)
    return format_code(code), _hasher.encode(code, _hasher.salt())


def normalize_recovery_code(typed: str) -> str | None:
    cleaned = "".join(ch for ch in typed.upper() if ch not in " -\u2010\u2011\u2012\u2013\t")
    cleaned = cleaned.translate(_READ_AS)
    if len(cleaned) != RECOVERY_CODE_LENGTH or any(ch not in CROCKFORD for ch in cleaned):
        return None
    return cleaned


def recovery_code_matches(code: str, hashed: str) -> bool:
    return bool(code) and _hasher.verify(code, hashed)
