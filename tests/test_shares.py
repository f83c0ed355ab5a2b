"""Shares: what is stored, what is refused, how long they live, and the `share` command."""

import base64
import io
import json
import re
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.core import signing
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.utils import timezone

from accounts import credentials, selectors, services
from accounts.models import AuditEvent, Share
from studies.models import PacsNode, RetrievalJob
from tests.support.access import (
    OTHER_STUDY_UID,
    STUDY_UID,
    legacy_link_path,
    make_share,
    make_study,
    open_link,
    sign_in,
)

CODE_FORMAT = re.compile(r"^[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){3}$")


def _raw_token(url: str) -> str:
    signed = url.rsplit("/s/#", 1)[1]
    return signing.TimestampSigner(salt="accounts.share-link", sep=".").unsign(signed)


class TestSecretsAtRest:
    def test_it_stores_neither_the_token_nor_the_code(self, share):
        row = Share.objects.get(pk=share.share.pk)
        token = _raw_token(share.url)
        code = share.access_code.replace("-", "")
        stored = " ".join(str(getattr(row, f.attname)) for f in Share._meta.fields)
        assert token not in stored
        assert code not in stored
        assert code[4:] not in stored  # the secret part
        assert row.token_hash == credentials.hash_link_token(token)
        assert row.code_hash.startswith("argon2$argon2id$")
        # Salted: the same secret hashes differently each time.
        assert credentials.AccessCodeHasher().encode(code[4:], "a" * 22) != row.code_hash

    def test_it_draws_128_bit_tokens_and_60_bit_code_secrets(self, study):
        created = [make_share() for _ in range(40)]
        tokens = [base64.urlsafe_b64decode(_raw_token(c.url) + "==") for c in created]
        assert {len(t) for t in tokens} == {16}  # 128 bits
        assert len(set(tokens)) == len(tokens)
        assert all(CODE_FORMAT.match(c.access_code) for c in created)
        # The secret part: 12 symbols drawn from all 32 of the alphabet (5 bits each: 60 bits).
        secrets_ = [c.access_code.replace("-", "")[4:] for c in created]
        assert {len(x) for x in secrets_} == {12}
        assert set("".join(secrets_)) == set(credentials.CROCKFORD)
        assert len(set(secrets_)) == len(secrets_)

    def test_it_audits_the_creation_without_the_secrets(self, share):
        event = AuditEvent.objects.get(share=share.share, action=AuditEvent.Action.SHARE_CREATED)
        blob = json.dumps(event.detail)
        assert share.access_code not in blob and _raw_token(share.url) not in blob


class TestCodeReading:
    def test_it_reads_codes_case_and_dash_insensitively(self) -> None:
        assert credentials.normalize_code("k7rm-9xq2-ht4p-2b6d") == "K7RM9XQ2HT4P2B6D"
        assert credentials.normalize_code(" K7RM 9XQ2 HT4P 2B6D ") == "K7RM9XQ2HT4P2B6D"
        # Crockford: I and L read as 1, O as 0.
        assert credentials.normalize_code("KIRM-9XQ2-HT4P-2B6O") == "K1RM9XQ2HT4P2B60"
        assert credentials.normalize_code("KLRM9XQ2HT4P2B6D") == "K1RM9XQ2HT4P2B6D"

    def test_it_rejects_what_cannot_be_a_code(self) -> None:
        assert credentials.normalize_code("K7RM-9XQ2-HT4P") is None  # too short
        assert credentials.normalize_code("K7RM-9XQ2-HT4P-2B6U") is None  # U is not Crockford
        assert credentials.normalize_code("' OR 1=1 --") is None


