"""Retrieval from a real PACS (Orthanc) by C-MOVE, C-GET and WADO-RS, and C-FIND searches."""

import hashlib
import io
import json
import threading
import time
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from pydicom.dataset import Dataset
from pynetdicom.association import Association

from studies import dicom, imports, retrieval, services
from studies.demo import synthetic
from studies.dimse import pacs
from studies.dimse.storescp import StorageServer
from studies.models import Instance, PacsNode, RetrievalJob, Series, Study
from studies.store import store_dir
from tests.conftest import PacsStudies, SyntheticStudy, scp_port
from tests.support import free_port
from tests.support.orthanc import OrthancServer
from tests.support.proxy import TcpRelay

pytestmark = [pytest.mark.dicom, pytest.mark.django_db(transaction=True)]

METHODS = [PacsNode.Retrieve.MOVE, PacsNode.Retrieve.GET, PacsNode.Retrieve.WADO]


def dataset_sha256(part10: bytes) -> str:
    return hashlib.sha256(part10[dicom.dataset_offset(part10) :]).hexdigest()


def retrieve(node: PacsNode, method: str, study_uid: str) -> RetrievalJob:
    node.retrieve_method = method
    node.save(update_fields=["retrieve_method"])
    job = retrieval.retrieval_job_create(node=node, study_uid=study_uid)
    return retrieval.retrieval_job_run(job.pk)


def peer(orthanc: OrthancServer) -> pacs.Peer:
    return pacs.Peer(ae_title=orthanc.aet, host=orthanc.host, port=orthanc.dicom_port)


def assert_study_indexed(study: SyntheticStudy, node: PacsNode) -> None:
    row = Study.objects.get(study_instance_uid=study.uid)
    # Decoded with the data set's Specific Character Set, whatever it was.
    assert row.patient_name == study.patient_name
    assert row.patient_id == study.patient_id
    assert row.source_id == node.pk
    series = {s.series_instance_uid: s for s in Series.objects.filter(study=row)}
    assert set(series) == set(study.series)
    for uid, (modality, count, syntax) in study.series.items():
        assert series[uid].modality == modality
        assert series[uid].instances.count() == count
        # Stored as the PACS holds it: a JPEG-LS series stays JPEG-LS.
        assert set(series[uid].instances.values_list("transfer_syntax_uid", flat=True)) == {syntax}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", ["latin1", "utf8"])
def test_it_retrieves_every_instance_byte_for_byte(
    method: str,
    which: str,
    orthanc: OrthancServer,
    pacs_studies: PacsStudies,
    orthanc_node: PacsNode,
) -> None:
    study: SyntheticStudy = getattr(pacs_studies, which)

    job = retrieve(orthanc_node, method, study.uid)

    assert job.status == RetrievalJob.Status.DONE, job.error
    assert job.error == ""
    assert job.expected == job.received == study.instance_count
    assert job.failed == 0
    assert job.attempts == 1
    pacs_copies = orthanc.study_files(study.uid)
    instances = Instance.objects.filter(series__study__study_instance_uid=study.uid)
    assert {i.sop_instance_uid for i in instances} == set(pacs_copies)
    for instance in instances:
        stored = (store_dir() / instance.file_path).read_bytes()
        pacs_copy = pacs_copies[instance.sop_instance_uid]
        assert instance.size == len(stored)
        assert instance.sha256 == dataset_sha256(stored) == dataset_sha256(pacs_copy)
        if method == PacsNode.Retrieve.WADO:
            # WADO-RS carries whole files: Orthanc sends the one it stores.
            assert stored == pacs_copy
    assert_study_indexed(study, orthanc_node)
    assert not list(store_dir().rglob("*.part"))
    # Brought by the retrieval: a copy that `purge` may delete once no share needs it.
    assert Study.objects.get(study_instance_uid=study.uid).retrieved_copy


def test_a_study_the_archive_held_before_its_retrieval_stays_in_the_archive(
    tmp_path, pacs_studies: PacsStudies, orthanc_node: PacsNode
) -> None:
    study = pacs_studies.utf8
    for number, data in enumerate(study.files.values()):
        (tmp_path / f"{number}.dcm").write_bytes(data)
    imports.dicom_import([tmp_path])

    job = retrieve(orthanc_node, PacsNode.Retrieve.MOVE, study.uid)

    assert job.status == RetrievalJob.Status.DONE, job.error
    assert not Study.objects.get(study_instance_uid=study.uid).retrieved_copy


