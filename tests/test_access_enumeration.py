"""No oracle: unknown, expired, revoked and used-up codes and links look the same from outside."""

import re
import statistics
import time
from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.test import Client
from django.utils import timezone

from accounts import credentials, selectors, services
from accounts.models import Share
from tests.support.access import legacy_link_path, make_share

pytestmark = pytest.mark.django_db

TRIES = 7
_CSRF = re.compile(r'name="csrfmiddlewaretoken" value="[^"]+"')


def _normalised(body: bytes) -> str:
    # The CSRF token is random per response (same length); nothing else may differ.
    return _CSRF.sub('name="csrfmiddlewaretoken" value=""', body.decode())


@pytest.fixture
def kinds(study):
    """One share of each kind a guesser could stumble on, plus a code nobody has."""
    expired = make_share()
    Share.objects.filter(pk=expired.share.pk).update(expires_at=timezone.now() - timedelta(days=1))
    revoked = make_share()
    services.share_revoke(share=revoked.share)
    used = make_share(single_use=True)
    Share.objects.filter(pk=used.share.pk).update(used_at=timezone.now())
    wrong_secret = make_share()
    right = wrong_secret.access_code.replace("-", "")
    return {
        "unknown": credentials.format_code(credentials.new_prefix() + "ABCDEFGHJKMN"),
        "malformed": "HELLO-WORLD",
        "wrong secret": credentials.format_code(right[:4] + "ABCDEFGHJKMN"),
        "expired": expired.access_code,
        "revoked": revoked.access_code,
        "used": used.access_code,
    }, {
        "unknown": "/s/" + credentials.sign_link_token(credentials.new_link_token()),
        "forged": "/s/" + credentials.new_link_token() + ".1xXGFt.forged",
        "expired": legacy_link_path(expired),
        "revoked": legacy_link_path(revoked),
        "used": legacy_link_path(used),
    }


def _timed_post(client: Client, path: str, data: dict[str, str]) -> float:
    start = time.perf_counter()
    client.post(path, data)
    return time.perf_counter() - start


def _timed_get(client: Client, path: str) -> float:
    start = time.perf_counter()
    client.get(path)
    return time.perf_counter() - start


def _assert_similar_timings(
    medians: dict[str, float], *, ratio: float = 2.5, slack: float = 0.003
) -> None:
    # Generous: a missing hash verification would make one kind several times faster.
    fastest, slowest = min(medians.values()), max(medians.values())
    assert slowest < fastest * ratio + slack, medians


class TestCodes:
    def test_every_refused_code_gets_the_same_answer(self, kinds):
        codes, _links = kinds
        answers = {}
        for kind, code in codes.items():
            response = Client().post("/access/", {"code": code}, REMOTE_ADDR="198.51.100.20")
            AccessAttempt.objects.all().delete()  # keep the captcha and lockout out of it
            answers[kind] = (
                response.status_code,
                len(response.content),
                _normalised(response.content),
            )
        first = next(iter(answers.values()))
        assert first[0] == 200
        assert "This link or code does not work" in first[2]
        for kind, answer in answers.items():
            assert answer == first, kind

    def test_every_refused_code_takes_the_same_time(self, kinds):
        codes, _links = kinds
        client = Client()
        client.get("/access/")  # warm up
        timings: dict[str, list[float]] = {kind: [] for kind in codes}
        for _ in range(TRIES):
            for kind, code in codes.items():
                timings[kind].append(_timed_post(client, "/access/", {"code": code}))
                AccessAttempt.objects.all().delete()
        _assert_similar_timings({k: statistics.median(v) for k, v in timings.items()})

    def test_every_refused_code_is_hashed_exactly_once(self, kinds, monkeypatch):
        """Timing is noisy; the work behind it is not: each refused code, whatever its kind,
        costs one Argon2 verification, no more and no less."""
        calls: list[str] = []
        real_verify = credentials._hasher.verify

        def counting_verify(password: str, encoded: str) -> bool:
            calls.append(encoded)
            return real_verify(password, encoded)

        monkeypatch.setattr(credentials._hasher, "verify", counting_verify)
        codes, _links = kinds
        for kind, code in codes.items():
            calls.clear()
            response = Client().post("/access/", {"code": code}, REMOTE_ADDR="198.51.100.22")
            AccessAttempt.objects.all().delete()
            assert response.status_code == 200, kind
            assert len(calls) == 1, kind
        calls.clear()
        assert selectors.share_check_code(codes["unknown"]).share is None
        assert len(calls) == 1

    def test_the_right_code_still_works(self, kinds, share):
        response = Client().post("/access/", {"code": share.access_code})
        assert response["Location"] == "/access/verify"


class TestLinks:
    def test_every_refused_link_gets_the_same_answer(self, kinds):
        _codes, links = kinds
        answers = {}
        for kind, path in links.items():
            client = Client()
            response = client.get(path, REMOTE_ADDR="198.51.100.21")
            page = client.get(response["Location"], REMOTE_ADDR="198.51.100.21")
            AccessAttempt.objects.all().delete()
            answers[kind] = (
                response.status_code,
                response["Location"],
                page.status_code,
                _normalised(page.content),
            )
        first = next(iter(answers.values()))
        assert first[:3] == (302, "/access/", 200)
        assert "This link or code does not work" in first[3]
        for kind, answer in answers.items():
            assert answer == first, kind

    def test_every_refused_link_takes_the_same_time(self, kinds):
        # A forged or stale link is refused without a lookup and without being counted, but
        # answers within the same time as the others all the same.
        _codes, links = kinds
        client = Client()
        timings: dict[str, list[float]] = {kind: [] for kind in links}
        for _ in range(TRIES):
            for kind, path in links.items():
                timings[kind].append(_timed_get(client, path))
                AccessAttempt.objects.all().delete()
        # Tighter than for codes: the counting alone (a few queries) is what a forged link
        # would save, were it not paced.
        medians = {k: statistics.median(v) for k, v in timings.items()}
        _assert_similar_timings(medians, ratio=1.3, slack=0.001)
