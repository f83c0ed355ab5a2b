"""`study_share`: a share for a study, and the retrieval of a study the store lacks, in one
service that the `share create` command and the staff workspace call."""

from collections.abc import Callable
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from accounts.models import Share
from studies import services
from studies.models import PacsNode, RetrievalJob
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
