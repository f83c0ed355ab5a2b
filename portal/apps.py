from pathlib import Path

from django.apps import AppConfig
from django.conf import settings


class PortalConfig(AppConfig):
    name = "portal"

    def ready(self) -> None:
        from django.core.signals import request_finished

        from portal import checks  # noqa: F401  (registers the system checks)
        from portal.logs import forget_request_id

        request_finished.connect(forget_request_id, dispatch_uid="portal.forget_request_id")

        _create_local_folders()


def _create_local_folders() -> None:
    """The folders that local settings name and their users do not create themselves: SQLite's
    (it creates a database file, not its folder), the static root (WhiteNoise warns at every
    start while collectstatic has not made it yet) and the file system broker's (kombu lists
    them on every poll and fails on a missing one). Made here rather than when the settings are
    read, so that importing the settings touches nothing."""
    folders: list[Path] = [Path(settings.STATIC_ROOT)]
    database = settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        folders += [Path(database["NAME"]).parent, Path(database["TEST"]["NAME"]).parent]
    broker = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {})
    for option in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
        if option in broker:
            folders.append(Path(broker[option]))
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
