"""OHIF under /ohif/: installed only when it matches its pinned checksum, served to recipient
sessions only, from its own folder only, with a CSP of its own; and in Chromium, a physician's
shared CT study shows in it without a single CSP violation.

The install tests use small fake packages made here (no network); the browser test uses the
real build that `make ohif` installs (`make test` runs it first).
"""

import base64
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
from django.core import mail
from django.core.management import CommandError, call_command
from django.test import Client
from PIL import Image, ImageStat
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from pydicom.uid import JPEGLSLossless

from dicomweb import ohif
from dicomweb.ohif import install
from dicomweb.ohif.install import OhifInstallError, Pin, ohif_install
from studies import imports
from studies.demo import synthetic
from tests.support.access import fragment_link, make_share, make_study, sign_in
from tests.test_recipient_browser import browser  # noqa: F401  (the module's Chromium)

PUBLISHED_INDEX = (
    '<!doctype html><html><head><script>window.PUBLIC_URL="/"</script>'
    '<script rel="preload" as="script" src="/app-config.js"></script>'
    '<script rel="preload" as="script" type="module" src="/init-service-worker.js"></script>'
    '<script defer src="/app.bundle.1234abcd.js"></script>'
    '<link href="/app.bundle.css" rel="stylesheet"></head><body><div id="root"></div></body>'
    "</html>"
)
APP_BUNDLE = '(() => {\n__webpack_require__.p = "/";\n})();\nconsole.log("app");\n'


def _package(folder: Path, files: dict[str, bytes] | None = None) -> Path:
    """A small stand-in for the @ohif/app tarball, as npm packs it (everything under package/)."""
    files = files or {
        "package/package.json": b'{"name": "@ohif/app"}',
        "package/dist/index.html": PUBLISHED_INDEX.encode(),
        "package/dist/app-config.js": b"window.config = {dataSources: ['https://elsewhere']};",
        "package/dist/app.bundle.1234abcd.js": APP_BUNDLE.encode(),
        "package/dist/8097.bundle.5678ef.js": APP_BUNDLE.encode(),  # a web worker's
        "package/dist/app.bundle.css": b"@font-face{src:url(/a1b2.woff2)}",
        "package/dist/5130ccb17e3f3f5b.wasm": b"\0asm\1\0\0\0",
        "package/dist/app.bundle.1234abcd.js.map": b"{}",
        "package/dist/sw.js": b"self.addEventListener('fetch', () => {});",
        "package/dist/assets/favicon.ico": b"icon",
    }
    path = folder / "ohif-app-0.0.1.tgz"
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def _pin(path: Path) -> Pin:
    return Pin(version="0.0.1", integrity=_integrity(path))


@pytest.fixture
def ohif_dir(settings: Any, tmp_path: Path) -> Path:
    """A fake OHIF build installed as `make ohif` would, in a folder of the test's own."""
    settings.OHIF_DIR = tmp_path / "var" / "ohif"
    tarball = _package(tmp_path)
    assert ohif_install(tarball=tarball, pin=_pin(tarball))
    return Path(settings.OHIF_DIR)


