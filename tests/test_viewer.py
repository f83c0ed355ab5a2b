"""The viewer page: what the server puts in it for a signed-in recipient (the first image, the
slices of every series, nothing of another study), and the viewer at work in Chromium on a
phone: the first image without a click, slices by key, swipe and slider, contrast presets,
saving the image, the keyboard alone."""

import io
import json
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Page, expect

from dicomweb import ohif
from studies import imports
from studies.demo import synthetic
from studies.models import Instance
from tests.support.access import (
    OTHER_STUDY_UID,
    STUDY_UID,
    fragment_link,
    last_code,
    make_share,
    make_study,
    sign_in,
)
from tests.test_recipient_browser import browser  # noqa: F401  (the module's Chromium)

CT_SLICES = 40


def _import_study(folder: Path, **kwargs: Any) -> str:
    datasets = synthetic.make_study(**kwargs)
    synthetic.write_study(datasets, folder)
    report = imports.dicom_import([folder])
    assert report.imported == len(datasets), report.skipped
    return str(datasets[0].StudyInstanceUID)


def _viewer_data(response: Any) -> Any:
    match = re.search(
        rb'<script id="viewer-data" type="application/json">(.*?)</script>', response.content
    )
    assert match, "no viewer data in the page"
    return json.loads(match.group(1))


# --- What the server puts in the page ---------------------------------------------------------


@pytest.fixture
def indexed(db: Any) -> None:
    """Alice's study (a CT of 3 images with pixels, a structured report) and someone else's."""
    make_study()
    Instance.objects.filter(series__modality="CT").update(rows=512, columns=512)
    make_study(OTHER_STUDY_UID, patient_name="MARTIN^Paul", description="IRM GENOU")
    Instance.objects.filter(series__study__study_instance_uid=OTHER_STUDY_UID).update(
        rows=256, columns=256
    )


def _alice(sms_dir: Path, **share: Any) -> Client:
    client = Client()
    sign_in(client, make_share(**share), sms_dir)
    return client


class TestViewerPage:
    def test_it_puts_the_first_image_and_every_series_in_the_page(
        self, indexed: None, sms_dir: Path
    ) -> None:
        response = _alice(sms_dir).get("/viewer/")
        assert response.status_code == 200
        html = response.content.decode()
        first = (
            f"/dicomweb/studies/{STUDY_UID}/series/{STUDY_UID}.1/instances/{STUDY_UID}.1.1"
            "/frames/1/rendered?viewport=1024,1024"
        )
        assert f'src="{first}"' in html
        data = _viewer_data(response)
        assert [s["uid"] for s in data["series"]] == [f"{STUDY_UID}.1"]
        ct = data["series"][0]
        assert ct["modality"] == "CT"
        assert ct["base"] == f"/dicomweb/studies/{STUDY_UID}/series/{STUDY_UID}.1/instances/"
        assert ct["slices"] == [[f"{STUDY_UID}.1.{n}", 1] for n in (1, 2, 3)]
        # The CT's presets are there; the report is listed, as something to download.
        assert "Lung" in html and 'id="viewer-presets"' in html
        assert "CT series 1" in html and "SR series 2" in html
        assert "cannot be displayed here" in html
        assert "Not for diagnostic use" in html
        assert "Marie DUPONT" in html

    def test_it_shows_nothing_of_another_study(self, indexed: None, sms_dir: Path) -> None:
        html = _alice(sms_dir).get("/viewer/").content.decode()
        assert OTHER_STUDY_UID not in html
        assert "MARTIN" not in html and "IRM GENOU" not in html

    def test_it_lists_only_the_series_the_share_grants(self, indexed: None, sms_dir: Path) -> None:
        client = _alice(sms_dir, series_instance_uids=[f"{STUDY_UID}.2"])
        response = client.get("/viewer/")
        html = response.content.decode()
        assert "SR series 2" in html and "CT series 1" not in html
        # Nothing to display: no image, no save button, and a plain sentence instead.
        assert _viewer_data(response)["series"] == []
        assert "/rendered" not in html and 'id="viewer-save"' not in html
        assert "can be displayed here" in html

    def test_it_offers_the_download_only_when_the_share_allows_it(
        self, indexed: None, sms_dir: Path
    ) -> None:
        html = _alice(sms_dir).get("/viewer/").content.decode()
        assert f'href="/download/{STUDY_UID}.zip"' in html
        html = _alice(sms_dir, allow_download=False).get("/viewer/").content.decode()
        assert "/download/" not in html

    def test_it_links_to_ohif_only_when_it_is_installed(
        self, indexed: None, sms_dir: Path, settings: Any, tmp_path: Path
    ) -> None:
        client = _alice(sms_dir)
        settings.OHIF_DIR = tmp_path / "ohif"
        assert "/ohif/viewer" not in client.get("/viewer/").content.decode()
        settings.OHIF_DIR.mkdir()
        (settings.OHIF_DIR / "index.html").write_text("<!doctype html>")
        assert "/ohif/viewer" not in client.get("/viewer/").content.decode()  # half installed
        (settings.OHIF_DIR / ohif.MARKER).write_text("{}")
        html = client.get("/viewer/").content.decode()
        assert f'href="/ohif/viewer?StudyInstanceUIDs={STUDY_UID}"' in html

    def test_it_links_the_access_history(self, indexed: None, sms_dir: Path) -> None:
        assert 'href="/access/history"' in _alice(sms_dir).get("/viewer/").content.decode()

    def test_it_speaks_french(self, indexed: None, sms_dir: Path) -> None:
        client = _alice(sms_dir, allow_download=True)
        html = client.get("/viewer/", HTTP_ACCEPT_LANGUAGE="fr").content.decode()
        assert "Poumon" in html and "Pas pour un usage diagnostique" in html

    def test_it_needs_a_signed_in_recipient(self, indexed: None, client: Client) -> None:
        response = client.get("/viewer/")
        assert response.status_code == 302 and response["Location"] == "/access/"

    def test_it_reads_the_index_in_a_fixed_number_of_queries(
        self, indexed: None, sms_dir: Path, django_assert_max_num_queries: Any
    ) -> None:
        client = _alice(sms_dir)
        client.get("/viewer/")
        with django_assert_max_num_queries(12):
            client.get("/viewer/")
        Instance.objects.filter(series__study__study_instance_uid=STUDY_UID).update(
            rows=64, columns=64
        )
        with django_assert_max_num_queries(12):
            client.get("/viewer/")


