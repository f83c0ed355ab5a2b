"""Share-scoped DICOMweb (PS3.18) for recipients: the same study loaded in Orthanc and in the
portal answers the same, and nothing outside the share answers at all.

Each test signs a patient in (link, one-time code) and then plays a DICOMweb client: the test
client for single requests, dicomweb-client against a live server for the comparison with
Orthanc.
"""

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from django.core import mail
from django.test import Client
from PIL import Image
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from accounts import services as account_services
from accounts.models import Share
from studies import imports
from studies import services as study_services
from studies.demo import synthetic
from studies.models import Instance
from studies.store import instance_file
from tests.conftest import PacsStudies, SyntheticStudy
from tests.support.access import make_share, open_link, sign_in
from tests.support.orthanc import OrthancServer

pytestmark = pytest.mark.dicom

MADE_UP_UID = "1.2.826.0.1.3680043.8.498.424242"


def _import(study: SyntheticStudy, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for number, data in enumerate(study.files.values()):
        (folder / f"{number}.dcm").write_bytes(data)
    report = imports.dicom_import([folder])
    assert report.imported == study.instance_count, report.skipped


def _dataset_bytes(part10: bytes) -> bytes:
    """The data set of a Part 10 file, without preamble and file meta (whose implementation
    UIDs differ from one archive to another)."""
    ds = dcmread(DicomBytesIO(part10), stop_before_pixels=True)
    assert ds.file_meta is not None
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return part10[meta_end:]


@pytest.fixture
def loaded(pacs_studies: PacsStudies, tmp_path: Path, transactional_db: Any) -> PacsStudies:
    """Both synthetic studies in the portal's store too (only the Latin-1 one gets shared)."""
    _import(pacs_studies.latin1, tmp_path / "latin1")
    _import(pacs_studies.utf8, tmp_path / "utf8")
    return pacs_studies


@pytest.fixture
def alice(loaded: PacsStudies, sms_dir: Path, fast_otp: Any) -> Client:
    """Alice, a patient signed in to her share of the Latin-1 study."""
    client = Client()
    sign_in(client, make_share(loaded.latin1.uid), sms_dir)
    return client


def _json(response: Any) -> Any:
    assert response.status_code == 200, response.content[:300]
    return json.loads(response.content)


def _value(element: dict[str, Any]) -> Any:
    values = element.get("Value", [])
    return values[0] if len(values) == 1 else values


# --- QIDO-RS --------------------------------------------------------------------------------


def test_it_finds_only_the_shared_study(alice: Client, loaded: PacsStudies) -> None:
    studies = _json(alice.get("/dicomweb/studies"))

    assert [_value(s["0020000D"]) for s in studies] == [loaded.latin1.uid]
    study = studies[0]
    assert _value(study["00201208"]) == loaded.latin1.instance_count
    assert _value(study["00201206"]) == len(loaded.latin1.series)
    assert sorted(study["00080061"]["Value"]) == ["CT", "MR"]
    assert _value(study["00100020"]) == "PAT-LATIN1"
    assert study["00100010"]["Value"][0]["Alphabetic"] == "Müller^Hélène"
    assert _value(study["00081190"]).endswith(f"/dicomweb/studies/{loaded.latin1.uid}")


def test_a_search_for_the_other_study_finds_nothing(alice: Client, loaded: PacsStudies) -> None:
    assert _json(alice.get("/dicomweb/studies", {"StudyInstanceUID": loaded.utf8.uid})) == []
    assert _json(alice.get("/dicomweb/studies", {"PatientID": "PAT-UTF8"})) == []
    assert _json(alice.get("/dicomweb/series", {"StudyInstanceUID": loaded.utf8.uid})) == []


@pytest.mark.parametrize(
    ("query", "found"),
    [
        ({"PatientName": "müller*"}, True),
        ({"PatientName": "M?LLER^*"}, True),
        ({"PatientName": "Dupont*"}, False),
        ({"00100020": "PAT-LATIN1"}, True),
        ({"PatientID": "PAT-*"}, True),
        ({"PatientID": "pat-latin1"}, False),
        ({"ModalitiesInStudy": "MR"}, True),
        ({"ModalitiesInStudy": "US"}, False),
    ],
)
def test_study_matching_follows_the_standard(
    alice: Client, query: dict[str, str], found: bool
) -> None:
    assert len(_json(alice.get("/dicomweb/studies", query))) == (1 if found else 0)


def test_dates_match_as_values_and_ranges(alice: Client) -> None:
    study = _json(alice.get("/dicomweb/studies"))[0]
    date = _value(study["00080020"])
    year = date[:4]
    for query, found in [
        (date, True),
        (f"{year}0101-{year}1231", True),
        (f"-{year}0101", date == f"{year}0101"),
        (f"{int(year) + 1}0101-", False),
    ]:
        assert len(_json(alice.get("/dicomweb/studies", {"StudyDate": query}))) == int(found)


def test_series_and_instances_are_those_orthanc_lists(
    alice: Client, loaded: PacsStudies, orthanc: OrthancServer
) -> None:
    uid = loaded.latin1.uid
    ours = _json(alice.get(f"/dicomweb/studies/{uid}/series"))
    theirs = requests.get(f"{orthanc.dicomweb_url}/studies/{uid}/series", timeout=30).json()

    def summary(series: list[dict[str, Any]]) -> set[tuple[str, str, int]]:
        return {
            (_value(s["0020000E"]), _value(s["00080060"]), int(_value(s["00201209"])))
            for s in series
        }

    assert summary(ours) == summary(theirs)

    for series in ours:
        series_uid = _value(series["0020000E"])
        path = f"/studies/{uid}/series/{series_uid}/instances"
        mine = {_value(i["00080018"]) for i in _json(alice.get("/dicomweb" + path))}
        orthancs = requests.get(orthanc.dicomweb_url + path, timeout=30).json()
        assert mine == {_value(i["00080018"]) for i in orthancs}


def test_limit_and_offset_page_through_instances(alice: Client, loaded: PacsStudies) -> None:
    every = _json(alice.get(f"/dicomweb/studies/{loaded.latin1.uid}/instances"))
    assert len(every) == loaded.latin1.instance_count

    pages = [
        _json(alice.get(f"/dicomweb/studies/{loaded.latin1.uid}/instances", {
            "limit": "3", "offset": str(offset)
        }))
        for offset in range(0, len(every), 3)
    ]  # fmt: skip

    assert [len(p) for p in pages][:-1] == [3] * (len(pages) - 1)
    assert [i["00080018"] for page in pages for i in page] == [i["00080018"] for i in every]


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ({"limit": "ten"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"StudyDate": "2026"}, "StudyDate"),
        ({"NotAKeyword": "x"}, "NotAKeyword"),
        ({"StudyInstanceUID": "1.2.abc"}, "StudyInstanceUID"),
        ({"SeriesNumber": "one"}, "SeriesNumber"),
    ],
)
def test_a_malformed_query_gets_400_with_its_reason(
    alice: Client, query: dict[str, str], reason: str
) -> None:
    response = alice.get("/dicomweb/series", query)

    assert response.status_code == 400
    assert reason in response.content.decode()


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ({"PatientID": "A\x00B"}, "NUL"),
        ({"ModalitiesInStudy": "\x00"}, "NUL"),
        ({"StudyDescription": "x" * 65}, "64 characters"),
    ],
)
def test_hostile_text_gets_400_never_a_server_error(
    alice: Client, query: dict[str, str], reason: str
) -> None:
    response = alice.get("/dicomweb/studies", query)

    assert response.status_code == 400
    assert reason in response.content.decode()


