"""The storage SCP and shared studies: a configured node (mistaken, or in an attacker's hands)
resends an instance of a study a recipient is looking at with other bytes. dcmtk's storescu
plays the node."""

from pathlib import Path

import pydicom
import pytest

from accounts import services as account_services
from accounts.models import AuditEvent
from studies.dimse.storescp import StorageServer
from studies.models import Instance, PacsNode
from studies.store import instance_file
from tests.conftest import MODALITY_AE, scp_port, wait_until
from tests.support import dcmtk
from tests.support.access import make_study
from tests.test_storescp import dataset_sha256, make_files

pytestmark = [pytest.mark.dicom, pytest.mark.django_db(transaction=True)]


def send(server: StorageServer, path: Path) -> str:
    result = dcmtk.storescu(
        "127.0.0.1", scp_port(server), [path], aet=MODALITY_AE, aec=server.ae_title,
        extra=["-v"],
    )  # fmt: skip
    return result.stdout + result.stderr


def rewritten(path: Path, folder: Path) -> Path:
    """The same instance (same SOP Instance UID), its content changed."""
    ds = pydicom.dcmread(path)
    ds.StudyDescription = "REWRITTEN"
    ds.PatientName = "Someone^Else"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / path.name
    ds.save_as(out)
    return out


@pytest.fixture
def pushed(storage_scp: StorageServer, modality_node: PacsNode, tmp_path: Path) -> Path:
    files = make_files(tmp_path / "push", modalities=(("CT", 1),), compress_series=None)
    (path,) = files.values()
    assert "Success" in send(storage_scp, path)
    wait_until(lambda: Instance.objects.exists())
    return path


def _stored(sop_uid: str | None = None) -> tuple[Instance, bytes]:
    instance = Instance.objects.get(sop_instance_uid=sop_uid) if sop_uid else Instance.objects.get()
    return instance, instance_file(instance).read_bytes()


def test_a_changed_instance_of_a_shared_study_is_refused_and_audited(
    storage_scp: StorageServer, pushed: Path, tmp_path: Path
) -> None:
    instance, before = _stored()
    study_uid = instance.series.study.study_instance_uid
    account_services.share_create(
        study_instance_uid=study_uid, recipient="patient", channel="sms", contact="+33612345642"
    )
    # The same bytes again (a repeated C-MOVE): a no-op success.
    assert "Received Store Response (Success)" in send(storage_scp, pushed)
    assert _stored()[1] == before

    output = send(storage_scp, rewritten(pushed, tmp_path / "evil"))
    # 0xC001: a failure status of the "cannot understand" range (PS3.4 B.2.3).
    assert "Received Store Response (Error: CannotUnderstand)" in output, output
    instance_after, after = _stored()
    assert after == before
    assert instance_after.sha256 == instance.sha256 == dataset_sha256(before)
    event = AuditEvent.objects.get(action=AuditEvent.Action.STUDY_OVERWRITE_REFUSED)
    assert event.detail["study"] == study_uid
    assert event.detail["sop_instance"] == instance.sop_instance_uid
    assert event.detail["source"] == "modality"
    assert event.detail["peer"] == f"{MODALITY_AE}@127.0.0.1"


def test_a_share_of_priors_protects_them_too(
    storage_scp: StorageServer, pushed: Path, tmp_path: Path
) -> None:
    instance, before = _stored()
    prior_uid = instance.series.study.study_instance_uid
    current = make_study(
        "1.2.826.0.1.3680043.8.498.9001", patient_id=instance.series.study.patient_id
    )
    created = account_services.share_create(
        study_instance_uid=current.study_instance_uid,
        recipient="patient",
        channel="sms",
        contact="+33612345642",
    )
    created.share.shared_studies.create(study_instance_uid=prior_uid)
    output = send(storage_scp, rewritten(pushed, tmp_path / "evil"))
    assert "Error: CannotUnderstand" in output, output
    assert _stored(instance.sop_instance_uid)[1] == before


def test_an_unshared_or_revoked_study_is_replaced_as_before(
    storage_scp: StorageServer, pushed: Path, tmp_path: Path
) -> None:
    instance, before = _stored()
    created = account_services.share_create(
        study_instance_uid=instance.series.study.study_instance_uid,
        recipient="patient",
        channel="sms",
        contact="+33612345642",
    )
    account_services.share_revoke(share=created.share)
    changed = rewritten(pushed, tmp_path / "fix")
    assert "Received Store Response (Success)" in send(storage_scp, changed)
    wait_until(lambda: Instance.objects.get().sha256 != instance.sha256)
    assert _stored()[1] != before
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.STUDY_OVERWRITE_REFUSED).exists()