# --- In a phone's browser ----------------------------------------------------------------------


@pytest.fixture
def phone(
    browser: Browser,  # noqa: F811
    live_server: Any,
    settings: Any,
    transactional_db: Any,
) -> Iterator[tuple[Page, list[str]]]:
    """A 375×667 touch screen; the page and the CSP violations it reports. It closes before
    the database is emptied: the viewer may still be prefetching slices."""
    settings.BASE_URL = live_server.url
    context = browser.new_context(
        viewport={"width": 375, "height": 667},
        device_scale_factor=2,
        has_touch=True,
        is_mobile=True,
        locale="en-GB",
        accept_downloads=True,
    )
    page = context.new_page()
    violations: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            violations.append(message.text)

    page.on("console", on_console)
    yield page, violations
    # Stop the prefetch, and give the server the moment it needs to answer what it was asked
    # already: a request still being answered when the database is emptied fails there.
    page.goto("about:blank")
    time.sleep(0.5)
    context.close()


def _pixels(page: Page) -> str:
    """A digest of the displayed image's own pixels (not of what lies over it)."""
    return str(
        page.evaluate(
            """() => {
              const img = document.querySelector('#viewer-pane img');
              const canvas = document.createElement('canvas');
              canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
              const context = canvas.getContext('2d');
              context.drawImage(img, 0, 0);
              const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
              let hash = 0;
              for (let i = 0; i < data.length; i += 4) { hash = (hash * 31 + data[i]) | 0; }
              return img.src + ' ' + hash;
            }"""
        )
    ).split(" ", 1)[1]


def _screenshot(page: Page) -> Image.Image:
    return Image.open(io.BytesIO(page.locator("#viewer-pane img").screenshot()))


