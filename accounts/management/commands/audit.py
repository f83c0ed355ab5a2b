"""`audit verify | export | prune`: the audit trail from the command line (accounts.audit)."""

import json
from datetime import datetime, time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from accounts import audit


class _Stream:
    """A text stream over the command's stdout, without the newline it adds to each write."""

    def __init__(self, wrapper: OutputWrapper) -> None:
        self.wrapper = wrapper

    def write(self, text: str) -> int:
        self.wrapper.write(text, ending="")
        return len(text)


def parse_since(value: str) -> datetime:
    """A date (from its midnight, local time) or a date and time (ISO 8601)."""
    moment = parse_datetime(value)
    if moment is None:
        day = parse_date(value)
        if day is None:
            raise ValueError(value)
        moment = datetime.combine(day, time.min)
    if timezone.is_naive(moment):
        moment = timezone.make_aware(moment)
    return moment


class Command(BaseCommand):
    help = (
        "The audit trail: verify its hash chain, export it (CSV, JSON lines, FHIR R4 "
        "AuditEvent), or export and prune the events past the retention."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)

        verify = sub.add_parser(
            "verify", help="Check the hash chain; report the first broken link."
        )
        verify.add_argument("--json", action="store_true", help="Print one JSON object.")

        export = sub.add_parser("export", help="Write the events out, oldest first.")
        export.add_argument(
            "--since", help="Only events from this date (YYYY-MM-DD) or time (ISO 8601)."
        )
        export.add_argument(
            "--format",
            required=True,
            choices=audit.EXPORT_FORMATS,
            help="csv; ndjson (one JSON object a line); fhir (a FHIR R4 Bundle of AuditEvent "
            "resources); fhir-ndjson (one AuditEvent resource a line).",
        )
        export.add_argument("--output", type=Path, help="Write to this file (default: stdout).")

        prune = sub.add_parser(
            "prune",
            help="Export the events older than PORTAL_AUDIT_RETENTION_DAYS to a file, then "
            "delete them; the kept events still verify.",
        )
        prune.add_argument("--output", type=Path, required=True, help="A file that must not exist.")
        prune.add_argument("--format", choices=audit.EXPORT_FORMATS, default="ndjson")
        prune.add_argument("--days", type=int, help="Retention in days (default: the setting).")
        prune.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action == "verify":
            self._verify(options)
        elif action == "export":
            self._export(options)
        else:
            self._prune(options)

    def _verify(self, options: dict[str, Any]) -> None:
        report = audit.audit_verify()
        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "intact": report.intact,
                        "events": report.events,
                        "broken_event_id": report.broken_event_id,
                        "broken_at": report.broken_at.isoformat() if report.broken_at else None,
                        "reason": report.reason,
                    }
                )
            )
        elif report.intact:
            self.stdout.write(f"intact, {report.events} events")
        if not report.intact:
            at = report.broken_at.isoformat() if report.broken_at else "-"
            raise CommandError(
                f"broken at event {report.broken_event_id} ({at}): {report.reason}; "
                f"{report.events} events before it verify"
            )

    def _export(self, options: dict[str, Any]) -> None:
        since = None
        if options["since"]:
            try:
                since = parse_since(options["since"])
            except ValueError:
                raise CommandError(
                    f"--since {options['since']!r}: give a date (2026-01-31) or an ISO 8601 time."
                ) from None
        events = audit.events_for_export(since=since)
        output: Path | None = options["output"]
        if output is None:
            audit.audit_export(events, _Stream(self.stdout), fmt=options["format"])
            return
        with output.open("w", encoding="utf-8", newline="") as out:
            count = audit.audit_export(events, out, fmt=options["format"])
        self.stderr.write(f"{count} events written to {output}")

    def _prune(self, options: dict[str, Any]) -> None:
        try:
            report = audit.audit_prune(
                output=options["output"], fmt=options["format"], days=options["days"]
            )
        except (FileExistsError, audit.AuditChainBroken) as exc:
            raise CommandError(f"{exc}; nothing was pruned.") from exc
        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "pruned": report.events,
                        "through": report.through.isoformat() if report.through else None,
                        "output": str(report.output) if report.output else None,
                    }
                )
            )
        elif report.events:
            self.stdout.write(
                f"Pruned {report.events} events (through {report.through:%Y-%m-%d %H:%M:%S}), "
                f"exported to {report.output}."
            )
        else:
            self.stdout.write("No event is older than the retention: nothing pruned.")
