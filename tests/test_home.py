"""The home page: where a patient holding a letter starts, in French or English."""

from pathlib import Path

import pytest
from django.test import Client

from tests.support.access import make_share, make_study, open_link, sign_in

pytestmark = pytest.mark.django_db


def test_it_offers_the_access_code_form_that_posts_to_the_access_page() -> None:
    page = Client().get("/")

    assert page.status_code == 200
    html = page.content.decode()
    assert 'action="/access/"' in html and 'name="code"' in html
    assert "Type the access code from your letter" in html
    # Each language is named in its own language.
    assert ">English</button>" in html and ">Français</button>" in html


def test_it_speaks_french_to_a_french_browser() -> None:
    html = Client().get("/", HTTP_ACCEPT_LANGUAGE="fr-FR,fr;q=0.9").content.decode()

    assert '<html lang="fr">' in html
    assert "Saisissez le code d’accès inscrit sur votre courrier" in html
    # Each language keeps its own name, whatever the page's language.
    assert ">English</button>" in html and ">Français</button>" in html


def test_a_code_typed_on_the_home_page_opens_the_share(sms_dir: Path) -> None:
    make_study()
    created = make_share()
    client = Client()

    response = client.post("/access/", {"code": created.access_code})

    assert response.status_code == 302 and response["Location"] == "/access/verify"


def test_a_signed_in_recipient_goes_back_to_the_images(sms_dir: Path, fast_otp: object) -> None:
    make_study()
    client = Client()
    sign_in(client, make_share(), sms_dir)

    response = client.get("/")

    assert response.status_code == 302 and response["Location"] == "/viewer/"


def test_a_recipient_half_way_goes_back_to_the_one_time_code(sms_dir: Path) -> None:
    make_study()
    client = Client()
    open_link(client, make_share())

    response = client.get("/")

    assert response.status_code == 302 and response["Location"] == "/access/verify"