@pytest.mark.parametrize("method", METHODS)
def test_it_retrieves_again_without_duplicating_or_rewriting(
    method: str, pacs_studies: PacsStudies, orthanc_node: PacsNode
) -> None:
    study = pacs_studies.latin1
    first = retrieve(orthanc_node, method, study.uid)
    assert first.status == RetrievalJob.Status.DONE, first.error
    rows = {i.pk: (i.file_path, i.sha256, i.size) for i in Instance.objects.all()}
    files = {path: (store_dir() / path).read_bytes() for path, _, _ in rows.values()}

    # Running a finished job again changes nothing.
    again = retrieval.retrieval_job_run(first.pk)
    assert (again.status, again.attempts, again.received) == ("done", 1, study.instance_count)

    # A new job for the same study is served from what the store already holds.
    second = retrieve(orthanc_node, method, study.uid)
    assert second.pk != first.pk
    assert second.status == RetrievalJob.Status.DONE, second.error
    assert second.received == study.instance_count
    assert Study.objects.count() == 1
    assert Series.objects.count() == len(study.series)
    # The same rows, the same bytes, nothing left over.
    assert {i.pk: (i.file_path, i.sha256, i.size) for i in Instance.objects.all()} == rows
    assert {path: (store_dir() / path).read_bytes() for path in files} == files
    assert sorted(p for p in store_dir().rglob("*") if p.is_file()) == sorted(
        store_dir() / path for path in files
    )


def test_it_reuses_an_unfinished_job_for_the_same_study(
    pacs_studies: PacsStudies, orthanc_node: PacsNode
) -> None:
    first = retrieval.retrieval_job_create(node=orthanc_node, study_uid=pacs_studies.utf8.uid)
    second = retrieval.retrieval_job_create(node=orthanc_node, study_uid=pacs_studies.utf8.uid)
    assert first.pk == second.pk
    other = retrieval.retrieval_job_create(node=orthanc_node, study_uid=pacs_studies.latin1.uid)
    assert other.pk != first.pk


def test_it_refuses_a_study_uid_that_is_not_a_uid(orthanc_node: PacsNode) -> None:
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError):
        retrieval.retrieval_job_create(node=orthanc_node, study_uid="../../etc/passwd")
    assert RetrievalJob.objects.count() == 0


def test_retrieve_command_prints_the_job_as_json(
    pacs_studies: PacsStudies, orthanc_node: PacsNode
) -> None:
    out = io.StringIO()
    call_command("retrieve", "orthanc", pacs_studies.utf8.uid, "--wait", "--json", stdout=out)

    result = json.loads(out.getvalue())
    assert result["status"] == "done"
    assert result["study_uid"] == pacs_studies.utf8.uid
    assert result["pacs"] == "orthanc"
    assert result["method"] == "move"
    assert result["expected"] == result["received"] == pacs_studies.utf8.instance_count
    assert result["error"] == ""
    assert Instance.objects.count() == pacs_studies.utf8.instance_count
    # The DICOM JSON of what was retrieved is ready before the first viewer asks for it.
    assert not Instance.objects.filter(metadata="").exists()


def test_retrieve_command_fails_clearly_for_a_study_the_pacs_lacks(orthanc_node: PacsNode) -> None:
    out = io.StringIO()
    with pytest.raises(CommandError, match="failed"):
        call_command("retrieve", "orthanc", "1.2.3.4.5.6.7.8.9", "--wait", "--json", stdout=out)
    result = json.loads(out.getvalue())
    assert result["status"] == "failed"
    # Not a bare DICOM status: which PACS lacks which study.
    assert result["error"] == (
        f"ORTHANC@127.0.0.1:{orthanc_node.port} does not have study 1.2.3.4.5.6.7.8.9"
    )
    assert Study.objects.count() == 0


