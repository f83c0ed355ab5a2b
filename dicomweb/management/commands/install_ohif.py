import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from dicomweb import ohif
from dicomweb.ohif.install import PINNED, OhifInstallError, ohif_install


class Command(BaseCommand):
    help = (
        f"Fetch the OHIF viewer ({ohif.PACKAGE} {ohif.VERSION}) from the npm registry, check it "
        "against the pinned checksum and install it where the portal serves it under /ohif/ "
        "(PORTAL_OHIF_DIR). Does nothing when that version is already installed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--tarball",
            type=Path,
            help="Install from this package file instead of asking the registry "
            "(it must match the pinned checksum all the same).",
        )
        parser.add_argument(
            "--force", action="store_true", help="Install again even if already installed."
        )
        parser.add_argument("--json", action="store_true", help="Print the outcome as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            installed = ohif_install(tarball=options["tarball"], force=options["force"])
        except OhifInstallError as exc:
            raise CommandError(str(exc)) from exc
        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "version": PINNED.version,
                        "integrity": PINNED.integrity,
                        "directory": str(ohif.directory()),
                        "installed": installed,
                    }
                )
            )
        elif installed:
            self.stdout.write(f"OHIF {PINNED.version} installed in {ohif.directory()}.")
        else:
            self.stdout.write(f"OHIF {PINNED.version} is already installed in {ohif.directory()}.")
