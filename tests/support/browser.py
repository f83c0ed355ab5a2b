"""Checks every browser test makes of a page: no WCAG 2.1 AA violation under axe-core, and
nothing wider than the screen (a phone's, 375 px)."""

from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Page, ViewportSize

PHONE: ViewportSize = {"width": 375, "height": 740}
WCAG_21_AA = {
    "runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]},
    "resultTypes": ["violations"],
}


def assert_accessible(page: Page) -> None:
    results = Axe().run(page, options=WCAG_21_AA)
    assert results.violations_count == 0, results.generate_report()


def assert_fits_the_screen(page: Page) -> None:
    screen = (page.viewport_size or PHONE)["width"]
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= screen, f"{page.url} is {width}px wide on a {screen}px screen"
