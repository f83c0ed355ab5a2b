"""Content negotiation for DICOMweb (PS3.18 §8.7): which of the media types a resource offers a
request's Accept header allows."""

from dataclasses import dataclass, field

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
MULTIPART = "multipart/related"


@dataclass(frozen=True)
class MediaRange:
    type: str  # e.g. "multipart/related", "application/dicom+json", "*/*"
    params: dict[str, str] = field(default_factory=dict)

    def matches(self, media_type: str) -> bool:
        if self.type in {"*/*", media_type}:
            return True
        major = media_type.split("/", 1)[0]
        return self.type == f"{major}/*"


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for character in text:
        if character == '"':
            quoted = not quoted
        if character == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(character)
    parts.append("".join(current))
    return parts


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, best first (by q, then as written); an absent or
    empty header accepts anything. Ranges with q=0 are dropped."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges: list[tuple[float, int, MediaRange]] = []
    for position, item in enumerate(_split_outside_quotes(header, ",")):
        pieces = _split_outside_quotes(item, ";")
        media_type = pieces[0].strip().lower()
        if not media_type:
            continue
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            name, _sep, value = piece.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            quality = float(params.pop("q", "1"))
        except ValueError:
            quality = 1.0
        if quality > 0:
            ranges.append((-quality, position, MediaRange(media_type, params)))
    return [media_range for _q, _p, media_range in sorted(ranges, key=lambda r: r[:2])]


def accepts_json(header: str | None) -> str | None:
    """The JSON media type to answer a QIDO-RS or metadata request with, or None (406)."""
    for media_range in parse_accept(header):
        for offered in (DICOM_JSON, JSON):
            if media_range.matches(offered):
                return offered
    return None


def accepts_multipart(header: str | None, part_type: str) -> MediaRange | None:
    """The range of a request that allows `multipart/related; type=<part_type>`, or None.

    The part type may be implied: `*/*` and a bare `multipart/related` take the resource's
    default (PS3.18 §8.7.3.5)."""
    for media_range in parse_accept(header):
        if media_range.type in {"*/*", "multipart/*"}:
            return MediaRange(MULTIPART, {"type": part_type})
        if media_range.type == MULTIPART:
            wanted = media_range.params.get("type", part_type).lower()
            if wanted == part_type:
                return media_range
    return None


def accepts_image(header: str | None, *, only_jpeg: bool = False) -> str | None:
    """The consumer image type to render in (PS3.18 §8.7.4): JPEG unless PNG is preferred."""
    offered = ("image/jpeg",) if only_jpeg else ("image/jpeg", "image/png")
    for media_range in parse_accept(header):
        for media_type in offered:
            if media_range.matches(media_type):
                return media_type
    return None
