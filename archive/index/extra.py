"""Extra indexed attributes: series- and instance-level keys beyond the index's columns.

Viewers' hanging protocols and the screening flow search on attributes the
core schema has no column for (ImageLaterality, ViewPosition, Laterality,
ProtocolName...).  In the manner of Orthanc's ExtraMainDicomTags and
dcm4chee's attribute filters, the setting ``index.extra_attributes`` lists
them per level::

    [index.extra_attributes]
    series = ["Laterality", "ProtocolName"]
    instance = ["ImageLaterality", "ViewPosition"]

Their values are read at parse time and stored in two narrow side tables
(``series_attributes``, ``instance_attributes``: row reference, tag, value
position, value; migration 0015), written in the ingest transaction of the
instance row, one multi-row insert per batch.  The instance table keeps its
two secondary indexes: an instance that carries none of the configured
attributes costs nothing more, one that does costs one narrow row per value.
:mod:`archive.query` matches them with the DICOM matching rules (an
``EXISTS`` on the side table) and returns them.

Series-level values come from the first instance stored in a series, as the
series columns do.  Only top-level elements of a short-string VR can be
configured (:data:`ALLOWED_VRS`: codes, short and long strings, dates, times,
integer strings, UIDs): values that a query can match exactly.  Objects
stored before an attribute was configured are indexed by ``imag db
reindex-attributes`` (:func:`reindex`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

if TYPE_CHECKING:
    from archive.index.db import Database

log = logging.getLogger(__name__)

#: the VRs an extra attribute may have: values a query matches as text
ALLOWED_VRS = frozenset({"AE", "AS", "CS", "DA", "IS", "LO", "SH", "TM", "UI"})
#: setting name of a level -> query level
LEVELS = {"series": "SERIES", "instance": "IMAGE"}
#: the default: what mammography hanging protocols and screening need
DEFAULT: dict[str, list[str]] = {
    "series": ["Laterality", "ProtocolName"],
    "instance": ["ImageLaterality", "ViewPosition"],
}
#: attributes per level at most (each one is an EXISTS in a query)
MAX_PER_LEVEL = 32
#: values of one multi-valued attribute indexed at most; longer values are skipped
MAX_VALUES = 16
MAX_VALUE_CHARS = 64
#: rows per INSERT statement (SQLite's bound on parameters is 32766)
_CHUNK = 500

_TABLE = {
    "SERIES": ("series_attributes", "series_ref"),
    "IMAGE": ("instance_attributes", "instance_ref"),
}


def check_setting(value: Any) -> dict[str, list[str]]:
    """The ``index.extra_attributes`` setting: a table of level = [keywords]
    (``IMAG_INDEX_EXTRA_ATTRIBUTES``: a JSON object).  Raises TypeError
    naming what is wrong: an unknown level or keyword, a VR that cannot be
    matched as text, too many attributes."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise TypeError('a JSON object such as {"instance": ["ImageLaterality"]}') from None
    if not isinstance(value, Mapping):
        raise TypeError('a table of level = [keywords], e.g. instance = ["ImageLaterality"]')
    out: dict[str, list[str]] = {}
    for level, keywords in value.items():
        if level not in LEVELS:
            raise TypeError(f"level {level!r}: use one of {', '.join(LEVELS)}")
        if isinstance(keywords, str):
            keywords = [k for k in keywords.split(",")]
        if not isinstance(keywords, list | tuple) or not all(isinstance(k, str) for k in keywords):
            raise TypeError(f'{level}: a list of DICOM keywords, e.g. ["ImageLaterality"]')
        names = list(dict.fromkeys(k.strip() for k in keywords if k.strip()))
        if len(names) > MAX_PER_LEVEL:
            raise TypeError(f"{level}: {MAX_PER_LEVEL} attributes at most, not {len(names)}")
        for name in names:
            tag = tag_for_keyword(name)
            if tag is None:
                raise TypeError(f"{level}: {name!r} is not a DICOM keyword")
            vr = dictionary_VR(tag)
            if vr not in ALLOWED_VRS:
                raise TypeError(
                    f"{level}: {name} has VR {vr}; only {', '.join(sorted(ALLOWED_VRS))} "
                    "attributes can be indexed"
                )
        out[level] = names
    return out


