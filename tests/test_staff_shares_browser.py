"""The shares and PACS nodes pages in a real browser (headless Chromium through Playwright) on
a phone-sized screen: axe-core finds no WCAG 2.1 AA violation, nothing is wider than the
screen, and a share is revoked with the keyboard alone."""

import os
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings as django_settings
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from accounts.models import Share, User
from studies import services
from tests.support.access import make_share, make_study
from tests.support.browser import PHONE, assert_accessible, assert_fits_the_screen
from tests.support.staff import staff_client

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Playwright's sync API keeps an event loop in this thread, which Django takes for an async
    # context; the database calls of the test itself are synchronous all the same.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
            )
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def csp_violations() -> list[str]:
    return []


def _signed_in_page(
    browser: Browser, live_server: Any, user: User, csp_violations: list[str]
) -> Page:
    """A phone-sized page whose browser holds a staff session of `user` (second factor just
    proved), made the way tests.support.staff makes it for the test client."""
    cookie = staff_client(user).cookies[django_settings.SESSION_COOKIE_NAME]
    context = browser.new_context(viewport=PHONE, locale="en-GB")
    context.add_cookies(
        [
            {
                "name": django_settings.SESSION_COOKIE_NAME,
                "value": cookie.value,
                "url": live_server.url,
            }
        ]
    )
    page = context.new_page()

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            csp_violations.append(message.text)

    page.on("console", on_console)
    return page


def _tab_to(page: Page, name: str, limit: int = 80) -> None:
    """Press Tab until the focused element is the control named `name`."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        focused = page.evaluate(
            "(() => { const e = document.activeElement;"
            " return e ? (e.getAttribute('aria-label') || e.textContent || '').trim() : ''; })()"
        )
        if focused == name:
            return
    raise AssertionError(f"{name!r} is not reachable with the Tab key")


@pytest.mark.django_db(transaction=True)
def test_a_sharer_finds_a_share_and_revokes_it_with_the_keyboard(
    browser: Browser, live_server: Any, csp_violations: list[str]
) -> None:
    alice = User.objects.create_user("alice", "alice@example.org", "x" * 20, role="sharer")
    make_study(patient_name="DUPONT^Marie", patient_id="PID-DUPONT")
    created = make_share()
    make_share("1.2.826.0.1.3680043.8.498.3003")  # not in the store: retrieving
    page = _signed_in_page(browser, live_server, alice, csp_violations)

    page.goto(live_server.url + "/staff/shares/")
    expect(page.get_by_role("heading", name="Shares")).to_be_visible()
    expect(page.get_by_role("cell", name="Retrieving")).to_be_visible()
    assert_accessible(page)
    assert_fits_the_screen(page)

    # Filter by patient with the keyboard: type in the field, Enter submits.
    page.get_by_label("Patient", exact=True).focus()
    page.keyboard.type("dupont")
    page.keyboard.press("Enter")
    expect(page).to_have_url(live_server.url + "/staff/shares/?status=&patient=dupont")
    expect(page.get_by_role("link", name=f"Share {created.share.pk}")).to_be_visible()
    expect(page.locator("tbody tr")).to_have_count(1)

    # The share's page (retrieval, link and code), then its access log and actions.
    page.get_by_role("link", name=f"Share {created.share.pk}").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name=f"Share {created.share.pk}")).to_be_visible()
    _tab_to(page, "Access log, revoke, extend, unlock")
    page.keyboard.press("Enter")
    expect(
        page.get_by_role("heading", name=f"Share {created.share.pk}: access log")
    ).to_be_visible()
    assert_accessible(page)
    assert_fits_the_screen(page)

    _tab_to(page, "Revoke the share")
    page.keyboard.press("Enter")

    expect(page.get_by_text(f"Share {created.share.pk} is revoked")).to_be_visible()
    expect(page.locator(".study-facts .status")).to_have_text("Revoked")
    assert Share.objects.get(pk=created.share.pk).revoked_by == alice
    assert_accessible(page)

    page.goto(live_server.url + "/staff/shares/revoke-patient/?patient_id=PID-DUPONT")
    expect(page.get_by_text("Patient PID-DUPONT has no live share.")).to_be_visible()
    assert_accessible(page)
    assert_fits_the_screen(page)
    assert csp_violations == []


@pytest.mark.django_db(transaction=True)
def test_an_admin_sees_the_nodes_pages(
    browser: Browser, live_server: Any, csp_violations: list[str]
) -> None:
    carol = User.objects.create_user("carol", "carol@example.org", "x" * 20, role="admin")
    services.pacs_node_create(
        name="main-pacs",
        ae_title="MAINPACS",
        host="pacs-with-a-rather-long-host-name.radiology.example.org",
        port=104,
        dicomweb_url="https://pacs-with-a-rather-long-host-name.radiology.example.org/dicom-web",
    )
    page = _signed_in_page(browser, live_server, carol, csp_violations)

    page.goto(live_server.url + "/staff/nodes/")
    expect(page.get_by_role("heading", name="PACS nodes")).to_be_visible()
    assert_accessible(page)
    assert_fits_the_screen(page)

    page.get_by_role("link", name="Add a node").click()
    expect(page.get_by_role("heading", name="Add a node")).to_be_visible()
    assert_accessible(page)
    assert_fits_the_screen(page)
    # A bad port: the errors are announced and the form keeps what was typed.
    page.get_by_label("Name").fill("second")
    page.get_by_label("AE title").fill("SECOND")
    page.get_by_label("Host").fill("127.0.0.1")
    page.get_by_label("Port").fill("0")
    page.get_by_role("button", name="Add the node").click()
    expect(page.get_by_role("alert")).to_be_visible()
    expect(page.get_by_label("AE title")).to_have_value("SECOND")
    assert_accessible(page)

    page.goto(live_server.url + "/staff/nodes/")
    page.get_by_role("link", name="Remove main-pacs").click()
    expect(page.get_by_role("heading", name="Remove main-pacs")).to_be_visible()
    assert_accessible(page)
    assert_fits_the_screen(page)
    assert csp_violations == []
