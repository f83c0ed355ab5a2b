"""Viewer tokens: `Authorization: Bearer` on DICOMweb for external viewers (Weasis, scripts),
minted by a recipient session for one study, for minutes, read-only, dead with their share.

Personas: Alice, a patient signed in to her share; Weasis, the viewer on her computer, with
her token and no session cookie; Mallory, who has a token that is not (or no longer) good, or
Alice's token and ideas about what else it might open.
"""

import json
import logging
import re
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import unquote

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from django.core import signing
from django.test import Client
from django.utils import timezone
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from accounts import checks, credentials, services
from accounts.logging import RedactShareLinks
from accounts.models import AuditEvent, Share
from studies.models import Instance
from tests.support.access import make_share, share_of, sign_in
from tests.support.stored import StoredStudies, store_two_studies

pytestmark = pytest.mark.dicom

DICOM = "multipart/related; type=application/dicom; transfer-syntax=*"


@pytest.fixture
def stored(tmp_path: Path, db: Any) -> StoredStudies:
    return store_two_studies(tmp_path / "import")


@pytest.fixture
def alice_share(stored: StoredStudies) -> services.CreatedShare:
    return make_share(stored.alice.uid)


@pytest.fixture
def alice(alice_share: services.CreatedShare, sms_dir: Path, fast_otp: Any) -> Client:
    client = Client()
    sign_in(client, alice_share, sms_dir)
    return client


def _mint(client: Client, study: str) -> str:
    response = client.post("/dicomweb/token", {"study": study})
    assert response.status_code == 200, response.content[:300]
    body = response.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 600
    assert body["dicomweb_url"] == "http://testserver/dicomweb"
    return str(body["access_token"])


@pytest.fixture
def token(alice: Client, stored: StoredStudies) -> str:
    return _mint(alice, stored.alice.uid)


def _weasis(token: str) -> Client:
    """A client with no session cookie at all: the token is all it has."""
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


def _is_invalid_token(response: Any) -> bool:
    return bool(
        response.status_code == 401
        and 'error="invalid_token"' in response["WWW-Authenticate"]
        and response["WWW-Authenticate"].startswith("Bearer ")
    )


class TestAValidToken:
    def test_it_answers_qido_metadata_and_retrieve_without_a_session(
        self, token: str, stored: StoredStudies
    ) -> None:
        weasis = _weasis(token)
        study = f"/dicomweb/studies/{stored.alice.uid}"

        studies = json.loads(weasis.get("/dicomweb/studies").content)
        series = json.loads(weasis.get(study + "/series").content)
        metadata = json.loads(weasis.get(study + "/metadata").content)
        retrieve: Any = weasis.get(study, HTTP_ACCEPT=DICOM)

        assert [s["0020000D"]["Value"] for s in studies] == [[stored.alice.uid]]
        assert len(series) == len(stored.alice.series)
        assert len(metadata) == stored.alice.instance_count
        assert retrieve.status_code == 200
        body = b"".join(retrieve.streaming_content)
        assert body.count(b"Content-Type: application/dicom") == stored.alice.instance_count
        assert "sessionid" not in weasis.cookies  # no session was made up for it

    def test_it_works_over_http_against_a_live_server(
        self, live_server: Any, transactional_db: Any, stored: StoredStudies, sms_dir: Path
    ) -> None:
        # The same flow with a real HTTP client, as Weasis or dicomweb-client would send it.
        alice = Client()
        sign_in(alice, make_share(stored.alice.uid), sms_dir)
        token = _mint(alice, stored.alice.uid)
        headers = {"Authorization": f"Bearer {token}"}
        root = live_server.url + "/dicomweb"

        found = requests.get(f"{root}/studies", headers=headers, timeout=30)
        metadata = requests.get(
            f"{root}/studies/{stored.alice.uid}/metadata", headers=headers, timeout=30
        )
        instance = Instance.objects.filter(series__study__study_instance_uid=stored.alice.uid)[0]
        one = requests.get(
            f"{root}/studies/{stored.alice.uid}/series/{instance.series.series_instance_uid}"
            f"/instances/{instance.sop_instance_uid}",
            headers={**headers, "Accept": DICOM},
            timeout=30,
        )

        assert found.status_code == 200 and len(found.json()) == 1
        assert metadata.status_code == 200 and len(metadata.json()) == stored.alice.instance_count
        assert one.status_code == 200
        part = one.content.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0]
        assert part == stored.alice.files[instance.sop_instance_uid]
        assert dcmread(DicomBytesIO(part)).SOPInstanceUID == instance.sop_instance_uid
        assert "Set-Cookie" not in metadata.headers
        # As the README shows it, with dicomweb-client.
        client = DICOMwebClient(root, headers=headers)
        retrieved = client.retrieve_study(stored.alice.uid)
        assert sorted(str(ds.SOPInstanceUID) for ds in retrieved) == sorted(stored.alice.files)

    def test_minting_is_audited_without_the_token(
        self, token: str, alice_share: services.CreatedShare, stored: StoredStudies
    ) -> None:
        event = AuditEvent.objects.get(action=AuditEvent.Action.VIEWER_TOKEN)

        assert event.share_id == alice_share.share.pk
        assert event.detail == {"study": stored.alice.uid, "minutes": 10}
        assert token not in json.dumps(event.detail)


