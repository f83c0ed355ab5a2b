"""`passkeys list [--email ADDR] | delete ID`: referring physicians' passkeys.

A passkey opens every later share sent to its physician's address without an emailed code;
staff delete one when the physician asks (a lost phone) or did not create it. Deleting is an
audit event and the physician is told by email.
"""

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts import selectors, services
from accounts.models import PhysicianPasskey


def passkey_as_dict(passkey: PhysicianPasskey) -> dict[str, Any]:
    return {
        "id": passkey.pk,
        "email": passkey.email,
        "created_at": passkey.created_at.isoformat(),
        "last_used_at": passkey.last_used_at.isoformat() if passkey.last_used_at else None,
        "usable": selectors.passkey_is_usable(passkey),
        "enrolled_with_share": passkey.enrolled_with_id,
    }


class Command(BaseCommand):
    help = "List or delete referring physicians' passkeys."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="Every passkey, or those of one address.")
        listing.add_argument("--email", default="", help="Only this physician's passkeys.")
        listing.add_argument("--json", action="store_true", help="Print one JSON list.")
        delete = sub.add_parser("delete", help="Delete a passkey; its physician is told.")
        delete.add_argument("id", type=int)
        delete.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["action"] == "delete":
            passkey = PhysicianPasskey.objects.filter(pk=options["id"]).first()
            if passkey is None:
                raise CommandError(f"No passkey {options['id']}.")
            deleted = passkey_as_dict(passkey)
            services.passkey_delete(passkey=passkey)
            if options["json"]:
                self.stdout.write(json.dumps({"deleted": deleted}))
            else:
                self.stdout.write(f"Deleted passkey {deleted['id']} of {deleted['email']}.")
            return
        rows = [passkey_as_dict(p) for p in selectors.passkey_list(email=options["email"])]
        if options["json"]:
            self.stdout.write(json.dumps(rows))
            return
        for row in rows:
            state = "usable" if row["usable"] else "idle (no longer signs in)"
            used = row["last_used_at"] or "never"
            self.stdout.write(
                f"{row['id']:>6}  {row['email']}  created {row['created_at']}  "
                f"last used {used}  {state}"
            )