def test_a_run_of_wildcards_matches_as_one(alice: Client) -> None:
    """Thousands of "*" would be a regular expression the database refuses: they are one."""
    response = alice.get("/dicomweb/studies", {"PatientID": "*" * 3000 + "LATIN1"})

    assert len(_json(response)) == 1


def test_a_key_the_index_cannot_match_is_ignored_with_a_warning(alice: Client) -> None:
    response = alice.get("/dicomweb/studies", {"PatientWeight": "70"})

    assert len(_json(response)) == 1
    assert "PatientWeight" in response["Warning"]


def test_qido_refuses_a_media_type_it_cannot_give(alice: Client) -> None:
    assert alice.get("/dicomweb/studies", HTTP_ACCEPT="application/dicom").status_code == 406
    ok = alice.get("/dicomweb/studies", HTTP_ACCEPT="application/json")
    assert ok.status_code == 200 and ok["Content-Type"] == "application/json"


# --- WADO-RS ----------------------------------------------------------------------------------


def _parts(response: Any) -> list[tuple[dict[str, str], bytes]]:
    content_type = response["Content-Type"]
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip('"').encode()
    body = b"".join(response.streaming_content)
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _sep, payload = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n") if ": " in line)
        parts.append((headers, payload[:-2]))
    return parts


