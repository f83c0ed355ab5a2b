"""French and English: every string of the portal is translated, and the switch works."""

import gettext
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client

from tests.support.access import open_link, sms_messages

LOCALE = Path(__file__).resolve().parent.parent / "locale"


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), text)


def _po_entries(path: Path) -> list[tuple[str, list[str], list[str]]]:
    """(msgid, msgstr values, flags) of each entry of a .po file, header excluded."""
    entries = []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        flags = [f for line in lines if line.startswith("#,") for f in line[2:].split(",")]
        current = None
        parts: dict[str, list[str]] = {}
        for line in lines:
            if line.startswith("#"):
                continue
            match = re.match(r'^(msgid|msgid_plural|msgstr(?:\[\d\])?) "(.*)"$', line)
            if match:
                current = match.group(1)
                parts.setdefault(current, []).append(_unescape(match.group(2)))
            elif line.startswith('"') and current:
                parts[current].append(_unescape(line[1:-1]))
        msgid = "".join(parts.get("msgid", []))
        if not msgid:
            continue
        strs = ["".join(v) for k, v in parts.items() if k.startswith("msgstr")]
        entries.append((msgid, strs, [f.strip() for f in flags]))
    return entries


def test_every_french_string_is_translated_and_compiled() -> None:
    po = LOCALE / "fr" / "LC_MESSAGES" / "django.po"
    entries = _po_entries(po)
    assert len(entries) > 100
    untranslated = [msgid for msgid, strs, _ in entries if not strs or not all(strs)]
    fuzzy = [msgid for msgid, _, flags in entries if "fuzzy" in flags]
    assert untranslated == [] and fuzzy == []
    with (po.with_suffix(".mo")).open("rb") as handle:
        catalog = gettext.GNUTranslations(handle)
    for msgid, strs, _ in entries:
        if len(strs) == 1:
            assert catalog.gettext(msgid) == strs[0], f"django.mo is older than django.po: {msgid}"


@pytest.mark.django_db
def test_pages_speak_french_to_french_browsers() -> None:
    page = Client().get("/access/", HTTP_ACCEPT_LANGUAGE="fr-FR,fr;q=0.9").content.decode()
    assert '<html lang="fr">' in page
    assert "Voir vos images" in page and "Continuer" in page


@pytest.mark.django_db
def test_the_language_switch_sticks() -> None:
    client = Client()
    response = client.post("/i18n/setlang/", {"language": "fr", "next": "/access/"})
    assert response.status_code == 302 and response["Location"] == "/access/"
    assert "Continuer" in client.get("/access/").content.decode()
    client.post("/i18n/setlang/", {"language": "en", "next": "/access/"})
    assert "Continue" in client.get("/access/").content.decode()


@pytest.mark.django_db
def test_the_one_time_code_message_is_translated(share, sms_dir) -> None:
    client = Client(HTTP_ACCEPT_LANGUAGE="fr")
    open_link(client, share)
    client.post("/access/verify", {"action": "send"})
    assert "est votre code pour voir vos images" in sms_messages(sms_dir)[0]["body"]


def test_every_string_of_the_code_and_templates_is_in_the_french_catalogue(
    tmp_path: Path,
) -> None:
    """makemessages, run on a copy of the project, finds no string the catalogue lacks."""
    root = LOCALE.parent
    copy = tmp_path / "project"
    skip = shutil.ignore_patterns(".*", "var", "node_modules", "__pycache__", "tests", "*.mo")
    shutil.copytree(root, copy, ignore=skip)
    result = subprocess.run(
        [sys.executable, "manage.py", "makemessages", "-l", "fr", "--no-obsolete"],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    entries = _po_entries(copy / "locale" / "fr" / "LC_MESSAGES" / "django.po")
    missing = [msgid for msgid, strs, flags in entries if not all(strs) or "fuzzy" in flags]
    assert missing == []
