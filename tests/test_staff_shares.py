"""The shares in the staff workspace: the list by status and patient, each share's access log,
and the actions on shares (revoke, extend, unlock, revoke every share of a patient), played by
alice (a sharer), bob (an auditor), carol (an administrator) and mallory (an attacker)."""

import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts import credentials
from accounts import selectors as account_selectors
from accounts import services as account_services
from accounts.models import AuditEvent, Share, User
from studies import selectors
from tests.support.access import (
    STUDY_UID,
    link_token,
    make_share,
    make_study,
    post_link,
    share_of,
    sign_in,
)
from tests.support.staff import staff_client

pytestmark = pytest.mark.django_db

PENDING_UID = "1.2.826.0.1.3680043.8.498.3003"


def _user(username: str, role: str) -> User:
    return User.objects.create_user(username, f"{username}@example.org", "x" * 20, role=role)


@pytest.fixture
def alice() -> User:
    return _user("alice", User.Role.SHARER)


@pytest.fixture
def bob() -> User:
    return _user("bob", User.Role.AUDITOR)


@pytest.fixture
def carol() -> User:
    return _user("carol", User.Role.ADMIN)


def _listed(response: Any) -> list[int]:
    """The shares a list page shows, in its order."""
    assert response.status_code == 200
    return [
        int(pk) for pk in re.findall(r'href="/staff/shares/(\d+)/log/"', response.content.decode())
    ]


def _shares_in_every_state() -> dict[str, Share]:
    make_study()
    now = timezone.now()
    shares = {
        "active": make_share().share,
        "retrieving": make_share(PENDING_UID).share,
        "locked": make_share().share,
        "expired": make_share().share,
        "used": make_share(single_use=True).share,
        "revoked": make_share().share,
    }
    Share.objects.filter(pk=shares["locked"].pk).update(
        otp_failures=settings.OTP_LIFETIME_MAX_FAILURES
    )
    Share.objects.filter(pk=shares["expired"].pk).update(expires_at=now - timedelta(minutes=1))
    Share.objects.filter(pk=shares["used"].pk).update(used_at=now)
    account_services.share_revoke(share=shares["revoked"])
    return shares


class TestTheList:
    def test_it_filters_by_each_status(self, alice: User) -> None:
        shares = _shares_in_every_state()
        client = staff_client(alice)

        for status, share in shares.items():
            assert _listed(client.get("/staff/shares/", {"status": status})) == [share.pk], status
        assert sorted(_listed(client.get("/staff/shares/"))) == sorted(
            s.pk for s in shares.values()
        )

    def test_its_status_is_the_rule_of_each_share(self, alice: User) -> None:
        """The database's status agrees with the row rules: Share.refusal, the lock selector,
        and share_status's pending for a study the store lacks."""
        for share in _shares_in_every_state().values():
            annotated = selectors.share_with_status(share.pk)
            assert annotated is not None
            row = Share.objects.get(pk=share.pk)
            refusal = row.refusal()
            if refusal is not None:
                expected = refusal.value
            elif account_selectors.share_is_locked(row):
                expected = "locked"
            else:
                expected = {"pending": "retrieving"}.get(
                    account_selectors.share_status(row), account_selectors.share_status(row)
                )
            assert getattr(annotated, "status") == expected  # noqa: B009

    def test_a_share_with_a_prior_not_yet_in_the_store_is_retrieving(self, alice: User) -> None:
        make_study()
        share = make_share(prior_study_instance_uids=[PENDING_UID]).share
        client = staff_client(alice)
        assert _listed(client.get("/staff/shares/", {"status": "retrieving"})) == [share.pk]
        assert _listed(client.get("/staff/shares/", {"status": "active"})) == []

    def test_it_filters_by_patient_id_or_name(self, alice: User) -> None:
        make_study(patient_name="DUPONT^Marie", patient_id="PID-DUPONT")
        make_study("1.2.826.0.1.3680043.8.498.4004", patient_name="MARTIN^Paul", patient_id="PID-M")
        dupont = make_share().share
        martin = make_share("1.2.826.0.1.3680043.8.498.4004").share
        client = staff_client(alice)

        assert _listed(client.get("/staff/shares/", {"patient": "PID-DUPONT"})) == [dupont.pk]
        assert _listed(client.get("/staff/shares/", {"patient": "pid-m"})) == [martin.pk]
        assert _listed(client.get("/staff/shares/", {"patient": "marie dupont"})) == [dupont.pk]
        assert _listed(client.get("/staff/shares/", {"patient": "Nobody"})) == []
        page = client.get("/staff/shares/", {"patient": "PID-DUPONT"}).content.decode()
        assert "Marie DUPONT" in page and "DUPONT^Marie" not in page

    def test_it_pages_newest_first(self, alice: User) -> None:
        make_study()
        shares = [make_share().share for _ in range(30)]
        client = staff_client(alice)

        first = _listed(client.get("/staff/shares/"))
        second = _listed(client.get("/staff/shares/", {"page": 2}))
        assert first == [s.pk for s in reversed(shares)][:25]
        assert second == [s.pk for s in reversed(shares)][25:]

    def test_it_reads_a_page_in_a_fixed_number_of_queries(
        self, alice: User, django_assert_max_num_queries: Any
    ) -> None:
        make_study()
        for _ in range(30):
            make_share(created_by=alice)
        client = staff_client(alice)
        with django_assert_max_num_queries(8):
            assert len(_listed(client.get("/staff/shares/", {"status": "active"}))) == 25

    def test_a_bad_filter_is_ignored_not_an_error(self, alice: User) -> None:
        make_study()
        share = make_share().share
        response = staff_client(alice).get("/staff/shares/", {"status": "<script>", "page": "x"})
        assert _listed(response) == [share.pk]
        assert "<script>" not in response.content.decode()

    def test_it_speaks_french(self, alice: User) -> None:
        make_study()
        make_share()
        page = staff_client(alice).get("/staff/shares/", HTTP_ACCEPT_LANGUAGE="fr").content.decode()
        assert "Partages" in page and "Active" not in page.split("<tbody>")[1]