class TestLinkSignature:
    def test_it_refuses_a_forged_link_before_any_lookup(self, share, django_assert_num_queries):
        forged = credentials.new_link_token() + ".abcdef.forgedsignature"
        with django_assert_num_queries(0):
            check = selectors.share_check_link(forged)
        assert check.share is None

    def test_it_refuses_a_link_signed_longer_ago_than_a_share_can_live(
        self, share, django_assert_num_queries, monkeypatch
    ):
        signed = share.url.rsplit("/s/#", 1)[1]
        later = timezone.now().timestamp() + (settings.SHARE_MAX_DAYS + 1) * 86400
        monkeypatch.setattr("django.core.signing.time.time", lambda: later)
        with django_assert_num_queries(0):
            assert selectors.share_check_link(signed).share is None

    def test_it_reads_links_as_long_as_the_longest_share_lives(self, study, settings, monkeypatch):
        # One ceiling: raising it lets links live as long as the shares they open.
        settings.SHARE_MAX_DAYS = 120
        created = make_share(days=120)
        signed = created.url.rsplit("/s/#", 1)[1]
        later = timezone.now().timestamp() + 119 * 86400
        monkeypatch.setattr("django.core.signing.time.time", lambda: later)
        assert selectors.share_check_link(signed).share == created.share

    def test_it_accepts_its_own_link(self, share):
        signed = share.url.rsplit("/s/#", 1)[1]
        assert selectors.share_check_link(signed).share == share.share


class TestExpiry:
    def test_it_gives_patients_30_days_and_physicians_14(self, study) -> None:
        patient = make_share().share
        physician = make_share(
            recipient="physician", channel="email", contact="dr@example.org"
        ).share
        assert abs(patient.expires_at - patient.created_at - timedelta(days=30)) < timedelta(
            seconds=1
        )
        assert abs(physician.expires_at - physician.created_at - timedelta(days=14)) < timedelta(
            seconds=1
        )

    def test_it_never_allows_more_than_90_days(self, study) -> None:
        with pytest.raises(ValidationError):
            make_share(days=91)
        with pytest.raises(ValidationError):
            make_share(days=0)
        assert make_share(days=90).share

    def test_it_refuses_bad_contacts(self, study) -> None:
        with pytest.raises(ValidationError):
            make_share(contact="06 12 34")  # too short to be a phone number
        with pytest.raises(ValidationError):
            make_share(contact="+33 1 42 34 56 78")  # a landline: no text message reaches it
        with pytest.raises(ValidationError):
            make_share(channel="email", contact="not-an-address")
        with pytest.raises(ValidationError):
            make_share(recipient="physician", channel="sms")

    def test_it_refuses_an_address_too_long_to_store(self, study) -> None:
        # Valid for Django (up to 320 characters), longer than the column: a clear error, not
        # a database failure (PostgreSQL) or a silently cut address.
        address = "a" * 64 + "@" + ".".join(label * 63 for label in "cde") + ".org"
        assert 254 < len(address) <= 320
        with pytest.raises(ValidationError) as info:
            make_share(recipient="physician", channel="email", contact=address)
        assert "too long" in str(info.value.message_dict["contact"])
        assert not Share.objects.exists()