def test_a_study_comes_back_byte_for_byte(alice: Client, loaded: PacsStudies) -> None:
    response = alice.get(
        f"/dicomweb/studies/{loaded.latin1.uid}",
        HTTP_ACCEPT='multipart/related; type="application/dicom"; transfer-syntax=*',
    )

    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"].startswith('multipart/related; type="application/dicom"')
    parts = _parts(response)
    assert len(parts) == loaded.latin1.instance_count
    sent = {hashlib.sha256(_dataset_bytes(b)).hexdigest() for b in loaded.latin1.files.values()}
    received = set()
    for headers, payload in parts:
        assert headers["Content-Length"] == str(len(payload))
        ds = dcmread(DicomBytesIO(payload), stop_before_pixels=True)
        assert headers["Content-Type"] == (
            f"application/dicom; transfer-syntax={ds.file_meta.TransferSyntaxUID}"
        )
        received.add(hashlib.sha256(_dataset_bytes(payload)).hexdigest())
    assert received == sent


def test_series_and_instance_retrieval_are_scoped(alice: Client, loaded: PacsStudies) -> None:
    uid = loaded.latin1.uid
    series_uid, (_modality, count, _syntax) = next(iter(loaded.latin1.series.items()))
    series = _parts(alice.get(f"/dicomweb/studies/{uid}/series/{series_uid}"))
    assert len(series) == count

    one = Instance.objects.filter(series__series_instance_uid=series_uid).first()
    assert one is not None
    single = _parts(
        alice.get(f"/dicomweb/studies/{uid}/series/{series_uid}/instances/{one.sop_instance_uid}")
    )
    assert [payload for _h, payload in single] == [instance_file(one).read_bytes()]


def test_retrieval_refuses_what_it_cannot_serve(alice: Client, loaded: PacsStudies) -> None:
    uid = loaded.latin1.uid
    assert alice.get(f"/dicomweb/studies/{uid}", HTTP_ACCEPT="image/png").status_code == 406
    # The MR series is stored in JPEG-LS: the portal converts to nothing but the default.
    jpeg_2000 = (
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90'
    )
    assert alice.get(f"/dicomweb/studies/{uid}", HTTP_ACCEPT=jpeg_2000).status_code == 406