class TestInstall:
    def test_it_installs_a_package_that_matches_its_pin(self, tmp_path: Path) -> None:
        tarball = _package(tmp_path)
        target = tmp_path / "ohif"
        assert ohif_install(target=target, tarball=tarball, pin=_pin(tarball))
        assert install.installed_pin(target) == _pin(tarball)
        marker = json.loads((target / ohif.MARKER).read_text())
        assert marker["workers"] == ["8097.bundle.5678ef.js"]

        index = (target / "index.html").read_text()
        assert '<script defer src="/ohif/app.bundle.1234abcd.js"></script>' in index
        assert '<link href="/ohif/app.bundle.css" rel="stylesheet">' in index
        assert '<script src="/ohif/app-config.js"></script>' in index
        # No inline script (the CSP allows none), no service worker.
        assert re.findall(r"<script>", index) == []
        assert "service-worker" not in index
        assert not (target / "sw.js").exists()
        assert not (target / "app.bundle.1234abcd.js.map").exists()
        setup = (target / install.SETUP_SCRIPT).read_text()
        assert 'window.PUBLIC_URL = "/ohif/";' in setup
        assert (
            '__webpack_require__.p = "/ohif/";' in (target / "app.bundle.1234abcd.js").read_text()
        )

        config = (target / "app-config.js").read_text()
        assert 'routerBasename: "/ohif"' in config
        assert 'window.location.origin + "/dicomweb"' in config
        assert "elsewhere" not in config and "https://" not in config
        assert config.count("namespace:") == 1  # one data source, the portal's
        for setting in (
            "qidoSupportsIncludeField: false",
            "imageRendering: 'wadors'",
            "thumbnailRendering: 'wadors'",
            "enableStudyLazyLoad: true",
            "supportsFuzzyMatching: false",
            "supportsWildcard: true",
            "omitQuotationForMultipartRequest: true",
            "bulkDataURI: { enabled: true }",
        ):
            assert setting in config

    def test_it_does_nothing_when_the_pinned_version_is_there(self, tmp_path: Path) -> None:
        tarball = _package(tmp_path)
        target = tmp_path / "ohif"
        assert ohif_install(target=target, tarball=tarball, pin=_pin(tarball))
        (target / "app.bundle.css").write_text("left alone")
        assert not ohif_install(target=target, tarball=tarball, pin=_pin(tarball))
        assert (target / "app.bundle.css").read_text() == "left alone"
        assert ohif_install(target=target, tarball=tarball, pin=_pin(tarball), force=True)
        assert (target / "app.bundle.css").read_text() == "@font-face{src:url(/ohif/a1b2.woff2)}"

    def test_it_refuses_a_tampered_package_and_installs_nothing(self, tmp_path: Path) -> None:
        tarball = _package(tmp_path)
        pin = _pin(tarball)
        data = bytearray(tarball.read_bytes())
        data[-30] ^= 1
        tarball.write_bytes(bytes(data))
        target = tmp_path / "site" / "ohif"
        with pytest.raises(OhifInstallError, match="does not match the pinned checksum"):
            ohif_install(target=target, tarball=tarball, pin=pin)
        assert not target.exists()
        assert list(target.parent.iterdir()) == []  # no leftovers

    def test_a_wrong_pin_keeps_the_installed_version(self, tmp_path: Path) -> None:
        tarball = _package(tmp_path)
        target = tmp_path / "ohif"
        ohif_install(target=target, tarball=tarball, pin=_pin(tarball))
        wrong = Pin(version="0.0.2", integrity="sha512-" + base64.b64encode(b"x" * 64).decode())
        with pytest.raises(OhifInstallError):
            ohif_install(target=target, tarball=tarball, pin=wrong)
        assert install.installed_pin(target) == _pin(tarball)

    def test_it_refuses_a_pin_that_is_not_sha512(self, tmp_path: Path) -> None:
        tarball = _package(tmp_path)
        digest = hashlib.sha256(tarball.read_bytes()).digest()
        sha256 = "sha256-" + base64.b64encode(digest).decode()
        with pytest.raises(OhifInstallError, match="not a sha512"):
            ohif_install(target=tmp_path / "ohif", tarball=tarball, pin=Pin("0.0.1", sha256))

    def test_it_refuses_a_package_that_writes_outside_its_folder(self, tmp_path: Path) -> None:
        (tmp_path / "pkg").mkdir()
        tarball = _package(
            tmp_path / "pkg",
            {
                "package/dist/index.html": PUBLISHED_INDEX.encode(),
                "package/dist/../../../escaped.txt": b"gotcha",
            },
        )
        target = tmp_path / "deep" / "ohif"
        with pytest.raises(OhifInstallError):
            ohif_install(target=target, tarball=tarball, pin=_pin(tarball))
        assert not target.exists()
        assert not list(tmp_path.rglob("escaped.txt"))

    def test_it_refuses_a_package_that_is_not_an_ohif_build(self, tmp_path: Path) -> None:
        tarball = _package(tmp_path, {"package/dist/index.html": b"<html></html>"})
        with pytest.raises(OhifInstallError, match="no bundle"):
            ohif_install(target=tmp_path / "ohif", tarball=tarball, pin=_pin(tarball))

    def test_the_command_refuses_a_file_that_is_not_the_pinned_package(
        self, settings: Any, tmp_path: Path
    ) -> None:
        settings.OHIF_DIR = tmp_path / "ohif"
        tarball = _package(tmp_path)
        with pytest.raises(CommandError, match="does not match the pinned checksum"):
            call_command("install_ohif", "--tarball", str(tarball))
        assert not ohif.is_installed()
        assert not Path(settings.OHIF_DIR).exists()

    def test_the_pin_is_a_sha512_of_a_3x_release(self) -> None:
        assert re.fullmatch(r"3\.\d+\.\d+", ohif.VERSION)
        digest = base64.b64decode(ohif.INTEGRITY.removeprefix("sha512-"), validate=True)
        assert ohif.INTEGRITY.startswith("sha512-") and len(digest) == 64