def test_pacs_commands_add_list_and_echo(orthanc: OrthancServer) -> None:
    out = io.StringIO()
    call_command(
        "pacs", "add", "main", "--aet", orthanc.aet, "--host", orthanc.host,
        "--port", str(orthanc.dicom_port), "--dicomweb", orthanc.dicomweb_url,
        "--retrieve", "get", "--json", stdout=out,
    )  # fmt: skip
    added = json.loads(out.getvalue())
    assert added == {
        "name": "main",
        "aet": orthanc.aet,
        "host": orthanc.host,
        "port": orthanc.dicom_port,
        "dicomweb": orthanc.dicomweb_url,
        "retrieve": "get",
    }

    out = io.StringIO()
    call_command("pacs", "list", "--json", stdout=out)
    assert json.loads(out.getvalue()) == [added]

    out = io.StringIO()
    call_command("pacs", "echo", "main", "--json", stdout=out)
    assert json.loads(out.getvalue()) == {"name": "main", "ok": True}


def test_pacs_echo_reports_a_node_that_does_not_answer(orthanc: OrthancServer) -> None:
    services.pacs_node_create(name="gone", ae_title="GONE", host="127.0.0.1", port=free_port())
    out = io.StringIO()
    with pytest.raises(CommandError, match="cannot reach"):
        call_command("pacs", "echo", "gone", "--json", stdout=out)
    result = json.loads(out.getvalue())
    assert result["ok"] is False
    assert "cannot reach" in result["error"]


@pytest.mark.parametrize(
    "arguments",
    [
        ["bad", "--aet", "A\\B", "--host", "127.0.0.1", "--port", "104"],
        ["bad", "--aet", "SEVENTEEN_CHARS_X", "--host", "127.0.0.1", "--port", "104"],
        ["bad", "--aet", "PACS", "--host", "127.0.0.1", "--port", "70000"],
        ["bad", "--aet", "PACS", "--host", "127.0.0.1", "--port", "104", "--retrieve", "wado"],
    ],
)
def test_pacs_add_refuses_a_bad_node(arguments: list[str]) -> None:
    with pytest.raises(CommandError, match="Cannot add the node"):
        call_command("pacs", "add", *arguments, "--json", stdout=io.StringIO())
    assert PacsNode.objects.count() == 0


def test_find_studies_matches_and_decodes_both_character_sets(
    orthanc: OrthancServer, pacs_studies: PacsStudies
) -> None:
    for study in (pacs_studies.latin1, pacs_studies.utf8):
        matches = pacs.find_studies(peer(orthanc), {"PatientID": study.patient_id})
        assert [str(m.StudyInstanceUID) for m in matches] == [study.uid]
        match = matches[0]
        assert str(match.PatientName) == study.patient_name
        assert set(match.ModalitiesInStudy) == {"CT", "MR"}
        assert int(match.NumberOfStudyRelatedSeries) == len(study.series)
        assert int(match.NumberOfStudyRelatedInstances) == study.instance_count

    by_uid = pacs.find_studies(peer(orthanc), {"StudyInstanceUID": pacs_studies.utf8.uid})
    assert [str(m.PatientID) for m in by_uid] == [pacs_studies.utf8.patient_id]
    assert pacs.find_studies(peer(orthanc), {"PatientID": "NOBODY-HERE"}) == []


def test_find_studies_stops_at_the_limit(orthanc: OrthancServer, pacs_studies: PacsStudies) -> None:
    everything = pacs.find_studies(peer(orthanc), {"PatientID": "PAT-*"})
    assert {str(m.StudyInstanceUID) for m in everything} >= {
        pacs_studies.latin1.uid,
        pacs_studies.utf8.uid,
    }
    assert len(pacs.find_studies(peer(orthanc), {"PatientID": "PAT-*"}, limit=1)) == 1
    # The association is still usable afterwards: the cancelled search left nothing behind.
    assert len(pacs.find_studies(peer(orthanc), {"PatientID": "PAT-UTF8"})) == 1


# --- One job, two runs at once --------------------------------------------------------------