class TestMalloryWithAlicesToken:
    def test_another_study_is_404(self, token: str, stored: StoredStudies) -> None:
        weasis = _weasis(token)
        other = f"/dicomweb/studies/{stored.other.uid}"

        assert weasis.get(other + "/metadata").status_code == 404
        assert weasis.get(other, HTTP_ACCEPT=DICOM).status_code == 404
        assert weasis.get(other + "/series").status_code == 404
        found = weasis.get("/dicomweb/studies", {"StudyInstanceUID": stored.other.uid})
        assert json.loads(found.content) == []

    def test_a_token_is_held_to_its_own_study_even_within_the_share(
        self, alice_share: services.CreatedShare, stored: StoredStudies
    ) -> None:
        # Signed by the portal for another study: the share would still have to grant it,
        # and the token opens nothing beyond the study it names.
        elsewhere = credentials.sign_viewer_token(
            share_id=alice_share.share.pk, study_instance_uid=stored.other.uid
        )
        weasis = _weasis(elsewhere)

        assert weasis.get(f"/dicomweb/studies/{stored.alice.uid}/metadata").status_code == 404
        assert weasis.get(f"/dicomweb/studies/{stored.other.uid}/metadata").status_code == 404
        assert json.loads(weasis.get("/dicomweb/studies").content) == []

    @pytest.mark.parametrize("method", ["post", "put", "delete", "patch"])
    def test_it_is_read_only(self, token: str, stored: StoredStudies, method: str) -> None:
        weasis = _weasis(token)

        response = getattr(weasis, method)(f"/dicomweb/studies/{stored.alice.uid}")

        assert response.status_code == 405

    def test_it_opens_no_page_no_download_and_mints_no_token(
        self, token: str, stored: StoredStudies
    ) -> None:
        weasis = _weasis(token)

        assert weasis.get("/viewer/").status_code == 302  # to the access-code page
        assert weasis.get(f"/download/{stored.alice.uid}.zip").status_code == 404
        assert weasis.post("/dicomweb/token", {"study": stored.alice.uid}).status_code == 404
        assert weasis.get(f"/viewer/weasis/{stored.alice.uid}").status_code == 404

    def test_a_token_in_the_query_string_is_ignored(
        self, token: str, stored: StoredStudies
    ) -> None:
        mallory = Client()
        study = f"/dicomweb/studies/{stored.alice.uid}"

        for name in ("access_token", "token", "bearer"):
            assert mallory.get(study + "/metadata", {name: token}).status_code == 404
            assert mallory.get("/dicomweb/studies", {name: token}).status_code == 404


