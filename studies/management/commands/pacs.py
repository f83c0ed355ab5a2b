import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from studies import services
from studies.dimse import pacs
from studies.models import PacsNode


def node_as_dict(node: PacsNode) -> dict[str, Any]:
    return {
        "name": node.name,
        "aet": node.ae_title,
        "host": node.host,
        "port": node.port,
        "dicomweb": node.dicomweb_url,
        "retrieve": node.retrieve_method,
    }


class Command(BaseCommand):
    help = "Configure the PACS nodes the portal queries, retrieves from and accepts images from."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="{add,list,echo,remove}")
        add = sub.add_parser("add", help="Add a PACS node.")
        add.add_argument("name", help="A short name, e.g. main-pacs.")
        add.add_argument("--aet", required=True, help="The node's AE title.")
        add.add_argument("--host", required=True)
        add.add_argument("--port", required=True, type=int)
        add.add_argument("--dicomweb", default="", help="Base URL of its DICOMweb service.")
        add.add_argument(
            "--retrieve",
            choices=[c.value for c in PacsNode.Retrieve],
            default=PacsNode.Retrieve.MOVE.value,
            help="How studies are retrieved (default: move).",
        )
        add.add_argument("--json", action="store_true", help="Print the node as JSON.")
        listing = sub.add_parser("list", help="List the configured nodes.")
        listing.add_argument("--json", action="store_true")
        echo = sub.add_parser("echo", help="Check that a node answers (C-ECHO).")
        echo.add_argument("name")
        echo.add_argument("--json", action="store_true")
        remove = sub.add_parser("remove", help="Remove a node.")
        remove.add_argument("name")
        remove.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        getattr(self, f"handle_{options['action']}")(**options)

    def _node(self, name: str) -> PacsNode:
        try:
            return PacsNode.objects.get(name=name)
        except PacsNode.DoesNotExist:
            raise CommandError(f"No PACS node named {name!r} (see `pacs list`).") from None

    def handle_add(self, **options: Any) -> None:
        try:
            node = services.pacs_node_create(
                name=options["name"],
                ae_title=options["aet"],
                host=options["host"],
                port=options["port"],
                dicomweb_url=options["dicomweb"],
                retrieve_method=options["retrieve"],
            )
        except ValidationError as exc:
            details = "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
            raise CommandError(f"Cannot add the node: {details}") from exc
        if options["json"]:
            self.stdout.write(json.dumps(node_as_dict(node)))
        else:
            self.stdout.write(f"Added {node}.")

    def handle_list(self, **options: Any) -> None:
        nodes = list(PacsNode.objects.all())
        if options["json"]:
            self.stdout.write(json.dumps([node_as_dict(n) for n in nodes]))
            return
        if not nodes:
            self.stdout.write("No PACS node is configured. Add one with `pacs add`.")
        for node in nodes:
            extra = f" dicomweb={node.dicomweb_url}" if node.dicomweb_url else ""
            self.stdout.write(f"{node} retrieve={node.retrieve_method}{extra}")

    def handle_echo(self, **options: Any) -> None:
        node = self._node(options["name"])
        try:
            pacs.echo(pacs.Peer.of(node))
        except pacs.PacsError as exc:
            if options["json"]:
                self.stdout.write(json.dumps({"name": node.name, "ok": False, "error": str(exc)}))
            raise CommandError(str(exc)) from exc
        if options["json"]:
            self.stdout.write(json.dumps({"name": node.name, "ok": True}))
        else:
            self.stdout.write(f"{node.name} answered the C-ECHO.")

    def handle_remove(self, **options: Any) -> None:
        node = self._node(options["name"])
        try:
            services.pacs_node_delete(node=node)
        except services.PacsNodeInUse as exc:
            raise CommandError(
                f"{node.name} has {exc.jobs} retrieval jobs queued or running: "
                "remove it once they are done."
            ) from exc
        if options["json"]:
            self.stdout.write(json.dumps({"name": options["name"], "removed": True}))
        else:
            self.stdout.write(f"Removed {options['name']}.")