@pytest.mark.django_db
class TestServing:
    def test_it_sends_a_visitor_without_a_session_to_the_access_page(
        self, client: Client, ohif_dir: Path
    ) -> None:
        for path in ("/ohif/", "/ohif/viewer?StudyInstanceUIDs=1.2.3", "/ohif/app-config.js"):
            response = client.get(path)
            assert response.status_code == 302 and response["Location"] == "/access/", path

    def test_it_serves_the_rewritten_index_to_a_signed_in_recipient(
        self, client: Client, ohif_dir: Path, sms_dir: Path
    ) -> None:
        make_study()
        sign_in(client, make_share(), sms_dir)
        assert ohif.is_installed()
        for path in ("/ohif/", "/ohif/viewer?StudyInstanceUIDs=1.2.3", "/ohif/index.html"):
            response = client.get(path)
            assert response.status_code == 200, path
            assert response["Content-Type"] == "text/html; charset=utf-8"
            body = b"".join(response.streaming_content).decode()  # type: ignore[attr-defined]
            assert '<script src="/ohif/app-config.js">' in body
            assert "no-store" in response["Cache-Control"]

    def test_it_serves_files_with_their_content_types(
        self, client: Client, ohif_dir: Path, sms_dir: Path
    ) -> None:
        make_study()
        sign_in(client, make_share(), sms_dir)
        expected = {
            "/ohif/app-config.js": "text/javascript; charset=utf-8",
            "/ohif/app.bundle.1234abcd.js": "text/javascript; charset=utf-8",
            "/ohif/app.bundle.css": "text/css; charset=utf-8",
            "/ohif/5130ccb17e3f3f5b.wasm": "application/wasm",
            "/ohif/assets/favicon.ico": "image/vnd.microsoft.icon",
        }
        for path, content_type in expected.items():
            response = client.get(path)
            assert response.status_code == 200, path
            assert response["Content-Type"] == content_type, path
            assert response["X-Content-Type-Options"] == "nosniff"
            assert "no-store" in response["Cache-Control"]
        assert client.post("/ohif/app-config.js").status_code == 405

    def test_it_serves_nothing_outside_its_folder(
        self, client: Client, ohif_dir: Path, sms_dir: Path, settings: Any
    ) -> None:
        make_study()
        sign_in(client, make_share(), sms_dir)
        (ohif_dir.parent / "secret.txt").write_text("no")
        (ohif_dir / "link.txt").symlink_to(ohif_dir.parent / "secret.txt")
        for path in (
            "/ohif/../../settings.py",
            "/ohif/../secret.txt",
            "/ohif/%2e%2e/secret.txt",
            "/ohif/%2E%2E%2Fsecret.txt",
            "/ohif/..%2fsecret.txt",
            "/ohif/..%5csecret.txt",
            "/ohif/%2fetc%2fpasswd.txt",
            "//ohif/etc/passwd.txt",
            "/ohif//etc/passwd.txt",
            "/ohif/link.txt",
            "/ohif/.installed.json",
            "/ohif/index.html%00.js",
            "/ohif/missing.js",
            "/ohif/sw.js",
        ):
            response = client.get(path)
            assert response.status_code == 404, (path, response.status_code)

    def test_it_sends_the_ohif_csp_on_ohif_only(
        self, client: Client, ohif_dir: Path, sms_dir: Path
    ) -> None:
        make_study()
        sign_in(client, make_share(), sms_dir)
        policy = _directives(client.get("/ohif/viewer")["Content-Security-Policy"])
        assert policy == {
            "default-src": ["'self'"],
            "script-src": ["'self'"],
            "worker-src": ["'self'"],
            "style-src": ["'self'", "'unsafe-inline'"],
            "img-src": ["'self'", "data:", "blob:"],
            "connect-src": ["'self'"],
            "font-src": ["'self'"],
            "object-src": ["'none'"],
            "base-uri": ["'none'"],
            "form-action": ["'self'"],
            "frame-ancestors": ["'none'"],
        }
        for path in ("/ohif/app.bundle.1234abcd.js", "/ohif/app-config.js"):
            assert _directives(client.get(path)["Content-Security-Policy"]) == policy
        # Eval for the image decoders' worker only, never for the page.
        worker = _directives(client.get("/ohif/8097.bundle.5678ef.js")["Content-Security-Policy"])
        assert worker == {**policy, "script-src": ["'self'", "'unsafe-eval'"]}
        strict = _directives(client.get("/viewer/")["Content-Security-Policy"])
        assert strict["script-src"] == ["'self'"] and strict["style-src"] == ["'self'"]
        assert "worker-src" not in strict
        json_answer = client.get("/dicomweb/studies", HTTP_ACCEPT="application/dicom+json")
        assert "eval" not in json_answer["Content-Security-Policy"]

    def test_it_is_not_there_when_not_installed(
        self, client: Client, settings: Any, tmp_path: Path, sms_dir: Path
    ) -> None:
        settings.OHIF_DIR = tmp_path / "nothing"
        make_study()
        sign_in(client, make_share(), sms_dir)
        assert not ohif.is_installed()
        assert client.get("/ohif/viewer").status_code == 404