def test_two_runs_of_one_job_at_once_ask_the_pacs_once(
    pacs_studies: PacsStudies, orthanc_node: PacsNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers given the same job (a redelivered message, a job queued twice) at the same
    moment: one retrieves the study, the other gets the job as it is."""
    study = pacs_studies.latin1
    job = retrieval.retrieval_job_create(node=orthanc_node, study_uid=study.uid)
    real_move = pacs.move_study
    moves: list[str] = []
    start = threading.Barrier(2)
    one_returned = threading.Event()

    def counting_move(*args: Any, **kwargs: Any) -> pacs.SubOperations:
        moves.append(threading.current_thread().name)
        # Hold the move until the other run has come and gone: both runs then overlap.
        one_returned.wait(timeout=5)
        return real_move(*args, **kwargs)

    monkeypatch.setattr(pacs, "move_study", counting_move)
    outcomes: dict[str, RetrievalJob] = {}

    def run(name: str) -> None:
        start.wait()
        try:
            outcomes[name] = retrieval.retrieval_job_run(job.pk)
        finally:
            one_returned.set()
            connection.close()

    runs = [threading.Thread(target=run, args=(name,), name=name) for name in ("a", "b")]
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join(timeout=60)

    assert len(moves) == 1, moves
    assert sorted(o.status for o in outcomes.values()) == ["done", "running"]
    job.refresh_from_db()
    assert (job.status, job.attempts, job.received) == ("done", 1, study.instance_count)
    assert Instance.objects.count() == study.instance_count


# --- Slow and hierarchical PACSs ------------------------------------------------------------


def test_a_c_get_asks_level_by_level_as_a_hierarchical_only_pacs_requires(
    pacs_studies: PacsStudies, orthanc_node: PacsNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PACS need only support hierarchical queries (PS3.4 C.4.1.3.1): an IMAGE-level query
    names its series, never a universal Series Instance UID."""
    study = pacs_studies.latin1
    queries: list[tuple[str, str | None]] = []
    real_find = Association.send_c_find

    def recording_find(self: Association, dataset: Dataset, *args: Any, **kwargs: Any) -> Any:
        queries.append((str(dataset.QueryRetrieveLevel), dataset.get("SeriesInstanceUID")))
        return real_find(self, dataset, *args, **kwargs)

    monkeypatch.setattr(Association, "send_c_find", recording_find)

    job = retrieve(orthanc_node, PacsNode.Retrieve.GET, study.uid)

    assert job.status == RetrievalJob.Status.DONE, job.error
    image_level = [str(series) for level, series in queries if level == "IMAGE"]
    assert sorted(image_level) == sorted(study.series)  # one query per series, by its UID
    assert ("SERIES", "") in queries


def test_instances_in_study_lists_every_instance_with_its_class(
    orthanc: OrthancServer, pacs_studies: PacsStudies
) -> None:
    study = pacs_studies.utf8
    found = pacs.instances_in_study(peer(orthanc), study.uid)
    assert set(found) == set(study.files)
    assert set(found.values()) == {
        str(dicom.read_header(data).SOPClassUID) for data in study.files.values()
    }
    assert pacs.instances_in_study(peer(orthanc), "1.2.826.0.1.3680043.8.498.7") == {}


def test_a_c_move_slower_than_the_dimse_timeout_between_answers_completes(
    settings,
    storage_scp: StorageServer,
    portal_ae_title: str,
) -> None:
    """Each C-STORE of this move takes about a second over a slow link to the storage SCP, and
    the PACS says nothing meanwhile: the DIMSE timeout (for a quick answer) must not cut the
    move short; the retrieve timeout bounds it."""
    settings.DICOM_DIMSE_TIMEOUT = 0.5
    settings.DICOM_RETRIEVE_TIMEOUT = 60.0
    files = [
        synthetic.to_bytes(ds)
        for ds in synthetic.iter_study(
            patient_name="Slow^Link",
            patient_id="SLOW",
            modalities=(("CT", 3),),
            rows=256,
            columns=256,
        )
    ]
    with (
        TcpRelay("127.0.0.1", scp_port(storage_scp), rate=128 * 1024) as slow_link,
        OrthancServer(
            aet="SLOWPACS", modalities={"portal": (portal_ae_title, "127.0.0.1", slow_link.port)}
        ) as slow,
    ):
        slow.upload_many(files)
        study_uid = str(dicom.read_header(files[0]).StudyInstanceUID)
        node = services.pacs_node_create(
            name="slow", ae_title=slow.aet, host="127.0.0.1", port=slow.dicom_port
        )
        started = time.monotonic()
        job = retrieve(node, PacsNode.Retrieve.MOVE, study_uid)
        elapsed = time.monotonic() - started

    assert job.status == RetrievalJob.Status.DONE, job.error
    assert job.received == 3
    assert elapsed > 3 * settings.DICOM_DIMSE_TIMEOUT  # the link really was that slow
    assert Instance.objects.filter(series__study__study_instance_uid=study_uid).count() == 3