@dataclass(frozen=True)
class ExtraAttribute:
    """One configured attribute: its keyword, tag, VR and query level."""

    keyword: str
    tag: int
    vr: str
    level: str  # "SERIES" or "IMAGE"

    @property
    def table(self) -> str:
        return _TABLE[self.level][0]

    @property
    def ref(self) -> str:
        """The side table's column that references the series or instance row."""
        return _TABLE[self.level][1]


@dataclass(frozen=True)
class ExtraValue:
    """One value of an extra attribute of an incoming instance: its level,
    tag, position among the attribute's values, and text."""

    level: str
    tag: int
    n: int
    value: str


class ExtraAttributes:
    """The configured extra attributes (see :func:`check_setting`)."""

    def __init__(self, attributes: Iterable[ExtraAttribute] = ()) -> None:
        self._by_keyword = {a.keyword: a for a in attributes}

    @classmethod
    def from_setting(
        cls, value: Mapping[str, Sequence[str]], skip: Iterable[str] = ()
    ) -> ExtraAttributes:
        """From the checked setting; keywords in ``skip`` (those the index
        already holds as columns, such as BodyPartExamined) are left out."""
        skipped = set(skip)
        found = []
        for level, keywords in check_setting(value).items():
            for keyword in keywords:
                if keyword in skipped:
                    continue
                tag = tag_for_keyword(keyword)
                assert tag is not None  # checked
                found.append(ExtraAttribute(keyword, tag, dictionary_VR(tag), LEVELS[level]))
        return cls(found)

    def get(self, keyword: str) -> ExtraAttribute | None:
        return self._by_keyword.get(keyword)

    def __iter__(self) -> Iterator[ExtraAttribute]:
        return iter(self._by_keyword.values())

    def __bool__(self) -> bool:
        return bool(self._by_keyword)

    def at(self, level: str) -> list[ExtraAttribute]:
        """The attributes of one query level ("SERIES" or "IMAGE")."""
        return [a for a in self._by_keyword.values() if a.level == level]

    def extract(self, ds: Dataset) -> tuple[ExtraValue, ...]:
        """The values ``ds`` carries for the configured attributes (nothing
        for an absent or empty one, so an instance without them costs no row).
        A value that cannot be read or is not a valid value of its VR is not
        indexed (the object is stored as received all the same)."""
        out: list[ExtraValue] = []
        for attribute in self._by_keyword.values():
            for n, text in enumerate(values_of(ds, attribute)):
                out.append(ExtraValue(attribute.level, attribute.tag, n, text))
        return tuple(out)


def values_of(ds: Dataset, attribute: ExtraAttribute) -> list[str]:
    """The indexed form of an attribute's values in ``ds``: trimmed text,
    integers in canonical form, empty values and values too long left out."""
    try:
        element = ds.get(attribute.tag)
        value = None if element is None else element.value
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on bad values
        log.debug("extra attribute unreadable", extra={"keyword": attribute.keyword})
        return []
    if value is None or value == "":
        return []
    raw = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    out = []
    for item in raw[:MAX_VALUES]:
        text = str(item).strip().rstrip("\x00").strip()
        if not text or len(text) > MAX_VALUE_CHARS:
            continue
        if attribute.vr == "IS":
            try:
                text = str(int(text))
            except ValueError:
                continue
        out.append(text)
    return out


def insert(db: Database, level: str, rows: Sequence[tuple[int, int, int, str]]) -> None:
    """Insert (ref, tag, n, value) rows of one level, a few hundred per statement."""
    table, ref = _TABLE[level]
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start : start + _CHUNK]
        db.execute(
            f"INSERT INTO {table} ({ref}, tag, n, value) VALUES "
            + ", ".join(["(?, ?, ?, ?)"] * len(chunk)),
            [v for row in chunk for v in row],
        )


