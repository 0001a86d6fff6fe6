"""The one retrieval path: C-GET, C-MOVE and WADO-RS.

:func:`locate` turns a retrieve request (a level and the unique keys of that
level, within the caller's scope) into the list of stored instances, in
series and instance order; :func:`read` reads one back from the object
store.  Converting it for a receiver that does not accept the stored
transfer syntax is :func:`archive.codecs.convert_for`.

Parsing needs a seekable file, and not every store gives one: the S3 store's
stream cannot seek.  :func:`open_seekable` makes any stored object seekable
by spooling what has been read so far to a temporary file (in memory up to
:data:`SPOOL_MEMORY`), lazily, so a header parse reads only the header and a
frame read only up to that frame.  :func:`open_header` parses the header
alone (never the pixel data), through a deflated dataset too, and survives
objects whose sequences nest deeper than pydicom or a JSON encoder can
recurse: their too-deep elements are left out and named.
"""

from __future__ import annotations

import io
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from archive.index.db import Database
from archive.query import QueryError
from archive.security.scope import Scope, series_clause, study_clause
from archive.uids import is_valid_uid
from storage import ObjectStore

#: bytes of an object spooled in memory before the spool moves to a temporary file
SPOOL_MEMORY = 1 << 20
#: how much is copied from a store's stream (or inflated) at a time
CHUNK = 1 << 20
#: sequences nested deeper than this are left out of headers: pydicom parses
#: nested sequences recursively and fails (RecursionError) near 200 levels
DEFAULT_MAX_DEPTH = 64
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


