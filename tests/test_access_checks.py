"""Settings that would weaken recipient access fail the system checks, so the portal does not
start with them (`manage.py check`, and every command that runs the checks)."""

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import run_checks

BASE_DIR = Path(__file__).resolve().parent.parent


def _ids(**kwargs: Any) -> set[str]:
    return {message.id for message in run_checks(**kwargs) if message.id}


@pytest.mark.parametrize(
    ("name", "value", "check_id"),
    [
        ("OTP_VALIDITY", 301, "accounts.E006"),
        ("OTP_VALIDITY", 3600, "accounts.E006"),
        ("OTP_VALIDITY", 0, "accounts.E006"),
        ("OTP_RESEND_COOLDOWN", 59, "accounts.E007"),
        ("OTP_RESEND_COOLDOWN", 0, "accounts.E007"),
        ("OTP_THROTTLE_FACTOR", 0, "accounts.E008"),
        ("OTP_THROTTLE_FACTOR", -1, "accounts.E008"),
    ],
)
def test_it_refuses_weak_one_time_code_settings(settings, name, value, check_id) -> None:  # type: ignore[no-untyped-def]
    assert check_id not in _ids()
    setattr(settings, name, value)
    assert check_id in _ids()


def test_the_limits_themselves_are_accepted(settings) -> None:  # type: ignore[no-untyped-def]
    settings.OTP_VALIDITY = 300
    settings.OTP_RESEND_COOLDOWN = 60
    settings.OTP_THROTTLE_FACTOR = 1
    assert not {"accounts.E006", "accounts.E007", "accounts.E008"} & _ids()


@pytest.mark.parametrize(
    ("cool_off", "refused"),
    [
        (None, True),  # axes would lock for ever, and the one-time code lock needs an end
        (timedelta(minutes=14), True),
        (0.2, True),  # axes reads a float as hours: 12 minutes
        (timedelta(minutes=15), False),
        (1, False),  # an int is hours
    ],
)
def test_the_cool_off_is_read_as_axes_reads_it(settings, cool_off, refused) -> None:  # type: ignore[no-untyped-def]
    settings.AXES_COOLOFF_TIME = cool_off
    assert ("accounts.E004" in _ids()) is refused


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://sms.example.org/v1/messages", True),
        ("http://10.0.0.5/send", True),
        ("ftp://sms.example.org/", True),
        ("https://sms.example.org/v1/messages", False),
        ("http://127.0.0.1:9000/send", False),
        ("http://localhost/send", False),
        ("http://[::1]:8080/send", False),
    ],
)
def test_the_sms_gateway_must_be_reached_over_https(settings, url, refused) -> None:  # type: ignore[no-untyped-def]
    # One-time codes and the gateway's bearer token are in every request.
    settings.SMS_BACKEND = "http"
    settings.SMS_GATEWAY_URL = url
    assert ("accounts.E005" in _ids()) is refused


def test_the_sms_gateway_check_ignores_other_backends(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SMS_BACKEND = "file"
    settings.SMS_GATEWAY_URL = "http://sms.example.org/"
    assert "accounts.E005" not in _ids()


def test_trusted_proxies_must_be_addresses_or_networks(settings) -> None:  # type: ignore[no-untyped-def]
    settings.TRUSTED_PROXIES = ["192.0.2.10", "10.1.0.0/16", "::1"]
    assert "accounts.E009" not in _ids()
    settings.TRUSTED_PROXIES = ["192.0.2.10", "proxy.example.org"]
    assert "accounts.E009" in _ids()


def test_the_portal_does_not_start_with_a_zero_throttle(tmp_path: Path) -> None:
    """The same, as an operator meets it: `manage.py check` with the environment variable."""
    env = {
        **os.environ,
        "PORTAL_OTP_THROTTLE_FACTOR": "0",
        "PORTAL_SMS_BACKEND": "http",
        "PORTAL_SMS_GATEWAY_URL": "http://sms.example.org/send",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'check.sqlite3'}",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "accounts.E008" in result.stderr and "accounts.E005" in result.stderr
