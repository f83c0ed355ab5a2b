"""What is not an image, shown for what it is: an encapsulated PDF opens as the PDF it holds, a
structured report reads as a page, anything else is said to be in the download. The objects
are made with pydicom and imported with a small CT, as a CD would bring them."""

from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from playwright.sync_api import Page, Response, expect
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    RawDataStorage,
    generate_uid,
)

from accounts.models import AuditEvent
from dicomweb import documents
from studies import imports
from studies.demo import synthetic
from tests.support.access import fragment_link, last_code, make_share, sign_in
from tests.test_recipient_browser import browser  # noqa: F401  (the module's Chromium)
from tests.test_viewer import phone  # noqa: F401  (a phone's page and its CSP violations)

HOSTILE_TEXT = 'Nodule of the right upper lobe <script>alert("x")</script>'


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing `text`, written out object by object (PDF 1.4, ISO 32000-1 §7.5):
    the cross-reference table gives each object's byte offset."""
    stream = f"BT /F1 24 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


# An odd length, so that the stored value carries the pad byte of PS3.3 C.24.2.1.
PDF = minimal_pdf("Radiology report")
if len(PDF) % 2 == 0:
    PDF = PDF.replace(b"%PDF-1.4\n", b"%PDF-1.4\n%\n", 1)
assert len(PDF) % 2 == 1


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = scheme
    code.CodeMeaning = meaning
    return code


def _item(value_type: str, name: Dataset, relationship: str = "CONTAINS", **values: Any) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = Sequence([name])
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _container(name: Dataset, children: list[Dataset]) -> Dataset:
    return _item(
        "CONTAINER", name, ContinuityOfContent="SEPARATE", ContentSequence=Sequence(children)
    )