class TestTheLog:
    def test_it_shows_who_opened_the_share_when_and_from_where(
        self, alice: User, sms_dir: Path
    ) -> None:
        make_study()
        created = make_share()
        sign_in(
            Client(), created, sms_dir, REMOTE_ADDR="203.0.113.7", HTTP_USER_AGENT="PhoneBrowser/1"
        )

        page = staff_client(alice).get(f"/staff/shares/{created.share.pk}/log/").content.decode()
        assert "Link opened" in page and "One-time code accepted" in page
        assert "203.0.113.7" in page and "PhoneBrowser/1" in page
        # The contact is shown masked, the credentials never.
        assert "06 •• •• •• 42" in page and "+33612345642" not in page
        assert created.access_code not in page and link_token(created) not in page

    def test_an_unknown_share_is_404(self, alice: User) -> None:
        assert staff_client(alice).get("/staff/shares/999999/log/").status_code == 404


class TestRevoke:
    def test_it_ends_the_recipient_session_and_viewer_tokens_at_once(
        self, alice: User, sms_dir: Path
    ) -> None:
        make_study()
        created = make_share()
        recipient = Client()
        sign_in(recipient, created, sms_dir)
        assert recipient.get("/viewer/").status_code == 200
        assert recipient.get("/dicomweb/studies").status_code == 200
        token = credentials.sign_viewer_token(
            share_id=created.share.pk, study_instance_uid=STUDY_UID
        )
        viewer = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
        assert viewer.get("/dicomweb/studies").status_code == 200

        response = staff_client(alice).post(
            f"/staff/shares/{created.share.pk}/revoke/", follow=True
        )

        assert response.redirect_chain[-1][0] == f"/staff/shares/{created.share.pk}/log/"
        assert "is revoked" in response.content.decode()
        share = share_of(created)
        assert share.revoked_at is not None and share.revoked_by == alice
        assert AuditEvent.objects.filter(
            share=share, action=AuditEvent.Action.SHARE_REVOKED, actor=alice
        ).exists()
        # The open session and the token are refused at their next request.
        assert recipient.get("/dicomweb/studies").status_code == 404
        assert recipient.get("/viewer/")["Location"] == "/access/"
        assert viewer.get("/dicomweb/studies").status_code == 401
        # The link now gets the answer of a link that never existed.
        revoked = post_link(Client(), link_token(created))
        unknown = post_link(Client(), link_token(make_share()) + "x")
        assert (revoked.status_code, revoked["Location"]) == (
            unknown.status_code,
            unknown["Location"],
        )

    def test_a_get_revokes_nothing(self, alice: User) -> None:
        make_study()
        created = make_share()
        assert (
            staff_client(alice).get(f"/staff/shares/{created.share.pk}/revoke/").status_code == 405
        )
        assert share_of(created).revoked_at is None

    def test_bob_the_auditor_cannot_revoke(self, bob: User) -> None:
        make_study()
        created = make_share()
        client = staff_client(bob)
        assert client.post(f"/staff/shares/{created.share.pk}/revoke/").status_code == 403
        assert client.get("/staff/shares/").status_code == 403
        assert client.get(f"/staff/shares/{created.share.pk}/log/").status_code == 403
        assert share_of(created).revoked_at is None

    def test_carol_the_admin_may(self, carol: User) -> None:
        make_study()
        created = make_share()
        assert (
            staff_client(carol).post(f"/staff/shares/{created.share.pk}/revoke/").status_code == 302
        )
        assert share_of(created).revoked_by == carol

    def test_mallory_without_a_session_is_sent_to_sign_in(self) -> None:
        make_study()
        created = make_share()
        response = Client().post(f"/staff/shares/{created.share.pk}/revoke/")
        assert response.status_code == 302 and response["Location"].startswith("/staff/login/")
        assert share_of(created).revoked_at is None

    def test_mallory_cannot_forge_the_post_from_another_site(self, alice: User) -> None:
        """A page elsewhere makes alice's browser post the form: without the CSRF token the
        portal refuses."""
        make_study()
        created = make_share()
        browser = Client(enforce_csrf_checks=True)
        browser.cookies = staff_client(alice).cookies
        for path in (
            f"/staff/shares/{created.share.pk}/revoke/",
            f"/staff/shares/{created.share.pk}/extend/",
            "/staff/shares/revoke-patient/",
        ):
            response = browser.post(path, {"days": 5, "patient_id": "PID-1001"})
            assert response.status_code == 403, path
        share = share_of(created)
        assert share.revoked_at is None and share.expires_at == created.share.expires_at


