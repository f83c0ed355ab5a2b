"""The study download (`/download/<StudyInstanceUID>.zip`): a ZIP streamed from the store with
a DICOMDIR that lists every granted instance, byte for byte; nothing outside the share; one
DOWNLOAD event per download that ran to its end, none for one broken off.

Personas: Alice, a patient signed in to her share; Bob, signed in to a share of the same study
limited to one series; Dave, whose share does not allow downloads; Mallory, with no session.
"""

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.test import Client
from pydicom.fileset import FileSet

from accounts.models import AuditEvent
from studies.models import Instance
from studies.store import instance_file
from tests.support.access import make_share, share_of, sign_in
from tests.support.stored import StoredStudies, store_two_studies

pytestmark = pytest.mark.dicom

MADE_UP_UID = "1.2.826.0.1.3680043.8.498.424242"


@pytest.fixture
def stored(tmp_path: Path, db: Any) -> StoredStudies:
    return store_two_studies(tmp_path / "import")


def _signed_in(uid: str, sms_dir: Path, **share: Any) -> Client:
    client = Client()
    sign_in(client, make_share(uid, **share), sms_dir)
    return client


@pytest.fixture
def alice(stored: StoredStudies, sms_dir: Path, fast_otp: Any) -> Client:
    return _signed_in(stored.alice.uid, sms_dir)


def _content(response: Any) -> bytes:
    assert response.status_code == 200, response.content[:300]
    assert response.streaming
    return b"".join(response.streaming_content)


def _unzip(data: bytes, where: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        archive.extractall(where)
    return where


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stored_digests(uid: str, series: str | None = None) -> dict[str, str]:
    instances = Instance.objects.filter(series__study__study_instance_uid=uid)
    if series is not None:
        instances = instances.filter(series__series_instance_uid=series)
    return {i.sop_instance_uid: _sha256(instance_file(i).read_bytes()) for i in instances}


def _dicomdir_digests(root: Path) -> dict[str, str]:
    fs = FileSet(pydicom.dcmread(root / "DICOMDIR"))
    return {str(i.SOPInstanceUID): _sha256(Path(i.path).read_bytes()) for i in fs}


def _downloads() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=AuditEvent.Action.DOWNLOAD))


class TestTheZip:
    def test_it_lists_every_granted_instance_in_its_dicomdir_with_identical_bytes(
        self, alice: Client, stored: StoredStudies, tmp_path: Path
    ) -> None:
        response = alice.get(f"/download/{stored.alice.uid}.zip")

        assert response["Content-Type"] == "application/zip"
        assert response["Content-Disposition"].startswith('attachment; filename="IMAGES')
        root = _unzip(_content(response), tmp_path / "unzipped")
        digests = _dicomdir_digests(root)
        assert digests == _stored_digests(stored.alice.uid)
        assert len(digests) == stored.alice.instance_count
        assert (root / "README.TXT").is_file() and (root / "INDEX.HTM").is_file()

    def test_it_holds_only_the_series_a_restricted_share_grants(
        self, stored: StoredStudies, sms_dir: Path, fast_otp: Any, tmp_path: Path
    ) -> None:
        ct = next(uid for uid, (modality, *_) in stored.alice.series.items() if modality == "CT")
        bob = _signed_in(stored.alice.uid, sms_dir, series_instance_uids=[ct])

        root = _unzip(_content(bob.get(f"/download/{stored.alice.uid}.zip")), tmp_path / "z")

        assert _dicomdir_digests(root) == _stored_digests(stored.alice.uid, series=ct)

    def test_it_speaks_the_recipients_language(
        self, alice: Client, stored: StoredStudies, tmp_path: Path
    ) -> None:
        response = alice.get(f"/download/{stored.alice.uid}.zip", HTTP_ACCEPT_LANGUAGE="fr")
        root = _unzip(_content(response), tmp_path / "fr")
        english = _unzip(
            _content(alice.get(f"/download/{stored.alice.uid}.zip", HTTP_ACCEPT_LANGUAGE="en")),
            tmp_path / "en",
        )

        assert (root / "README.TXT").read_bytes() != (english / "README.TXT").read_bytes()


