"""`createstaff USERNAME --email ADDR [--role …] [--password-stdin] [--totp]`."""

import getpass
import sys
from typing import Any

from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.validators import validate_email
from django.db import transaction
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts.models import User


class Command(BaseCommand):
    help = "Create a member of staff (or update one: password, role, e-mail)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--email", required=True)
        parser.add_argument("--role", choices=User.Role.values, default=User.Role.SHARER)
        parser.add_argument(
            "--password-stdin",
            action="store_true",
            help="Read the password from standard input instead of prompting.",
        )
        parser.add_argument(
            "--totp",
            action="store_true",
            help="Enrol a TOTP device and print its otpauth:// URI for an authenticator app.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        username = options["username"]
        email = options["email"]
        try:
            validate_email(email)
        except ValidationError:
            raise CommandError(f"{email!r} is not a valid e-mail address.") from None
        password = self._read_password(options["password_stdin"])
        user = User.objects.filter(username=username).first() or User(username=username)
        user.email = email
        user.role = options["role"]
        try:
            validate_password(password, user)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from exc
        user.set_password(password)
        # Administrators reach the Django admin (behind its second factor); others do not.
        user.is_staff = user.role == User.Role.ADMIN
        user.is_superuser = user.role == User.Role.ADMIN
        with transaction.atomic():
            user.save()
            device = None
            if options["totp"]:
                TOTPDevice.objects.filter(user=user, name="authenticator").delete()
                device = TOTPDevice.objects.create(user=user, name="authenticator", confirmed=True)
        self.stdout.write(f"Staff user {user.username!r} ({user.role}) saved.")
        if device is not None:
            self.stdout.write(device.config_url)

    def _read_password(self, from_stdin: bool) -> str:
        if from_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass("Password: ")
            if password != getpass.getpass("Password (again): "):
                raise CommandError("The passwords do not match.")
        if not password:
            raise CommandError("The password is empty.")
        return password