class TestExtend:
    def test_it_extends_within_the_ceiling(self, alice: User) -> None:
        make_study()
        created = make_share(days=30)
        before = created.share.expires_at

        response = staff_client(alice).post(
            f"/staff/shares/{created.share.pk}/extend/", {"days": 10}, follow=True
        )

        assert share_of(created).expires_at == before + timedelta(days=10)
        assert "now expires on" in response.content.decode()
        event = AuditEvent.objects.get(action=AuditEvent.Action.SHARE_EXTENDED)
        assert event.actor == alice and event.detail["days"] == 10

    def test_it_refuses_beyond_the_ceiling_with_a_clear_error(self, alice: User) -> None:
        make_study()
        created = make_share(days=30)
        client = staff_client(alice)
        # Up to the ceiling is fine: 30 + 60 = 90 days from creation.
        client.post(f"/staff/shares/{created.share.pk}/extend/", {"days": 60})
        at_ceiling = share_of(created).expires_at
        assert at_ceiling == created.share.created_at + timedelta(days=settings.SHARE_MAX_DAYS)

        response = client.post(
            f"/staff/shares/{created.share.pk}/extend/", {"days": 1}, follow=True
        )

        page = response.content.decode()
        assert f"at most {settings.SHARE_MAX_DAYS} days from its creation" in page
        assert "by 0 more days at most" in page
        assert share_of(created).expires_at == at_ceiling

    def test_it_refuses_hostile_numbers(self, alice: User) -> None:
        make_study()
        created = make_share(days=30)
        client = staff_client(alice)
        for days in ("-5", "0", "1e9", "", "999999999999999999999"):
            client.post(f"/staff/shares/{created.share.pk}/extend/", {"days": days})
        assert share_of(created).expires_at == created.share.expires_at

    def test_a_revoked_share_stays_revoked(self, alice: User) -> None:
        make_study()
        created = make_share(days=10)
        account_services.share_revoke(share=created.share)
        response = staff_client(alice).post(
            f"/staff/shares/{created.share.pk}/extend/", {"days": 5}, follow=True
        )
        assert "cannot be extended" in response.content.decode()
        assert share_of(created).expires_at == created.share.expires_at