class TestMalloryWithABadToken:
    def test_a_revoked_share_kills_its_tokens(
        self, token: str, alice_share: services.CreatedShare, stored: StoredStudies
    ) -> None:
        weasis = _weasis(token)
        metadata = f"/dicomweb/studies/{stored.alice.uid}/metadata"
        assert weasis.get(metadata).status_code == 200

        services.share_revoke(share=share_of(alice_share))

        assert _is_invalid_token(weasis.get(metadata))

    def test_an_emergency_close_ends_tokens_minted_before_it(
        self, token: str, stored: StoredStudies
    ) -> None:
        """The close ends every recipient session for good, and so what they minted: reopening
        does not bring the token back."""
        weasis = _weasis(token)
        metadata = f"/dicomweb/studies/{stored.alice.uid}/metadata"
        assert weasis.get(metadata).status_code == 200

        services.recipients_close(message="")
        assert weasis.get(metadata).status_code == 503
        services.recipients_open()

        assert _is_invalid_token(weasis.get(metadata))

    def test_an_expired_share_kills_its_tokens(
        self, token: str, alice_share: services.CreatedShare, stored: StoredStudies
    ) -> None:
        Share.objects.filter(pk=alice_share.share.pk).update(
            expires_at=timezone.now() - timedelta(seconds=1)
        )

        assert _is_invalid_token(_weasis(token).get("/dicomweb/studies"))

    def test_a_locked_share_kills_its_tokens(
        self, token: str, alice_share: services.CreatedShare
    ) -> None:
        Share.objects.filter(pk=alice_share.share.pk).update(
            locked_until=timezone.now() + timedelta(minutes=15)
        )

        assert _is_invalid_token(_weasis(token).get("/dicomweb/studies"))

    def test_a_token_past_its_minutes_is_refused(
        self, alice_share: services.CreatedShare, stored: StoredStudies, settings: Any
    ) -> None:
        settings.VIEWER_TOKEN_MINUTES = 2
        minted_at = timezone.now().timestamp()
        with mock.patch("django.core.signing.time.time", return_value=minted_at - 121):
            old = credentials.sign_viewer_token(
                share_id=alice_share.share.pk, study_instance_uid=stored.alice.uid
            )
        with mock.patch("django.core.signing.time.time", return_value=minted_at - 119):
            fresh = credentials.sign_viewer_token(
                share_id=alice_share.share.pk, study_instance_uid=stored.alice.uid
            )
        metadata = f"/dicomweb/studies/{stored.alice.uid}/metadata"

        assert _is_invalid_token(_weasis(old).get(metadata))
        assert _weasis(fresh).get(metadata).status_code == 200

    def test_a_tampered_token_is_refused(self, token: str, stored: StoredStudies) -> None:
        payload, timestamp, signature = token.split(".")
        other_share = signing.b64_encode(
            json.dumps({"share": 999, "study": stored.other.uid}).encode()
        ).decode()
        flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
        metadata = f"/dicomweb/studies/{stored.alice.uid}/metadata"

        for forged in (
            f"{other_share}.{timestamp}.{signature}",
            f"{payload}.{timestamp}.{flipped}",
            f"{payload}.{'1' + timestamp}.{signature}",
            token + "x",
            "x" * 2000,
            "not-a-token",
        ):
            assert _is_invalid_token(_weasis(forged).get(metadata)), forged

    def test_a_link_token_is_no_viewer_token(
        self, alice_share: services.CreatedShare, stored: StoredStudies
    ) -> None:
        signed_link = alice_share.url.rsplit("/", 1)[1]

        assert _is_invalid_token(_weasis(signed_link).get("/dicomweb/studies"))

    @pytest.mark.parametrize("header", ["Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer   ", "Token x"])
    def test_another_scheme_or_no_token_is_refused(
        self, stored: StoredStudies, header: str
    ) -> None:
        response = Client(HTTP_AUTHORIZATION=header).get("/dicomweb/studies")

        assert _is_invalid_token(response)

    def test_a_bad_token_never_falls_back_to_the_session(
        self, alice: Client, stored: StoredStudies
    ) -> None:
        metadata = f"/dicomweb/studies/{stored.alice.uid}/metadata"
        assert alice.get(metadata).status_code == 200

        assert _is_invalid_token(alice.get(metadata, HTTP_AUTHORIZATION="Bearer forged"))

    def test_no_token_and_no_session_is_still_404(self, stored: StoredStudies) -> None:
        assert Client().get(f"/dicomweb/studies/{stored.alice.uid}/metadata").status_code == 404
        assert Client().get("/dicomweb/studies").status_code == 404


class TestMinting:
    def test_only_for_a_study_of_the_sessions_share(
        self, alice: Client, stored: StoredStudies
    ) -> None:
        for study in (stored.other.uid, "1.2.3", "", "../../etc", "1.2\x00", "1.2\n"):
            assert alice.post("/dicomweb/token", {"study": study}).status_code == 404

    def test_not_without_a_session(self, stored: StoredStudies) -> None:
        assert Client().post("/dicomweb/token", {"study": stored.alice.uid}).status_code == 404

    def test_not_without_the_csrf_token(self, alice: Client, stored: StoredStudies) -> None:
        alice.handler.enforce_csrf_checks = True

        assert alice.post("/dicomweb/token", {"study": stored.alice.uid}).status_code == 403

    def test_not_by_a_get(self, alice: Client, stored: StoredStudies) -> None:
        assert alice.get("/dicomweb/token", {"study": stored.alice.uid}).status_code == 405