class TestWhoMayDownload:
    def test_a_share_without_downloads_is_refused_with_a_page(
        self, stored: StoredStudies, sms_dir: Path, fast_otp: Any
    ) -> None:
        dave = _signed_in(stored.alice.uid, sms_dir, allow_download=False)

        response = dave.get(f"/download/{stored.alice.uid}.zip")

        assert response.status_code == 403
        assert not response.streaming
        assert b"did not allow these images to be downloaded" in response.content
        assert _downloads() == []

    @pytest.mark.parametrize("which", ["other", "made-up"])
    def test_alice_gets_404_for_any_other_study(
        self, alice: Client, stored: StoredStudies, which: str
    ) -> None:
        uid = stored.other.uid if which == "other" else MADE_UP_UID

        assert alice.get(f"/download/{uid}.zip").status_code == 404

    def test_mallory_without_a_session_gets_404(self, stored: StoredStudies) -> None:
        mallory = Client()

        assert mallory.get(f"/download/{stored.alice.uid}.zip").status_code == 404

    def test_a_viewer_token_does_not_download(self, alice: Client, stored: StoredStudies) -> None:
        token = alice.post("/dicomweb/token", {"study": stored.alice.uid}).json()["access_token"]
        mallory = Client(HTTP_AUTHORIZATION=f"Bearer {token}")

        assert mallory.get(f"/download/{stored.alice.uid}.zip").status_code == 404

    def test_a_head_request_packs_nothing(self, alice: Client, stored: StoredStudies) -> None:
        assert alice.head(f"/download/{stored.alice.uid}.zip").status_code == 405


class TestTheAudit:
    def test_a_download_read_to_its_end_is_one_download_event(
        self, alice: Client, stored: StoredStudies
    ) -> None:
        response = alice.get(f"/download/{stored.alice.uid}.zip")
        assert _downloads() == []  # nothing sent yet

        _content(response)

        events = _downloads()
        assert len(events) == 1
        assert events[0].share is not None
        assert events[0].share.study_instance_uid == stored.alice.uid
        assert events[0].detail == {
            "study": stored.alice.uid,
            "instances": stored.alice.instance_count,
        }

    def test_a_download_broken_off_after_the_first_chunk_is_not_counted(
        self, transactional_db: Any, alice: Client, stored: StoredStudies
    ) -> None:
        # (transactional: closing a response ends the request, which closes the database
        # connection as a server would, and a test transaction cannot survive that.)
        response: Any = alice.get(f"/download/{stored.alice.uid}.zip")
        chunks = iter(response.streaming_content)

        assert next(chunks).startswith(b"PK")
        response.close()  # the client went away: the server closes the ZIP's generator

        assert _downloads() == []


class TestViewEvents:
    def test_one_view_event_per_session_and_study(
        self, stored: StoredStudies, sms_dir: Path, fast_otp: Any
    ) -> None:
        created = make_share(stored.alice.uid)
        alice = Client()
        sign_in(alice, created, sms_dir)
        study = f"/dicomweb/studies/{stored.alice.uid}"

        alice.get("/viewer/")
        alice.get(study + "/metadata")
        retrieve: Any = alice.get(study, HTTP_ACCEPT="multipart/related; type=application/dicom")
        assert b"".join(retrieve.streaming_content)
        alice.get("/viewer/")

        views = AuditEvent.objects.filter(action=AuditEvent.Action.VIEW, share=share_of(created))
        assert [e.detail for e in views] == [{"study": stored.alice.uid}]

    def test_metadata_alone_is_a_view(self, alice: Client, stored: StoredStudies) -> None:
        assert alice.get(f"/dicomweb/studies/{stored.alice.uid}/metadata").status_code == 200

        assert AuditEvent.objects.filter(action=AuditEvent.Action.VIEW).count() == 1

    def test_a_search_is_not_a_view(self, alice: Client, stored: StoredStudies) -> None:
        assert alice.get("/dicomweb/studies").status_code == 200

        assert not AuditEvent.objects.filter(action=AuditEvent.Action.VIEW).exists()