@dataclass(frozen=True)
class StoredObject:
    """One instance to send: where it is and what it is."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    object_key: str
    size: int


_LEVEL_KEY = {
    "STUDY": ("StudyInstanceUID", "st.study_uid"),
    "SERIES": ("SeriesInstanceUID", "se.series_uid"),
    "IMAGE": ("SOPInstanceUID", "i.sop_instance_uid"),
}
_FROM = (
    "FROM instances i JOIN series se ON se.id = i.series_ref "
    "JOIN studies st ON st.id = se.study_ref JOIN patients p ON p.id = st.patient_ref "
    "WHERE i.integrity = 'ok'"
)
_SELECT = (
    "SELECT st.study_uid, se.series_uid, i.sop_instance_uid, i.sop_class_uid, i.stored_ts, "
    f"i.object_key, i.size {_FROM}"
)


def _uid_list(keyword: str, value: str) -> list[str]:
    uids = [u.strip() for u in (value or "").split("\\") if u.strip()]
    if not uids:
        raise QueryError(f"{keyword} is required to retrieve at this level")
    for uid in uids:
        if not is_valid_uid(uid):
            raise QueryError(f"{keyword}: {uid!r} is not a valid UID")
    return uids


def locate(
    db: Database, level: str, keys: dict[str, str], scope: Scope | None = None
) -> list[StoredObject]:
    """The stored instances a retrieve request names.

    ``keys`` holds the unique keys of ``level`` and, optionally, of the levels
    above it (hierarchical retrieve, PS3.4 C.4.2.2): PatientID at PATIENT
    level, StudyInstanceUID at STUDY level, and so on; lists of UIDs are
    allowed.  ``scope`` restricts the answer to the studies the caller may see.
    """
    where, params = _where(level, keys, scope)
    sql = f"{_SELECT}{where} ORDER BY st.id, se.series_number, se.id, i.instance_number, i.id"
    return [StoredObject(*row[:6], int(row[6])) for row in db.query(sql, params)]


def outside_scope(db: Database, level: str, keys: dict[str, str], scope: Scope | None) -> bool:
    """Whether what ``keys`` name exists, but only outside ``scope``: such a
    request is answered as if nothing were there, and audited as denied."""
    if scope is None:
        return False

    def exists(within: Scope | None) -> bool:
        where, params = _where(level, keys, within)
        return bool(db.scalar(f"SELECT 1 {_FROM}{where} LIMIT 1", params))

    return not exists(scope) and exists(None)


def _where(level: str, keys: dict[str, str], scope: Scope | None) -> tuple[str, list[object]]:
    """The conditions (appended to ``_FROM``'s WHERE) selecting what ``keys`` name."""
    clauses: list[str] = []
    params: list[object] = []
    if level == "PATIENT":
        pid = (keys.get("PatientID") or "").strip()
        if not pid:
            raise QueryError("PatientID is required to retrieve at PATIENT level")
        clauses.append("p.patient_id = ?")
        params.append(pid)
        if keys.get("IssuerOfPatientID"):
            clauses.append("p.issuer = ?")
            params.append(keys["IssuerOfPatientID"].strip())
    elif level in _LEVEL_KEY:
        for upper in ("STUDY", "SERIES", "IMAGE"):
            keyword, column = _LEVEL_KEY[upper]
            value = keys.get(keyword)
            if upper == level or value:
                uids = _uid_list(keyword, value or "")
                clauses.append(f"{column} IN ({', '.join('?' * len(uids))})")
                params.extend(uids)
            if upper == level:
                break
    else:
        raise QueryError(f"unknown retrieve level {level!r}: use PATIENT, STUDY, SERIES or IMAGE")
    if scope is not None:
        clause, scope_params = study_clause(scope, "st")
        clauses.append(clause)
        params.extend(scope_params)
        narrowed = series_clause(scope, "se")
        if narrowed is not None:  # a capability naming some series of the study
            clauses.append(narrowed[0])
            params.extend(narrowed[1])
    return "".join(f" AND {c}" for c in clauses), params


def read(store: ObjectStore, item: StoredObject) -> FileDataset:
    """The stored instance as a dataset (pixel data not decoded), for senders
    that need it whole (C-GET, C-MOVE, routing, conversions).  Read through
    :func:`open_seekable`, so the object's bytes are never held in memory
    beside the dataset, whatever the store."""
    with open_seekable(store, item.object_key) as fp:
        return pydicom.dcmread(fp)


class UnreadableObject(ValueError):
    """A stored object whose header cannot be read back (it got past the
    checks of an older version): a property of the object, not of the request."""


class TooLargeToInflate(UnreadableObject):
    """A deflated object that inflates beyond the allowed size."""


# --------------------------------------------------------------------------- seekable reads


class _LazySpool(io.RawIOBase):
    """A seekable view of a forward-only stream: bytes are copied from the
    stream into a spool (memory, then a temporary file) only as far as a read
    or seek needs them, so parsing a header downloads the header only."""

    def __init__(
        self, source: BinaryIO, name: str, size: int | None = None, memory: int = SPOOL_MEMORY
    ) -> None:
        self._source = source
        self._size = size  # known: seeking from the end fetches nothing
        self.name = name  # pydicom records it as the dataset's filename
        # closed in close(): the spool lives as long as this reader
        self._spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=memory, prefix="imag-read-"
        )
        self._filled = 0
        self._pos = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def _fill(self, upto: int | None) -> None:
        if self._eof or (upto is not None and upto <= self._filled):
            return
        self._spool.seek(self._filled)
        while not self._eof and (upto is None or self._filled < upto):
            want = CHUNK if upto is None else max(min(CHUNK, upto - self._filled), 1 << 16)
            chunk = self._source.read(want)
            if not chunk:
                self._eof = True
                break
            self._spool.write(chunk)
            self._filled += len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            if self._size is None:
                self._fill(None)
                self._size = self._filled
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        want = len(buffer)
        self._fill(self._pos + want)
        if self._pos >= self._filled:
            return 0
        self._spool.seek(self._pos)
        data = self._spool.read(min(want, self._filled - self._pos))
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._source.close()
                self._spool.close()
            finally:
                super().close()


