"""`study_share`: a share for a study, and the retrieval of a study the store lacks, in one
service that the `share create` command and the staff workspace call."""

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from accounts.models import Share
from accounts.selectors import share_status
from studies import services
from studies.models import PacsNode, RetrievalJob, Study
from studies.retention import studies_unneeded
from tests.support import free_port
from tests.support.access import STUDY_UID, make_study

pytestmark = pytest.mark.django_db

CaptureOnCommit = Callable[..., Any]


@pytest.fixture
def node() -> PacsNode:
    return services.pacs_node_create(
        name="remote", ae_title="REMOTE", host="127.0.0.1", port=free_port()
    )


def share(**kwargs: Any) -> services.SharedStudy:
    options: dict[str, Any] = {
        "study_instance_uid": STUDY_UID,
        "recipient": "patient",
        "channel": "sms",
        "contact": "+33612345642",
    }
    return services.study_share(**(options | kwargs))


@pytest.mark.parametrize(
    "uid", ["1.2.<script>", "1.2.840.10008.1.2\n", "1..2", "1." + "2" * 64, ""]
)
def test_it_refuses_an_invalid_study_uid_before_any_share_exists(node: PacsNode, uid: str) -> None:
    with pytest.raises(ValidationError) as info:
        share(study_instance_uid=uid, node=node)
    assert list(info.value.message_dict) == ["study_uid"]
    assert not Share.objects.exists()
    assert not RetrievalJob.objects.exists()


def test_it_queues_the_retrieval_of_a_study_the_store_lacks(
    node: PacsNode, django_capture_on_commit_callbacks: CaptureOnCommit
) -> None:
    with django_capture_on_commit_callbacks() as callbacks:
        shared = share(node=node)
    assert shared.created.share.study_instance_uid == STUDY_UID
    assert shared.job is not None and shared.job.pacs == node
    assert shared.job.study_instance_uid == STUDY_UID
    assert not shared.in_store
    assert len(callbacks) == 1  # the job's message, sent once the share is committed


def test_it_asks_nothing_of_the_pacs_for_a_study_in_the_store(node: PacsNode) -> None:
    make_study()
    shared = share(node=node)
    assert shared.in_store and shared.job is None
    assert not RetrievalJob.objects.exists()


def test_without_a_node_a_missing_study_leaves_the_share_pending() -> None:
    shared = share()
    assert shared.job is None and not shared.in_store
    assert Share.objects.get() == shared.created.share


PRIOR_UID = "1.2.826.0.1.3680043.8.498.1002"
OTHER_PATIENT_UID = "1.2.826.0.1.3680043.8.498.3003"


def test_a_share_holds_the_current_study_and_its_priors(
    node: PacsNode, django_capture_on_commit_callbacks: CaptureOnCommit
) -> None:
    make_study(STUDY_UID, patient_id="PID-1")
    with django_capture_on_commit_callbacks():
        shared = share(prior_study_instance_uids=[PRIOR_UID, STUDY_UID, PRIOR_UID], node=node)

    created = Share.objects.get(pk=shared.created.share.pk)
    assert created.study_uids == [STUDY_UID, PRIOR_UID]
    # Only the prior the store lacks is retrieved; the share waits for it.
    assert [job.study_instance_uid for job in shared.jobs] == [PRIOR_UID]
    assert not shared.in_store
    assert share_status(created) == "pending"

    make_study(PRIOR_UID, patient_id="PID-1", description="CT THORAX 2025")
    # Instances of the prior arrived, but its retrieval has not ended: perhaps part of it.
    assert share_status(created) == "pending"
    RetrievalJob.objects.filter(pk=shared.jobs[0].pk).update(status=RetrievalJob.Status.DONE)
    assert share_status(created) == "active"


def test_priors_of_another_patient_are_refused(node: PacsNode) -> None:
    make_study(STUDY_UID, patient_id="PID-1")
    make_study(OTHER_PATIENT_UID, patient_id="PID-2")

    with pytest.raises(ValidationError) as info:
        share(prior_study_instance_uids=[OTHER_PATIENT_UID], node=node)

    assert "different patients" in str(info.value)
    assert not Share.objects.exists()


def test_an_invalid_prior_uid_is_refused(node: PacsNode) -> None:
    with pytest.raises(ValidationError):
        share(prior_study_instance_uids=["1.2.840.10008.1.2\n"], node=node)
    assert not Share.objects.exists()


def test_purge_keeps_a_prior_that_a_live_share_needs() -> None:
    make_study(STUDY_UID, patient_id="PID-1")
    prior = make_study(PRIOR_UID, patient_id="PID-1")
    Study.objects.filter(pk=prior.pk).update(retrieved_copy=True)
    created = share(prior_study_instance_uids=[PRIOR_UID]).created.share

    assert prior not in studies_unneeded()
    assert prior in studies_unneeded(now=created.expires_at + timedelta(seconds=1))
    Share.objects.filter(pk=created.pk).update(revoked_at=timezone.now())
    assert prior in studies_unneeded()
