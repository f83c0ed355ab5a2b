import signal
import sys
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from studies.dicom import is_valid_ae_title
from studies.dimse.storescp import StorageServer


class Command(BaseCommand):
    help = (
        "Run the storage SCP that receives studies from configured PACS nodes "
        "(C-MOVE destination, autoroute, modality push)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=settings.DICOM_PORT)
        parser.add_argument("--bind", default=settings.DICOM_BIND_ADDRESS)
        parser.add_argument("--aet", default=settings.DICOM_AE_TITLE)

    def handle(self, *args: Any, **options: Any) -> None:
        # PORTAL_AE_TITLE and PORTAL_DICOM_PORT are checked at start-up (portal.checks); the
        # options that override them are checked here.
        if not is_valid_ae_title(options["aet"]):
            raise CommandError(
                f"--aet {options['aet']!r} is not a valid AE title: 1 to 16 printable ASCII "
                "characters, no backslash."
            )
        if not 1 <= options["port"] <= 65535:
            raise CommandError(f"--port {options['port']} is not a port number (1-65535).")
        # Each association hands its slices to an indexing thread: a short GIL switch interval
        # keeps that hand-over from delaying the answer to the sender (Python's default, 5 ms,
        # is longer than it takes to receive a CT slice).
        sys.setswitchinterval(0.0005)
        server = StorageServer(ae_title=options["aet"], host=options["bind"], port=options["port"])
        server.start(block=False)
        self.stdout.write(
            f"Storage SCP {options['aet']} listening on {options['bind']}:{options['port']}"
        )
        self.stdout.flush()
        stopping = threading.Event()

        def stop(signum: int, frame: Any) -> None:
            stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        while not stopping.wait(1.0):
            pass
        server.stop()
        self.stdout.write("Storage SCP stopped.")
