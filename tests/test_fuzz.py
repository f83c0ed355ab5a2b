"""Hostile input, generated (hypothesis): broken DICOM at the ingest paths (a file import, the
storage SCP), random text at the recipients' forms and the share command, random DICOMweb
query parameters, frame lists and Accept headers. Nothing may crash (no 500, no exception out
of a service), and what is refused writes nothing: no index row, no file, no share change.

Bounded: a few dozen examples per test, so the file runs in well under two minutes.
"""

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.core.cache import cache
from django.core.management import CommandError, call_command
from django.test import Client
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from accounts.models import Share, User
from studies import dicom, imports
from studies.demo import synthetic
from studies.dimse.storescp import StorageServer
from studies.models import Instance, PacsNode, Series, Study
from studies.store import store_dir
from tests.conftest import MODALITY_AE, assert_store_consistent, scp_port
from tests.support.access import make_share, make_study, open_link, share_of, sign_in
from tests.support.staff import admin_user
from tests.support.stored import StoredStudies, store_two_studies

# pydicom warns about every broken value it reads: here, that is the point.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FUZZ = hypothesis_settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Text a browser or client could send (no lone surrogates: they cannot be encoded at all).
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)


def _valid_instance() -> bytes:
    ds = synthetic.make_study(patient_name="Fuzz^Base", patient_id="FUZZ", modalities=(("CT", 1),))[
        0
    ]
    return synthetic.to_bytes(ds)


BASE = _valid_instance()
BASE_DATA_SET = BASE[dicom.dataset_offset(BASE) :]


@st.composite
def broken_data_sets(draw: st.DrawFn) -> bytes:
    """A valid data set, mutated: cut short, bytes overwritten or inserted (mostly in the
    header, where the parser lives), or replaced by noise."""
    data = bytearray(BASE_DATA_SET)
    kind = draw(st.sampled_from(["truncate", "overwrite", "insert", "noise", "lengths"]))
    header_end = min(len(data), 1200)
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "noise":
        return draw(st.binary(max_size=2048))
    if kind == "lengths":
        # A value length turned huge or odd: the parser must not trust it.
        at = draw(st.integers(0, header_end - 4))
        data[at : at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f"]))
        return bytes(data)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, header_end - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        if kind == "overwrite":
            data[at : at + len(chunk)] = chunk
        else:
            data[at:at] = chunk
    return bytes(data)


def _forget_everything() -> None:
    """Between two examples: an empty index and store (a mutation may leave a valid instance,
    which is then rightly imported)."""
    Instance.objects.all().delete()
    Series.objects.all().delete()
    Study.objects.all().delete()
    root = store_dir()
    if root.exists():
        for path in sorted(root.rglob("*"), reverse=True):
            if path.is_file():
                path.unlink()


def _stored_files() -> list[Path]:
    root = store_dir()
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


# --- Ingest: the file import ------------------------------------------------------------------


@pytest.mark.django_db
@FUZZ
@given(data_set=broken_data_sets(), part10=st.booleans())
def test_a_broken_file_is_refused_with_a_reason_and_leaves_nothing(
    tmp_path: Path, data_set: bytes, part10: bool
) -> None:
    _forget_everything()
    content = data_set
    if part10:
        content = (
            dicom.encode_file_meta(
                sop_class_uid=CTImageStorage,
                sop_instance_uid=str(dicom.read_header(BASE).SOPInstanceUID),
                transfer_syntax_uid=ExplicitVRLittleEndian,
            )
            + data_set
        )
    path = tmp_path / "broken.dcm"
    path.write_bytes(content)

    report = imports.dicom_import([path])

    assert not report.error
    # "could not be imported" is the import's net for unexpected errors: a bug, not a refusal.
    assert not [r for _, r in report.skipped if r.startswith("could not be imported")], report
    if report.imported == 0:
        assert len(report.skipped) == 1 and report.skipped[0][1]  # a reason a person can read
        assert Instance.objects.count() == 0
        assert Study.objects.count() == 0
        assert _stored_files() == []
    else:
        assert_store_consistent(timeout=0)


# --- Ingest: the storage SCP ------------------------------------------------------------------


def _c_store(server: StorageServer, path: Path) -> int | None:
    """C-STORE a file's data set bytes as they are (no parsing by the sender); the status, or
    None when the SCP ended the association instead of answering."""
    ae = AE(ae_title=MODALITY_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp_port(server), ae_title=server.ae_title)
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        if assoc.is_established:
            assoc.release()
    return int(status.Status) if "Status" in status else None


def _echo(server: StorageServer) -> int:
    ae = AE(ae_title=MODALITY_AE)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp_port(server), ae_title=server.ae_title)
    assert assoc.is_established
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