class TestUnlock:
    @pytest.fixture
    def locked(self) -> Share:
        make_study()
        share = make_share().share
        Share.objects.filter(pk=share.pk).update(
            otp_failures=settings.OTP_LIFETIME_MAX_FAILURES,
            locked_until=timezone.now() + timedelta(minutes=15),
        )
        return share

    def test_it_unlocks_with_a_recent_second_factor(self, alice: User, locked: Share) -> None:
        client = staff_client(alice)
        page = client.get(f"/staff/shares/{locked.pk}/log/").content.decode()
        assert "Unlock the share" in page

        response = client.post(f"/staff/shares/{locked.pk}/unlock/", follow=True)

        assert "is unlocked" in response.content.decode()
        share = Share.objects.get(pk=locked.pk)
        assert not account_selectors.share_is_locked(share) and share.otp_failures == 0
        assert AuditEvent.objects.filter(
            share=share, action=AuditEvent.Action.SHARE_UNLOCKED, actor=alice
        ).exists()

    def test_an_old_second_factor_is_asked_again(self, alice: User, locked: Share) -> None:
        client = staff_client(alice, second_factor_at=time.time() - 3600)
        log = f"/staff/shares/{locked.pk}/log/"

        response = client.post(f"/staff/shares/{locked.pk}/unlock/", {"next": log})

        assert response.status_code == 302
        assert response["Location"].startswith(reverse("staff:reauth"))
        assert "next=%2Fstaff%2Fshares%2F" in response["Location"]
        assert account_selectors.share_is_locked(Share.objects.get(pk=locked.pk))

    def test_bob_cannot_unlock(self, bob: User, locked: Share) -> None:
        assert staff_client(bob).post(f"/staff/shares/{locked.pk}/unlock/").status_code == 403
        assert account_selectors.share_is_locked(Share.objects.get(pk=locked.pk))


class TestRevokeEveryShareOfAPatient:
    @pytest.fixture
    def patients(self) -> dict[str, list[Share]]:
        make_study("1.2.826.0.1.3680043.8.498.5001", patient_id="P-ONE", patient_name="ONE^Ann")
        make_study("1.2.826.0.1.3680043.8.498.5002", patient_id="P-ONE", patient_name="ONE^Ann")
        make_study("1.2.826.0.1.3680043.8.498.5003", patient_id="P-TWO", patient_name="TWO^Bo")
        one = [
            make_share("1.2.826.0.1.3680043.8.498.5001").share,
            make_share(
                "1.2.826.0.1.3680043.8.498.5002",
                recipient="physician",
                channel="email",
                contact="dr@example.org",
            ).share,
            # The patient's older study as a prior of another patient's share cannot happen
            # (study_share refuses it); a prior of their own can.
            make_share(
                "1.2.826.0.1.3680043.8.498.5002",
                prior_study_instance_uids=["1.2.826.0.1.3680043.8.498.5001"],
            ).share,
        ]
        expired = make_share("1.2.826.0.1.3680043.8.498.5001").share
        Share.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(days=1))
        two = [make_share("1.2.826.0.1.3680043.8.498.5003").share]
        return {"one": one, "two": two, "expired": [expired]}

    def test_the_confirmation_lists_what_goes_and_revokes_nothing(
        self, alice: User, patients: dict[str, list[Share]]
    ) -> None:
        response = staff_client(alice).get("/staff/shares/revoke-patient/", {"patient_id": "P-ONE"})

        assert sorted(_listed(response)) == sorted(s.pk for s in patients["one"])
        assert "3 live shares of patient P-ONE will be revoked" in response.content.decode()
        assert not Share.objects.filter(revoked_at__isnull=False).exists()

    def test_it_revokes_every_live_share_of_that_patient_and_no_other(
        self, alice: User, patients: dict[str, list[Share]]
    ) -> None:
        response = staff_client(alice).post(
            "/staff/shares/revoke-patient/", {"patient_id": "P-ONE"}, follow=True
        )

        assert "3 shares of patient P-ONE are revoked" in response.content.decode()
        for share in patients["one"]:
            assert Share.objects.get(pk=share.pk).revoked_by == alice
        assert Share.objects.get(pk=patients["two"][0].pk).revoked_at is None
        assert Share.objects.get(pk=patients["expired"][0].pk).revoked_at is None
        event = AuditEvent.objects.get(action=AuditEvent.Action.PATIENT_SHARES_REVOKED)
        assert event.actor == alice and sorted(event.detail["shares"]) == sorted(
            s.pk for s in patients["one"]
        )
        assert AuditEvent.objects.filter(action=AuditEvent.Action.SHARE_REVOKED).count() == 3

    def test_a_patient_id_is_matched_exactly(
        self, alice: User, patients: dict[str, list[Share]]
    ) -> None:
        client = staff_client(alice)
        for near_miss in ("P-ON", "P-ONE*", "%", "p-one"):
            client.post("/staff/shares/revoke-patient/", {"patient_id": near_miss})
        assert not Share.objects.filter(revoked_at__isnull=False).exists()

    def test_bob_cannot(self, bob: User, patients: dict[str, list[Share]]) -> None:
        response = staff_client(bob).post("/staff/shares/revoke-patient/", {"patient_id": "P-ONE"})
        assert response.status_code == 403
        assert not Share.objects.filter(revoked_at__isnull=False).exists()

    def test_a_share_whose_study_has_not_arrived_is_shown_apart_and_left(
        self, alice: User, patients: dict[str, list[Share]]
    ) -> None:
        """Nothing of its study is in the index: whose it is, the portal cannot tell; staff
        see it beside the list, to revoke it themselves."""
        arriving = make_share(PENDING_UID).share
        client = staff_client(alice)

        page = client.get("/staff/shares/revoke-patient/", {"patient_id": "P-ONE"})
        text = page.content.decode()
        assert "Shares whose patient is not known yet" in text
        assert (
            text.split("Shares whose patient is not known yet")[1].count(
                f"/staff/shares/{arriving.pk}/log/"
            )
            == 1
        )

        client.post("/staff/shares/revoke-patient/", {"patient_id": "P-ONE"})
        assert Share.objects.get(pk=arriving.pk).revoked_at is None


