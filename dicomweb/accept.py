"""Accept header negotiation for WADO-RS (PS3.18 8.7)."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import UID, ExplicitVRLittleEndian


class NotAcceptable(ValueError):
    """No representation the client accepts can be produced."""


@dataclass(frozen=True)
class MediaRange:
    """One comma-separated item of an Accept header."""

    media_type: str  # e.g. multipart/related, application/dicom, */*
    params: dict[str, str]
    q: float = 1.0

    @property
    def part_type(self) -> str:
        """The media type of the parts: ``type`` of multipart/related, or itself."""
        if self.media_type == "multipart/related":
            return self.params.get("type", "*/*")
        return self.media_type


def _split(header: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes."""
    parts, current, quoted = [], [], False
    for char in header:
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, best first (missing: ``*/*``)."""
    if not header or not header.strip():
        return [MediaRange("*/*", {})]
    ranges = []
    for item in _split(header, ","):
        fields = _split(item, ";")
        params: dict[str, str] = {}
        for field in fields[1:]:
            name, _, value = field.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        ranges.append(MediaRange(fields[0].lower(), params, q))
    return sorted(ranges, key=lambda r: -r.q)


def matches(pattern: str, media_type: str) -> bool:
    """Whether an Accept media range (``*/*``, ``image/*``, ``image/jpeg``) covers a type."""
    if pattern in ("*/*", "*"):
        return True
    if pattern.endswith("/*"):
        return media_type.split("/")[0] == pattern[:-2]
    return pattern == media_type


def dicom_transfer_syntax(
    header: str | None, can_produce: set[str], stored: set[str], *, single_ok: bool = False
) -> tuple[str, bool]:
    """The transfer syntax to send DICOM instances in, and whether the answer
    is a single-part application/dicom body.

    ``transfer-syntax=*`` means as stored; no parameter means Explicit VR
    Little Endian (the PS3.18 default); an explicit UID must be producible
    for every instance (``can_produce``).  A single-part ``application/dicom``
    range is honoured only where one instance is asked (``single_ok``): it is
    never answered with a multipart envelope.  Raises NotAcceptable otherwise."""
    for media in parse_accept(header):
        if media.q <= 0:
            continue
        if media.media_type not in ("multipart/related", "*/*", "multipart/*", "application/dicom"):
            continue
        single = media.media_type == "application/dicom"
        if single and not single_ok:
            continue
        if not matches(media.part_type, "application/dicom") and media.part_type != "*/*":
            continue
        ts = media.params.get("transfer-syntax")
        if ts == "*":
            return "*", single
        if ts is None:
            ts = ExplicitVRLittleEndian
        if UID(ts) in can_produce:
            return ts, single
    raise NotAcceptable(
        "no acceptable representation: this archive sends multipart/related; "
        'type="application/dicom" (single-part application/dicom for one instance) '
        f"with transfer-syntax=* (as stored: {', '.join(sorted(stored))}) or one of "
        f"{', '.join(sorted(can_produce))}"
    )


def wants(header: str | None, offered: list[str]) -> str:
    """The first of ``offered`` media types the Accept header allows, for
    single-part resources (metadata, rendered images)."""
    for media in parse_accept(header):
        if media.q <= 0:
            continue
        for candidate in offered:
            if matches(
                media.part_type if media.media_type == "multipart/related" else media.media_type,
                candidate,
            ):
                return candidate
    raise NotAcceptable(f"acceptable media types here: {', '.join(offered)}")
