"""The staff workspace's search, share form, share page and handout, through the test client,
against the session's Orthanc PACS and the local archive.

Personas: alice is a sharer, bob an auditor (no right to search or share), carol a sharer
whose second factor is an hour old (re-authentication needed for sensitive actions).
"""

import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.sessions.models import Session
from django.test import Client
from django.urls import reverse

from accounts.models import AuditEvent, Share, User
from studies import services
from studies.models import PacsNode, RetrievalJob
from tests.conftest import PacsStudies, SyntheticStudy, synthetic_study
from tests.support import free_port
from tests.support.access import make_study, sms_messages
from tests.support.orthanc import OrthancServer
from tests.support.staff import staff_client

pytestmark = pytest.mark.django_db

# A patient of this module's own on the session's Orthanc: two studies, the later one shared
# with the earlier one as a prior.
PATIENT_ID = "STF-PRIORS"


class Priors:
    def __init__(self, current: SyntheticStudy, prior: SyntheticStudy) -> None:
        self.current = current
        self.prior = prior


@pytest.fixture(scope="module")
def priors(orthanc: OrthancServer) -> Priors:
    current = synthetic_study(
        patient_name="Bernard^Lucie",
        patient_id=PATIENT_ID,
        charset="ISO_IR 100",
        modalities=(("CT", 3),),
    )
    prior = synthetic_study(
        patient_name="Bernard^Lucie",
        patient_id=PATIENT_ID,
        charset="ISO_IR 100",
        modalities=(("MR", 2),),
    )
    for study in (current, prior):
        orthanc.upload_many(study.files.values())
    return Priors(current, prior)


@pytest.fixture
def alice(db: Any) -> User:
    return User.objects.create_user("alice", "alice@example.org", "x" * 20, role="sharer")


@pytest.fixture
def bob(db: Any) -> User:
    return User.objects.create_user("bob", "bob@example.org", "x" * 20, role="auditor")


@pytest.fixture
def client(alice: User) -> Client:
    return staff_client(alice)


