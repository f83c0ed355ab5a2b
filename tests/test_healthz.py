"""/healthz against real parts: the test database, Redis (or the file system broker), a store on
disk, Orthanc as the PACS. Each part is broken for real: a broker URL on a port nobody listens on,
a store on a read-only file system, a PACS node on a closed port."""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.core.cache import cache
from django.test import Client

from studies import services
from studies.models import PacsNode
from tests.support import free_port
from tests.support.gunicorn import PortalServer
from tests.support.orthanc import OrthancServer
from tests.support.proxy import TcpRelay


@pytest.fixture
def healthy(settings: Any, tmp_path: Path) -> Any:
    """Every part as it should be: a real broker, a writable store, no free-space floor."""
    settings.CELERY_BROKER_URL = os.environ.get("REDIS_URL") or "filesystem://localhost/"
    settings.HEALTH_MIN_FREE_BYTES = 0
    settings.HEALTH_TIMEOUT = 2.0
    settings.HEALTH_PACS_CACHE_SECONDS = 60
    cache.clear()
    return settings


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody may write to, root included (the suite may run as root, for whom file
    modes mean nothing): a read-only file system mounted there, or without the privilege to
    mount, a folder without write permission."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def get_health(client: Client) -> tuple[int, dict[str, Any]]:
    response = client.get("/healthz")
    assert response["Content-Type"] == "application/json"
    assert "no-store" in response["Cache-Control"]
    return response.status_code, response.json()


@pytest.mark.django_db
def test_it_answers_ok_when_every_part_works(
    healthy: Any, client: Client, orthanc: OrthancServer, orthanc_node: PacsNode
) -> None:
    status, body = get_health(client)

    assert status == 200
    assert body == {
        "status": "ok",
        "database": "ok",
        "broker": "ok",
        "store": "ok",
        "cache": "ok",
        "pacs": {"orthanc": "ok"},
    }


@pytest.mark.django_db
def test_a_broker_that_does_not_answer_fails_the_node(healthy: Any, client: Client) -> None:
    healthy.CELERY_BROKER_URL = f"redis://127.0.0.1:{free_port()}/0"

    status, body = get_health(client)

    assert status == 503
    assert body["status"] == "failing"
    assert body["broker"] == "failing"
    assert body["database"] == body["store"] == "ok"


@pytest.mark.django_db
def test_a_store_that_cannot_be_written_fails_the_node(
    healthy: Any, client: Client, read_only_folder: Path
) -> None:
    healthy.STORE_DIR = read_only_folder / "store"

    status, body = get_health(client)

    assert status == 503
    assert body["store"] == "failing"
    assert body["database"] == body["broker"] == "ok"


@pytest.mark.django_db
def test_a_store_short_of_free_space_fails_the_node(healthy: Any, client: Client) -> None:
    healthy.HEALTH_MIN_FREE_BYTES = 10**18  # more than any disk has free

    status, body = get_health(client)

    assert status == 503
    assert body["store"] == "failing"


@pytest.mark.django_db
def test_the_store_probe_leaves_nothing_behind(healthy: Any, client: Client) -> None:
    assert get_health(client)[0] == 200

    leftovers = [p for p in Path(healthy.STORE_DIR).rglob("*") if p.is_file()]
    assert leftovers == []


@pytest.mark.django_db
def test_a_pacs_that_does_not_answer_degrades_but_keeps_the_node_in(
    healthy: Any, client: Client, orthanc: OrthancServer, orthanc_node: PacsNode
) -> None:
    """The store's studies are still served; and the PACS is every node's, so failing the
    node for it would take every node out of the load balancer at once."""
    services.pacs_node_create(name="closed", ae_title="NOBODY", host="127.0.0.1", port=free_port())

    status, body = get_health(client)

    assert status == 200
    assert body["status"] == "degraded"
    assert body["pacs"] == {"closed": "unreachable", "orthanc": "ok"}


@pytest.mark.django_db
def test_the_answer_names_no_address_or_error(
    healthy: Any, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever reaches /healthz learns which part fails, not where the PACS is nor why: that
    goes to the log."""
    port = free_port()
    services.pacs_node_create(name="closed", ae_title="NOBODY", host="127.0.0.1", port=port)

    response = Client().get("/healthz")

    assert str(port) not in response.content.decode()
    assert "127.0.0.1" not in response.content.decode()
    assert any(
        "closed" in r.getMessage() and "does not answer" in r.getMessage() for r in caplog.records
    )


@pytest.mark.django_db
def test_a_pacs_is_echoed_once_per_cache_period(
    healthy: Any, client: Client, orthanc: OrthancServer
) -> None:
    """Load balancers poll every node every few seconds: the PACS answers one C-ECHO per
    period, whatever the number of polls. Counted on the wire, through a relay."""
    with TcpRelay(orthanc.host, orthanc.dicom_port) as relay:
        services.pacs_node_create(
            name="relayed", ae_title=orthanc.aet, host="127.0.0.1", port=relay.port
        )
        assert get_health(client)[1]["pacs"] == {"relayed": "ok"}
        after_first = relay.meter.total
        assert after_first > 0

        for _ in range(3):
            assert get_health(client)[1]["pacs"] == {"relayed": "ok"}
        assert relay.meter.total == after_first

        # Once the period is over (the cache forgets), the PACS is asked again.
        cache.clear()
        assert get_health(client)[1]["pacs"] == {"relayed": "ok"}
        assert relay.meter.total > after_first


@pytest.mark.django_db
def test_a_pacs_moved_to_another_address_is_echoed_anew(
    healthy: Any, client: Client, orthanc: OrthancServer, orthanc_node: PacsNode
) -> None:
    assert get_health(client)[1]["pacs"] == {"orthanc": "ok"}

    PacsNode.objects.filter(pk=orthanc_node.pk).update(port=free_port())

    assert get_health(client)[1]["pacs"] == {"orthanc": "unreachable"}


@pytest.mark.django_db(transaction=True)
def test_a_database_that_does_not_answer_fails_the_node(tmp_path: Path) -> None:
    """gunicorn serving a portal whose database is on a port nobody listens on: 503, and the
    PACS nodes (which the database lists) unknown."""
    env = {"DATABASE_URL": f"postgres://portal@127.0.0.1:{free_port()}/portal"}
    with PortalServer(workdir=tmp_path / "gunicorn", workers=1, env=env) as web:
        response = requests.get(web.url + "/healthz", timeout=30)

    assert response.status_code == 503
    assert response.json() == {
        "status": "failing",
        "database": "failing",
        "broker": "ok",
        "store": "ok",
        "cache": "ok",
        "pacs": None,
    }


@pytest.mark.django_db
def test_a_shared_cache_that_does_not_answer_fails_the_node(healthy: Any, client: Client) -> None:
    """Lockout attempts in progress and request budgets live in the shared cache: without it
    the node cannot count failures, so it must not take recipients."""
    healthy.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{free_port()}/0",
        }
    }

    status, body = get_health(client)

    assert status == 503
    assert body["cache"] == "failing"
    assert body["database"] == body["broker"] == body["store"] == "ok"