def test_without_a_transfer_syntax_instances_come_in_the_default_one(
    alice: Client, loaded: PacsStudies
) -> None:
    """PS3.18 §8.7.3.5.2: application/dicom without a transfer-syntax parameter is Explicit VR
    Little Endian; the JPEG-LS series is decoded, losslessly."""
    uid = loaded.latin1.uid
    parts = _parts(
        alice.get(
            f"/dicomweb/studies/{uid}", HTTP_ACCEPT='multipart/related; type="application/dicom"'
        )
    )
    assert len(parts) == loaded.latin1.instance_count
    for headers, payload in parts:
        assert headers["Content-Type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
        ours = dcmread(DicomBytesIO(payload))
        assert ours.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        original = dcmread(DicomBytesIO(loaded.latin1.files[str(ours.SOPInstanceUID)]))
        assert (ours.pixel_array == original.pixel_array).all()


def test_metadata_has_orthancs_tags_and_bulk_data_that_resolves(
    alice: Client, loaded: PacsStudies, orthanc: OrthancServer
) -> None:
    uid = loaded.latin1.uid
    ours = _json(alice.get(f"/dicomweb/studies/{uid}/metadata"))
    theirs = requests.get(f"{orthanc.dicomweb_url}/studies/{uid}/metadata", timeout=30).json()

    def by_uid(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {_value(d["00080018"]): d for d in documents}

    mine, orthancs = by_uid(ours), by_uid(theirs)
    assert mine.keys() == orthancs.keys()
    for sop_uid, document in mine.items():
        # Orthanc leaves compressed pixel data out; the portal gives it as bulk data too.
        assert "BulkDataURI" in document["7FE00010"]
        assert document.keys() - {"7FE00010"} == orthancs[sop_uid].keys() - {"7FE00010"}
        for tag in ("00100010", "00100020", "0020000E", "00280010", "00280011"):
            assert document[tag] == orthancs[sop_uid][tag], tag

    document = ours[0]
    pixel_uri = document["7FE00010"]["BulkDataURI"]
    assert pixel_uri.startswith("http://testserver/dicomweb/studies/")
    bulk = alice.get(pixel_uri.removeprefix("http://testserver"))
    assert bulk.status_code == 200
    ((headers, value),) = _parts(bulk) if bulk.streaming else _static_parts(bulk)
    instance = Instance.objects.get(sop_instance_uid=_value(document["00080018"]))
    stored = dcmread(instance_file(instance))
    assert value == stored.PixelData
    assert headers["Content-Type"] == "application/octet-stream"


def _static_parts(response: Any) -> list[tuple[dict[str, str], bytes]]:
    class Streamed:
        def __init__(self, r: Any) -> None:
            self.r = r
            self.streaming_content = [r.content]

        def __getitem__(self, key: str) -> str:
            return str(self.r[key])

    return _parts(Streamed(response))


def test_metadata_is_computed_once_and_kept(alice: Client, loaded: PacsStudies) -> None:
    uid = loaded.latin1.uid
    instances = Instance.objects.filter(series__study__study_instance_uid=uid)
    # The import computed it; what a push left out is computed at the first request.
    assert not instances.filter(metadata="").exists()
    instances.filter(pk=instances.first().pk).update(metadata="")  # type: ignore[union-attr]

    first = alice.get(f"/dicomweb/studies/{uid}/metadata").content
    assert not instances.filter(metadata="").exists()
    # The files are not read again: the answer comes from the index.
    for instance in instances:
        instance_file(instance).unlink()
    assert alice.get(f"/dicomweb/studies/{uid}/metadata").content == first


# --- Nothing outside the share ----------------------------------------------------------------


def _paths(study: str, series: str, instance: str) -> list[str]:
    base = f"/dicomweb/studies/{study}"
    return [
        base,
        base + "/metadata",
        base + "/series",
        base + "/instances",
        f"{base}/series/{series}",
        f"{base}/series/{series}/metadata",
        f"{base}/series/{series}/instances",
        f"{base}/series/{series}/instances/{instance}",
        f"{base}/series/{series}/instances/{instance}/metadata",
        f"{base}/series/{series}/instances/{instance}/bulk/7FE00010",
        f"{base}/series/{series}/instances/{instance}/frames/1",
        f"{base}/series/{series}/instances/{instance}/rendered",
        f"{base}/series/{series}/instances/{instance}/frames/1/rendered",
        f"{base}/series/{series}/instances/{instance}/thumbnail",
        f"{base}/series/{series}/thumbnail",
        base + "/thumbnail",
    ]


def _some_instance(study_uid: str) -> Instance:
    instance = (
        Instance.objects.filter(series__study__study_instance_uid=study_uid)
        .select_related("series")
        .first()
    )
    assert instance is not None
    return instance


def test_another_study_is_404_on_every_path(alice: Client, loaded: PacsStudies) -> None:
    other = _some_instance(loaded.utf8.uid)
    for path in _paths(loaded.utf8.uid, other.series.series_instance_uid, other.sop_instance_uid):
        assert alice.get(path).status_code == 404, path


def test_a_made_up_or_malformed_uid_is_the_same_404(alice: Client, loaded: PacsStudies) -> None:
    mine = _some_instance(loaded.latin1.uid)
    series, sop = mine.series.series_instance_uid, mine.sop_instance_uid
    cases = [
        *_paths(MADE_UP_UID, series, sop),
        *[p for p in _paths(loaded.latin1.uid, MADE_UP_UID, sop) if "/series/" in p],
        *[p for p in _paths(loaded.latin1.uid, series, MADE_UP_UID) if "/instances/" in p],
        f"/dicomweb/studies/{loaded.latin1.uid}x",
        "/dicomweb/studies/' OR 1=1 --",
        f"/dicomweb/studies/{loaded.latin1.uid}/series/{series}/instances/{sop}/bulk/7FE0",
        f"/dicomweb/studies/{loaded.latin1.uid}/series/{series}/instances/{sop}/bulk/00100010",
    ]
    for path in cases:
        assert alice.get(path).status_code == 404, path


def test_a_share_of_one_series_hides_the_others(
    loaded: PacsStudies, sms_dir: Path, fast_otp: Any
) -> None:
    uid = loaded.latin1.uid
    shown, hidden = list(loaded.latin1.series)
    bob = Client()
    sign_in(bob, make_share(uid, series_instance_uids=[shown]), sms_dir)

    listed = {_value(s["0020000E"]) for s in _json(bob.get(f"/dicomweb/studies/{uid}/series"))}
    assert listed == {shown}
    hidden_instance = Instance.objects.filter(series__series_instance_uid=hidden).first()
    assert hidden_instance is not None
    for path in [p for p in _paths(uid, hidden, hidden_instance.sop_instance_uid) if hidden in p]:
        assert bob.get(path).status_code == 404, path
    study = _json(bob.get("/dicomweb/studies"))[0]
    assert _value(study["00201206"]) == 1
    retrieved = _parts(bob.get(f"/dicomweb/studies/{uid}"))
    assert len(retrieved) == loaded.latin1.series[shown][1]


def test_without_a_session_or_after_revocation_nothing_answers(
    alice: Client, loaded: PacsStudies
) -> None:
    mine = _some_instance(loaded.latin1.uid)
    paths = [
        "/dicomweb/studies",
        *_paths(loaded.latin1.uid, mine.series.series_instance_uid, mine.sop_instance_uid),
    ]
    charlie = Client()
    for path in paths:
        assert charlie.get(path).status_code == 404, path

    account_services.share_revoke(share=Share.objects.get())
    for path in paths:
        assert alice.get(path).status_code in {302, 404}, path


# --- A real DICOMweb client -------------------------------------------------------------------


def test_dicomweb_client_gets_from_the_portal_what_it_gets_from_orthanc(
    alice: Client, loaded: PacsStudies, orthanc: OrthancServer, live_server: Any
) -> None:
    session = requests.Session()
    for cookie in alice.cookies.values():
        session.cookies.set(cookie.key, cookie.value)
    portal = DICOMwebClient(f"{live_server.url}/dicomweb", session=session)
    pacs = DICOMwebClient(orthanc.dicomweb_url)
    uid = loaded.latin1.uid

    assert [s["0020000D"] for s in portal.search_for_studies()] == [
        s["0020000D"] for s in pacs.search_for_studies(search_filters={"StudyInstanceUID": uid})
    ]
    ours = {str(ds.SOPInstanceUID): ds for ds in portal.retrieve_study(uid)}
    theirs = {str(ds.SOPInstanceUID): ds for ds in pacs.retrieve_study(uid)}
    assert ours.keys() == theirs.keys()
    for sop_uid, ds in ours.items():
        assert ds.PixelData == theirs[sop_uid].PixelData
        assert ds.PatientName == theirs[sop_uid].PatientName
    metadata = portal.retrieve_study_metadata(uid)
    assert {m["00080018"]["Value"][0] for m in metadata} == ours.keys()


# --- Frames, rendered images, thumbnails --------------------------------------------------------


def _instance_path(instance: Instance) -> str:
    return (
        f"/dicomweb/studies/{instance.series.study.study_instance_uid}"
        f"/series/{instance.series.series_instance_uid}/instances/{instance.sop_instance_uid}"
    )


def _instances_of(study_uid: str) -> list[Instance]:
    return list(
        Instance.objects.filter(series__study__study_instance_uid=study_uid).select_related(
            "series__study"
        )
    )


def test_frames_come_uncompressed_or_as_stored(alice: Client, loaded: PacsStudies) -> None:
    for instance in _instances_of(loaded.latin1.uid):
        original = dcmread(instance_file(instance))
        path = _instance_path(instance) + "/frames/1"

        ((headers, pixels),) = _static_parts(alice.get(path))
        assert headers["Content-Type"].startswith("application/octet-stream")
        assert (
            pixels
            == original.pixel_array.astype(original.pixel_array.dtype.newbyteorder("<")).tobytes()
        )

        stored_syntax = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
        ((headers, raw),) = _static_parts(alice.get(path, HTTP_ACCEPT=stored_syntax))
        assert headers["Content-Type"] == (
            f"application/octet-stream; transfer-syntax={instance.transfer_syntax_uid}"
        )
        if original.file_meta.TransferSyntaxUID.is_compressed:
            assert raw != pixels and raw in original.PixelData
        else:
            assert raw == pixels

        assert alice.get(_instance_path(instance) + "/frames/2").status_code == 404
        assert alice.get(_instance_path(instance) + "/frames/1,x").status_code == 400
        # A list of thousands of frames would hold gigabytes in the server: refused unread.
        assert (
            alice.get(_instance_path(instance) + "/frames/" + ",".join(["1"] * 2000)).status_code
            == 400
        )
        assert alice.get(_instance_path(instance) + "/frames/1,1").status_code == 400
        assert alice.get(path, HTTP_ACCEPT="image/png").status_code == 406


def test_a_rendered_frame_follows_the_window_asked(alice: Client, loaded: PacsStudies) -> None:
    instance = next(i for i in _instances_of(loaded.latin1.uid) if i.series.modality == "CT")
    path = _instance_path(instance) + "/rendered"

    jpeg = alice.get(path)
    assert jpeg.status_code == 200 and jpeg["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg.content)).size == (instance.columns, instance.rows)

    png = alice.get(path, {"viewport": "32,32"}, HTTP_ACCEPT="image/png")
    assert png["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (32, 32)

    # A window far below every value paints the image white, one far above paints it black.
    low = Image.open(
        io.BytesIO(alice.get(path, {"window": "-5000,10"}, HTTP_ACCEPT="image/png").content)
    )
    high = Image.open(
        io.BytesIO(alice.get(path, {"window": "50000,10"}, HTTP_ACCEPT="image/png").content)
    )
    assert low.getextrema() == (255, 255)
    assert high.getextrema() == (0, 0)

    frame = alice.get(_instance_path(instance) + "/frames/1/rendered")
    assert frame.status_code == 200 and frame.content == jpeg.content


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ({"window": "40"}, "window"),
        ({"viewport": "0,0"}, "viewport"),
        ({"quality": "101"}, "quality"),
    ],
)
def test_a_malformed_rendering_parameter_gets_400(
    alice: Client, loaded: PacsStudies, query: dict[str, str], reason: str
) -> None:
    instance = _instances_of(loaded.latin1.uid)[0]
    response = alice.get(_instance_path(instance) + "/rendered", query)

    assert response.status_code == 400
    assert reason in response.content.decode().lower()


def test_rendering_refuses_a_media_type_it_cannot_give(alice: Client, loaded: PacsStudies) -> None:
    instance = _instances_of(loaded.latin1.uid)[0]
    assert (
        alice.get(_instance_path(instance) + "/rendered", HTTP_ACCEPT="image/gif").status_code
        == 406
    )
    assert (
        alice.get(_instance_path(instance) + "/thumbnail", HTTP_ACCEPT="image/png").status_code
        == 406
    )


def test_thumbnails_stand_for_an_instance_a_series_and_a_study(
    alice: Client, loaded: PacsStudies
) -> None:
    instance = _instances_of(loaded.latin1.uid)[0]
    series_path = _instance_path(instance).rsplit("/instances/", 1)[0]
    for path in (_instance_path(instance), series_path, f"/dicomweb/studies/{loaded.latin1.uid}"):
        response = alice.get(path + "/thumbnail")
        assert response.status_code == 200, path
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "JPEG" and max(image.size) <= 128


# --- A share of several studies -------------------------------------------------------------------


def test_a_share_with_a_prior_grants_both_studies_and_no_other(
    loaded: PacsStudies, tmp_path: Path, sms_dir: Path, fast_otp: Any
) -> None:
    prior = synthetic.make_study(
        patient_name="Müller^Hélène", patient_id="PAT-LATIN1", modalities=(("CT", 2),)
    )
    synthetic.write_study(prior, tmp_path / "prior")
    imports.dicom_import([tmp_path / "prior"])
    prior_uid = str(prior[0].StudyInstanceUID)
    shared = study_services.study_share(
        study_instance_uid=loaded.latin1.uid,
        prior_study_instance_uids=[prior_uid],
        recipient="physician",
        channel="email",
        contact="dr.martin@example.org",
    )
    dave = Client()
    response = open_link(dave, shared.created)
    assert response.status_code == 302
    dave.post("/access/verify", {"action": "send"})
    code = re.search(r"\b(\d{6})\b", str(mail.outbox[-1].body))
    assert code is not None
    dave.post("/access/verify", {"otp": code.group(1)})

    found = {_value(s["0020000D"]) for s in _json(dave.get("/dicomweb/studies"))}
    assert found == {loaded.latin1.uid, prior_uid}
    assert len(_parts(dave.get(f"/dicomweb/studies/{prior_uid}"))) == 2
    assert dave.get(f"/dicomweb/studies/{loaded.utf8.uid}").status_code == 404