@contextmanager
def open_seekable(store: ObjectStore, key: str, size: int | None = None) -> Iterator[BinaryIO]:
    """The stored object as a seekable binary file, closed on exit.

    A store's own stream is used when it can seek (the filesystem store's
    file); otherwise (S3) it is spooled lazily: only what is read is fetched,
    at most :data:`SPOOL_MEMORY` of it held in memory, the rest in a
    temporary file deleted on exit.  ``size`` (the object's size, when the
    caller knows it) lets a reader find the end without fetching it all."""
    stream = store.open(key)
    try:
        seekable = stream.seekable()
    except (AttributeError, OSError, ValueError):
        seekable = False
    if seekable:
        with stream:
            yield stream
        return
    reader = io.BufferedReader(_LazySpool(stream, key, size), buffer_size=1 << 16)
    try:
        yield reader  # type: ignore[misc]
    finally:
        reader.close()


# --------------------------------------------------------------------------- headers


@dataclass
class StoredHeader:
    """A stored object's header, read without its pixel data.

    ``file`` is a seekable Part 10 file of the object in a syntax that is not
    deflated (a deflated object is inflated into a temporary file), so
    ``pixel_at``, the offset of the pixel data element's tag (None: no pixel
    data), points into it.  ``dropped`` names the top-level elements left
    out because their sequences nest deeper than the limit."""

    dataset: FileDataset
    file: BinaryIO
    pixel_at: int | None
    dropped: list[str] = field(default_factory=list)


@contextmanager
def open_header(
    store: ObjectStore,
    item: StoredObject,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_inflated: int | None = None,
) -> Iterator[StoredHeader]:
    """The header of a stored instance (see :class:`StoredHeader`), its file
    open until the block ends.  Raises :class:`UnreadableObject` when the
    object cannot be parsed at all."""
    with ExitStack() as stack:
        fp = stack.enter_context(open_seekable(store, item.object_key, item.size or None))
        yield _header(fp, stack, max_depth=max_depth, max_inflated=max_inflated)


def _header(
    fp: BinaryIO, stack: ExitStack, *, max_depth: int, max_inflated: int | None
) -> StoredHeader:
    try:
        fp.seek(0)
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        data_at = fp.tell()
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad bytes
        raise UnreadableObject(f"the stored object's file meta cannot be read: {exc}") from None
    syntax = UID(str(meta.get("TransferSyntaxUID", "") or ExplicitVRLittleEndian))
    if syntax == DeflatedExplicitVRLittleEndian:
        fp = stack.enter_context(_inflated(fp, meta, data_at, max_inflated))
        fp.seek(0)
        read_preamble(fp, False)
        _read_file_meta_info(fp)
        data_at = fp.tell()
        syntax = ExplicitVRLittleEndian
    dropped: list[str] = []
    try:
        fp.seek(0)
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        pixel_at = fp.tell()
        deep = _too_deep(ds, max_depth)
    except RecursionError:
        ds, pixel_at, deep = _read_pruned(fp, data_at, syntax, max_depth, stack)
    except Exception as exc:  # noqa: BLE001
        raise UnreadableObject(f"the stored object's header cannot be parsed: {exc}") from None
    for tag in deep:
        dropped.append(f"({tag >> 16:04X},{tag & 0xFFFF:04X})")
        if tag in ds:
            del ds[tag]
    fp.seek(pixel_at)
    has_pixels = len(fp.read(4)) == 4  # the parse stops at pixel data, or at the end
    return StoredHeader(ds, fp, pixel_at if has_pixels else None, dropped)


@contextmanager
def _inflated(
    fp: BinaryIO, meta: FileMetaDataset, data_at: int, limit: int | None
) -> Iterator[BinaryIO]:
    """A Deflated Explicit VR Little Endian object as the equivalent Explicit
    VR Little Endian file, inflated chunk by chunk into a spool (memory is
    bounded whatever the compression ratio; ``limit`` bounds the size)."""
    meta = FileMetaDataset(meta)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "FileMetaInformationGroupLength" in meta:
        del meta.FileMetaInformationGroupLength
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=False)
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY, prefix="imag-inflate-") as spool:
        spool.write(b"\0" * 128 + b"DICM" + head.getvalue())
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        fp.seek(data_at)
        try:
            while not inflater.eof:
                data = inflater.unconsumed_tail or fp.read(CHUNK)
                if not data:
                    break
                out = inflater.decompress(data, CHUNK)  # at most CHUNK out per step
                total += len(out)
                if limit is not None and total > limit:
                    raise TooLargeToInflate(
                        f"the deflated dataset inflates to more than {limit} bytes"
                    )
                spool.write(out)
            spool.write(inflater.flush())
        except zlib.error as exc:
            raise UnreadableObject(f"the deflated dataset cannot be inflated: {exc}") from None
        spool.seek(0)
        yield spool  # type: ignore[misc]


