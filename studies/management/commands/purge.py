import json
from dataclasses import asdict
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from studies.retention import retention_run


class Command(BaseCommand):
    help = (
        "End expired shares (their access codes are released), delete the study copies no "
        "live share needs (oldest first past PORTAL_STORE_MAX_GB), and clear expired sessions "
        "(Django's clearsessions). Celery beat runs it hourly (studies.tasks.purge); cron or a "
        "systemd timer may run it instead."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="Say what would be deleted; delete nothing."
        )
        parser.add_argument("--json", action="store_true", help="Print the report as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        report = retention_run(dry_run=options["dry_run"])
        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "dry_run": options["dry_run"],
                        **asdict(report),
                    }
                )
            )
            return
        verb = "Would delete" if options["dry_run"] else "Deleted"
        self.stdout.write(
            f"{verb} {len(report.studies)} studies ({report.instances} instances, "
            f"{report.bytes / 1e6:.1f} MB)."
        )
        for uid in report.studies:
            self.stdout.write(f"  {uid}")
        if not options["dry_run"]:
            self.stdout.write(
                f"Released {report.codes_released} access codes of ended shares; removed "
                f"{report.temporary_files} temporary files left by interrupted transfers."
            )
            self.stdout.write("Cleared expired sessions.")
        if report.over_cap_bytes:
            self.stdout.write(
                f"The store is {report.over_cap_bytes / 1e6:.1f} MB over its cap: what it "
                "holds is needed by live shares or is the local archive."
            )
