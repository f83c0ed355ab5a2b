"""What /healthz reports: whether this node can serve, part by part.

- `database`: a query answers;
- `broker`: the Celery broker accepts a connection within PORTAL_HEALTH_TIMEOUT seconds
  (without it no study is retrieved);
- `store`: the store's folder takes a file and its disk has PORTAL_HEALTH_MIN_FREE_MB free;
- `cache`: the shared cache (Redis in production) takes and gives back a value: lockout
  attempts in progress and request budgets are counted there (accounts.throttle);
- `pacs`: each configured node answers a C-ECHO. The answer is kept in the shared cache for
  PORTAL_HEALTH_PACS_CACHE_SECONDS: a load balancer polls every few seconds, from every node,
  and a PACS has better things to do than answer all of them.

The answer names the parts and their state only. /healthz is reachable by anyone the proxy lets
through, so why a part fails (addresses, error texts, disk figures) goes to the log instead.
"""

import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field

from django.conf import settings
from django.core.cache import cache
from django.db import DatabaseError, connection
from kombu import Connection

from studies.dimse import pacs
from studies.models import PacsNode
from studies.store import INCOMING, store_dir

logger = logging.getLogger(__name__)

OK = "ok"
FAILING = "failing"
UNREACHABLE = "unreachable"


@dataclass
class Health:
    database: str = OK
    broker: str = OK
    store: str = OK
    cache: str = OK
    # Node name → OK or UNREACHABLE; None when the database could not list the nodes.
    pacs: dict[str, str] | None = field(default_factory=dict)

    @property
    def serving(self) -> bool:
        """Whether this node can serve recipients and staff: what a load balancer asks.

        A PACS that does not answer is not part of it: every study already in the store is
        still served, and the PACS is shared by every node, so a load balancer that took the
        nodes out for it would take them all out and serve nobody."""
        return OK == self.database == self.broker == self.store == self.cache

    @property
    def status(self) -> str:
        if not self.serving:
            return FAILING
        if self.pacs is None or any(state != OK for state in self.pacs.values()):
            return "degraded"
        return OK

    def as_json(self) -> dict[str, object]:
        return {
            "status": self.status,
            "database": self.database,
            "broker": self.broker,
            "store": self.store,
            "cache": self.cache,
            "pacs": self.pacs,
        }


def database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:
        logger.warning("health: the database does not answer: %s", type(exc).__name__)
        return False
    return True


def broker_ok() -> bool:
    timeout = settings.HEALTH_TIMEOUT
    broker = Connection(
        settings.CELERY_BROKER_URL,
        transport_options=getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}),
        connect_timeout=timeout,
    )
    try:
        # One try, no retry loop: a load balancer waits for the answer.
        broker.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
    except Exception as exc:
        logger.warning("health: the broker does not answer: %s", type(exc).__name__)
        return False
    finally:
        broker.release()
    return True


def store_ok() -> bool:
    """The store's folder takes a file (where the storage SCP writes its incoming files) and
    its disk has the free space the settings ask for."""
    incoming = store_dir() / INCOMING
    try:
        incoming.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=incoming, prefix="health-", suffix=".probe") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        free = shutil.disk_usage(incoming).free
    except OSError as exc:
        logger.warning("health: the store cannot be written: %s", exc.strerror)
        return False
    if free < settings.HEALTH_MIN_FREE_BYTES:
        logger.warning(
            "health: the store's disk has %d MB free, less than the %d MB asked",
            free >> 20,
            settings.HEALTH_MIN_FREE_BYTES >> 20,
        )
        return False
    return True


def cache_ok() -> bool:
    key = f"health:probe:{uuid.uuid4().hex}"
    try:
        cache.set(key, "ok", 10)
        answered = cache.get(key) == "ok"
        cache.delete(key)
    except Exception as exc:
        logger.warning("health: the cache does not answer: %s", type(exc).__name__)
        return False
    return answered


def _pacs_cache_key(node: PacsNode) -> str:
    # The address is part of the key: a node changed to another address is echoed anew.
    return f"health:pacs:{node.pk}:{node.ae_title}@{node.host}:{node.port}"


def pacs_reachable(node: PacsNode) -> bool:
    """Whether the node answered a C-ECHO, at most PORTAL_HEALTH_PACS_CACHE_SECONDS ago."""
    key = _pacs_cache_key(node)
    try:
        known = cache.get(key)
    except Exception:  # reported as the cache's failure; the echo itself still tells
        known = None
    if known is not None:
        return bool(known)
    try:
        pacs.echo(pacs.Peer.of(node), timeout=settings.HEALTH_TIMEOUT)
        reachable = True
    except pacs.PacsError as exc:
        logger.warning("health: PACS %s does not answer: %s", node.name, exc)
        reachable = False
    try:
        cache.set(key, reachable, settings.HEALTH_PACS_CACHE_SECONDS)
    except Exception as exc:
        logger.debug("health: C-ECHO of %s not remembered: %s", node.name, type(exc).__name__)
    return reachable


def health() -> Health:
    report = Health()
    if not database_ok():
        report.database = FAILING
        report.pacs = None
    if not broker_ok():
        report.broker = FAILING
    if not store_ok():
        report.store = FAILING
    if not cache_ok():
        report.cache = FAILING
    if report.pacs is not None:
        try:
            nodes = list(PacsNode.objects.order_by("name"))
        except DatabaseError as exc:
            # The database answers but not this query (a migration not applied yet).
            logger.warning("health: cannot list the PACS nodes: %s", type(exc).__name__)
            report.pacs = None
            return report
        report.pacs = {node.name: OK if pacs_reachable(node) else UNREACHABLE for node in nodes}
    return report
