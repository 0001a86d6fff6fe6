"""C-FIND on the lean asyncio path: identifiers written straight from index rows.

On pynetdicom a C-FIND match cost ~1 ms of CPU: a pydicom Dataset built per
row (:func:`archive.dimse.identifiers.answer`), encoded by pydicom, and a
C-FIND-RSP command set built and encoded by pynetdicom's message classes, then
the reactor threads.  Here the query is the same -- :func:`plan_find` decodes
the identifier once (pydicom), searches in the peer's site scope and writes the
one audit entry, in an ingest thread -- but each match is written as bytes:
:class:`AnswerEncoder` lays out, once per query, the elements ``answer()``
would give (the same tags, in tag order, with their dictionary VR) and then
only encodes each row's values, padded as pydicom pads them; the C-FIND-RSP
command set is a template per request (message id and status are all that
vary); the P-DATA-TF PDUs of many matches are written to the transport at once.

The bytes are the ones pynetdicom sends (tests compare them row by row).  What
the layout cannot promise to write alike goes through ``answer()`` and pydicom
as before: a whole query when the identifier asks for an element of a VR
written here in no other way (binary, sequences other than empty ones,
ambiguous, group lengths) or the accepted transfer syntax is big endian or
deflated; a single row when one of its values is not a plain string (or an
integer for IS), is not ASCII where pydicom would not use the character set,
or is a person name with empty trailing component groups.

Cancelling: reading goes on while an answer is written, so a C-CANCEL-RQ
stops it between two batches of matches (0xFE00).  Writing pauses when the
peer does not read (the transport's high-water mark): an association holds at
most a batch and the transport's buffer, whatever the number of matches.

What stays on pynetdicom: C-GET and C-MOVE (and any other service), so an
association proposing them is not lean at all (:func:`archive.dimse.lean.lean_request`).
"""

from __future__ import annotations

import functools
import io
import logging
import re
import struct
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from archive.dimse.handlers import OPERATION_SECONDS, OPERATIONS, FindPlan, plan_find
from archive.dimse.identifiers import answer
from archive.query import QueryError

if TYPE_CHECKING:
    import asyncio
    import concurrent.futures

    from archive.dimse.handlers import AssociationLog
    from archive.dimse.peers import Peer
    from archive.runtime import Archive

log = logging.getLogger(__name__)

#: the query models served here (C-GET / C-MOVE ones stay on pynetdicom)
FIND_MODELS = frozenset(
    {PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind}
)
C_FIND_RQ_FIELD = 0x0020
C_CANCEL_RQ_FIELD = 0x0FFF
PENDING, SUCCESS, CANCEL = 0xFF00, 0x0000, 0xFE00
#: pynetdicom's statuses when the handler raised / an identifier did not encode
HANDLER_FAILED, ENCODING_FAILED = 0xC311, 0xC312
#: the largest C-FIND identifier received (an identifier is a few hundred
#: bytes); beyond, the rest is discarded and the query refused (0xA900)
IDENTIFIER_MAX = 1 << 20
#: the matches written to the transport at once: at most this many ...
BATCH_ROWS = 256
#: ... or about this many bytes
BATCH_BYTES = 128 * 1024

_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")
#: a P-DATA-TF PDU holding one PDV: PDU type, PDU length, PDV length, context, control
_PDV = struct.Struct(">BxIIBB")

# -- identifiers --------------------------------------------------------------------------------

#: VRs written here from a row value (a string; an integer for IS); the text
#: ones in the answer's character set (ISO_IR 192), the others in ASCII
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "PN"})
_STRING_VRS = _TEXT_VRS | {"AE", "AS", "CS", "DA", "DT", "IS", "TM", "UI"}
#: VRs whose values pydicom splits at backslashes (the others are one value)
_SINGLE_VALUED = frozenset({"ST", "LT"})
#: an IS value pydicom writes as given (it strips the spaces around a number)
_IS_VALUE = re.compile(r"^(?:[+-]?[0-9]+| *)$")
_UTF8 = convert_encodings(["ISO_IR 192"])
_LEVEL = Tag("QueryRetrieveLevel")
_CHARSET = Tag("SpecificCharacterSet")
_UNIQUE = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


class _Slow(Exception):
    """A row this encoder does not write itself: pydicom writes it."""