def _too_deep(ds: Dataset, max_depth: int) -> list[int]:
    """Top-level tags whose sequences nest deeper than ``max_depth``, found
    without recursion (sequences are converted level by level as walked;
    other values are left unconverted: an unconverted value whose VR is not
    SQ is no sequence -- pydicom reads a sequence of implicit VR as one)."""
    deep = []
    for elem in ds.elements():
        if elem.VR != "SQ":
            continue
        elem = ds[elem.tag]
        todo: list[tuple[Dataset, int]] = [(item, 1) for item in elem.value]
        while todo:
            item, depth = todo.pop()
            if depth > max_depth:
                deep.append(int(elem.tag))
                break
            for inner in item:
                if inner.VR == "SQ":
                    todo.extend((child, depth + 1) for child in inner.value)
    return deep


_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UR", b"UT", b"UN"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def _walk_top_level(
    fp: BinaryIO, start: int, implicit: bool, little: bool
) -> tuple[list[tuple[int, int, int, int]], int]:
    """The top-level elements of the dataset from ``start`` up to the pixel
    data (or the end): (tag, start, end, sequence depth) each, and the offset
    where the walk stopped.  Iterative, so any nesting is measured; a
    structure that runs past the end raises UnreadableObject."""
    order = "<" if little else ">"
    fp.seek(0, io.SEEK_END)
    size = fp.tell()

    def element_at(at: int) -> tuple[int, int, bytes, int]:
        """tag, length, VR (b"" for items and delimiters, b"??" when implicit), value offset"""
        fp.seek(at)
        raw = fp.read(8)
        if len(raw) < 8:
            raise UnreadableObject(f"the header is truncated at byte {at}")
        group, element = struct.unpack(order + "HH", raw[:4])
        tag = group << 16 | element
        if group == 0xFFFE:
            return tag, struct.unpack(order + "I", raw[4:8])[0], b"", at + 8
        if implicit or not raw[4:6].isalpha():  # some writers mislabel implicit VR
            return tag, struct.unpack(order + "I", raw[4:8])[0], b"??", at + 8
        if raw[4:6] in _LONG_VRS:
            more = fp.read(4)
            if len(more) < 4:
                raise UnreadableObject(f"the header is truncated at byte {at}")
            return tag, struct.unpack(order + "I", more)[0], raw[4:6], at + 12
        return tag, struct.unpack(order + "H", raw[6:8])[0], raw[4:6], at + 8

    elements: list[tuple[int, int, int, int]] = []
    # open containers, innermost last: (kind, end offset or None, depth) with
    # kind "sq" (a sequence), "item" (a dataset in one) or "frags" (fragments)
    stack: list[tuple[str, int | None, int]] = []
    current: list[int] | None = None  # the top-level element walked: tag, start, depth
    pos = start
    while pos < size:
        while stack and stack[-1][1] is not None and pos >= stack[-1][1]:  # type: ignore[operator]
            stack.pop()
        if not stack and current is not None:
            elements.append((current[0], current[1], pos, current[2]))
            current = None
        tag, length, vr, value_at = element_at(pos)
        if not stack:
            if tag in PIXEL_TAGS:
                break
            current = [tag, pos, 0]
        kind, depth = (stack[-1][0], stack[-1][2]) if stack else ("", 0)
        defined_end = None if length == _UNDEFINED else value_at + length
        if tag == _SEQUENCE_END:
            while stack and stack[-1][0] == "item":
                stack.pop()
            if stack:
                stack.pop()
            pos = value_at
        elif tag == _ITEM_END:
            if stack and stack[-1][0] == "item":
                stack.pop()
            pos = value_at
        elif tag == _ITEM and kind == "frags" and defined_end is not None:
            pos = defined_end
        elif tag == _ITEM:
            stack.append(("item", defined_end, depth))
            pos = value_at
        elif tag in PIXEL_TAGS and defined_end is None:  # encapsulated icon pixels
            stack.append(("frags", None, depth))
            pos = value_at
        elif (
            vr == b"SQ"
            or (vr in (b"??", b"UN") and defined_end is None)
            or (vr == b"??" and _dictionary_vr(tag) == "SQ")
        ):
            stack.append(("sq", defined_end, depth + 1))
            if current is not None:
                current[2] = max(current[2], depth + 1)
            pos = value_at
        elif defined_end is None:
            raise UnreadableObject(f"element {tag:08X} at byte {pos} has an undefined length")
        else:
            pos = defined_end
        if pos > size:
            raise UnreadableObject(f"an element runs past the end of the object ({pos} > {size})")
    if current is not None:
        elements.append((current[0], current[1], min(pos, size), current[2]))
    return elements, min(pos, size)