@pytest.mark.dicom
@pytest.mark.django_db(transaction=True)
@hypothesis_settings(FUZZ, max_examples=40)
@given(data_set=broken_data_sets())
def test_the_storage_scp_refuses_broken_data_sets_and_keeps_nothing_of_them(
    storage_scp: StorageServer, modality_node: PacsNode, tmp_path: Path, data_set: bytes
) -> None:
    _forget_everything()
    sop_uid = str(dicom.read_header(BASE).SOPInstanceUID)
    path = tmp_path / "broken.dcm"
    path.write_bytes(
        dicom.encode_file_meta(
            sop_class_uid=CTImageStorage,
            sop_instance_uid=sop_uid,
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        + data_set
    )

    status = _c_store(storage_scp, path)

    if status != 0x0000:
        assert Instance.objects.count() == 0
        assert _stored_files() == []
    else:
        # The mutation left a valid instance (in pixel data, say): kept whole and indexed.
        assert Instance.objects.filter(sop_instance_uid=sop_uid).count() == 1
        assert_store_consistent()
    assert _echo(storage_scp) == 0x0000  # and it goes on


# --- Recipient forms and the share command ----------------------------------------------------


@pytest.fixture
def shared(db: Any) -> Iterator[Share]:
    make_study()
    yield share_of(make_share())


def _share_state(share: Share) -> tuple[object, ...]:
    share.refresh_from_db()
    return (
        share.revoked_at,
        share.expires_at,
        share.used_at,
        share.study_id,
        share.code_prefix,
        share.code_hash,
        share.token_hash,
        share.contact,
    )


def _calm() -> None:
    """Between two examples: no lockout or request budget carried over, so that every example
    reaches the parsers rather than the 429 page."""
    from axes.utils import reset

    cache.clear()
    reset()


@pytest.mark.django_db
@hypothesis_settings(FUZZ, max_examples=30)  # each example hashes credentials
@given(code=text, token=text, extra=st.dictionaries(text, text, max_size=3))
def test_the_access_code_and_link_forms_never_fail_on_random_input(
    client: Client, shared: Share, code: str, token: str, extra: dict[str, str]
) -> None:
    _calm()
    before = _share_state(shared)
    for path, fields in (("/access/", {"code": code}), ("/s/", {"token": token})):
        response = client.post(path, {**extra, **fields})
        assert response.status_code in {200, 302, 400, 403, 429}, (path, response.status_code)
        # Nothing opened: a random string is not a credential.
        assert response.status_code != 302 or response["Location"] != "/access/verify"
    assert client.get("/access/", {"code": code}).status_code in {200, 400, 429}
    assert _share_state(shared) == before


@pytest.mark.django_db
@hypothesis_settings(FUZZ, max_examples=30)  # each example hashes credentials
@given(otp=text, action=text, extra=st.dictionaries(text, text, max_size=3))
def test_the_one_time_code_form_never_fails_on_random_input(
    client: Client, shared: Share, sms_dir: Path, otp: str, action: str, extra: dict[str, str]
) -> None:
    _calm()
    new = make_share()  # a share of its own, its link opened: the code form's stage
    assert open_link(client, new).status_code == 302
    share = share_of(new)
    before = _share_state(share)

    response = client.post("/access/verify", {**extra, "action": action, "otp": otp})

    assert response.status_code in {200, 302, 400, 403, 429}, response.status_code
    if response.status_code == 302:
        # Only a send (which writes nothing on the share) or a lockout page; never the viewer.
        assert response["Location"] in {"/access/verify", "/access/locked"}
    assert _share_state(share) == before


@pytest.mark.django_db
@hypothesis_settings(FUZZ, max_examples=30)  # each example hashes a password
@given(
    username=st.one_of(text, st.just("admin")),
    password=text,
    next_url=st.one_of(text, st.sampled_from(["//evil.example", "/staff/", "javascript:x"])),
)
def test_the_staff_sign_in_never_fails_on_random_input(
    client: Client, username: str, password: str, next_url: str
) -> None:
    _calm()
    staff = User.objects.filter(username="admin").first() or admin_user()
    before = (staff.password, staff.is_active, staff.role)

    response = client.post(
        "/staff/login/", {"username": username, "password": password, "next": next_url}
    )

    assert response.status_code in {200, 400, 403, 429}, response.status_code
    staff.refresh_from_db()
    assert (staff.password, staff.is_active, staff.role) == before
    assert "_auth_user_id" not in client.session  # nobody signed in


SHARE_WORDS = [
    "create", "revoke", "list", "--patient-phone", "--patient-email", "--physician-email",
    "--days", "--pacs", "--json", "--no-download", "1.2.826.0.1.3680043.8.498.1001",
    "+33612345678", "a@b.org", "0", "-1", "91", "99999999999999999999",
]  # fmt: skip


@pytest.mark.django_db
@FUZZ
@given(arguments=st.lists(st.one_of(text, st.sampled_from(SHARE_WORDS)), max_size=6))
def test_the_share_command_refuses_bad_arguments_clearly(arguments: list[str]) -> None:
    if not Study.objects.exists():
        make_study()
    shares = Share.objects.count()
    try:
        call_command("share", *arguments, stdout=_Sink(), stderr=_Sink())
    except CommandError:
        assert Share.objects.count() == shares  # refused: nothing made
    except SystemExit as exc:  # argparse's --help
        assert exc.code in {0, None}


class _Sink:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


# --- DICOMweb parameters ----------------------------------------------------------------------


@pytest.fixture
def recipient(client: Client, tmp_path: Path, sms_dir: Path) -> Iterator[tuple[Client, Any]]:
    stored: StoredStudies = store_two_studies(tmp_path / "import")
    created = make_share(stored.alice.uid)
    sign_in(client, created, sms_dir)
    # The fuzzed requests reach the real answers: without noise, they succeed.
    first = Instance.objects.filter(series__study__study_instance_uid=stored.alice.uid).first()
    assert first is not None
    instance = (
        f"/dicomweb/studies/{stored.alice.uid}/series/{first.series.series_instance_uid}"
        f"/instances/{first.sop_instance_uid}"
    )
    assert client.get("/dicomweb/studies").status_code == 200
    for path in ("/rendered", "/frames/1/rendered", "/thumbnail", "/metadata"):
        assert client.get(instance + path).status_code == 200, path
    yield client, stored.alice


QIDO_KEYS = [
    "PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality", "SeriesNumber",
    "InstanceNumber", "StudyDescription", "00100010", "0020000D", "0020000E", "00080060",
    "includefield", "limit", "offset", "fuzzymatching",
]  # fmt: skip
VALUES = st.one_of(
    text,
    st.sampled_from(["*", "?", "-1", "0", "1e309", "nan", "99999999999999999999", "all", ""]),
    st.from_regex(r"[0-9]{0,8}-[0-9]{0,8}", fullmatch=True),
)
ACCEPT = st.one_of(
    text,
    st.sampled_from([
        "application/dicom+json", "multipart/related; type=\"application/dicom\"",
        "multipart/related; type=application/octet-stream; transfer-syntax=*",
        "image/jpeg", "image/png;q=0", "*/*", "image/*;q=abc", "multipart/related; type=",
    ]),
)  # fmt: skip


def _index_state() -> tuple[object, ...]:
    return (
        Instance.objects.count(),
        Study.objects.count(),
        sorted(str(p) for p in _stored_files()),
        list(Share.objects.values_list("pk", "revoked_at", "used_at", "expires_at")),
    )


@pytest.mark.django_db
@FUZZ
@given(
    query=st.dictionaries(st.one_of(st.sampled_from(QIDO_KEYS), text), VALUES, max_size=4),
    level=st.sampled_from(["studies", "series", "instances", "study-series", "study-instances"]),
    accept=ACCEPT,
)
def test_qido_never_fails_on_random_parameters(
    recipient: tuple[Client, Any], query: dict[str, str], level: str, accept: str
) -> None:
    client, study = recipient
    before = _index_state()
    path = {
        "studies": "/dicomweb/studies",
        "series": "/dicomweb/series",
        "instances": "/dicomweb/instances",
        "study-series": f"/dicomweb/studies/{study.uid}/series",
        "study-instances": f"/dicomweb/studies/{study.uid}/instances",
    }[level]
    response = client.get(path, query, HTTP_ACCEPT=accept)
    assert response.status_code < 500, (path, query, accept, response.status_code)
    assert _index_state() == before


@pytest.mark.django_db
@FUZZ
@given(
    window=VALUES,
    viewport=VALUES,
    quality=VALUES,
    frames=st.one_of(text, st.from_regex(r"[0-9,\-+ ]{1,30}", fullmatch=True)),
    accept=ACCEPT,
    target=st.sampled_from(["rendered", "frame-rendered", "thumbnail", "frames", "metadata"]),
)
def test_wado_and_rendering_never_fail_on_random_parameters(
    recipient: tuple[Client, Any],
    window: str,
    viewport: str,
    quality: str,
    frames: str,
    accept: str,
    target: str,
) -> None:
    client, study = recipient
    first = Instance.objects.filter(series__study__study_instance_uid=study.uid).first()
    assert first is not None
    series_uid, sop_uid = first.series.series_instance_uid, first.sop_instance_uid
    instance = f"/dicomweb/studies/{study.uid}/series/{series_uid}/instances/{sop_uid}"
    before = _index_state()
    path = {
        "rendered": instance + "/rendered",
        "frame-rendered": instance + "/frames/1/rendered",
        "thumbnail": instance + "/thumbnail",
        "frames": instance + "/frames/" + quote(frames or "1", safe=","),
        "metadata": instance + "/metadata",
    }[target]
    query = {"window": window, "viewport": viewport, "quality": quality}
    response = client.get(path, query, HTTP_ACCEPT=accept)
    if response.status_code < 500 and hasattr(response, "streaming_content"):
        b"".join(response.streaming_content)  # a stream that fails midway is a crash too
    assert response.status_code < 500, (path, query, accept, response.status_code)
    assert _index_state() == before


def test_the_fuzz_base_instance_is_valid() -> None:
    """The mutations start from a data set the portal takes, or they would test nothing."""
    header = dicom.read_header(BASE)
    assert str(header.SOPClassUID) == CTImageStorage
    assert hashlib.sha256(BASE_DATA_SET).hexdigest()
