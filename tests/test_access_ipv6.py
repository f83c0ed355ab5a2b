"""An IPv6 attacker holds a whole /64 and may use a fresh address for every guess: every
per-address limit counts the /64, while the audit log keeps each full address."""

import ipaddress

import pytest
from axes.models import AccessAttempt
from django.test import Client

from accounts import net
from accounts.models import AuditEvent
from tests.test_access_bruteforce import captcha_passes, post_code, random_code  # noqa: F401

pytestmark = pytest.mark.django_db

PROXY = "192.0.2.10"
ATTACKER_NETWORK = "2001:db8:66:1"


def attacker(i: int) -> str:
    """One of the 2^64 addresses of the attacker's /64 (as privacy addresses would be)."""
    return str(
        ipaddress.ip_address(f"{ATTACKER_NETWORK}:{i:x}:{i * 7919 % 0x10000:x}:beef:{i + 1:x}")
    )


@pytest.fixture
def behind_proxy(settings):
    settings.TRUSTED_PROXIES = [PROXY]


def post_via_proxy(client: Client, code: str, address: str):
    return post_code(client, code, PROXY, HTTP_X_FORWARDED_FOR=address)


@pytest.mark.usefixtures("behind_proxy", "captcha_passes")
class TestOneNetworkManyAddresses:
    def test_wrong_codes_from_many_addresses_of_one_64_are_locked_out(self, share) -> None:
        for i in range(4):
            response = post_via_proxy(Client(), random_code(), attacker(i))
            assert response.status_code == 200
        response = post_via_proxy(Client(), random_code(), attacker(4))

        assert response.status_code == 429
        # A sixth address of the same /64, with the right code: still the cool-off.
        assert post_via_proxy(Client(), share.access_code, attacker(5)).status_code == 429

    def test_another_network_is_not_affected(self, share) -> None:
        for i in range(5):
            post_via_proxy(Client(), random_code(), attacker(i))

        response = post_via_proxy(Client(), share.access_code, "2001:db8:66:2::1")

        assert response.status_code == 302
        assert response["Location"] == "/access/verify"

    def test_the_lockout_counts_the_network_and_the_audit_log_each_address(self, share) -> None:
        for i in range(3):
            post_via_proxy(Client(), random_code(), attacker(i))

        assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {
            f"{ATTACKER_NETWORK}::"
        }
        failed = AuditEvent.objects.filter(action=AuditEvent.Action.CODE_FAILED)
        assert set(failed.values_list("ip_address", flat=True)) == {attacker(i) for i in range(3)}


@pytest.mark.usefixtures("behind_proxy")
def test_a_fresh_address_of_the_same_64_gets_the_captcha(share) -> None:
    for i in range(3):
        Client().post(
            "/access/", {"code": random_code()}, REMOTE_ADDR=PROXY, HTTP_X_FORWARDED_FOR=attacker(i)
        )

    response = Client().get("/access/", REMOTE_ADDR=PROXY, HTTP_X_FORWARDED_FOR=attacker(9))

    assert b'name="captcha_1"' in response.content
    fresh = Client().get("/access/", REMOTE_ADDR=PROXY, HTTP_X_FORWARDED_FOR="2001:db8:77::1")
    assert b"captcha" not in fresh.content


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.66", "203.0.113.66"),
        ("2001:db8:66:1:aaaa:bbbb:cccc:dddd", "2001:db8:66:1::"),
        ("2001:DB8:66:1::1", "2001:db8:66:1::"),
        ("2001:db8:66:2::1", "2001:db8:66:2::"),
        ("::ffff:203.0.113.66", "203.0.113.66"),
    ],
)
def test_limits_count_ipv4_addresses_and_ipv6_networks(address: str, key: str) -> None:
    assert net.limit_key(address) == key
