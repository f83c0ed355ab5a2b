import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from studies import imports


class Command(BaseCommand):
    help = (
        "Import DICOM files, folders or a CD (its folder or its DICOMDIR) into the local archive."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("paths", nargs="+", type=Path, metavar="PATH")
        parser.add_argument("--json", action="store_true", help="Print the report as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        report = imports.dicom_import(options["paths"])
        error = ""
        if report.error:
            error = f"The import stopped: the store cannot take more files ({report.error})."
        elif report.skipped and not report.imported and not report.already_present:
            error = "Nothing could be imported."
        if options["json"]:
            result: dict[str, Any] = {
                "imported": report.imported,
                "already_present": report.already_present,
                "studies": sorted(report.studies),
                "skipped": [{"path": p, "reason": r} for p, r in report.skipped],
            }
            if error:
                result["error"] = error
            self.stdout.write(json.dumps(result))
        else:
            self.stdout.write(
                f"Imported {report.imported} instances ({report.already_present} already present) "
                f"in {len(report.studies)} studies."
            )
            for path, reason in report.skipped:
                self.stderr.write(f"skipped {path}: {reason}")
        if error:
            raise CommandError(error)
