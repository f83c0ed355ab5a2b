"""`recipients close [--message TEXT] | open | status`: the emergency close of recipient access.

While closed, every recipient URL answers 503 with a maintenance page and every recipient
session ends at its next request; staff work goes on. The state is in the database, so one
command closes every process and machine at once; closing and opening are audit events.
"""

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from accounts import selectors, services


class Command(BaseCommand):
    help = "Close recipient access at once (portal under attack), open it again, or show it."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        close = sub.add_parser("close", help="Close every recipient URL now.")
        close.add_argument(
            "--message", default="", help="Shown to recipients on the maintenance page."
        )
        close.add_argument("--json", action="store_true", help="Print one JSON object.")
        opening = sub.add_parser("open", help="Let recipients in again.")
        opening.add_argument("--json", action="store_true", help="Print one JSON object.")
        status = sub.add_parser("status", help="Whether recipient access is open or closed.")
        status.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["action"] == "close":
            services.recipients_close(message=options["message"])
        elif options["action"] == "open":
            services.recipients_open()
        state = selectors.recipient_access()
        closure = state.closure
        result = {
            "closed": closure is not None,
            "since": closure.since.isoformat() if closure else None,
            "message": closure.message if closure else "",
            "last_closed_at": state.last_closed_at.isoformat() if state.last_closed_at else None,
        }
        if options["json"]:
            self.stdout.write(json.dumps(result))
        elif closure is not None:
            self.stdout.write(f"Recipient access is CLOSED since {result['since']}.")
            if closure.message:
                self.stdout.write(f"Message: {closure.message}")
        else:
            self.stdout.write("Recipient access is open.")