def _object(ct: Dataset, sop_class: str, modality: str, number: int) -> Dataset:
    """A storage object of the CT's study, in a series of its own."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword in (
        "SpecificCharacterSet",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        setattr(ds, keyword, getattr(ct, keyword))
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = number
    ds.InstanceNumber = 1
    ds.ContentDate = ct.StudyDate
    ds.ContentTime = "090000"
    return ds


def encapsulated_pdf(ct: Dataset, pdf: bytes = PDF) -> Dataset:
    ds = _object(ct, EncapsulatedPDFStorage, "DOC", 90)
    ds.SeriesDescription = "Compte rendu"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "Radiology report"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic imaging report")])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + b"\x00" * (len(pdf) % 2)
    return ds


def comprehensive_sr(ct: Dataset, *, content: list[Dataset] | None = None) -> Dataset:
    ds = _object(ct, ComprehensiveSRStorage, "SR", 91)
    ds.SeriesDescription = "Structured report"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic imaging report")])
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName = "Dupré^Anaïs"
    observer.VerifyingOrganization = "Radiologie"
    observer.VerificationDateTime = f"{ct.StudyDate}100000"
    observer.VerifyingObserverIdentificationCodeSequence = Sequence()
    ds.VerifyingObserverSequence = Sequence([observer])
    if content is None:
        diameter = Dataset()
        diameter.NumericValue = "12.5"
        diameter.MeasurementUnitsCodeSequence = Sequence([_code("mm", "UCUM", "millimeter")])
        image = Dataset()
        image.ReferencedSOPClassUID = ct.SOPClassUID
        image.ReferencedSOPInstanceUID = ct.SOPInstanceUID
        content = [
            _container(
                _code("121070", "DCM", "Findings"),
                [
                    _item("TEXT", _code("121071", "DCM", "Finding"), TextValue=HOSTILE_TEXT),
                    _item(
                        "CODE",
                        _code("363698007", "SCT", "Finding site"),
                        ConceptCodeSequence=Sequence(
                            [_code("45653009", "SCT", "Upper lobe of right lung")]
                        ),
                    ),
                    _item(
                        "NUM",
                        _code("81827009", "SCT", "Diameter"),
                        MeasuredValueSequence=Sequence([diameter]),
                    ),
                    _item(
                        "IMAGE",
                        _code("121112", "DCM", "Source of Measurement"),
                        ReferencedSOPSequence=Sequence([image]),
                    ),
                ],
            ),
            _container(
                _code("121072", "DCM", "Impressions"),
                [_item("TEXT", _code("121073", "DCM", "Impression"), TextValue="No malignancy.")],
            ),
        ]
    ds.ContentSequence = Sequence(content)
    return ds


def raw_data(ct: Dataset) -> Dataset:
    ds = _object(ct, RawDataStorage, "OT", 92)
    ds.SeriesDescription = "Raw data"
    ds.CreatorVersionUID = generate_uid()
    return ds


class Imported:
    def __init__(self, ct: list[Dataset], pdf: Dataset, sr: Dataset, raw: Dataset) -> None:
        self.ct, self.pdf, self.sr, self.raw = ct, pdf, sr, raw
        self.study = str(ct[0].StudyInstanceUID)

    def path(self, kind: str, ds: Dataset) -> str:
        return f"/viewer/{kind}/{self.study}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}" + (
            ".pdf" if kind == "document" else ""
        )

    @property
    def pdf_path(self) -> str:
        return self.path("document", self.pdf)

    @property
    def sr_path(self) -> str:
        return self.path("report", self.sr)


def import_study(folder: Path, patient_id: str = "PID-DOCS") -> Imported:
    ct = synthetic.make_study(
        patient_name="DUPONT^Marie", patient_id=patient_id, modalities=(("CT", 2),)
    )
    imported = Imported(ct, encapsulated_pdf(ct[0]), comprehensive_sr(ct[0]), raw_data(ct[0]))
    synthetic.write_study([*ct, imported.pdf, imported.sr, imported.raw], folder)
    report = imports.dicom_import([folder])
    assert report.imported == len(ct) + 3, report.skipped
    return imported


@pytest.fixture
def study(db: Any, tmp_path: Path) -> Imported:
    return import_study(tmp_path / "alice")


@pytest.fixture
def alice(study: Imported, sms_dir: Path) -> Client:
    client = Client()
    sign_in(client, make_share(study.study), sms_dir)
    return client


class TestViewerLists:
    def test_it_links_the_pdf_and_the_report_and_says_the_rest_is_downloaded(
        self, study: Imported, alice: Client
    ) -> None:
        html = alice.get("/viewer/").content.decode()
        assert f'href="{study.pdf_path}" target="_blank" rel="noopener"' in html
        assert "Open the report (PDF)" in html
        assert f'href="{study.sr_path}"' in html and "Read the report" in html
        # The raw data, only, is said to be in the download.
        assert html.count("cannot be displayed here; it is in the download") == 1
        assert "Raw data" in html

    def test_it_speaks_french(self, study: Imported, alice: Client) -> None:
        html = alice.get("/viewer/", HTTP_ACCEPT_LANGUAGE="fr").content.decode()
        assert "Ouvrir le compte rendu (PDF)" in html and "Lire le compte rendu" in html
        html = alice.get(study.sr_path, HTTP_ACCEPT_LANGUAGE="fr").content.decode()
        assert "Vérifié" in html and "Retour à vos images" in html


class TestPdf:
    def test_it_answers_the_document_byte_for_byte(self, study: Imported, alice: Client) -> None:
        response = alice.get(study.pdf_path)
        assert response.status_code == 200
        assert response.content == PDF  # without the pad byte
        assert response["Content-Type"] == "application/pdf"
        assert response["Content-Disposition"] == 'inline; filename="report.pdf"'
        assert response["X-Content-Type-Options"] == "nosniff"
        assert "no-store" in response["Cache-Control"]
        policy = [d.strip() for d in response["Content-Security-Policy"].split(";")]
        assert sorted(policy) == ["default-src 'none'", "frame-ancestors 'none'", "sandbox"]

    def test_it_records_one_view_per_session_and_study(
        self, study: Imported, alice: Client
    ) -> None:
        views = AuditEvent.objects.filter(action=AuditEvent.Action.VIEW)
        alice.get(study.pdf_path)
        assert views.count() == 1
        alice.get(study.pdf_path)
        alice.get(study.sr_path)
        alice.get("/viewer/")
        assert views.count() == 1

    def test_it_drops_a_pad_byte_when_no_length_is_given(self, tmp_path: Path) -> None:
        ct = synthetic.make_study(patient_name="X^Y", patient_id="P", modalities=(("CT", 1),))
        ds = encapsulated_pdf(ct[0])
        del ds.EncapsulatedDocumentLength
        path = synthetic.write_study([ds], tmp_path)[0]
        assert documents.encapsulated_pdf(path) == PDF


class TestReport:
    def test_it_reads_the_content_tree(self, study: Imported, alice: Client) -> None:
        response = alice.get(study.sr_path)
        assert response.status_code == 200
        html = response.content.decode()
        assert "<h1>Diagnostic imaging report</h1>" in html
        assert "<h2>Findings</h2>" in html and "<h2>Impressions</h2>" in html
        assert "Upper lobe of right lung" in html
        assert "12.5 millimeter" in html
        assert "No malignancy." in html
        assert "Verified (Anaïs Dupré)" in html and "Complete" in html
        assert "(image, not shown here)" in html
        # Escaped: the text is shown, never run.
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
        assert '<script>alert("x")' not in html

    def test_a_hostile_report_is_cut_short(self, db: Any, tmp_path: Path, sms_dir: Path) -> None:
        text = _code("121071", "DCM", "Finding")
        deep: list[Dataset] = [_item("TEXT", text, TextValue="the bottom")]
        for _level in range(documents.MAX_DEPTH + 10):
            deep = [_container(_code("121070", "DCM", "Findings"), deep)]
        wide = [
            _item("TEXT", text, TextValue=f"line {n}") for n in range(documents.MAX_ITEMS + 100)
        ]
        anchor = synthetic.make_study(
            patient_name="X^Y", patient_id="PID-DEEP", modalities=(("CT", 1),)
        )[0]
        deep_sr = comprehensive_sr(anchor, content=deep)
        wide_sr = comprehensive_sr(anchor, content=wide)
        wide_sr.SeriesInstanceUID = deep_sr.SeriesInstanceUID
        wide_sr.InstanceNumber = 2
        synthetic.write_study([anchor, deep_sr, wide_sr], tmp_path / "hostile")
        assert imports.dicom_import([tmp_path / "hostile"]).imported == 3
        client = Client()
        sign_in(client, make_share(str(anchor.StudyInstanceUID)), sms_dir)
        base = f"/viewer/report/{anchor.StudyInstanceUID}/{deep_sr.SeriesInstanceUID}/"
        html = client.get(base + deep_sr.SOPInstanceUID).content.decode()
        assert "too long to be shown here in full" in html
        assert "the bottom" not in html
        assert html.count("<section") == html.count("</section>") <= documents.MAX_DEPTH
        html = client.get(base + wide_sr.SOPInstanceUID).content.decode()
        assert "too long to be shown here in full" in html
        assert f"line {documents.MAX_ITEMS - 1}" in html
        assert f"line {documents.MAX_ITEMS}<" not in html


class TestOutsideTheShare:
    def test_another_study_or_a_made_up_uid_is_404(
        self, study: Imported, alice: Client, tmp_path: Path
    ) -> None:
        other = import_study(tmp_path / "bob", patient_id="PID-BOB")
        for path in (other.pdf_path, other.sr_path):
            assert alice.get(path).status_code == 404
        # The other study's UIDs under Alice's study, or a made-up one.
        crossed = f"/viewer/document/{study.study}/{other.pdf.SeriesInstanceUID}/"
        assert alice.get(crossed + f"{other.pdf.SOPInstanceUID}.pdf").status_code == 404
        made_up = f"/viewer/document/{study.study}/{study.pdf.SeriesInstanceUID}/1.2.3.4.pdf"
        assert alice.get(made_up).status_code == 404

    def test_each_view_opens_its_own_kind_only(self, study: Imported, alice: Client) -> None:
        assert alice.get(study.path("report", study.pdf)).status_code == 404
        assert alice.get(study.path("document", study.sr)).status_code == 404
        assert alice.get(study.path("document", study.raw)).status_code == 404
        assert alice.get(study.path("report", study.ct[0])).status_code == 404

    def test_it_needs_a_signed_in_recipient(self, study: Imported, client: Client) -> None:
        for path in (study.pdf_path, study.sr_path):
            response = client.get(path)
            assert response.status_code == 302 and response["Location"] == "/access/"

    def test_a_share_of_other_series_does_not_reach_them(
        self, study: Imported, sms_dir: Path
    ) -> None:
        client = Client()
        sign_in(
            client,
            make_share(study.study, series_instance_uids=[str(study.sr.SeriesInstanceUID)]),
            sms_dir,
        )
        assert client.get(study.sr_path).status_code == 200
        assert client.get(study.pdf_path).status_code == 404


# --- In Chromium -------------------------------------------------------------------------------


def test_a_patient_opens_the_pdf_in_a_new_tab_and_reads_the_report(
    phone: tuple[Page, list[str]],  # noqa: F811
    live_server: Any,
    sms_dir: Path,
    tmp_path: Path,
) -> None:
    page, csp_violations = phone
    study = import_study(tmp_path / "study")
    page.goto(live_server.url + fragment_link(make_share(study.study)))
    page.get_by_role("button", name="Send me a code").click()
    expect(page.get_by_text("We have sent you a code")).to_be_visible()
    page.get_by_label("One-time code").fill(last_code(sms_dir))
    page.get_by_role("button", name="Confirm").click()
    expect(page).to_have_url(live_server.url + "/viewer/")

    link = page.get_by_role("link", name="Open the report (PDF)")
    link.focus()  # reachable from the keyboard
    pdf_answer = page.context.expect_event("response", lambda r: r.url.endswith(".pdf"))
    with page.context.expect_page() as opened, pdf_answer as answered:
        link.press("Enter")
    response: Response = answered.value
    assert response.status == 200
    assert response.headers["content-type"] == "application/pdf"
    # (Its headers, body and policy are checked with the test client above: what Playwright
    # reports of a document the PDF viewer took is Chromium's own wrapper.)
    tab = opened.value
    # Chromium's PDF viewer took the document (it is embedded from its own extension).
    for _ in range(100):
        if any(f.url.startswith("chrome-extension://") for f in tab.frames):
            break
        tab.wait_for_timeout(100)
    assert [f.url for f in tab.frames if f.url.startswith("chrome-extension://")], tab.frames
    tab.close()

    page.get_by_role("link", name="Read the report").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Diagnostic imaging report")
    expect(page.get_by_text(HOSTILE_TEXT)).to_be_visible()
    expect(page.get_by_text("12.5 millimeter")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    assert csp_violations == []