def _swipe_up(page: Page) -> None:
    box = page.locator("#viewer-stage").bounding_box()
    assert box
    x = box["x"] + box["width"] / 2
    y = box["y"] + box["height"] * 0.7
    cdp = page.context.new_cdp_session(page)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
    for dy in range(10, 110, 10):
        move = {"type": "touchMove", "touchPoints": [{"x": x, "y": y - dy}]}
        cdp.send("Input.dispatchTouchEvent", move)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def test_a_patient_sees_the_first_image_at_once_and_pages_through_the_series(
    phone: tuple[Page, list[str]], live_server: Any, sms_dir: Path, tmp_path: Path
) -> None:
    page, csp_violations = phone
    uid = _import_study(
        tmp_path / "ct",
        patient_name="DUPONT^Marie",
        patient_id="PID-VIEWER",
        modalities=(("CT", CT_SLICES), ("MR", 5)),
        rows=128,
        columns=128,
        study_description="CT THORAX",
    )
    created = make_share(uid)

    page.goto(live_server.url + fragment_link(created))
    page.get_by_role("button", name="Send me a code").click()
    expect(page.get_by_text("We have sent you a code")).to_be_visible()
    page.get_by_label("One-time code").fill(last_code(sms_dir))
    started = time.perf_counter()
    page.get_by_role("button", name="Confirm").click()
    page.wait_for_function(
        "() => { const i = document.querySelector('#viewer-pane img');"
        " return i && i.complete && i.naturalWidth > 0; }"
    )
    print(f"\nfirst image {1000 * (time.perf_counter() - started):.0f} ms after the one-time code")
    expect(page).to_have_url(live_server.url + "/viewer/")
    counter = page.locator("#viewer-counter")
    expect(counter).to_have_text(f"1 / {CT_SLICES}")
    histogram = _screenshot(page).convert("L").histogram()
    assert sum(1 for count in histogram if count) > 10, "the first image is blank"
    assert page.evaluate("document.documentElement.scrollWidth") <= 375

    # A key: the next slice.
    before = _pixels(page)
    page.keyboard.press("ArrowDown")
    expect(counter).to_have_text(f"2 / {CT_SLICES}")
    assert _pixels(page) != before

    # A swipe up over the image: further on.
    before = _pixels(page)
    _swipe_up(page)
    expect(counter).not_to_have_text(f"2 / {CT_SLICES}")
    assert int(counter.inner_text().split(" / ")[0]) > 2
    assert _pixels(page) != before

    # The slider.
    page.locator("#viewer-slider").fill(str(CT_SLICES))
    expect(counter).to_have_text(f"{CT_SLICES} / {CT_SLICES}")

    # Scrolling through the whole series as fast as a finger would: no image is ever blank.
    page.keyboard.press("Home")
    expect(counter).to_have_text(f"1 / {CT_SLICES}")
    blank = page.evaluate(
        """async (count) => {
          let blank = 0;
          for (let i = 1; i < count; i++) {
            document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowDown'}));
            await new Promise((resolve) => setTimeout(resolve, 50));
            const img = document.querySelector('#viewer-pane img');
            if (!img || !img.complete || !img.naturalWidth) { blank++; }
          }
          return blank;
        }""",
        CT_SLICES,
    )
    assert blank == 0
    expect(counter).to_have_text(f"{CT_SLICES} / {CT_SLICES}")

    # The lung window.
    before = _pixels(page)
    page.get_by_role("button", name="Lung").click()
    expect(page.locator("#viewer-window")).not_to_be_empty()
    page.wait_for_function(
        "() => document.querySelector('#viewer-pane img').src.includes('window')"
    )
    assert _pixels(page) != before

    # Saving the image: a JPEG, with the warning burned in below the image.
    with page.expect_download() as download:
        page.get_by_role("button", name="Save this image (JPEG)").click()
    saved = Image.open(download.value.path())
    assert saved.format == "JPEG"
    assert saved.width == 512 and saved.height > 512
    assert download.value.suggested_filename == f"image-{CT_SLICES}.jpg"

    # Another series, from its thumbnail: no presets for an MR.
    page.locator(".series-pick").nth(1).click()
    expect(counter).to_have_text("1 / 5")
    expect(page.locator("#viewer-presets")).to_be_hidden()

    # The whole study, as a ZIP laid out like a CD.
    with page.expect_download() as download:
        page.get_by_role("link", name="Download the study (DICOM)").click()
    with zipfile.ZipFile(download.value.path()) as archive:
        names = archive.namelist()
    assert "DICOMDIR" in names and "INDEX.HTM" in names
    assert sum(1 for name in names if name.startswith("DICOM/")) == CT_SLICES + 5
    assert csp_violations == []


def test_the_viewer_works_with_the_keyboard_alone(
    phone: tuple[Page, list[str]], live_server: Any, sms_dir: Path, tmp_path: Path
) -> None:
    page, csp_violations = phone
    uid = _import_study(
        tmp_path / "ct",
        patient_name="DUPONT^Marie",
        patient_id="PID-KEYS",
        modalities=(("CT", 6),),
        rows=64,
        columns=64,
    )
    created = make_share(uid)
    page.goto(live_server.url + fragment_link(created))
    page.get_by_role("button", name="Send me a code").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_text("We have sent you a code")).to_be_visible()
    page.keyboard.type(last_code(sms_dir))
    page.keyboard.press("Enter")
    expect(page).to_have_url(live_server.url + "/viewer/")
    expect(page.locator("#viewer-counter")).to_have_text("1 / 6")

    reached: list[str] = []
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.append(
            page.evaluate(
                "() => { const e = document.activeElement;"
                " return e.id || e.getAttribute('aria-label') || e.textContent.trim(); }"
            )
        )
    for control in ("viewer-stage", "viewer-slider", "Lung", "Zoom in", "viewer-save"):
        assert control in reached, reached
    # The focused image takes the arrow keys; a preset takes Enter.
    page.locator("#viewer-stage").focus()
    page.keyboard.press("ArrowDown")
    expect(page.locator("#viewer-counter")).to_have_text("2 / 6")
    page.get_by_role("button", name="Bone").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("button", name="Bone")).to_have_attribute("aria-pressed", "true")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none")
    assert csp_violations == []