def _directives(header: str) -> dict[str, list[str]]:
    parts = (part.split() for part in header.split(";") if part.strip())
    return {name: values for name, *values in parts}


# --- In Chromium, with the real build ---------------------------------------------------------

DESKTOP = {"width": 1280, "height": 800}


def _import_ct(folder: Path) -> str:
    datasets = synthetic.make_study(
        patient_name="DURAND^Louise",
        patient_id="PID-OHIF",
        modalities=(("CT", 20),),
        rows=256,
        columns=256,
        study_description="CT ABDOMEN",
        # Stored compressed, and sent so (OHIF asks for transfer-syntax=*): OHIF decodes it
        # with its WebAssembly JPEG-LS decoder, which the CSP must let it compile.
        compress_series=0,
        compression=JPEGLSLossless,
    )
    report = imports.dicom_import(synthetic.write_study(datasets, folder))
    assert report.imported == 20, report.skipped
    return str(datasets[0].StudyInstanceUID)


@pytest.mark.django_db(transaction=True)
def test_a_physician_sees_the_shared_ct_in_ohif(
    browser: Browser,  # noqa: F811
    live_server: Any,
    settings: Any,
    tmp_path: Path,
) -> None:
    # `make test` installs it (`make ohif`); a run without it must say so, not pass silently.
    assert ohif.is_installed(), "OHIF is not installed: run `make ohif`"
    settings.BASE_URL = live_server.url
    uid = _import_ct(tmp_path / "ct")
    other = synthetic.make_study(
        patient_name="AUTRE^Paul", patient_id="PID-OTHER", modalities=(("MR", 2),)
    )
    imports.dicom_import(synthetic.write_study(other, tmp_path / "other"))
    other_uid = str(other[0].StudyInstanceUID)
    created = make_share(uid, recipient="physician", channel="email", contact="dr@example.org")

    context = browser.new_context(viewport=DESKTOP, locale="en-GB")  # type: ignore[arg-type]
    page = context.new_page()
    violations: list[str] = []
    failed: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text or "Refused to" in message.text:
            violations.append(message.text)

    def on_finished(request: Request) -> None:
        response = request.response()
        if response is not None and response.status >= 400:
            failed.append(f"{response.status} {request.url}")

    page.on("console", on_console)
    page.on("requestfinished", on_finished)
    # (Requests cut short by leaving the page, net::ERR_ABORTED, are no failure.)
    page.on(
        "requestfailed",
        lambda request: (
            None
            if request.failure == "net::ERR_ABORTED"
            else failed.append(f"{request.failure} {request.url}")
        ),
    )

    _sign_in(page, live_server.url, created)
    page.goto(f"{live_server.url}{ohif.viewer_path(uid)}")
    _dismiss_notices(page)
    assert _shows_an_image(page, 1)
    page.screenshot(path=str(tmp_path / "ohif-viewer.png"))  # to look at when it fails

    # MPR: the same series as a volume in three planes (workers, WebAssembly, WebGL).
    page.goto(f"{live_server.url}{ohif.viewer_path(uid)}&hangingprotocolId=mpr")
    assert _shows_an_image(page, 3)
    page.screenshot(path=str(tmp_path / "ohif-mpr.png"))
    assert violations == []
    assert failed == []

    # Only the share's study is there: OHIF's study list shows it alone, and a search for
    # another study through the session finds nothing.
    page.goto(f"{live_server.url}{ohif.MOUNT}")
    expect(page.get_by_text("CT ABDOMEN").first).to_be_visible(timeout=30_000)
    expect(page.get_by_text("AUTRE")).to_have_count(0)
    expect(page.get_by_text("Paul")).to_have_count(0)
    found = page.evaluate(
        """async (uid) => {
            const r = await fetch('/dicomweb/studies?StudyInstanceUID=' + uid,
                                  {headers: {Accept: 'application/dicom+json'}});
            return [r.status, r.status === 200 ? await r.json() : null];
        }""",
        other_uid,
    )
    assert found[0] in (200, 204) and not found[1], found
    context.close()


