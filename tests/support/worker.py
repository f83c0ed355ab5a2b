"""A real Celery worker in a subprocess, sharing the test's database, store and broker.

The broker is Redis when REDIS_URL is set (CI), the file system broker in a private folder
otherwise. Each worker consumes a queue of its own name, so that parallel runs against one Redis
never take each other's messages; workers given the same queue share its messages, as the
workers of several machines do. `producer_app()` makes `retrieve_study.delay()` in the test
process publish where this worker listens.
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from celery import Celery
from django.conf import settings
from django.db import connection

import portal.celery
from tests.support import Service, terminate


class WorkerError(RuntimeError):
    """The worker did not start."""


def database_url() -> str:
    """The URL of the database this process is connected to: inside a test, the test database."""
    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        name = str(db["NAME"])
        if name == ":memory:" or name.startswith("file:"):
            raise WorkerError("a worker in another process cannot share an in-memory database")
        return f"sqlite:///{Path(name).resolve()}"
    if db["ENGINE"] == "django.db.backends.postgresql":
        credentials = quote(db["USER"] or "", safe="")
        if db["PASSWORD"]:
            credentials += ":" + quote(db["PASSWORD"], safe="")
        host = db["HOST"] or "127.0.0.1"
        port = f":{db['PORT']}" if db["PORT"] else ""
        return f"postgres://{credentials}@{host}{port}/{quote(db['NAME'], safe='')}"
    raise WorkerError(f"no database URL for engine {db['ENGINE']}")


class CeleryWorker(Service):
    """`celery -A portal worker --pool=solo` with its own queue (or the one given), as a
    context manager."""

    def __init__(
        self,
        *,
        workdir: Path,
        env: dict[str, str] | None = None,
        queue: str | None = None,
        name: str | None = None,
    ) -> None:
        self.workdir = workdir
        # The worker's store: a test points settings.STORE_DIR here to see what it wrote.
        self.store_dir = workdir / "store"
        # Several workers given one `queue` share its messages, as the workers of several
        # machines do; each then needs a `name` of its own (Celery's node name, -n).
        self.queue = queue or f"portal-test-{uuid.uuid4().hex[:12]}"
        self.hostname = f"{name or self.queue}@localhost"
        redis_url = os.environ.get("REDIS_URL", "")
        self.broker_url = redis_url or "filesystem://localhost/"
        self.broker_dir = workdir / "broker"
        self.transport_options: dict[str, Any] = {}
        if not redis_url:
            self.transport_options = {
                "data_folder_in": str(self.broker_dir / "queue"),
                "data_folder_out": str(self.broker_dir / "queue"),
                "processed_folder": str(self.broker_dir / "processed"),
                "control_folder": str(self.broker_dir / "control"),
            }
        self.extra_env = dict(env or {})
        self.log_path = workdir / "worker.log"
        self.process: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PORTAL_", "CELERY_")) and key != "DATABASE_URL"
        }
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "portal.settings",
                "DATABASE_URL": database_url(),
                "CELERY_BROKER_URL": self.broker_url,
                "PORTAL_BROKER_DIR": str(self.broker_dir),
                "PORTAL_STORE_DIR": str(self.store_dir),
                "PORTAL_AE_TITLE": str(settings.DICOM_AE_TITLE),
                "PORTAL_SECRET_KEY": str(settings.SECRET_KEY),
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60.0) -> "CeleryWorker":
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "portal",
            "worker",
            "--pool=solo",
            "--queues",
            self.queue,
            "--hostname",
            self.hostname,
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            "--loglevel=INFO",
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=settings.BASE_DIR,
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise WorkerError(f"the worker exited at start-up:\n{self.log_tail()}")
            if " ready." in self.log():
                return self
            time.sleep(0.1)
        self.stop()
        raise WorkerError(f"the worker was not ready within {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 2.0) -> None:
        """Cold shutdown, then SIGKILL: the tests wait for their tasks themselves, and the file
        system transport takes seconds to notice a warm shutdown."""
        terminate(self.process, signal.SIGQUIT, timeout)
        self.process = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    @contextmanager
    def producer_app(self) -> Iterator[Celery]:
        """Within this block, tasks sent from this process go to this worker's queue."""
        app = Celery("portal", set_as_current=False)
        app.config_from_object("django.conf:settings", namespace="CELERY")
        app.conf.update(
            broker_url=self.broker_url,
            broker_transport_options=self.transport_options,
            task_default_queue=self.queue,
            task_always_eager=False,
        )
        app.set_current()
        try:
            yield app
        finally:
            portal.celery.app.set_current()
            app.close()