def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return ""


def _read_pruned(
    fp: BinaryIO, data_at: int, syntax: UID, max_depth: int, stack: ExitStack
) -> tuple[FileDataset, int, list[int]]:
    """Read a header pydicom cannot parse whole (it recursed too deep): walk
    its top-level elements iteratively, copy the file meta and every element
    nested no deeper than ``max_depth`` into a spool, and parse that."""
    elements, pixel_at = _walk_top_level(
        fp, data_at, syntax.is_implicit_VR, syntax.is_little_endian
    )
    deep = [tag for tag, _, _, depth in elements if depth > max_depth]
    spool = stack.enter_context(  # closed with the header
        tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY, prefix="imag-header-")  # noqa: SIM115
    )
    fp.seek(0)
    spool.write(fp.read(data_at))
    for _tag, begin, end, depth in elements:
        if depth <= max_depth:
            fp.seek(begin)
            spool.write(fp.read(end - begin))
    spool.seek(0)
    try:
        ds = pydicom.dcmread(spool, stop_before_pixels=True)
    except RecursionError:
        raise UnreadableObject("the header nests sequences too deeply to be read") from None
    except Exception as exc:  # noqa: BLE001
        raise UnreadableObject(f"the stored object's header cannot be parsed: {exc}") from None
    return ds, pixel_at, deep


#: the UID keys of a look-up, lowest level first
_UID_KEYS = (
    ("IMAGE", "SOPInstanceUID"),
    ("SERIES", "SeriesInstanceUID"),
    ("STUDY", "StudyInstanceUID"),
)


def _uid_level(keys: dict[str, str]) -> str | None:
    """The lowest level whose UID ``keys`` name (None: they name no UID)."""
    return next((lvl for lvl, key in _UID_KEYS if (keys.get(key) or "").strip()), None)


def may_hide(keys: dict[str, str], scope: Scope | None) -> bool:
    """Whether :func:`hidden_studies` could name a study for a search with
    ``keys`` that finds nothing: a site-bound caller's look-up by UID.  A
    search for which it cannot may write its audit entry before knowing
    whether it found anything."""
    return scope is not None and _uid_level(keys) is not None


def hidden_studies(
    db: Database,
    keys: dict[str, str],
    scope: Scope | None,
    level: str | None = None,
    limit: int = 100,
) -> list[str]:
    """The studies a look-up by UID names when they exist only outside
    ``scope`` (empty when the keys name no UID, when what they name is in
    scope, or when it is nowhere): the look-up is answered as if nothing were
    there, and audited as denied with these studies.  ``level`` None: the
    lowest level whose UID ``keys`` name (QIDO-RS and C-FIND keys)."""
    if level is None:
        level = _uid_level(keys)
    if scope is None or level is None:
        return []
    try:
        if not outside_scope(db, level, keys, scope):
            return []
        where, params = _where(level, keys, None)
    except QueryError:
        return []  # not a well-formed look-up by UID: nothing it names exists
    rows = db.query(f"SELECT DISTINCT st.study_uid {_FROM}{where} LIMIT {int(limit)}", params)
    return sorted(str(row[0]) for row in rows)
