"""The portal served by gunicorn, as in production: several worker processes, its access log
on, the test's database, Redis as the shared cache (REDIS_URL) under a key prefix of its own."""

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from django.conf import settings

from tests.support import Service, free_port, terminate
from tests.support.worker import database_url

# The client address, the request line, the status and the worker's process id.
ACCESS_LOG_FORMAT = '%(h)s "%(r)s" %(s)s pid=%(p)s'


class GunicornError(RuntimeError):
    """gunicorn did not start."""


class PortalServer(Service):
    def __init__(
        self,
        *,
        workdir: Path,
        workers: int = 2,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        config: Path | None = None,
    ) -> None:
        """With `config` (deploy/gunicorn.conf.py), gunicorn runs with that file, as in
        production (its worker class, timeouts and redacting logger); its error log then goes
        to a file of its own (`error_log`), apart from the application's output."""
        self.workdir = workdir
        self.workers = workers
        # More gunicorn options (`--threads 4`…), after the ones given here.
        self.args = list(args)
        self.config = config
        self.error_log = workdir / "gunicorn-error.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_log = workdir / "access.log"
        self.app_log = workdir / "app.log"
        self.sms_dir = workdir / "sms"
        self.extra_env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PORTAL_", "CELERY_")) and key != "DATABASE_URL"
        }
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "tests.support.server_settings",
                "DATABASE_URL": database_url(),
                "PORTAL_SECRET_KEY": str(settings.SECRET_KEY),
                "PORTAL_BASE_URL": self.url,
                "PORTAL_ALLOWED_HOSTS": "127.0.0.1",
                "PORTAL_BROKER_DIR": str(self.workdir / "broker"),
                "PORTAL_STORE_DIR": str(self.workdir / "store"),
                "PORTAL_SMS_BACKEND": "file",
                "PORTAL_SMS_FILE_PATH": str(self.sms_dir),
                "PORTAL_LOG_LEVEL": "DEBUG",
            }
        )
        redis_url = os.environ.get("REDIS_URL", "")
        if redis_url:
            env["PORTAL_CACHE_URL"] = redis_url
            env["PORTAL_CACHE_KEY_PREFIX"] = f"portal-test-{uuid.uuid4().hex[:12]}"
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60.0) -> "PortalServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "portal.wsgi:application",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            str(self.workers),
            "--access-logfile",
            str(self.access_log),
        ]
        if self.config is None:
            command += ["--access-logformat", ACCESS_LOG_FORMAT, "--error-logfile", "-"]
        else:
            command += ["--config", str(self.config), "--error-logfile", str(self.error_log)]
        command += self.args
        with self.app_log.open("ab") as log:
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
                raise GunicornError(f"gunicorn exited at start-up:\n{self.logs()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise GunicornError(f"gunicorn did not listen within {timeout} s:\n{self.logs()}")

    def stop(self) -> None:
        terminate(self.process)
        self.process = None

    def logs(self) -> str:
        """The access log, gunicorn's error log and the application's log."""
        text = ""
        for path in (self.access_log, self.error_log, self.app_log):
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        return text

    def worker_pids(self) -> set[str]:
        """The workers that served a request, as the access log says."""
        lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
        return {line.rsplit("pid=", 1)[1] for line in lines if "pid=" in line}
