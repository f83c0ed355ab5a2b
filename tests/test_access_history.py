"""A recipient's access history shows that strangers tried, and when, never from where.

mallory, a stranger, types a wrong code that starts with the share's public prefix (a typo, or
the code of an older share that had the same prefix): the attempt is on the share's history.
The patient sees "someone typed a wrong code" and its time, not mallory's address or browser;
their own steps keep theirs; alice, an administrator, still sees everything in the admin.
"""

import re

import pytest
from django.test import Client

from accounts.models import AuditEvent
from tests.support.access import open_link, sign_in
from tests.test_access_bruteforce import captcha_passes, post_code, wrong_code_for  # noqa: F401
from tests.test_admin_otp import admin_login, code, createstaff

pytestmark = pytest.mark.django_db

MALLORY = "198.51.100.9"
MALLORY_BROWSER = "StrangerBrowser/2.0"
PATIENT = "192.0.2.33"
PATIENT_BROWSER = "PatientPhone/1.0"


@pytest.fixture
def stranger_tried(share, captcha_passes) -> None:  # noqa: F811
    post_code(Client(), wrong_code_for(share), MALLORY, HTTP_USER_AGENT=MALLORY_BROWSER)
    assert AuditEvent.objects.filter(
        share=share.share, action=AuditEvent.Action.CODE_FAILED, ip_address=MALLORY
    ).exists()


def history_page(share, sms_dir) -> str:
    client = Client()
    sign_in(client, share, sms_dir, REMOTE_ADDR=PATIENT, HTTP_USER_AGENT=PATIENT_BROWSER)
    return client.get("/access/history", REMOTE_ADDR=PATIENT).content.decode()


@pytest.mark.usefixtures("stranger_tried")
class TestStrangersInTheHistory:
    def test_the_patient_sees_the_attempt_without_the_strangers_address(
        self, share, sms_dir
    ) -> None:
        page = history_page(share, sms_dir)

        assert "Someone typed a wrong code" in page
        assert MALLORY not in page
        assert MALLORY_BROWSER not in page

    def test_the_patients_own_steps_keep_their_address_and_browser(self, share, sms_dir) -> None:
        page = history_page(share, sms_dir)

        assert "One-time code accepted" in page
        assert PATIENT in page and PATIENT_BROWSER in page

    def test_a_wrong_one_time_code_shows_no_address_either(self, share, sms_dir) -> None:
        patient = Client()
        sign_in(patient, share, sms_dir, REMOTE_ADDR=PATIENT, HTTP_USER_AGENT=PATIENT_BROWSER)
        intruder = Client()
        open_link(intruder, share, REMOTE_ADDR=MALLORY, HTTP_USER_AGENT=MALLORY_BROWSER)
        intruder.post(
            "/access/verify",
            {"otp": "000000"},
            REMOTE_ADDR=MALLORY,
            HTTP_USER_AGENT=MALLORY_BROWSER,
        )
        assert AuditEvent.objects.filter(
            action=AuditEvent.Action.OTP_FAILED, ip_address=MALLORY
        ).exists()

        page = patient.get("/access/history", REMOTE_ADDR=PATIENT).content.decode()

        # (Opening the link is the link holder's own step, shown with its address: a patient
        # who sees a stranger's address there knows the link went astray.)
        rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)
        failed = [row for row in rows if "Someone typed a wrong one-time code" in row]
        assert len(failed) == 1
        assert MALLORY not in failed[0] and "—" in failed[0]

    def test_the_admin_still_shows_the_strangers_address(
        self, share, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        alice = createstaff(monkeypatch, "alice", "admin")
        client = Client()
        admin_login(client, "alice", otp_device=alice.persistent_id, otp_token=code(alice))

        page = client.get("/admin/accounts/auditevent/").content.decode()

        assert MALLORY in page

    def test_the_history_is_in_french_too(self, share, sms_dir) -> None:
        client = Client(HTTP_ACCEPT_LANGUAGE="fr")
        sign_in(client, share, sms_dir, REMOTE_ADDR=PATIENT)

        page = client.get("/access/history", REMOTE_ADDR=PATIENT).content.decode()

        assert "Quelqu’un a saisi un code erroné" in page