class TestCodePrefixes:
    """The public prefix has 20 bits and shares are never deleted: a share that can no longer
    be opened gives its prefix back, and its old code then matches nothing."""

    @pytest.fixture
    def prefixes(self, monkeypatch):
        """The prefixes the next codes will be drawn with, in order; what was drawn."""
        planned: list[str] = []
        drawn: list[str] = []
        real_new = credentials.new_access_code

        def planned_new(prefix: str | None = None) -> credentials.NewAccessCode:
            drawn.append(planned.pop(0))
            return real_new(drawn[-1])

        monkeypatch.setattr(credentials, "new_access_code", planned_new)
        return planned, drawn

    def _refused_alike(self, code: str) -> None:
        check = selectors.share_check_code(code)
        assert check.share is None
        response = Client().post("/access/", {"code": code}, REMOTE_ADDR="198.51.100.90")
        assert (
            response.status_code == 200 and b"This link or code does not work" in response.content
        )

    def test_revoking_gives_the_prefix_back(self, share) -> None:
        prefix = share.access_code[:4]
        services.share_revoke(share=share.share)
        assert Share.objects.get(pk=share.share.pk).code_prefix is None
        assert not Share.objects.filter(code_prefix=prefix).exists()
        self._refused_alike(share.access_code)

    def test_a_new_share_takes_the_prefix_of_an_expired_one(self, study, prefixes) -> None:
        planned, drawn = prefixes
        planned += ["K7RM", "K7RM"]
        old = make_share()
        assert old.access_code.startswith("K7RM")
        Share.objects.filter(pk=old.share.pk).update(expires_at=timezone.now() - timedelta(days=1))
        new = make_share()
        # Creation did not fail nor draw again: the expired share gave the prefix back.
        assert drawn == ["K7RM", "K7RM"]
        assert new.access_code.startswith("K7RM")
        assert Share.objects.get(pk=old.share.pk).code_prefix is None
        self._refused_alike(old.access_code)
        assert selectors.share_check_code(new.access_code).share == new.share

    def test_a_live_share_keeps_its_prefix(self, study, prefixes) -> None:
        planned, drawn = prefixes
        planned += ["K7RM", "K7RM", "Q2HT"]
        live = make_share()
        other = make_share()
        # The second share found K7RM taken by a live share, and drew again.
        assert drawn == ["K7RM", "K7RM", "Q2HT"]
        assert other.access_code.startswith("Q2HT")
        assert Share.objects.get(pk=live.share.pk).code_prefix == "K7RM"
        assert selectors.share_check_code(live.access_code).share == live.share

    def test_failures_typed_at_a_free_prefix_do_not_burden_its_next_share(
        self, study, prefixes
    ) -> None:
        from axes.models import AccessAttempt

        prefixes[0].append("K7RM")
        for i in range(5):
            Client().post(
                "/access/", {"code": "K7RM-0000-0000-0000"}, REMOTE_ADDR=f"198.51.100.{i + 1}"
            )
        assert AccessAttempt.objects.filter(username="code:K7RM").count() == 5
        created = make_share()
        assert created.access_code.startswith("K7RM")
        response = Client().post("/access/", {"code": created.access_code})
        assert response["Location"] == "/access/verify"

    def test_scheduled_work_releases_every_dead_prefix(self, study) -> None:
        live = make_share()
        expired = make_share()
        used = make_share(single_use=True)
        revoked_later = make_share()
        Share.objects.filter(pk=expired.share.pk).update(expires_at=timezone.now())
        Share.objects.filter(pk=used.share.pk).update(used_at=timezone.now())
        Share.objects.filter(pk=revoked_later.share.pk).update(revoked_at=timezone.now())
        assert services.shares_release_dead_codes() == 3
        assert list(Share.objects.filter(code_prefix__isnull=False)) == [live.share]
        for dead in (expired, used, revoked_later):
            self._refused_alike(dead.access_code)
        assert services.shares_release_dead_codes() == 0


class TestStatus:
    def test_it_is_pending_until_the_study_is_in_the_store(self, db) -> None:
        created = make_share(OTHER_STUDY_UID)
        assert created.share.study is None
        assert selectors.share_status(created.share) == "pending"
        make_study(OTHER_STUDY_UID)
        assert selectors.share_status(created.share) == "active"
        services.share_attach_study(created.share)
        assert Share.objects.get(pk=created.share.pk).study is not None

    def test_it_says_revoked_expired_and_used(self, share) -> None:
        row = share.share
        row.single_use = True
        row.used_at = timezone.now()
        assert selectors.share_status(row) == "used"
        row.expires_at = timezone.now() - timedelta(seconds=1)
        assert selectors.share_status(row) == "expired"
        services.share_revoke(share=row)
        assert selectors.share_status(row) == "revoked"


