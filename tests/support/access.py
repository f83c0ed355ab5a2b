"""Fixtures and helpers for the recipient-access tests (shares, codes, sessions).

A pytest plugin (tests/conftest.py lists it in `pytest_plugins`): the fixtures are there for
every test module; the helpers are imported by name. Studies are written straight into the
index through the ORM: these tests need no PACS.
"""

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.core.cache import cache
from django.test import Client

from accounts import services
from accounts.models import Share
from studies.models import Instance, Series, Study

STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
OTHER_STUDY_UID = "1.2.826.0.1.3680043.8.498.2002"


def make_study(
    uid: str = STUDY_UID,
    *,
    patient_name: str = "DUPONT^Marie",
    patient_id: str | None = None,
    description: str = "CT THORAX",
    series: tuple[tuple[str, int], ...] = (("CT", 3), ("SR", 1)),
) -> Study:
    study = Study.objects.create(
        study_instance_uid=uid,
        patient_name=patient_name,
        patient_id=patient_id or "PID-" + uid[-4:],
        study_date="20260315",
        study_description=description,
    )
    for number, (modality, count) in enumerate(series, start=1):
        s = Series.objects.create(
            study=study,
            series_instance_uid=f"{uid}.{number}",
            modality=modality,
            series_number=number,
            series_description=f"{modality} series {number}",
        )
        for i in range(count):
            Instance.objects.create(
                series=s,
                sop_instance_uid=f"{uid}.{number}.{i + 1}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                instance_number=i + 1,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                file_path=f"{uid}/{number}/{i + 1}.dcm",
                size=1000,
                sha256="0" * 64,
            )
    return study


def make_share(
    uid: str = STUDY_UID,
    *,
    recipient: str = "patient",
    channel: str = "sms",
    contact: str = "+33612345642",
    **kwargs: Any,
) -> services.CreatedShare:
    return services.share_create(
        study_instance_uid=uid, recipient=recipient, channel=channel, contact=contact, **kwargs
    )


def link_token(created: services.CreatedShare) -> str:
    """The signed token of a share's link, which travels in its fragment: `/s/#<token>`."""
    url = urlsplit(created.url)
    assert url.path == "/s/" and url.fragment, created.url
    return url.fragment


def fragment_link(created: services.CreatedShare) -> str:
    """The link as a browser opens it: path and fragment."""
    return "/s/#" + link_token(created)


def legacy_link_path(created: services.CreatedShare) -> str:
    """The same link in the form issued before the fragment one: the token in the path."""
    return "/s/" + link_token(created)


def post_link(client: Client, token: str, **extra: Any) -> Any:
    """What the script of the `/s/` page does with the fragment it reads."""
    return client.post("/s/", {"token": token}, **extra)


def sms_messages(folder: Path) -> list[dict[str, str]]:
    if not folder.exists():
        return []
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def last_code(folder: Path) -> str:
    messages = sms_messages(folder)
    assert messages, "no SMS was sent"
    match = re.search(r"\b(\d{6})\b", messages[-1]["body"])
    assert match
    return match.group(1)


@pytest.fixture(autouse=True)
def plain_static_files(settings: Any, tmp_path: Path) -> None:
    """Pages link their CSS through `{% static %}`; tests run without collectstatic, so no
    manifest of hashed names exists (and no collected folder for WhiteNoise)."""
    settings.STATIC_ROOT = tmp_path / "static"
    settings.STATIC_ROOT.mkdir()
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture(autouse=True)
def fresh_cache(settings: Any) -> None:
    """Request budgets and attempts in progress (accounts.throttle) live in the cache, local
    memory in this process: each test starts with none counted. The request budget is off but
    where a test turns it on (its own tests): the test client sends everything from one
    address, faster than any person."""
    cache.clear()
    settings.RECIPIENT_REQUESTS_PER_MINUTE = 0


@pytest.fixture
def sms_dir(settings: Any, tmp_path: Path) -> Path:
    folder = tmp_path / "sms"
    settings.SMS_BACKEND = "file"
    settings.SMS_FILE_PATH = str(folder)
    return folder


@pytest.fixture
def fast_otp(settings: Any) -> Any:
    """No exponential wait between wrong one-time codes (tests type them back to back)."""
    settings.OTP_THROTTLE_FACTOR = 0
    return settings


@pytest.fixture
def study(db: Any) -> Study:
    return make_study()


@pytest.fixture
def share(study: Study) -> services.CreatedShare:
    return make_share()


def open_link(client: Client, created: services.CreatedShare, **extra: Any) -> Any:
    return post_link(client, link_token(created), **extra)


def sign_in(client: Client, created: services.CreatedShare, sms_folder: Path, **extra: Any) -> Any:
    """The whole patient path with the test client: link, send, one-time code."""
    response = open_link(client, created, **extra)
    assert response.status_code == 302 and response["Location"] == "/access/verify"
    response = client.post("/access/verify", {"action": "send"}, **extra)
    assert response.status_code == 302
    response = client.post("/access/verify", {"otp": last_code(sms_folder)}, **extra)
    assert response.status_code == 302, response.content[:500]
    return response


def share_of(created: services.CreatedShare) -> Share:
    return Share.objects.get(pk=created.share.pk)