class TestWeasis:
    def _launch(self, alice: Client, study: str) -> str:
        response = alice.get(f"/viewer/weasis/{study}")
        assert response.status_code == 302
        location = str(response["Location"])
        assert location.startswith("weasis://")
        return unquote(location.removeprefix("weasis://"))

    def test_the_link_loads_the_study_over_dicomweb_with_a_token(
        self, alice: Client, stored: StoredStudies
    ) -> None:
        command = self._launch(alice, stored.alice.uid)

        assert command.startswith("$dicom:rs ")
        assert '--url "http://testserver/dicomweb"' in command
        assert f'-r "studyUID={stored.alice.uid}"' in command
        match = re.search(r'-H "Authorization: Bearer ([^"]+)"', command)
        assert match
        weasis = _weasis(match.group(1))
        metadata = weasis.get(f"/dicomweb/studies/{stored.alice.uid}/metadata")
        assert metadata.status_code == 200
        assert len(json.loads(metadata.content)) == stored.alice.instance_count

    def test_launching_is_a_view_and_a_token_issued(
        self, alice: Client, stored: StoredStudies
    ) -> None:
        self._launch(alice, stored.alice.uid)
        self._launch(alice, stored.alice.uid)

        actions = list(AuditEvent.objects.values_list("action", flat=True))
        assert actions.count(AuditEvent.Action.VIEWER_TOKEN) == 2
        assert actions.count(AuditEvent.Action.VIEW) == 1

    def test_another_study_is_404(self, alice: Client, stored: StoredStudies) -> None:
        assert alice.get(f"/viewer/weasis/{stored.other.uid}").status_code == 404
        assert alice.get("/viewer/weasis/1.2.826.0.1.3680043.8.498.424242").status_code == 404

    def test_no_session_is_404(self, stored: StoredStudies) -> None:
        assert Client().get(f"/viewer/weasis/{stored.alice.uid}").status_code == 404

    def test_another_site_cannot_launch_it(self, alice: Client, stored: StoredStudies) -> None:
        """A page elsewhere sending the signed-in patient to the launch link mints nothing."""
        response = alice.get(f"/viewer/weasis/{stored.alice.uid}", HTTP_SEC_FETCH_SITE="cross-site")
        assert response.status_code == 404
        assert not AuditEvent.objects.filter(action=AuditEvent.Action.VIEWER_TOKEN).exists()


class TestTokensNeverReachALog:
    def test_requests_with_tokens_log_no_token(
        self, token: str, stored: StoredStudies, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        weasis = _weasis(token)

        weasis.get(f"/dicomweb/studies/{stored.alice.uid}/metadata")
        weasis.get(f"/dicomweb/studies/{stored.other.uid}/metadata")  # 404: logged
        _weasis(token + "x").get("/dicomweb/studies")  # 401: logged

        assert caplog.records
        for record in caplog.records:
            assert token not in record.getMessage()
            request = getattr(record, "request", None)
            assert request is None or "HTTP_AUTHORIZATION" not in getattr(request, "META", {})

    def test_the_log_filter_redacts_a_bearer_token_in_a_message(self) -> None:
        record = logging.LogRecord(
            "x",
            logging.WARNING,
            __file__,
            1,
            "sent Authorization: Bearer %s",
            ("abc.def.ghi",),
            None,
        )

        RedactShareLinks().filter(record)

        assert "abc.def.ghi" not in record.getMessage()
        assert "Bearer [redacted]" in record.getMessage()


@pytest.mark.parametrize(("minutes", "valid"), [(0, False), (1, True), (60, True), (61, False)])
def test_the_token_lifetime_is_minutes_at_most_an_hour(
    settings: Any, minutes: int, valid: bool
) -> None:
    settings.VIEWER_TOKEN_MINUTES = minutes

    errors = checks.check_viewer_token_lifetime(None)

    assert [e.id for e in errors] == ([] if valid else ["accounts.E015"])