class TestShareCommand:
    def _run(self, *args: str) -> str:
        out = io.StringIO()
        call_command("share", *args, stdout=out)
        return out.getvalue()

    def test_it_prints_exactly_the_contract_fields_as_json(self, study) -> None:
        data = json.loads(
            self._run("create", STUDY_UID, "--patient-phone", "+33612345642", "--json")
        )
        assert set(data) == {"id", "url", "access_code", "expires_at", "status", "studies"}
        assert data["status"] == "active"
        assert data["studies"] == [STUDY_UID]
        assert re.match(r"^http://127\.0\.0\.1:8000/s/#[A-Za-z0-9_\-.]+$", data["url"])
        assert CODE_FORMAT.match(data["access_code"])
        share = Share.objects.get(pk=data["id"])
        assert share.recipient == "patient" and share.channel == "sms"
        assert selectors.share_check_code(data["access_code"]).share == share

    def test_it_shares_a_study_with_its_priors(self, study) -> None:
        prior = make_study(OTHER_STUDY_UID, patient_id=study.patient_id, description="CT 2024")
        data = json.loads(
            self._run(
                "create",
                STUDY_UID,
                prior.study_instance_uid,
                "--physician-email",
                "dr.martin@example.org",
                "--json",
            )
        )
        assert data["studies"] == [STUDY_UID, OTHER_STUDY_UID]
        assert data["status"] == "active"
        listing = json.loads(self._run("list", "--json"))
        assert listing[0]["studies"] == [STUDY_UID, OTHER_STUDY_UID]

    def test_it_creates_physician_shares_for_14_days_with_options(self, study) -> None:
        data = json.loads(
            self._run(
                "create",
                STUDY_UID,
                "--physician-email",
                "dr@example.org",
                "--no-download",
                "--days",
                "7",
                "--json",
            )
        )
        share = Share.objects.get(pk=data["id"])
        assert share.recipient == "physician" and share.channel == "email"
        assert not share.allow_download
        assert timedelta(days=6, hours=23) < share.expires_at - timezone.now() <= timedelta(days=7)

    def test_it_queues_a_retrieval_for_a_study_the_store_lacks(self, db) -> None:
        PacsNode.objects.create(name="pacs1", ae_title="PACS1", host="127.0.0.1", port=4242)
        data = json.loads(
            self._run(
                "create",
                OTHER_STUDY_UID,
                "--pacs",
                "pacs1",
                "--patient-email",
                "marie@example.org",
                "--json",
            )
        )
        assert data["status"] == "pending"
        job = RetrievalJob.objects.get(study_instance_uid=OTHER_STUDY_UID)
        assert job.pacs is not None and job.pacs.name == "pacs1"

    def test_it_refuses_an_unknown_node_and_bad_input(self, db) -> None:
        with pytest.raises(CommandError):
            self._run("create", STUDY_UID, "--pacs", "nope", "--patient-phone", "+33612345642")
        with pytest.raises(CommandError):
            self._run("create", STUDY_UID, "--patient-phone", "0612", "--json")
        with pytest.raises(CommandError):
            self._run("create", STUDY_UID, "--patient-phone", "+33612345642", "--days", "120")
        assert not Share.objects.exists()

    @pytest.mark.parametrize(
        "uid",
        ["1.2.<script>", STUDY_UID + "\n", "1.2..3", "1." + "2" * 64, "../1.2", ""],
    )
    def test_it_refuses_a_bad_study_uid(self, db, uid: str) -> None:
        # UIDs become folder and file names in the store: a trailing newline or a path
        # separator must not slip through.
        with pytest.raises(CommandError):
            self._run("create", uid, "--patient-phone", "+33612345642")
        assert not Share.objects.exists()

    def test_it_revokes_unlocks_and_lists(self, share) -> None:
        pk = share.share.pk
        Share.objects.filter(pk=pk).update(locked_until=timezone.now() + timedelta(minutes=10))
        listing = json.loads(self._run("list", "--json"))
        assert listing[0]["id"] == pk and listing[0]["locked"] is True
        self._run("unlock", str(pk))
        assert not selectors.share_is_locked(Share.objects.get(pk=pk))
        self._run("revoke", str(pk))
        assert Share.objects.get(pk=pk).revoked_at is not None
        assert json.loads(self._run("list", "--json"))[0]["status"] == "revoked"
        assert json.loads(self._run("list", "--live", "--json")) == []
        assert (
            AuditEvent.objects.filter(share_id=pk, action=AuditEvent.Action.SHARE_REVOKED).count()
            == 1
        )
        with pytest.raises(CommandError):
            self._run("revoke", "999999")


