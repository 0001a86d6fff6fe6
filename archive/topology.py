"""The region's topology as typed records: the producing sites, the DICOM
peers that speak for them, and the routes that forward data between systems.

They are the ``[[sites]]``, ``[[dicom.peers]]`` and ``[[routes]]`` tables of
the configuration file (or the JSON arrays of ``IMAG_SITES``,
``IMAG_DICOM_PEERS``, ``IMAG_ROUTES``).  :mod:`archive.config` reads and
validates them through :meth:`Peer.from_toml`, :meth:`Site.from_toml` and
:meth:`Route.from_toml`; ingest, stability, routing and the DICOM services
read the records' attributes, so a key is spelt once, here, and a misspelt
attribute fails at import-time checks instead of at the first delivery.

This module holds the one definition of the stored transfer syntax policy
names (:data:`STORE_AS`) and of the route match keys (:data:`ROUTE_MATCH`,
the fields of :class:`RouteMatch`).  It imports nothing of the configuration
loader, so domain modules may depend on it without depending on the loader.

Validation errors are :class:`TypeError` with the "expected ..." phrase that
:func:`archive.config.load_config` wraps into a ``ConfigError`` naming the
setting and where its value came from.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from archive.security.scope import Scope

#: stored transfer syntax policies, per producing site or as the default
STORE_AS: tuple[str, ...] = (
    "as-received",
    "htj2k-lossless",
    "j2k-lossless",
    "jpegls-lossless",
    "rle-lossless",
)
#: when a route fires: for each stored instance, or once a study is stable
ROUTE_WHEN: tuple[str, ...] = ("instance", "stable")
#: what a route does: send copies elsewhere (``forward``), or ask for the
#: study to be read (``read``: a request on the teleradiology worklist)
ROUTE_KINDS: tuple[str, ...] = ("forward", "read")
#: the priorities a ``read`` route may give its requests
READ_PRIORITIES: tuple[str, ...] = ("STAT", "URGENT", "ROUTINE")
#: the longest stable_after_seconds accepted (a week)
MAX_STABLE_AFTER = 7 * 86400


# -- value checks (the wording of archive.config's, which cannot be imported here) ----------


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a string")
    return value


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _whole(value: Any, lo: int, hi: int) -> int:
    expected = f"an integer between {lo} and {hi}"
    if isinstance(value, bool):
        raise TypeError(expected)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise TypeError(expected) from None
    if not lo <= number <= hi:
        raise TypeError(expected)
    return number


def flag(value: Any) -> bool:
    """true / false, also from the environment's strings (1, yes, on / 0, no, off)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise TypeError("true or false")


def time_zone(value: Any) -> str:
    """An IANA time zone name that this machine's time zone data knows
    (``America/Martinique``, ``Europe/Paris``)."""
    expected = "an IANA time zone name such as Europe/Paris or America/Martinique"
    text = _text(value)
    try:
        zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise TypeError(f"{expected} (unknown: {text!r})") from None
    return text


def _ae_title(value: Any) -> str:
    text = _text(value)
    if not 1 <= len(text) <= 16 or not text.isascii() or "\\" in text or text != text.strip():
        raise TypeError("an AE title of 1-16 ASCII characters without backslash or edge spaces")
    return text


# -- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A known remote AE (``[[dicom.peers]]``): who may associate, from which
    host, and which site it speaks for (a regional peer speaks for all)."""

    aet: str
    host: str = "*"  # address or host name; "*" = any address
    port: int = 104
    site: str = ""
    regional: bool = False

    KEYS = ("aet", "host", "port", "site", "regional")

    @classmethod
    def from_toml(cls, table: Any, number: int = 1) -> Peer:
        """The peer of one ``[[dicom.peers]]`` table (``number`` counts from 1,
        for the messages).  Raises TypeError saying what was expected."""
        if isinstance(table, cls):
            return table
        if not isinstance(table, Mapping):
            raise TypeError(f"a table for peer #{number}")
        unknown = set(table) - set(cls.KEYS)
        if unknown:
            raise TypeError(
                f"peer #{number}: only {', '.join(cls.KEYS)} "
                f"(unknown: {', '.join(sorted(unknown))})"
            )
        try:
            return cls(
                aet=_ae_title(table.get("aet")),
                host=_text(table.get("host", "*")),
                port=_whole(table.get("port", 104), 0, 65535),
                site=_text(table.get("site", "")),
                regional=flag(table.get("regional", False)),
            )
        except TypeError as exc:
            raise TypeError(f"peer #{number} ({table.get('aet')!r}): {exc}") from None

    def as_toml(self) -> dict[str, Any]:
        """The ``[[dicom.peers]]`` table of this peer (for ``imag config show``)."""
        return {key: getattr(self, key) for key in self.KEYS}

    @property
    def scope(self) -> Scope | None:
        """The studies this peer may find and retrieve: its site's; None = all."""
        return None if self.regional else Scope(frozenset([self.site]))