def _shows_an_image(page: Page, viewports: int) -> bool:
    """Whether each of the first `viewports` canvases shows an image (not one flat colour)
    within 30 seconds."""
    canvases = page.locator("canvas.cornerstone-canvas")
    expect(canvases).to_have_count(viewports, timeout=60_000)
    for number in range(viewports):
        canvas = canvases.nth(number)
        for _ in range(60):
            shot = Image.open(io.BytesIO(canvas.screenshot())).convert("L")
            if ImageStat.Stat(shot).var[0] > 100:
                break
            page.wait_for_timeout(500)
        else:
            return False
    return True


def _dismiss_notices(page: Page) -> None:
    """OHIF's first-visit tour and its "investigational use" banner, when they show."""
    for name in ("Skip all", "Confirm and hide"):
        button = page.get_by_role("button", name=name)
        try:
            button.click(timeout=10_000)
        except PlaywrightTimeoutError:
            pass


def _sign_in(page: Page, base: str, created: Any) -> None:
    page.goto(base + fragment_link(created))
    page.get_by_role("button", name="Send me a code").click()
    code = re.search(r"\b(\d{6})\b", str(mail.outbox[-1].body))
    assert code
    page.get_by_label("One-time code").fill(code.group(1))
    page.get_by_role("button", name="Confirm").click()
    expect(page).not_to_have_url(re.compile(r"/access/verify$"))