class TestCreateStaff:
    def test_it_creates_staff_with_a_totp_device(self, db, monkeypatch) -> None:
        from django_otp.plugins.otp_totp.models import TOTPDevice

        from accounts.models import User

        monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery staple 42\n"))
        out = io.StringIO()
        call_command(
            "createstaff",
            "secretary",
            "--email",
            "sec@example.org",
            "--role",
            "sharer",
            "--password-stdin",
            "--totp",
            stdout=out,
        )
        user = User.objects.get(username="secretary")
        assert user.check_password("correct horse battery staple 42")
        assert user.role == "sharer" and not user.is_superuser
        assert user.password.startswith("argon2")
        assert TOTPDevice.objects.filter(user=user, confirmed=True).count() == 1
        assert re.search(r"^otpauth://totp/", out.getvalue(), re.M)

    def test_it_refuses_weak_passwords(self, db, monkeypatch) -> None:
        monkeypatch.setattr("sys.stdin", io.StringIO("123\n"))
        with pytest.raises(CommandError):
            call_command("createstaff", "bob", "--email", "bob@example.org", "--password-stdin")


class TestAuditLog:
    def test_the_admin_shows_it_read_only(self, share, rf) -> None:
        from django.contrib import admin

        model_admin = admin.site._registry[AuditEvent]
        request = rf.get("/admin/")
        event = AuditEvent.objects.first()
        assert not model_admin.has_add_permission(request)
        assert not model_admin.has_change_permission(request, event)
        assert not model_admin.has_delete_permission(request, event)

    def test_a_shares_whole_life_only_ever_adds_events(self, share, sms_dir) -> None:
        from django.test import Client

        def snapshot() -> dict[int, tuple[Any, ...]]:
            return {e["id"]: tuple(e.values()) for e in AuditEvent.objects.values()}

        steps = [
            lambda: sign_in(Client(), share, sms_dir),
            lambda: Client().post("/access/", {"code": "AAAA-BBBB-CCCC-DDDD"}),
            lambda: services.share_unlock(share=Share.objects.get(pk=share.share.pk)),
            lambda: services.share_revoke(share=Share.objects.get(pk=share.share.pk)),
            lambda: services.shares_release_dead_codes(),
            lambda: open_link(Client(), share),
            lambda: Client().get(legacy_link_path(share)),
        ]
        before = snapshot()
        for step in steps:
            step()
            after = snapshot()
            # Every earlier event is still there, unchanged; new ones were added.
            assert {k: after[k] for k in before} == before
            before = after
        actions = set(AuditEvent.objects.values_list("action", flat=True))
        assert actions == {
            AuditEvent.Action.SHARE_CREATED,
            AuditEvent.Action.LINK_OPENED,
            AuditEvent.Action.OTP_SENT,
            AuditEvent.Action.OTP_OK,
            AuditEvent.Action.CODE_FAILED,
            AuditEvent.Action.SHARE_UNLOCKED,
            AuditEvent.Action.SHARE_REVOKED,
            AuditEvent.Action.LINK_FAILED,
        }

    def test_a_share_with_events_cannot_be_deleted(self, share) -> None:
        from django.db.models import ProtectedError

        with pytest.raises(ProtectedError):
            Share.objects.filter(pk=share.share.pk).delete()