def delete(db: Database, level: str, refs: Sequence[int]) -> None:
    """Remove the rows of these series or instances (before writing them anew)."""
    table, ref = _TABLE[level]
    for start in range(0, len(refs), _CHUNK):
        chunk = refs[start : start + _CHUNK]
        db.execute(f"DELETE FROM {table} WHERE {ref} IN ({', '.join('?' * len(chunk))})", chunk)


def read_values(
    db: Database, level: str, refs: Sequence[int], tags: Sequence[int]
) -> dict[tuple[int, int], str]:
    """(ref, tag) -> the attribute's values joined by "\\" in their order, for
    the rows of one answer page (one query per few hundred rows)."""
    table, ref = _TABLE[level]
    values: dict[tuple[int, int], list[tuple[int, str]]] = {}
    wanted = list(dict.fromkeys(refs))
    tag_list = ", ".join("?" * len(tags))
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        for r, tag, n, value in db.query(
            f"SELECT {ref}, tag, n, value FROM {table} "
            f"WHERE {ref} IN ({', '.join('?' * len(chunk))}) AND tag IN ({tag_list})",
            [*chunk, *tags],
        ):
            values.setdefault((int(r), int(tag)), []).append((int(n), value))
    return {key: "\\".join(v for _, v in sorted(items)) for key, items in values.items()}


@dataclass
class ReindexResult:
    """What :func:`reindex` did."""

    series: int = 0
    instances: int = 0
    values: int = 0
    unreadable: int = 0


#: reads a stored object's header: (object key, size) -> data set, None when unreadable
HeaderReader = Callable[[str, int], Dataset | None]


def reindex(
    db: Database,
    extras: ExtraAttributes,
    read: HeaderReader,
    *,
    batch: int = 50,
    progress: Callable[[int], None] | None = None,
) -> ReindexResult:
    """Write the extra attribute rows of every stored series and instance
    anew from their objects (``imag db reindex-attributes``): for objects
    stored before an attribute was configured, or after one was removed.

    Walks the series in id order, ``batch`` at a time, each batch in its own
    transaction (nothing long-held on a 10^8-row index); only the first
    instance of each series is read when no instance-level attribute is
    configured.  Idempotent: running it again, or after a crash, rewrites the
    same rows.  ``progress`` is called with the number of objects read."""
    result = ReindexResult()
    series_attrs, instance_attrs = extras.at("SERIES"), extras.at("IMAGE")
    last = 0
    while True:
        series_ids = [
            int(r[0])
            for r in db.query(
                "SELECT id FROM series WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
            )
        ]
        if not series_ids:
            return result
        last = series_ids[-1]
        marks = ", ".join("?" * len(series_ids))
        rows = db.query(
            f"SELECT id, series_ref, object_key, size FROM instances WHERE series_ref IN ({marks}) "
            "AND integrity = 'ok' ORDER BY series_ref, id",
            series_ids,
        )
        series_rows: list[tuple[int, int, int, str]] = []
        instance_rows: list[tuple[int, int, int, str]] = []
        first_done: set[int] = set()
        for instance_id, series_ref, key, size in rows:
            first = series_ref not in first_done
            if not first and not instance_attrs:
                continue
            ds = read(key, int(size))
            if progress is not None:
                progress(1)
            if ds is None:
                result.unreadable += 1
                continue
            result.instances += 1
            if first:
                first_done.add(series_ref)
                for a in series_attrs:
                    series_rows += [
                        (series_ref, a.tag, n, v) for n, v in enumerate(values_of(ds, a))
                    ]
            for a in instance_attrs:
                instance_rows += [
                    (int(instance_id), a.tag, n, v) for n, v in enumerate(values_of(ds, a))
                ]
        with db.transaction():
            delete(db, "SERIES", series_ids)
            # every instance of these series, read or not: no row of an
            # attribute no longer configured (or of an unreadable object) stays
            db.execute(
                "DELETE FROM instance_attributes WHERE instance_ref IN "
                f"(SELECT id FROM instances WHERE series_ref IN ({marks}))",
                series_ids,
            )
            insert(db, "SERIES", series_rows)
            insert(db, "IMAGE", instance_rows)
        result.series += len(series_ids)
        result.values += len(series_rows) + len(instance_rows)