@functools.lru_cache(maxsize=256)
def _layout(
    tags: tuple[int, ...], level: str, aet: str, implicit: bool
) -> tuple[tuple[int, Any], ...] | None:
    """The elements ``answer()`` gives, in the order pydicom writes them;
    None when one of them is not of a VR written here.  Kept per set of
    query keys: a viewer asks the same keys again and again, and laying
    them out (pydicom encodes the constant elements) cost ~0.3 ms, as much
    as the rest of a small answer."""
    elements: dict[int, Any] = {}
    constants: dict[int, tuple[str, Any]] = {_CHARSET: ("CS", "ISO_IR 192")}
    for tag in tags:
        keyword = keyword_for_tag(tag)
        if keyword == "SpecificCharacterSet":
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if keyword == "QueryRetrieveLevel":
            constants[tag] = (vr, level)
        elif keyword == "RetrieveAETitle":
            constants[tag] = (vr, aet)
        elif keyword == "InstanceAvailability":
            constants[tag] = (vr, "ONLINE")
        elif vr == "SQ":
            constants[tag] = (vr, [])
        elif vr in _STRING_VRS and Tag(tag).element != 0:
            elements[int(tag)] = (keyword, vr, False)
        else:
            return None
    level_vr = dictionary_VR(_LEVEL)
    elements.pop(int(_LEVEL), None)
    constants[_LEVEL] = (level_vr, level)
    unique = _UNIQUE[level]
    unique_tag = int(Tag(unique))
    if unique_tag not in elements and unique_tag not in constants:
        elements[unique_tag] = (unique, dictionary_VR(unique_tag), True)
    for tag, (vr, value) in constants.items():
        elements.pop(int(tag), None)
        ds = Dataset()
        ds.add_new(tag, vr, value)
        encoded = encode(ds, implicit, True)
        if encoded is None:
            return None
        elements[int(tag)] = encoded
    return tuple(sorted(elements.items()))


class AnswerEncoder:
    """The C-FIND response identifiers of one query, encoded from index rows
    as :func:`archive.dimse.identifiers.answer` + pydicom would encode them.

    ``tags``, ``level``, ``aet``: as ``answer()`` takes them; ``syntax``: the
    transfer syntax of the presentation context (little endian: written
    here; big endian, deflated: through pydicom)."""

    def __init__(self, tags: list, level: str, aet: str, syntax: UID) -> None:
        self.tags, self.level, self.aet, self.syntax = tags, level, aet, syntax
        self.implicit = syntax.is_implicit_VR
        #: (tag, constant bytes) or (tag, (keyword, vr, unique)), in tag order
        self.layout: tuple[tuple[int, Any], ...] | None = None
        if syntax.is_little_endian and not syntax.is_deflated:
            self.layout = _layout(tuple(int(t) for t in tags), level, aet, self.implicit)

    def encode(self, row: dict[str, Any]) -> bytes:
        """The identifier answering ``row``; raises what ``answer()`` raises
        on a value pydicom cannot take, :class:`EncodingFailed` when pydicom
        cannot write it."""
        if self.layout is not None:
            try:
                return self._write(row)
            except _Slow:
                pass
        data = encode(
            answer(row, self.tags, self.level, self.aet),
            self.implicit,
            self.syntax.is_little_endian,
            self.syntax.is_deflated,
        )
        if not data:
            raise EncodingFailed("pydicom could not write the identifier")
        return data

    def _write(self, row: dict[str, Any]) -> bytes:
        assert self.layout is not None
        out = []
        implicit = self.implicit
        for tag, slot in self.layout:
            if type(slot) is bytes:
                out.append(slot)
                continue
            keyword, vr, unique = slot
            if unique:
                if keyword not in row:
                    continue
                value = row[keyword] or ""
            else:
                value = row.get(keyword)
            raw = _value(keyword, vr, value)
            if len(raw) & 1:
                raw += b"\0" if vr == "UI" else b" "
            n = len(raw)
            if implicit:
                out.append(_ELEMENT.pack(tag >> 16, tag & 0xFFFF, n))
            elif n > 0xFFFF:
                raise _Slow  # pydicom's to refuse
            else:
                out.append(struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), n))
            out.append(raw)
        return b"".join(out)


class EncodingFailed(Exception):
    """pydicom could not write a response identifier (pynetdicom answers 0xC312)."""


def _value(keyword: str, vr: str, value: Any) -> bytes:
    """One element's value as pydicom writes it (unpadded); :class:`_Slow`
    when it cannot promise that."""
    if value is None:
        return b""
    kind = type(value)
    if kind is int and vr == "IS":
        return str(value).encode("ascii")
    if kind is not str:
        raise _Slow
    if keyword == "ModalitiesInStudy":
        value = "\\".join(m for m in value.split("\\") if m)
    if vr in _TEXT_VRS:
        if vr == "PN" and "=" in value:
            # pydicom drops a name's empty trailing component groups
            value = "\\".join(v.rstrip("=") for v in value.split("\\"))
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Slow from None
    if not value.isascii():
        raise _Slow
    if vr == "IS" and not all(_IS_VALUE.match(v) for v in value.split("\\")):
        raise _Slow  # pydicom's to warn or refuse
    return value.encode("ascii")


