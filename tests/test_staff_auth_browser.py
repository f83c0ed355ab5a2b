"""Staff sign-in in a real browser (headless Chromium through Playwright), on a phone-sized
screen: dave enrols his authenticator app from the QR page and signs in again with a code;
alice adds a passkey (Chromium's virtual authenticator) and signs in with it. Every sign-in page
is checked with axe-core at WCAG 2.1 AA."""

import base64
import io
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zxingcpp
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Page, expect

from accounts.models import AuditEvent, StaffPasskey, User
from tests.support.browser import PHONE, assert_accessible, assert_fits_the_screen
from tests.test_recipient_browser import browser  # noqa: F401  (the module's Chromium)

PASSWORD = "correct horse battery staple"


@pytest.fixture
def csp_violations() -> list[str]:
    return []


@pytest.fixture
def page(
    browser: Browser,  # noqa: F811
    live_server: Any,
    settings: Any,
    csp_violations: list[str],
) -> Iterator[Page]:
    """A phone-sized page on the live server; Content Security Policy reports collected."""
    settings.BASE_URL = live_server.url  # the passkeys' origin
    context = browser.new_context(viewport=PHONE, locale="en-GB")
    page = context.new_page()

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            csp_violations.append(message.text)

    page.on("console", on_console)
    yield page
    context.close()


def totp_code(secret: str, *, steps_ahead: int = 0) -> str:
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    totp = TOTP(key)
    totp.time = time.time() + 30 * steps_ahead
    return f"{totp.token():06d}"


def type_password(page: Page, live_server: Any, username: str) -> None:
    page.goto(live_server.url + "/staff/login/")
    expect(page.get_by_role("heading", name="Staff sign-in")).to_be_visible()
    assert_accessible(page)
    assert_fits_the_screen(page)
    # The keyboard alone: the username field has the focus.
    page.keyboard.type(username)
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")


@pytest.mark.django_db(transaction=True)
def test_dave_enrols_his_app_then_signs_in_with_a_code(
    page: Page, live_server: Any, csp_violations: list[str]
) -> None:
    User.objects.create_user("dave", "dave@hospital.example.org", PASSWORD, role="sharer")

    type_password(page, live_server, "dave")
    expect(page).to_have_url(live_server.url + "/staff/enrol/")
    expect(page.get_by_role("heading", name="Set up your authenticator app")).to_be_visible()
    qr = page.get_by_role("img", name="QR code to scan with your authenticator app")
    expect(qr).to_be_visible()
    assert (qr.get_attribute("src") or "").startswith("data:image/svg+xml")
    assert_accessible(page)
    assert_fits_the_screen(page)
    secret = page.locator("#totp-secret").get_attribute("data-secret") or ""
    # The key typed by hand is the one shown in groups, and the QR code, as a phone reads it,
    # carries the same key.
    assert page.locator("#totp-secret").inner_text().replace(" ", "") == secret
    read = zxingcpp.read_barcodes(Image.open(io.BytesIO(qr.screenshot())))
    assert [r.text for r in read] == [TOTPDevice.objects.get(user__username="dave").config_url]
    assert f"secret={secret}" in read[0].text

    page.get_by_label("Code from your authenticator app").fill(totp_code(secret))
    page.get_by_role("button", name="Confirm").click()
    expect(page.get_by_role("heading", name="Your recovery codes")).to_be_visible()
    expect(page.locator(".recovery-codes code")).to_have_count(10)
    assert_accessible(page)
    assert_fits_the_screen(page)
    page.get_by_role("link", name="I have kept them, continue").click()
    expect(page).to_have_url(live_server.url + "/staff/")
    assert TOTPDevice.objects.get(user__username="dave").confirmed

    page.get_by_role("button", name="Sign out (dave)").click()
    expect(page).to_have_url(live_server.url + "/staff/login/")
    expect(page.get_by_text("You are signed out.")).to_be_visible()

    # Again, with a later code (the first one is used up).
    type_password(page, live_server, "dave")
    expect(page).to_have_url(live_server.url + "/staff/login/second-factor/")
    expect(page.get_by_role("heading", name="Confirm it is you")).to_be_visible()
    assert_accessible(page)
    assert_fits_the_screen(page)
    page.keyboard.type(totp_code(secret, steps_ahead=1))  # the code field has the focus
    page.keyboard.press("Enter")
    expect(page).to_have_url(live_server.url + "/staff/")

    page.goto(live_server.url + "/staff/security/")
    expect(page.get_by_role("heading", name="Your security")).to_be_visible()
    expect(page.get_by_text("Authenticator app", exact=True)).to_be_visible()
    assert_accessible(page)
    assert_fits_the_screen(page)

    # Dave replaces the password he was given; a wrong old one is explained first.
    new = "dave's own passphrase, long enough"
    page.get_by_label("Old password", exact=True).fill("not the password")
    page.get_by_label("New password", exact=True).fill(new)
    page.get_by_label("New password confirmation", exact=True).fill(new)
    page.get_by_role("button", name="Change my password").click()
    expect(page.get_by_text("Your old password was entered incorrectly")).to_be_visible()
    assert_accessible(page)
    assert_fits_the_screen(page)
    page.get_by_label("Old password", exact=True).fill(PASSWORD)
    page.get_by_label("New password", exact=True).fill(new)
    page.get_by_label("New password confirmation", exact=True).fill(new)
    page.get_by_label("New password confirmation", exact=True).press("Enter")
    expect(page.get_by_text("Your password is changed.")).to_be_visible()
    assert User.objects.get(username="dave").check_password(new)
    assert csp_violations == []


@pytest.mark.django_db(transaction=True)
def test_alice_adds_a_passkey_and_signs_in_with_it(
    page: Page, live_server: Any, csp_violations: list[str]
) -> None:
    alice = User.objects.create_user(
        "alice", "alice@hospital.example.org", PASSWORD, role="admin", is_staff=True
    )
    device = TOTPDevice.objects.create(user=alice, name="authenticator", confirmed=True)
    secret = base64.b32encode(device.bin_key).decode()
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

    type_password(page, live_server, "alice")
    page.get_by_label("Code from your authenticator app").fill(totp_code(secret))
    page.get_by_role("button", name="Confirm").click()
    expect(page).to_have_url(live_server.url + "/staff/")

    page.get_by_role("link", name="Your security").click()
    page.get_by_role("button", name="Add a passkey on this device").click()
    expect(page.get_by_text("Your passkey is added.")).to_be_visible()
    expect(page.get_by_text("Passkey", exact=True)).to_be_visible()
    assert_accessible(page)
    credentials = cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator})
    assert len(credentials["credentials"]) == 1
    assert StaffPasskey.objects.filter(user=alice).count() == 1

    page.get_by_role("button", name="Sign out (alice)").click()
    type_password(page, live_server, "alice")
    expect(page).to_have_url(live_server.url + "/staff/login/second-factor/")
    assert_accessible(page)
    page.get_by_role("button", name="Confirm with my passkey").click()
    expect(page).to_have_url(live_server.url + "/staff/")
    assert AuditEvent.objects.filter(
        action=AuditEvent.Action.STAFF_LOGIN, actor=alice, detail__method="passkey"
    ).exists()

    # The administrator's way into the admin is the same sign-in.
    page.goto(live_server.url + "/admin/")
    expect(page).to_have_url(live_server.url + "/admin/")
    assert csp_violations == []
