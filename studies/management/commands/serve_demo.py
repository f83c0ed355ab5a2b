"""Run the whole portal on one machine for the demo: web server, Celery worker, storage SCP.

Each service runs in its own process group, so that one Ctrl-C reaches this command only and the
services are stopped in order (SIGTERM, then SIGKILL after a grace period). When any service
exits on its own, the others are stopped too: a demo with half its parts gone only confuses.
"""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

# Seconds a service has to stop after SIGTERM before it is killed.
_GRACE_SECONDS = 10.0


class Command(BaseCommand):
    help = (
        "Serve the demo: the web server, a Celery worker and the storage SCP together, "
        "all stopped by Ctrl-C. Production runs them as separate services (see the README)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1", help="Web address (127.0.0.1).")
        parser.add_argument("--port", type=int, default=8000, help="Web port (8000).")
        parser.add_argument(
            "--dicom-port",
            type=int,
            default=settings.DICOM_PORT,
            help=f"Port of the storage SCP ({settings.DICOM_PORT}).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        manage = str(Path(settings.BASE_DIR) / "manage.py")
        python = sys.executable
        services = {
            "storage SCP": [
                python,
                manage,
                "run_storescp",
                "--bind",
                options["host"],
                "--port",
                str(options["dicom_port"]),
            ],
            # One task at a time is plenty for a demo; mingle and gossip only add chatter on
            # the file system broker. The worker embeds Celery beat (the scheduled purge): in
            # production beat is a process of its own, one for the whole site.
            "worker": [
                python,
                "-m",
                "celery",
                "-A",
                "portal",
                "worker",
                "--beat",
                "--pool=solo",
                "--loglevel=INFO",
                "--without-mingle",
                "--without-gossip",
            ],
            "web server": [
                python,
                manage,
                "runserver",
                f"{options['host']}:{options['port']}",
                "--noreload",
                "--skip-checks",
            ],
        }
        stopping = threading.Event()

        def request_stop(signum: int, frame: Any) -> None:
            stopping.set()

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

        processes: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for name, command in services.items():
                processes[name] = subprocess.Popen(command, start_new_session=True)
            self.stdout.write(
                f"\nThe portal is at http://{options['host']}:{options['port']}/ "
                f"(storage SCP {settings.DICOM_AE_TITLE} on port {options['dicom_port']}). "
                "Ctrl-C stops everything.\n"
            )
            self.stdout.flush()
            exited = self._wait(processes, stopping)
        finally:
            _stop_all(processes)
        if exited is not None:
            raise CommandError(f"The {exited} stopped unexpectedly; the demo was shut down.")
        self.stdout.write("The demo is stopped.")

    def _wait(
        self, processes: dict[str, subprocess.Popen[bytes]], stopping: threading.Event
    ) -> str | None:
        """Block until asked to stop (None) or until a service exits (its name)."""
        while not stopping.wait(0.5):
            for name, process in processes.items():
                if process.poll() is not None:
                    return name
        return None


def _stop_all(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    # The web server goes first so that nothing new is queued while the worker finishes.
    for process in reversed(list(processes.values())):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _GRACE_SECONDS
    for process in processes.values():
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