@dataclass(frozen=True)
class Site:
    """A producing site (``[[sites]]``) and its own policies, where they
    differ from the archive-wide ``store_as`` and ``stable_after_seconds``;
    for the orientation directory, its local time zone (the on-call rota is
    read in it), a label for people and the region it belongs to."""

    name: str
    store_as: str | None = None  # one of STORE_AS; None: the default store_as
    stable_after_seconds: int | None = None  # None: the default stable_after_seconds
    time_zone: str | None = None  # IANA name; None: the setting orientation.time_zone
    label: str = ""
    region: str = ""  # e.g. "martinique": rota rules and holidays may name it

    KEYS = ("name", "store_as", "stable_after_seconds", "time_zone", "label", "region")

    @classmethod
    def from_toml(cls, table: Any, number: int = 1) -> Site:
        """The site of one ``[[sites]]`` table.  Raises TypeError saying what
        was expected."""
        if isinstance(table, cls):
            return table
        if not isinstance(table, Mapping) or not table.get("name"):
            raise TypeError(f"site #{number}: a table with at least a name")
        unknown = set(table) - set(cls.KEYS)
        if unknown:
            raise TypeError(
                f"site #{number}: only {', '.join(cls.KEYS)} "
                f"(unknown: {', '.join(sorted(unknown))})"
            )
        name = table["name"]
        if not isinstance(name, str):
            raise TypeError(f"site #{number}: name a string")
        store_as = table.get("store_as")
        if store_as is not None and store_as not in STORE_AS:
            raise TypeError(f"site {name!r}: store_as one of {', '.join(STORE_AS)}")
        stable = table.get("stable_after_seconds")
        if stable is not None:
            try:
                stable = _whole(stable, 1, MAX_STABLE_AFTER)
            except TypeError as exc:
                raise TypeError(f"site {name!r}: stable_after_seconds {exc}") from None
        zone = table.get("time_zone")
        if zone is not None:
            try:
                zone = time_zone(zone)
            except TypeError as exc:
                raise TypeError(f"site {name!r}: time_zone {exc}") from None
        texts = {}
        for key in ("label", "region"):
            try:
                texts[key] = _text(table.get(key, ""))
            except TypeError:
                raise TypeError(f"site {name!r}: {key} a string") from None
        return cls(
            name=name,
            store_as=store_as,
            stable_after_seconds=stable,
            time_zone=zone,
            label=texts["label"],
            region=texts["region"],
        )

    def as_toml(self) -> dict[str, Any]:
        """The ``[[sites]]`` table of this site (for ``imag config show``); the
        orientation keys only when they are set."""
        table = {key: getattr(self, key) for key in self.KEYS}
        for key in ("time_zone", "label", "region"):
            if not table[key]:
                del table[key]
        return table


@dataclass(frozen=True)
class RouteMatch:
    """What a route selects: one pattern per key, None matching everything.
    A pattern is exact, a wildcard (``*`` ``?``) or a regular expression
    written ``re:...`` (searched).  For a stable study, list-valued keys
    (modalities, SOP classes, body parts of its series) match when any
    element does; ``calling_aet`` is known for single instances only."""

    site: str | None = None
    calling_aet: str | None = None
    modality: str | None = None
    sop_class: str | None = None
    study_description: str | None = None
    body_part: str | None = None

    def items(self) -> Iterator[tuple[str, str | None]]:
        """(match key, pattern) for every key, in :data:`ROUTE_MATCH` order."""
        for key in ROUTE_MATCH:
            yield key, getattr(self, key)


#: the route match keys: the fields of RouteMatch, the keys of a [[routes]] table
ROUTE_MATCH: tuple[str, ...] = tuple(f.name for f in fields(RouteMatch))