@pytest.fixture
def silent_pacs() -> Iterator[int]:
    """A PACS that takes the connection and never says a word (hung, or a firewall that
    swallows packets): the search must not wait for it."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def hold() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _address = server.accept()
            except OSError:
                continue
            accepted.append(connection)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


def _share_form_url(study_uid: str, source: str) -> str:
    return reverse("staff:share_new") + f"?study={study_uid}&source={source}"


def _share_data(**overrides: Any) -> dict[str, Any]:
    data = {
        "recipient": "patient",
        "channel": "sms",
        "phone": "06 12 34 56 78",
        "email": "",
        "days": "",
        "allow_download": "on",
        "note": "",
        "language": "en",
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


def _code_on(page: str) -> str:
    match = re.search(r'class="code">([0-9A-Z]{4}(?:-[0-9A-Z]{4}){3})<', page)
    assert match, "no access code on the page"
    return match.group(1)


def _link_on(page: str) -> str:
    match = re.search(r'class="break">(http[^<]+/s/#[^<]+)<', page)
    assert match, "no link on the page"
    return match.group(1)


# --- search -------------------------------------------------------------------------------------


class TestSearch:
    def test_it_finds_a_patient_on_the_pacs_and_in_the_local_archive_at_once(
        self, client: Client, orthanc_node: PacsNode, pacs_studies: PacsStudies, alice: User
    ) -> None:
        local = make_study(
            "1.2.826.0.1.3680043.8.498.77001",
            patient_id="PAT-LATIN1",
            patient_name="Müller^Hélène",
            description="LOCAL CD IMPORT",
        )
        response = client.get(reverse("staff:home"), {"patient_id": "PAT-LATIN1"})
        assert response.status_code == 200
        result = response.context["result"]
        by_uid = {hit.study_instance_uid: hit for hit in result.studies}
        pacs_hit = by_uid[pacs_studies.latin1.uid]
        assert pacs_hit.sources == ["orthanc"]
        assert pacs_hit.modalities == ["CT", "MR"]
        assert (pacs_hit.series_count, pacs_hit.instance_count) == (2, 7)
        assert pacs_hit.in_store is False
        local_hit = by_uid[local.study_instance_uid]
        assert local_hit.sources == ["local"] and local_hit.in_store is True
        # One patient, one group: the share form offers the other study as a prior.
        assert len(result.groups) == 1
        page = response.content.decode()
        assert "MÜLLER Hélène" in page and "LOCAL CD IMPORT" in page
        assert all(source.answered for source in result.sources)
        event = AuditEvent.objects.get(action=AuditEvent.Action.STUDY_SEARCH)
        assert event.actor == alice
        assert event.detail["criteria"] == {"PatientID": "PAT-LATIN1"}
        assert event.detail["matches"] == 2

    def test_a_node_that_does_not_answer_shows_as_such_and_the_others_still_come(
        self,
        client: Client,
        orthanc_node: PacsNode,
        pacs_studies: PacsStudies,
        silent_pacs: int,
        settings: Any,
    ) -> None:
        settings.SEARCH_TIMEOUT = 1.0
        services.pacs_node_create(
            name="silent", ae_title="SILENT", host="127.0.0.1", port=silent_pacs
        )
        services.pacs_node_create(
            name="closed", ae_title="CLOSED", host="127.0.0.1", port=free_port()
        )
        response = client.get(reverse("staff:home"), {"patient_id": "PAT-UTF8"})
        assert response.status_code == 200
        sources = {source.name: source for source in response.context["result"].sources}
        assert sources["orthanc"].answered and sources["orthanc"].matches == 1
        assert not sources["silent"].answered
        assert sources["silent"].problem == "still silent after 1 second"
        assert not sources["closed"].answered
        assert "cannot reach" in sources["closed"].problem
        page = response.content.decode()
        assert page.count("did not answer") == 2
        assert pacs_studies.utf8.uid in page

    def test_it_searches_a_dicomweb_node_by_qido_rs(
        self, client: Client, orthanc_node: PacsNode, pacs_studies: PacsStudies
    ) -> None:
        PacsNode.objects.filter(pk=orthanc_node.pk).update(retrieve_method=PacsNode.Retrieve.WADO)
        response = client.get(reverse("staff:home"), {"patient_id": "PAT-UTF8", "modality": "MR"})
        assert response.status_code == 200
        hits = response.context["result"].studies
        assert [hit.study_instance_uid for hit in hits] == [pacs_studies.utf8.uid]
        assert hits[0].modalities == ["CT", "MR"]
        assert hits[0].instance_count == 5

    def test_a_search_by_name_birth_date_and_date_range_narrows_it(
        self, client: Client, db: Any
    ) -> None:
        make_study(patient_name="DUPONT^Marie")
        make_study("1.2.826.0.1.3680043.8.498.77002", patient_name="DURAND^Paul")
        response = client.get(
            reverse("staff:home"),
            {"patient_name": "dupont ma", "date_from": "2026-03-01", "date_to": "2026-03-31"},
        )
        names = [g.patient_name for g in response.context["result"].groups]
        assert names == ["DUPONT^Marie"]
        response = client.get(
            reverse("staff:home"), {"patient_name": "dupont", "date_from": "2026-04-01"}
        )
        assert response.context["result"].studies == []

    def test_an_empty_search_is_refused_with_a_clear_message(
        self, client: Client, orthanc_node: PacsNode
    ) -> None:
        response = client.get(reverse("staff:home"), {"patient_id": "", "modality": "CT"})
        assert response.status_code == 200
        assert response.context["result"] is None
        assert "Say whom or what you are looking for" in response.content.decode()
        assert not AuditEvent.objects.filter(action=AuditEvent.Action.STUDY_SEARCH).exists()

    def test_wildcards_typed_by_staff_cannot_widen_a_search_into_a_dump(
        self, client: Client, orthanc_node: PacsNode
    ) -> None:
        response = client.get(reverse("staff:home"), {"patient_id": "*"})
        assert response.context["result"] is None
        assert "without * ? or" in response.content.decode()

    def test_the_start_page_searches_nothing(self, client: Client) -> None:
        response = client.get(reverse("staff:home"))
        assert response.status_code == 200
        assert response.context["result"] is None and response.context["problem"] == ""


# --- who may ------------------------------------------------------------------------------------


class TestRoles:
    def test_an_auditor_gets_403_everywhere_in_searching_and_sharing(
        self, bob: User, db: Any
    ) -> None:
        make_study()
        created = services.study_share(
            study_instance_uid=make_study("1.2.826.0.1.3680043.8.498.77003").study_instance_uid,
            recipient="patient",
            channel="sms",
            contact="+33612345642",
        ).created
        auditor = staff_client(bob)
        pk = created.share.pk
        for method, url in [
            ("get", _share_form_url("1.2.826.0.1.3680043.8.498.1001", "local")),
            ("post", _share_form_url("1.2.826.0.1.3680043.8.498.1001", "local")),
            ("get", reverse("staff:share_detail", args=[pk])),
            ("get", reverse("staff:share_progress", args=[pk])),
            ("get", reverse("staff:share_handout", args=[pk])),
            ("post", reverse("staff:share_regenerate", args=[pk])),
            ("post", reverse("staff:share_resend", args=[pk])),
            ("post", reverse("staff:share_retry", args=[pk])),
        ]:
            response = getattr(auditor, method)(url)
            assert response.status_code == 403, url
        assert Share.objects.count() == 1
        assert not AuditEvent.objects.filter(action=AuditEvent.Action.STUDY_SEARCH).exists()

    def test_nobody_signed_in_is_sent_to_the_login_page(self, db: Any) -> None:
        response = Client().get(reverse("staff:home"))
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("staff:login"))


# --- the share form -----------------------------------------------------------------------------


@pytest.mark.usefixtures("sms_dir")
class TestShareForm:
    def test_it_shares_a_pacs_study_with_a_prior_and_queues_their_retrieval(
        self, client: Client, orthanc_node: PacsNode, priors: Priors, alice: User
    ) -> None:
        url = _share_form_url(priors.current.uid, "orthanc")
        response = client.get(url)
        assert response.status_code == 200
        form = response.context["form"]
        assert [uid for uid, _label in form.fields["priors"].choices] == [priors.prior.uid]
        data = _share_data(priors=[priors.prior.uid], note="Bring this letter to Dr Martin.")
        response = client.post(url, data)
        assert response.status_code == 302, response.content.decode()[:2000]
        share = Share.objects.get()
        assert response["Location"] == reverse("staff:share_detail", args=[share.pk])
        assert share.study_uids == [priors.current.uid, priors.prior.uid]
        assert share.contact == "+33612345678"
        assert share.channel == "sms" and share.recipient == "patient"
        assert share.note == "Bring this letter to Dr Martin."
        assert share.created_by == alice
        assert (share.expires_at - share.created_at).days == 30
        jobs = RetrievalJob.objects.filter(pacs=orthanc_node)
        assert {job.study_instance_uid for job in jobs} == {priors.current.uid, priors.prior.uid}

        page = client.get(response["Location"]).content.decode()
        code = _code_on(page)
        assert _link_on(page).startswith("http")
        # Neither the code nor the link is in the database in clear, the session included.
        for session in Session.objects.all():
            assert code not in session.session_data
            assert code not in str(session.get_decoded())
        assert code not in str(list(AuditEvent.objects.values_list("detail", flat=True)))

    def test_a_prior_of_another_patient_cannot_be_slipped_in(
        self, client: Client, orthanc_node: PacsNode, priors: Priors, pacs_studies: PacsStudies
    ) -> None:
        url = _share_form_url(priors.current.uid, "orthanc")
        response = client.post(url, _share_data(priors=[pacs_studies.latin1.uid]))
        assert response.status_code == 400
        assert "is not one of the available choices" in response.content.decode()
        assert not Share.objects.exists()

    def test_a_physician_gets_14_days_by_default_and_codes_by_email(
        self, client: Client, db: Any
    ) -> None:
        study = make_study()
        url = _share_form_url(study.study_instance_uid, "local")
        response = client.post(
            url,
            _share_data(
                recipient="physician", channel="email", phone="", email="dr.martin@example.org"
            ),
        )
        assert response.status_code == 302
        share = Share.objects.get()
        assert share.contact == "dr.martin@example.org"
        assert (share.expires_at - share.created_at).days == 14
        assert not RetrievalJob.objects.exists()  # the store has it already

    @pytest.mark.parametrize(
        ("phone", "message"),
        [
            ("06 12 34", "This phone number does not exist"),
            ("not a number", "This is not a phone number"),
            ("01 42 34 56 78", "This is not a mobile number"),
            ("", "Type the mobile number"),
        ],
    )
    def test_a_bad_phone_is_refused_with_a_clear_error_and_nothing_is_made(
        self, client: Client, db: Any, phone: str, message: str
    ) -> None:
        study = make_study()
        response = client.post(
            _share_form_url(study.study_instance_uid, "local"), _share_data(phone=phone)
        )
        assert response.status_code == 400
        page = response.content.decode()
        assert message in page
        assert 'aria-describedby="id_phone_error"' in page
        assert not Share.objects.exists()

    def test_an_expiry_beyond_the_ceiling_is_refused(self, client: Client, db: Any) -> None:
        study = make_study()
        response = client.post(
            _share_form_url(study.study_instance_uid, "local"), _share_data(days="91")
        )
        assert response.status_code == 400
        assert "A share lasts 90 days at most." in response.content.decode()
        assert not Share.objects.exists()

    def test_a_physician_cannot_get_codes_by_text_message(self, client: Client, db: Any) -> None:
        study = make_study()
        response = client.post(
            _share_form_url(study.study_instance_uid, "local"), _share_data(recipient="physician")
        )
        assert response.status_code == 400
        assert "Physicians receive their codes by email." in response.content.decode()
        assert not Share.objects.exists()

    def test_the_create_post_needs_a_recent_second_factor(self, db: Any) -> None:
        carol = User.objects.create_user("carol", "carol@example.org", "x" * 20, role="sharer")
        client = staff_client(carol, second_factor_at=time.time() - 3600)
        study = make_study()
        url = _share_form_url(study.study_instance_uid, "local")
        assert client.get(url).status_code == 200  # looking is not sensitive
        response = client.post(url, _share_data() | {"next": url})
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("staff:reauth"))
        assert "next=" in response["Location"]
        assert not Share.objects.exists()

    def test_send_now_texts_the_link_in_the_recipient_language(
        self, client: Client, db: Any, sms_dir: Path
    ) -> None:
        study = make_study()
        response = client.post(
            _share_form_url(study.study_instance_uid, "local"),
            _share_data(send_now="on", language="fr"),
        )
        assert response.status_code == 302
        page = client.get(response["Location"]).content.decode()
        (message,) = sms_messages(sms_dir)
        assert message["to"] == "+33612345678"
        assert _link_on(page) in message["body"]
        assert "Ouvrez ce lien" in message["body"]
        assert AuditEvent.objects.filter(action=AuditEvent.Action.SHARE_LINK_SENT).count() == 1

    def test_a_source_that_does_not_answer_sends_back_to_the_search_with_a_reason(
        self, client: Client, db: Any
    ) -> None:
        services.pacs_node_create(
            name="closed", ae_title="CLOSED", host="127.0.0.1", port=free_port()
        )
        response = client.get(
            _share_form_url("1.2.826.0.1.3680043.8.498.77009", "closed"), follow=True
        )
        assert response.redirect_chain == [(reverse("staff:home"), 302)]
        assert "The PACS closed did not answer" in response.content.decode()
        assert not Share.objects.exists()

    def test_send_now_emails_a_physician_the_link_with_the_note(
        self, client: Client, db: Any
    ) -> None:
        from django.core import mail

        study = make_study()
        response = client.post(
            _share_form_url(study.study_instance_uid, "local"),
            _share_data(
                recipient="physician",
                channel="email",
                phone="",
                email="dr.martin@example.org",
                send_now="on",
                note="Compare with the 2024 CT.",
            ),
        )
        assert response.status_code == 302
        page = client.get(response["Location"]).content.decode()
        (message,) = mail.outbox
        assert message.to == ["dr.martin@example.org"]
        assert message.subject == "Your images are ready to view"
        assert _link_on(page) in message.body and "Compare with the 2024 CT." in message.body
        assert _code_on(page) not in message.body  # the code travels on paper only

    def test_an_unknown_study_or_source_is_404(self, client: Client, db: Any) -> None:
        assert client.get(_share_form_url("1.2.3.4", "local")).status_code == 404
        assert client.get(_share_form_url("1.2.3.4", "nowhere")).status_code == 404


# --- after the share ----------------------------------------------------------------------------


def _share_local(client: Client, **overrides: Any) -> tuple[Share, str, str]:
    study = make_study()
    response = client.post(
        _share_form_url(study.study_instance_uid, "local"), _share_data(**overrides)
    )
    assert response.status_code == 302
    share = Share.objects.get()
    page = client.get(reverse("staff:share_detail", args=[share.pk])).content.decode()
    return share, _link_on(page), _code_on(page)


@pytest.mark.usefixtures("sms_dir")
class TestAfterTheShare:
    def test_regenerating_kills_the_old_code_and_link_at_once(
        self, client: Client, db: Any
    ) -> None:
        share, old_link, old_code = _share_local(client)
        response = client.post(reverse("staff:share_regenerate", args=[share.pk]))
        assert response.status_code == 302
        page = client.get(response["Location"]).content.decode()
        new_code, new_link = _code_on(page), _link_on(page)
        assert new_code != old_code and new_link != old_link

        attacker = Client()
        refused = attacker.post("/access/", {"code": old_code})
        assert refused.status_code == 200
        assert "This link or code does not work" in refused.content.decode()
        refused = attacker.post("/s/", {"token": old_link.split("#", 1)[1]}, follow=True)
        assert "This link or code does not work" in refused.content.decode()

        recipient = Client()
        assert recipient.post("/access/", {"code": new_code})["Location"] == "/access/verify"
        assert AuditEvent.objects.filter(
            action=AuditEvent.Action.SHARE_REGENERATED, share=share
        ).exists()

    def test_regenerating_needs_a_recent_second_factor(self, alice: User, db: Any) -> None:
        client = staff_client(alice)
        share, _link, code = _share_local(client)
        stale = staff_client(alice, second_factor_at=time.time() - 3600)
        response = stale.post(reverse("staff:share_regenerate", args=[share.pk]))
        assert response["Location"].startswith(reverse("staff:reauth"))
        assert Client().post("/access/", {"code": code})["Location"] == "/access/verify"

    def test_resending_sends_a_new_link_and_the_printed_code_still_works(
        self, client: Client, sms_dir: Path, db: Any
    ) -> None:
        share, old_link, code = _share_local(client)
        response = client.post(reverse("staff:share_resend", args=[share.pk]))
        assert response.status_code == 302
        (message,) = sms_messages(sms_dir)
        assert old_link not in message["body"]
        new_link = re.search(r"(http\S+/s/#\S+)", message["body"])
        assert new_link
        page = client.get(response["Location"]).content.decode()
        assert _link_on(page) == new_link.group(1)
        assert _code_on(page) == code
        refused = Client().post("/s/", {"token": old_link.split("#", 1)[1]}, follow=True)
        assert "This link or code does not work" in refused.content.decode()
        assert Client().post("/access/", {"code": code})["Location"] == "/access/verify"

    def test_the_link_and_code_are_shown_to_their_maker_only(
        self, client: Client, alice: User, db: Any
    ) -> None:
        share, _link, code = _share_local(client)
        dave = User.objects.create_user("dave", "dave@example.org", "x" * 20, role="sharer")
        other = staff_client(dave)
        page = other.get(reverse("staff:share_detail", args=[share.pk])).content.decode()
        assert code not in page
        handout = other.get(reverse("staff:share_handout", args=[share.pk])).content.decode()
        assert code not in handout and "<svg" not in handout
        assert "replace the link and code" in handout

    def test_the_handout_holds_the_code_in_groups_and_a_qr_code(
        self, client: Client, settings: Any, db: Any
    ) -> None:
        settings.HOSPITAL_NAME = "Hôpital Saint-Exemple"
        settings.HELPDESK_PHONE = "01 23 45 67 89"
        share, _link, code = _share_local(client, note="Jeûne inutile.")
        response = client.get(reverse("staff:share_handout", args=[share.pk]))
        assert response.status_code == 200
        assert "no-store" in response["Cache-Control"]
        page = response.content.decode()
        groups = code.split("-")
        assert re.search(
            r'<span class="group">'
            + r'</span><span class="dash" aria-hidden="true">-</span><span class="group">'.join(
                groups
            )
            + "</span>",
            page,
        )
        assert "<svg" in page and "<path" in page
        assert "Hôpital Saint-Exemple" in page and "01 23 45 67 89" in page
        assert settings.BASE_URL in page and "Jeûne inutile." in page
        assert 'lang="en"' in page and "In three steps" in page
        assert AuditEvent.objects.filter(
            action=AuditEvent.Action.HANDOUT_PRINTED, share=share
        ).exists()

    def test_the_handout_is_in_the_language_chosen_for_the_share(
        self, client: Client, db: Any
    ) -> None:
        share, _link, _code = _share_local(client, language="fr")
        page = client.get(reverse("staff:share_handout", args=[share.pk])).content.decode()
        assert 'lang="fr"' in page
        assert "Vos images en ligne" in page and "En trois étapes" in page

    def test_no_link_or_code_reaches_the_logs(
        self, client: Client, caplog: pytest.LogCaptureFixture, db: Any
    ) -> None:
        with caplog.at_level(logging.DEBUG):
            share, link, code = _share_local(client, send_now="on")
            client.post(reverse("staff:share_resend", args=[share.pk]))
            client.get(reverse("staff:share_handout", args=[share.pk]))
        token = link.split("#", 1)[1]
        for record in caplog.records:
            text = record.getMessage()
            assert code not in text and token not in text


class TestProgress:
    def test_progress_says_ready_for_a_study_in_the_store(self, client: Client, db: Any) -> None:
        share, _link, _code = _share_local(client)
        data = client.get(reverse("staff:share_progress", args=[share.pk])).json()
        assert data["done"] is True
        (row,) = data["studies"]
        assert row["state"] == "ready" and row["percent"] == 100
        assert (row["received"], row["expected"]) == (4, 4)

    def test_a_failed_retrieval_is_told_in_words_and_can_be_tried_again(
        self, client: Client, orthanc_node: PacsNode, alice: User, db: Any
    ) -> None:
        uid = "1.2.826.0.1.3680043.8.498.77004"
        shared = services.study_share(
            study_instance_uid=uid,
            node=orthanc_node,
            recipient="patient",
            channel="sms",
            contact="+33612345642",
        )
        job = shared.jobs[0]
        RetrievalJob.objects.filter(pk=job.pk).update(
            status=RetrievalJob.Status.FAILED,
            received=0,
            expected=12,
            failed=12,
            error="12 of 12 instances could not be retrieved.",
            error_kind=RetrievalJob.Failure.PARTIAL,
        )
        share = shared.created.share
        data = client.get(reverse("staff:share_progress", args=[share.pk])).json()
        (row,) = data["studies"]
        assert row["state"] == "failed" and data["done"] is True
        assert "could not send 12 of the 12 images" in row["failure"]
        page = client.get(reverse("staff:share_detail", args=[share.pk])).content.decode()
        assert "could not send 12 of the 12 images" in page and "Try again" in page

        response = client.post(reverse("staff:share_retry", args=[share.pk]), {"job": job.pk})
        assert response.status_code == 302
        newest = RetrievalJob.objects.filter(study_instance_uid=uid).first()
        assert newest is not None and newest.pk != job.pk
        assert newest.status == RetrievalJob.Status.QUEUED and newest.requested_by == alice
        data = client.get(reverse("staff:share_progress", args=[share.pk])).json()
        assert data["studies"][0]["state"] == "queued" and data["done"] is False
        assert AuditEvent.objects.filter(action=AuditEvent.Action.RETRIEVAL_RETRIED).exists()

    def test_a_job_of_another_share_cannot_be_retried_from_this_one(
        self, client: Client, orthanc_node: PacsNode, db: Any
    ) -> None:
        share, _link, _code = _share_local(client)
        other = services.study_share(
            study_instance_uid="1.2.826.0.1.3680043.8.498.77005",
            node=orthanc_node,
            recipient="patient",
            channel="sms",
            contact="+33612345642",
        )
        job = other.jobs[0]
        response = client.post(reverse("staff:share_retry", args=[share.pk]), {"job": job.pk})
        assert response.status_code == 404


# --- failures told in words -----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
class TestFailuresInWords:
    """Real retrievals failing against real peers; the share page words each failure for the
    radiology desk (from its kind, never from the technical message), with a retry button."""

    def _share_and_run(self, client: Client, node: PacsNode, uid: str) -> str:
        from studies import retrieval

        shared = services.study_share(
            study_instance_uid=uid,
            node=node,
            recipient="patient",
            channel="sms",
            contact="+33612345642",
        )
        retrieval.retrieval_job_run(shared.jobs[0].pk)
        share = shared.created.share
        page = client.get(reverse("staff:share_detail", args=[share.pk])).content.decode()
        assert "Try again" in page
        return page

    def test_a_study_the_pacs_lacks(self, client: Client, orthanc_node: PacsNode) -> None:
        page = self._share_and_run(client, orthanc_node, "1.2.826.0.1.3680043.8.498.77006")
        job = RetrievalJob.objects.get()
        assert job.error_kind == RetrievalJob.Failure.STUDY_MISSING
        assert "The PACS orthanc does not have this study (any more)." in page

    def test_a_pacs_that_cannot_be_reached(self, client: Client, db: Any) -> None:
        node = services.pacs_node_create(
            name="closed", ae_title="CLOSED", host="127.0.0.1", port=free_port()
        )
        page = self._share_and_run(client, node, "1.2.826.0.1.3680043.8.498.77007")
        assert RetrievalJob.objects.get().error_kind == RetrievalJob.Failure.UNREACHABLE
        assert "The portal cannot reach the PACS closed at CLOSED (127.0.0.1:" in page

    def test_a_pacs_that_does_not_know_the_portal(
        self, client: Client, orthanc_node: PacsNode, pacs_studies: PacsStudies, settings: Any
    ) -> None:
        settings.DICOM_AE_TITLE = "STRANGER"
        page = self._share_and_run(client, orthanc_node, pacs_studies.latin1.uid)
        assert RetrievalJob.objects.get().error_kind == RetrievalJob.Failure.PORTAL_UNKNOWN
        assert "it does not know the portal&#x27;s AE title STRANGER" in page

    def test_a_pacs_that_does_not_know_where_to_send_the_images(
        self, client: Client, settings: Any, db: Any
    ) -> None:
        """(The test PACS knows the portal; tests/test_pacs_move.py has a PACS that answers
        "move destination unknown" and checks that it raises DestinationUnknown.)"""
        # The page's words for it, with the portal's own AE title and DICOM port.
        settings.DICOM_PORT = 11112
        node = services.pacs_node_create(
            name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port()
        )
        shared = services.study_share(
            study_instance_uid="1.2.826.0.1.3680043.8.498.77008",
            node=node,
            recipient="patient",
            channel="sms",
            contact="+33612345642",
        )
        RetrievalJob.objects.filter(pk=shared.jobs[0].pk).update(
            status=RetrievalJob.Status.FAILED,
            error_kind=RetrievalJob.Failure.DESTINATION_UNKNOWN,
        )
        page = client.get(
            reverse("staff:share_detail", args=[shared.created.share.pk])
        ).content.decode()
        assert (
            "The PACS pacs could not send the images back to the portal: it does not know "
            "the portal&#x27;s AE title PORTAL at 127.0.0.1:11112."
        ) in page