class TestRearm:
    """A live share whose study copy is gone (purged, or a store restored from an older
    backup) is retrieved again from the node it came from, by a sharer, from its log page."""

    def _lost_share(self) -> Share:
        from studies.models import PacsNode, RetrievalJob

        node = PacsNode.objects.create(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)
        RetrievalJob.objects.create(
            pacs=node, study_instance_uid=PENDING_UID, status=RetrievalJob.Status.DONE
        )
        return make_share(PENDING_UID).share

    def test_it_retrieves_the_lost_study_again(self, alice: User, monkeypatch: Any) -> None:
        from studies import tasks
        from studies.models import RetrievalJob

        queued: list[RetrievalJob] = []
        monkeypatch.setattr(tasks, "retrieval_job_enqueue", queued.append)
        share = self._lost_share()
        client = staff_client(alice)
        page = client.get(reverse("staff:share_log", args=[share.pk]))
        assert reverse("staff:share_rearm", args=[share.pk]) in page.content.decode()

        response = client.post(reverse("staff:share_rearm", args=[share.pk]))
        assert response.status_code == 302
        assert response["Location"] == reverse("staff:share_detail", args=[share.pk])
        (job,) = queued
        assert job.study_instance_uid == PENDING_UID and job.status == RetrievalJob.Status.QUEUED
        event = AuditEvent.objects.get(action=AuditEvent.Action.SHARE_REARMED)
        assert event.share_id == share.pk and event.actor == alice
        # While the job runs, the page offers no second retrieval.
        page = client.get(reverse("staff:share_log", args=[share.pk]))
        assert reverse("staff:share_rearm", args=[share.pk]) not in page.content.decode()

    def test_an_auditor_cannot_rearm_and_nothing_is_queued(self, bob: User) -> None:
        from studies.models import RetrievalJob

        share = self._lost_share()
        response = staff_client(bob).post(reverse("staff:share_rearm", args=[share.pk]))
        assert response.status_code == 403
        assert RetrievalJob.objects.count() == 1
        assert not AuditEvent.objects.filter(action=AuditEvent.Action.SHARE_REARMED).exists()

    def test_an_ended_share_is_not_rearmed(self, alice: User) -> None:
        from studies.models import RetrievalJob

        share = self._lost_share()
        Share.objects.filter(pk=share.pk).update(revoked_at=timezone.now())
        response = staff_client(alice).post(reverse("staff:share_rearm", args=[share.pk]))
        assert response.status_code == 302
        assert RetrievalJob.objects.count() == 1