@dataclass(frozen=True)
class Route:
    """A routing rule (``[[routes]]``): instances (``when = "instance"``) or
    stable studies (``when = "stable"``) that :attr:`match` selects go to a
    DICOM peer (``to_dicom``: the AE title of a ``[[dicom.peers]]``) or to a
    STOW-RS endpoint (``to_stow``: its base URL; ``stow_token_file``: a file
    holding the destination's API token).

    A rule of ``kind = "read"`` sends nothing: each stable study it selects
    becomes a reading request on the teleradiology worklist (``priority``
    STAT, URGENT or ROUTINE; ``reply_to``: where the signed report is mailed)."""

    name: str
    when: str = "instance"  # one of ROUTE_WHEN
    to_dicom: str | None = None
    to_stow: str | None = None
    stow_token_file: str | None = None
    match: RouteMatch = field(default_factory=RouteMatch)
    kind: str = "forward"  # one of ROUTE_KINDS
    priority: str = "ROUTINE"  # kind "read": one of READ_PRIORITIES
    reply_to: str | None = None  # kind "read": the requester's address

    KEYS = (
        "name",
        "kind",
        "when",
        "to_dicom",
        "to_stow",
        "stow_token_file",
        "priority",
        "reply_to",
        *ROUTE_MATCH,
    )

    @classmethod
    def from_toml(cls, table: Any, number: int = 1) -> Route:
        """The route of one ``[[routes]]`` table, whose match keys sit beside
        the others; unnamed, it is ``route-<number>``.  Raises TypeError
        saying what was expected (regular expressions are compiled here, so a
        bad one stops start-up rather than a delivery)."""
        if isinstance(table, cls):
            return table
        if not isinstance(table, Mapping):
            raise TypeError(f"route #{number}: a table")
        name = str(table.get("name") or f"route-{number}")
        unknown = set(table) - set(cls.KEYS)
        if unknown:
            raise TypeError(
                f"route {name!r}: unknown key(s) {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(sorted(cls.KEYS))}"
            )
        kind = table.get("kind", "forward")
        if kind not in ROUTE_KINDS:
            raise TypeError(f"route {name!r}: kind = 'forward' or 'read'")
        when = table.get("when", "stable" if kind == "read" else "instance")
        if when not in ROUTE_WHEN:
            raise TypeError(f"route {name!r}: when = 'instance' or 'stable'")
        targets = [k for k in ("to_dicom", "to_stow") if table.get(k)]
        if kind == "read":
            if when != "stable" or targets:
                raise TypeError(
                    f"route {name!r}: a read route asks for stable studies to be read "
                    "(when = 'stable', no to_dicom or to_stow)"
                )
            priority = str(table.get("priority", "ROUTINE")).upper()
            if priority not in READ_PRIORITIES:
                raise TypeError(f"route {name!r}: priority = 'STAT', 'URGENT' or 'ROUTINE'")
        elif len(targets) != 1:
            raise TypeError(f"route {name!r}: exactly one of to_dicom or to_stow")
        elif "priority" in table or "reply_to" in table:
            raise TypeError(f"route {name!r}: priority and reply_to are for kind = 'read'")
        else:
            priority = "ROUTINE"
        texts: dict[str, str | None] = {}
        for key in ("to_dicom", "to_stow", "stow_token_file", "reply_to", *ROUTE_MATCH):
            try:
                texts[key] = _optional_text(table.get(key))
            except TypeError:
                raise TypeError(f"route {name!r}: {key} a string") from None
        for key in ROUTE_MATCH:
            pattern = texts[key]
            if pattern is not None and pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise TypeError(
                        f"route {name!r}: {key} is not a valid regular expression: {exc}"
                    ) from None
        return cls(
            name=name,
            when=when,
            to_dicom=texts["to_dicom"],
            to_stow=texts["to_stow"],
            stow_token_file=texts["stow_token_file"],
            match=RouteMatch(**{key: texts[key] for key in ROUTE_MATCH}),
            kind=kind,
            priority=priority,
            reply_to=texts["reply_to"],
        )

    def as_toml(self) -> dict[str, Any]:
        """The ``[[routes]]`` table of this route, match keys beside the others
        (for ``imag config show``)."""
        if self.kind == "read":
            return {
                "name": self.name,
                "kind": self.kind,
                "when": self.when,
                "priority": self.priority,
                "reply_to": self.reply_to,
                **dict(self.match.items()),
            }
        return {
            "name": self.name,
            "when": self.when,
            "to_dicom": self.to_dicom,
            "to_stow": self.to_stow,
            "stow_token_file": self.stow_token_file,
            **dict(self.match.items()),
        }
