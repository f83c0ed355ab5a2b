"""The recipient paths in a real browser (headless Chromium through Playwright), on a phone-sized
screen: link → one-time code from the SMS file → viewer; typed access code with the keyboard
only; a physician's passkey (Chromium's virtual authenticator)."""

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core import mail
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    expect,
    sync_playwright,
)

from tests.support.access import (
    fragment_link,
    last_code,
    link_token,
    make_share,
    make_study,
    sms_messages,
)
from tests.support.browser import PHONE, assert_fits_the_screen

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


@pytest.fixture
def page(
    browser: Browser, live_server: Any, settings: Any, csp_violations: list[str]
) -> Iterator[Page]:
    settings.BASE_URL = live_server.url
    context = browser.new_context(viewport=PHONE, locale="en-GB")
    page = context.new_page()

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            csp_violations.append(message.text)

    page.on("console", on_console)
    yield page
    context.close()


def _history_urls(page: Page) -> list[str]:
    cdp = page.context.new_cdp_session(page)
    entries = cdp.send("Page.getNavigationHistory")["entries"]
    return [entry["url"] for entry in entries]


@pytest.mark.django_db(transaction=True)
def test_patient_opens_the_link_and_reaches_the_viewer(
    page: Page, live_server: Any, csp_violations: list[str], sms_dir: Path
) -> None:
    make_study()
    created = make_share()
    token = link_token(created)

    page.goto(live_server.url + fragment_link(created))
    expect(page).to_have_url(live_server.url + "/access/verify")
    expect(page.get_by_text("06 •• •• •• 42")).to_be_visible()
    assert_fits_the_screen(page)
    # Following the link sent nothing: the patient asks for the code.
    assert sms_messages(sms_dir) == []
    page.get_by_role("button", name="Send me a code").click()
    expect(page.get_by_text("We have sent you a code")).to_be_visible()

    otp = page.get_by_label("One-time code")
    assert otp.get_attribute("autocomplete") == "one-time-code"
    assert otp.get_attribute("inputmode") == "numeric"
    otp.fill(last_code(sms_dir))
    page.get_by_role("button", name="Confirm").click()

    expect(page).to_have_url(live_server.url + "/viewer/")
    expect(page.get_by_role("heading", name="CT THORAX")).to_be_visible()
    expect(page.get_by_text("Marie DUPONT")).to_be_visible()
    expect(page.locator(".series")).to_have_count(2)
    expect(page.locator(".series").first).to_contain_text("CT")
    # make_study indexes no pixels: the viewer lists the CT's files without showing them.
    expect(page.locator(".series").first).to_contain_text("3 files")
    assert_fits_the_screen(page)

    # The token is nowhere in the address bar or the history.
    assert all(token not in url for url in _history_urls(page))
    assert token.split(".")[0] not in page.url

    page.get_by_role("link", name="Access history").click()
    expect(page.get_by_role("cell", name="Link opened")).to_be_visible()
    expect(page.get_by_role("cell", name="One-time code accepted")).to_be_visible()
    page.go_back()
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(live_server.url + "/access/")
    expect(page.get_by_text("You are signed out")).to_be_visible()
    page.goto(live_server.url + "/viewer/")
    expect(page).to_have_url(live_server.url + "/access/")
    assert csp_violations == []


@pytest.mark.django_db(transaction=True)
def test_patient_types_the_access_code_with_the_keyboard_only_in_french(
    page: Page, live_server: Any, csp_violations: list[str], sms_dir: Path
) -> None:
    make_study()
    created = make_share()
    page.goto(live_server.url + "/access/")
    # Switch the language with the keyboard.
    page.get_by_role("button", name="Français").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Voir vos images")).to_be_visible()
    # The code field has the focus: type the code as a patient might, lower case, no dashes.
    page.keyboard.type(created.access_code.replace("-", "").lower())
    page.keyboard.press("Enter")
    expect(page).to_have_url(live_server.url + "/access/verify")
    page.get_by_role("button", name="Envoyez-moi un code").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_text("Nous vous avons envoyé un code")).to_be_visible()
    page.keyboard.type(last_code(sms_dir))  # the one-time code field has the focus
    page.keyboard.press("Enter")
    expect(page).to_have_url(live_server.url + "/viewer/")
    expect(page.get_by_role("heading", name="CT THORAX")).to_be_visible()
    expect(page.get_by_text("3 fichiers")).to_be_visible()
    # Focus is visible: the focused element has an outline.
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none")
    assert csp_violations == []