# -- command sets and PDUs ----------------------------------------------------------------------


def _ui(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def find_response(sop_class_uid: str, message_id: int, status: int, comment: str = "") -> bytes:
    """The C-FIND-RSP command set (implicit VR little endian), as pynetdicom
    encodes it; with an identifier following when ``status`` is pending."""
    if comment:  # rare (a refusal): pynetdicom's own encoding of the comment
        primitive = C_FIND()
        primitive.MessageIDBeingRespondedTo = message_id
        primitive.AffectedSOPClassUID = sop_class_uid
        primitive.Status = status
        primitive.ErrorComment = comment
        message = C_FIND_RSP()
        message.primitive_to_message(primitive)
        return encode(message.command_set, True, True) or b""
    elements = [
        (0x0002, _ui(sop_class_uid)),
        (0x0100, _US.pack(0x8020)),
        (0x0120, _US.pack(message_id)),
        (0x0800, _US.pack(0x0001 if status in (PENDING, 0xFF01) else 0x0101)),
        (0x0900, _US.pack(status)),
    ]
    body = b"".join(_ELEMENT.pack(0, element, len(value)) + value for element, value in elements)
    return _ELEMENT.pack(0, 0x0000, 4) + len(body).to_bytes(4, "little") + body


def pdus(data: bytes, context_id: int, max_pdu: int, command: bool) -> bytes:
    """``data`` (a command set or a data set) in P-DATA-TF PDUs of at most
    ``max_pdu`` bytes (0: no limit), one PDV each, the last one flagged."""
    flag = 0x01 if command else 0x00
    if max_pdu <= 0 or len(data) + 6 <= max_pdu:
        return _PDV.pack(0x04, len(data) + 6, len(data) + 2, context_id, flag | 0x02) + data
    room = max(1, max_pdu - 6)
    out = []
    for start in range(0, len(data), room):
        fragment = data[start : start + room]
        last = 0x02 if start + room >= len(data) else 0x00
        n = len(fragment)
        out.append(_PDV.pack(0x04, n + 6, n + 2, context_id, flag | last))
        out.append(fragment)
    return b"".join(out)


# -- one C-FIND on a lean association -----------------------------------------------------------


class _Receiver(Protocol):
    archive: Archive
    aet: str
    loop: asyncio.AbstractEventLoop
    executor: concurrent.futures.Executor


class Association(Protocol):
    """What a C-FIND needs of :class:`archive.dimse.lean.LeanAssociation`."""

    receiver: _Receiver
    peer: Peer | None
    calling_aet: str
    address: str
    peer_max_pdu: int
    record: AssociationLog | None
    activity: int
    write_paused: bool

    def writable(self) -> bool: ...

    def _write(self, data: bytes) -> None: ...


class Find:
    """One C-FIND-RQ: its identifier received, the query run in an ingest
    thread (:func:`plan_find`), then the matches written in batches on the
    event loop.  ``done(find)`` is called once the last response is written
    (or the association is gone)."""

    def __init__(
        self,
        assoc: Association,
        message_id: int,
        sop_class_uid: str,
        context_id: int,
        syntax: UID,
        done: Callable[[Find], None],
    ) -> None:
        self.assoc = assoc
        self.message_id = message_id
        self.sop_class_uid = sop_class_uid
        self.context_id = context_id
        self.syntax = syntax
        self.done = done
        self.identifier = bytearray()
        self.discarded = 0  #: identifier bytes past IDENTIFIER_MAX
        self.receiving = True  #: the identifier is still arriving
        self.querying = False  #: the query runs in an ingest thread
        self.cancelled = False
        self.finished = False
        self.started = 0.0
        self.rows: list[dict[str, Any]] = []
        self.next_row = 0
        self.encoder: AnswerEncoder | None = None
        self.pending = b""  #: the pending C-FIND-RSP PDUs of this request
        self._scheduled = False

    # -- receiving ----------------------------------------------------------------------------

    def take(self, data: memoryview) -> None:
        room = IDENTIFIER_MAX - len(self.identifier)
        if self.discarded or len(data) > room:
            self.discarded += len(data)
        else:
            self.identifier += data

    def identifier_complete(self) -> None:
        """Run the query in an ingest thread; answer when it returns."""
        self.receiving = False
        self.querying = True
        self.started = time.perf_counter()
        receiver, assoc = self.assoc.receiver, self.assoc
        job = partial(
            plan_find,
            receiver.archive,
            self._decoded,
            assoc.peer,
            assoc.calling_aet,
            assoc.address,
        )
        future = receiver.loop.run_in_executor(receiver.executor, job)
        future.add_done_callback(self._planned)

    def _decoded(self) -> Dataset:
        """The identifier as pynetdicom's ``event.identifier`` decodes it."""
        if self.discarded:
            size = len(self.identifier) + self.discarded
            raise QueryError(f"identifier of {size} bytes, over {IDENTIFIER_MAX}")
        syntax = self.syntax
        ds = decode(
            io.BytesIO(bytes(self.identifier)),
            syntax.is_implicit_VR,
            syntax.is_little_endian,
            syntax.is_deflated,
        )
        ds.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian)
        return ds

    # -- answering ----------------------------------------------------------------------------

    def cancel(self) -> None:
        """A C-CANCEL-RQ for this request: stop before the next batch."""
        self.cancelled = True

    def _planned(self, future: asyncio.Future) -> None:
        self.querying = False
        self.assoc.activity += 1
        try:
            plan: FindPlan = future.result()
        except Exception:  # noqa: BLE001 - as pynetdicom answers a handler that raised
            log.exception("lean C-FIND failed")
            OPERATIONS.labels("C-FIND", f"0x{HANDLER_FAILED:04X}").inc()
            return self._final(HANDLER_FAILED)
        if plan.query is None:
            return self._final(plan.status, plan.comment)
        self.rows = plan.rows
        self.encoder = AnswerEncoder(
            plan.tags, plan.query.level, self.assoc.receiver.aet, self.syntax
        )
        self.pending = pdus(
            find_response(self.sop_class_uid, self.message_id, PENDING),
            self.context_id,
            self.assoc.peer_max_pdu,
            command=True,
        )
        self._batch()  # the first batch now: the request has just been read whole

    def resume(self) -> None:
        """Write the next batch of matches soon (the loop reads in between:
        a C-CANCEL-RQ is seen before the batch after)."""
        if self.encoder is None or self._scheduled or self.finished:
            return
        self._scheduled = True
        self.assoc.receiver.loop.call_soon(self._batch)

    def _batch(self) -> None:
        self._scheduled = False
        assoc = self.assoc
        if self.finished:
            return
        if not assoc.writable():
            return self._gone()
        if assoc.write_paused:
            return  # resume_writing() calls resume()
        if self.cancelled:
            OPERATIONS.labels("C-FIND", f"0x{CANCEL:04X}").inc()
            return self._final(CANCEL)
        encoder, rows = self.encoder, self.rows
        assert encoder is not None
        out: list[bytes] = []
        size, first = 0, self.next_row
        end = min(len(rows), first + BATCH_ROWS)
        max_pdu, context_id, pending = assoc.peer_max_pdu, self.context_id, self.pending
        status = 0
        i = first
        while i < end and size < BATCH_BYTES:
            try:
                identifier = encoder.encode(rows[i])
            except EncodingFailed:
                status = ENCODING_FAILED
                break
            except Exception:  # noqa: BLE001 - answer() raised: the handler failed
                log.exception("lean C-FIND could not build a response identifier")
                status = HANDLER_FAILED
                break
            out.append(pending)
            out.append(pdus(identifier, context_id, max_pdu, command=False))
            size += len(pending) + len(identifier) + 12
            i += 1
        self.next_row = i
        done = bool(status) or i >= len(rows)  # status: a failure (SUCCESS is 0)
        if done:
            # the last matches and the final response leave in one write
            # (one segment for a small answer, read by the peer at once)
            if status == SUCCESS:
                OPERATION_SECONDS.labels("C-FIND").observe(time.perf_counter() - self.started)
            OPERATIONS.labels("C-FIND", f"0x{status:04X}").inc()
            out.append(self._final_pdus(status))
        if out:
            assoc._write(b"".join(out))
            assoc.activity += 1
            if assoc.record is not None:
                assoc.record.found += i - first
        if done:
            return self._gone()
        self.resume()

    def _final_pdus(self, status: int, comment: str = "") -> bytes:
        command = find_response(self.sop_class_uid, self.message_id, status, comment)
        return pdus(command, self.context_id, self.assoc.peer_max_pdu, True)

    def _final(self, status: int, comment: str = "") -> None:
        if self.assoc.writable():
            self.assoc._write(self._final_pdus(status, comment))
        self._gone()

    def _gone(self) -> None:
        if not self.finished:
            self.finished = True
            self.rows = []
            self.done(self)
