import json
from dataclasses import asdict
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from studies.retention import store_purge


class Command(BaseCommand):
    help = (
        "End expired shares (their access codes are released), delete the study copies no "
        "live share needs, and clear expired sessions (Django's clearsessions). Run it hourly, "
        "from cron or a systemd timer."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="Say what would be deleted; delete nothing."
        )
        parser.add_argument("--json", action="store_true", help="Print the report as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        report = store_purge(dry_run=options["dry_run"])
        # Sessions past their expiry stay in the database until this runs: each visitor who
        # ever got one (a recipient, a staff member) left a row.
        sessions_cleared = not options["dry_run"]
        if sessions_cleared:
            call_command("clearsessions")
        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "dry_run": options["dry_run"],
                        **asdict(report),
                        "expired_sessions_cleared": sessions_cleared,
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