@pytest.mark.django_db(transaction=True)
def test_a_wrong_code_in_the_browser_says_so_plainly(
    page: Page, live_server: Any, csp_violations: list[str]
) -> None:
    make_study()
    make_share()
    page.goto(live_server.url + "/access/")
    page.get_by_label("Access code").fill("AAAA-BBBB-CCCC-DDDD")
    page.get_by_role("button", name="Continue").click()
    expect(page.get_by_role("alert")).to_contain_text("This link or code does not work")


@pytest.mark.django_db(transaction=True)
def test_physician_enrols_a_passkey_then_signs_in_with_it(
    page: Page, live_server: Any, csp_violations: list[str]
) -> None:
    make_study()
    first = make_share(recipient="physician", channel="email", contact="dr.martin@example.org")
    cdp = page.context.new_cdp_session(page)
    cdp.send("WebAuthn.enable")
    authenticator = cdp.send(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "transport": "internal",
                "hasResidentKey": True,
                "hasUserVerification": True,
                "isUserVerified": True,
                "automaticPresenceSimulation": True,
            }
        },
    )["authenticatorId"]

    # First visit: the emailed code, then the offer of a passkey.
    page.goto(live_server.url + fragment_link(first))
    expect(page.get_by_text("d•••@example.org")).to_be_visible()
    page.get_by_role("button", name="Send me a code").click()
    expect(page.get_by_text("We have sent you a code")).to_be_visible()
    code = re.search(r"\b(\d{6})\b", str(mail.outbox[-1].body))
    assert code
    page.get_by_label("One-time code").fill(code.group(1))
    page.get_by_role("button", name="Confirm").click()
    expect(page).to_have_url(live_server.url + "/access/passkey")
    page.get_by_role("button", name="Create a passkey").click()
    expect(page).to_have_url(live_server.url + "/viewer/")
    authenticators = cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator})
    assert len(authenticators["credentials"]) == 1
    # The physician is told, at the address the passkey now opens.
    notice = mail.outbox[-1]
    assert notice.to == ["dr.martin@example.org"] and "passkey" in notice.subject.lower()
    page.get_by_role("button", name="Sign out").click()

    # A later share to the same address: the passkey replaces the emailed code.
    second = make_share(recipient="physician", channel="email", contact="dr.martin@example.org")
    sent_before = len(mail.outbox)
    page.goto(live_server.url + fragment_link(second))
    page.get_by_role("button", name="Sign in with my passkey").click()
    expect(page).to_have_url(live_server.url + "/viewer/")
    expect(page.get_by_role("heading", name="CT THORAX")).to_be_visible()
    assert len(mail.outbox) == sent_before

    from accounts.models import AuditEvent, PhysicianPasskey

    assert PhysicianPasskey.objects.filter(email="dr.martin@example.org").count() == 1
    assert AuditEvent.objects.filter(
        share=second.share, action=AuditEvent.Action.PASSKEY_OK
    ).exists()
    assert csp_violations == []


@pytest.mark.django_db(transaction=True)
def test_a_page_full_of_portal_images_does_not_lock_its_visitor_out(
    page: Page, live_server: Any
) -> None:
    """Another site embeds <img src="https://portal/s/…"> to lock its visitors' (a whole
    hospital's) address out: the browser marks those requests as images, the portal ignores
    them, and the visitor's own link still opens."""
    from axes.models import AccessAttempt

    from accounts import credentials

    make_study()
    created = make_share()
    junk = [credentials.sign_link_token(credentials.new_link_token()) for _ in range(6)]
    junk += ["junk", "forged.abc.def"]
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url) if "/s/" in request.url else None)
    page.set_content("".join(f'<img src="{live_server.url}/s/{t}" alt="">' for t in junk))
    page.wait_for_load_state("load")
    assert len(sent) == len(junk)  # the browser did ask for every one
    assert not AccessAttempt.objects.exists()
    page.goto(live_server.url + fragment_link(created))
    expect(page).to_have_url(live_server.url + "/access/verify")
