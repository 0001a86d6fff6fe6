"""pynetdicom event handlers: DICOM services on top of the archive core.

Every C-STORE goes through the one ingest pipeline and is answered only when
the instance is durable and indexed; C-FIND uses the one query model; C-GET
and C-MOVE use the one retrieval path.  The peer table decides who may
associate and which sites' studies they see.
"""

from __future__ import annotations

import logging
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.sop_class import Verification

from archive.codecs import convert_for
from archive.dimse.identifiers import answer, query_from_identifier, retrieve_keys
from archive.dimse.peers import Decision, Peer, PeerTable
from archive.identity import Source
from archive.index.catalog import Origin
from archive.ingest import DIMSE_STATUS, IngestResult, store_audit_entry
from archive.query import Query, QueryError, extra_attributes, search
from archive.retrieve import StoredObject, hidden_studies, locate, may_hide, read
from archive.runtime import Archive
from archive.security.audit import AuditEntry, AuditUnavailable
from archive.security.scope import Scope

log = logging.getLogger(__name__)

ASSOCIATIONS = Counter("imag_dicom_associations_total", "DICOM associations requested", ["outcome"])
ACTIVE = Gauge(
    "imag_dicom_associations_active",
    "DICOM associations in progress",
    multiprocess_mode="livesum",  # summed over dicom.processes
)
OPERATIONS = Counter(
    "imag_dicom_operations_total", "DIMSE operations by service and status", ["service", "status"]
)
OPERATION_SECONDS = Histogram(
    "imag_dicom_operation_seconds",
    "Duration of DIMSE operations",
    ["service"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
)

# DIMSE status of a refused C-STORE, by the pipeline's rejection code (PS3.4 B.2.3);
# one table with the pipeline's own (IngestResult.dimse_status)
STORE_STATUS = DIMSE_STATUS
CANNOT_UNDERSTAND = 0xC000
#: ErrorComment (64 characters at most) where the pipeline's reason would be cut
#: in the middle of a UID
STORE_COMMENT = {
    "forbidden": "Not authorized: a UID of this instance is another site's",
    "inconsistent": "the series is already stored under another study",
    "conflict": "a different object is stored under this UID; this one was not",
    "audit-error": "audit trail unavailable: not acknowledged; retry later",
}


@dataclass
class AssociationLog:
    """What one association did, for its one log line when it ends: an
    administrator reading the log sees who connected, from where, what they
    stored, found and retrieved, for how long, and how it ended."""

    calling_aet: str
    address: str
    started: float
    stored: int = 0  #: C-STOREs answered with success (duplicates included)
    store_failures: int = 0  #: C-STOREs answered with a failure or warning status
    found: int = 0  #: C-FIND matches sent
    retrieved: int = 0  #: instances sent by C-GET / C-MOVE sub-operations
    retrieve_failures: int = 0  #: instances that could not be read to send
    #: "released" or "aborted" once one of them happened (else the connection just closed)
    ended: str = "closed"

    def fields(self, outcome: str) -> dict[str, Any]:
        return {
            "calling_aet": self.calling_aet,
            "address": self.address,
            "outcome": outcome,
            "stored": self.stored,
            "store_failures": self.store_failures,
            "found": self.found,
            "retrieved": self.retrieved,
            "retrieve_failures": self.retrieve_failures,
            "seconds": round(time.monotonic() - self.started, 3),
        }


def set_nodelay(event: evt.Event) -> None:
    """No Nagle delay: each C-STORE round trip would otherwise wait ~40 ms for
    a delayed ACK."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class DicomServices:
    """The handlers bound to one AE, sharing the archive and the peer table."""

    def __init__(self, archive: Archive, peers: PeerTable, aet: str) -> None:
        self.archive = archive
        self.peers = peers
        self.aet = aet
        self._peer_of: weakref.WeakKeyDictionary[Any, Peer | None] = weakref.WeakKeyDictionary()
        self._log_of: weakref.WeakKeyDictionary[Any, AssociationLog] = weakref.WeakKeyDictionary()

    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_RELEASED, self.on_closed),
            (evt.EVT_ABORTED, self.on_closed),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_C_MOVE, self.on_move),
        ]

    # -- associations -------------------------------------------------------------

    def on_requested(self, event: evt.Event) -> None:
        if event.assoc.is_rejected:  # refused already (no association slot free)
            return
        requestor = event.assoc.requestor
        # requestor.ae_title is only filled in by the negotiation that follows
        # this event: the calling AE title is read from the request itself.
        calling_aet = str(requestor.primitive.calling_ae_title or "").strip()
        decision = self.peers.check(calling_aet, requestor.address)
        if not decision.allowed:
            refuse_peer(self.archive, decision, calling_aet, requestor.address)
            # Rejected permanent, by the service user: calling AE title not recognised
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            # As pynetdicom does for its own rejections: wait until the A-ASSOCIATE-RJ
            # is sent and the peer has closed (or ARTIM expired) before the socket
            # is shut down, or the peer sees an abort instead of the rejection.
            event.assoc.kill()
            return
        self._peer_of[event.assoc] = decision.peer

    def on_conn_close(self, event: evt.Event) -> None:
        """A connection that closes before its A-ASSOCIATE-RQ (port scans, TCP
        health checks) must free its association slot now: pynetdicom's
        acceptor would wait for the request until the ACSE timeout.  It stops
        waiting when it receives "no request" (None) from the upper layer."""
        assoc = event.assoc
        if not assoc.is_established and assoc.requestor.primitive is None:
            assoc.dul.to_user_queue.put(None)
        record = self._log_of.pop(assoc, None)
        if record is not None:
            # an A-ABORT closes the connection before the association's own
            # thread reads it (EVT_ABORTED comes after): it is queued already
            if record.ended == "closed" and (assoc.is_aborted or assoc.acse.is_aborted()):
                record.ended = "aborted"
            log.info("association ended", extra=record.fields(record.ended))

    def on_established(self, event: evt.Event) -> None:
        ASSOCIATIONS.labels("accepted").inc()
        ACTIVE.inc()
        requestor = event.assoc.requestor
        self._log_of[event.assoc] = AssociationLog(
            requestor.ae_title.strip(), requestor.address, time.monotonic()
        )

    def _count(self, event: evt.Event, what: str, n: int = 1) -> None:
        """Add ``n`` to the ``what`` counter of the association's log line."""
        record = self._log_of.get(event.assoc)
        if record is not None:
            setattr(record, what, getattr(record, what) + n)

    def on_closed(self, event: evt.Event) -> None:
        # C-STOREs are audited one by one as they are answered (on_store), so
        # nothing is left to write at release (or lost when the process dies).
        record = self._log_of.get(event.assoc)
        if record is not None:
            record.ended = "released" if event.event is evt.EVT_RELEASED else "aborted"
        if event.assoc in self._peer_of:
            ACTIVE.dec()
            self._peer_of.pop(event.assoc, None)

    # -- audit ------------------------------------------------------------------------

    def _audit_peer(
        self,
        aet: str,
        address: str,
        peer: Peer | None,
        action: str,
        outcome: str,
        study_uid: str | None = None,
        detail: dict | None = None,
        status: int | None = None,
    ) -> None:
        """:func:`audit_peer` on this archive."""
        audit_peer(self.archive, aet, address, peer, action, outcome, study_uid, detail, status)

    def _audit(
        self,
        event: evt.Event,
        action: str,
        outcome: str,
        study_uid: str | None = None,
        detail: dict | None = None,
        status: int | None = None,
        peer: Peer | None = None,
    ) -> None:
        requestor = event.assoc.requestor
        self._audit_peer(
            requestor.ae_title.strip(),
            requestor.address,
            peer or self._peer(event),
            action,
            outcome,
            study_uid,
            detail,
            status,
        )

    def _peer(self, event: evt.Event) -> Peer | None:
        return self._peer_of.get(event.assoc)

    def _scope(self, event: evt.Event) -> Scope | None:
        peer = self._peer(event)
        return None if peer is None else peer.scope

    # -- services -------------------------------------------------------------------

    def on_echo(self, event: evt.Event) -> int:
        OPERATIONS.labels("C-ECHO", "0x0000").inc()
        return 0x0000

    def on_store(self, event: evt.Event) -> Dataset | int:
        """Store one instance; answer only once it is durable, indexed and audited
        (:func:`store_instance`, which the lean receive path calls too)."""
        started = time.perf_counter()
        requestor = event.assoc.requestor
        source = peer_source(
            self.archive, self._peer(event), requestor.ae_title.strip(), requestor.address
        )
        try:
            data: bytes | IngestResult = event.encoded_dataset()
        except Exception as exc:  # noqa: BLE001 - a dataset pynetdicom cannot frame
            data = IngestResult(None, code="unreadable", reason=f"cannot read the data set: {exc}")
        status, comment = store_instance(
            self.archive, data, source, str(event.request.AffectedSOPInstanceUID or ""), started
        )
        self._count(event, "stored" if status == 0x0000 else "store_failures")
        if status == 0x0000:
            return 0x0000
        ds = Dataset()
        ds.Status = status
        ds.ErrorComment = comment
        return ds

    def on_find(self, event: evt.Event) -> Iterator[tuple[Any, Dataset | None]]:
        """C-FIND on pynetdicom: the query, audit and statuses of :func:`plan_find`
        (the lean path's C-FIND uses them too), one identifier per match."""
        started = time.perf_counter()
        requestor = event.assoc.requestor
        plan = plan_find(
            self.archive,
            lambda: event.identifier,
            self._peer(event),
            requestor.ae_title.strip(),
            requestor.address,
        )
        if plan.query is None:
            yield _failure(plan.status, plan.comment), None
            return
        for row in plan.rows:
            if event.is_cancelled:
                OPERATIONS.labels("C-FIND", "0xFE00").inc()
                yield 0xFE00, None
                return
            self._count(event, "found")
            yield 0xFF00, answer(row, plan.tags, plan.query.level, self.aet)
        OPERATIONS.labels("C-FIND", "0x0000").inc()
        OPERATION_SECONDS.labels("C-FIND").observe(time.perf_counter() - started)

    def _locate(self, event: evt.Event, service: str, **detail: Any) -> list[StoredObject]:
        """The instances to send, with one audit entry for the request.  Raises
        :class:`AuditUnavailable` when that entry cannot be written (nothing
        may then be sent)."""
        action = f"dicom.{service.lower()}"
        scope = self._scope(event)
        try:
            level, keys = retrieve_keys(event.identifier)
            items = locate(self.archive.db, level, keys, scope)
        except QueryError as exc:
            self._audit(event, action, "failed", detail={"error": str(exc), **detail})
            raise
        studies = list(dict.fromkeys(i.study_uid for i in items))
        outcome = "allowed"
        if not items:  # outside the peer's scope (denied, naming the study) or not here (failed)
            studies = hidden_studies(self.archive.db, keys, scope, level)
            outcome = "denied" if studies else "failed"
        self._audit(
            event,
            action,
            outcome,
            study_uid=studies[0] if len(studies) == 1 else None,
            detail={
                "level": level,
                "keys": keys,
                "instances": len(items),
                **({"studies": studies[:100]} if len(studies) > 1 else {}),
                **detail,
            },
        )
        return items

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        # A bad identifier raises here; pynetdicom answers 0xC413 (unable to process).
        try:
            items = self._locate(event, "C-GET")
        except AuditUnavailable:
            # pynetdicom sends a failure status only as a sub-operation's:
            # announce one, refuse it, send nothing
            yield 1
            yield _audit_refusal("C-GET", 0xA702), None
            return
        yield len(items)
        accepted = _accepted_by_sop_class(event.assoc)
        yield from self._send(event, items, accepted, "C-GET")

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        name = event.move_destination
        name = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
        destination = self.peers.get(name)
        if destination is None:
            log.warning("C-MOVE to an unknown destination", extra={"destination": name})
            try:
                self._audit(
                    event, "dicom.c-move", "failed", status=0xA801, detail={"destination": name}
                )
            except AuditUnavailable:
                pass  # logged and counted; nothing is sent either way
            OPERATIONS.labels("C-MOVE", "0xA801").inc()
            yield None, None  # pynetdicom answers 0xA801: move destination unknown
            return
        refused = False
        try:
            items, error = self._locate(event, "C-MOVE", destination=name), None
        except QueryError as exc:
            items, error = [], exc
        except AuditUnavailable:
            items, error, refused = [], None, True
        store_assoc: dict[str, Any] = {}

        def remember(ev: evt.Event) -> None:
            store_assoc["assoc"] = ev.assoc

        yield (
            destination.host,
            destination.port,
            {
                # pynetdicom associates with the destination before it takes a
                # status from us: on refusal, an association that carries nothing
                "contexts": _contexts_for(items) or [build_context(Verification)],
                "max_pdu": self.archive.config["dicom.max_pdu"],
                "evt_handlers": [(evt.EVT_CONN_OPEN, set_nodelay), (evt.EVT_ESTABLISHED, remember)],
            },
        )
        if error is not None:
            raise error  # pynetdicom answers 0xC513 (unable to process)
        if refused:
            yield 1
            yield _audit_refusal("C-MOVE", 0xA702), None
            return
        yield len(items)
        assoc = store_assoc.get("assoc")
        accepted = _accepted_by_sop_class(assoc) if assoc else {}
        yield from self._send(event, items, accepted, "C-MOVE")

    def _send(
        self,
        event: evt.Event,
        items: list[StoredObject],
        accepted: dict[str, set[str]],
        service: str,
    ) -> Iterator[Any]:
        started = time.perf_counter()
        for item in items:
            if event.is_cancelled:
                OPERATIONS.labels(service, "0xFE00").inc()
                yield 0xFE00, None
                return
            try:
                ds = convert_for(
                    read(self.archive.store, item), accepted.get(item.sop_class_uid, set())
                )
            except Exception as exc:  # noqa: BLE001 - counted as a failed sub-operation
                log.warning(
                    "cannot read a stored instance for %s",
                    service,
                    extra={"sop_instance_uid": item.sop_instance_uid, "error": str(exc)},
                )
                ds = Dataset()  # pynetdicom counts it as failed with an empty UID
                ds.SOPInstanceUID = item.sop_instance_uid
                self._count(event, "retrieve_failures")
            else:
                self._count(event, "retrieved")
            yield 0xFF00, ds
        OPERATIONS.labels(service, "done").inc()
        OPERATION_SECONDS.labels(service).observe(time.perf_counter() - started)


def peer_source(archive: Archive, peer: Peer | None, aet: str, address: str) -> Source:
    """Who is storing, for the ingest pipeline (site, scope) and for the audit
    entry committed with each instance (``origin``, named as
    :meth:`DicomServices._audit` names a peer).  One definition for the
    pynetdicom handlers and the lean receive path."""
    origin = Origin(
        aet or "unknown",
        "peer",
        role=None if peer is None else ("regional-peer" if peer.regional else "site-peer"),
        source=f"{aet}@{address}",
        site=peer.site if peer else "",
    )
    return Source(
        kind="dicom",
        site=peer.site if peer else archive.config["ingest.default_site"],
        calling_aet=aet,
        address=address,
        scope=peer.scope if peer else None,
        origin=origin,
    )


def store_instance(
    archive: Archive,
    data: bytes | Path | IngestResult,
    source: Source,
    affected_sop_instance_uid: str,
    started: float,
) -> tuple[int, str]:
    """Ingest one C-STORE data set (a Part 10 byte string, a Part 10 file
    streamed from disk -- a large object the lean path spooled --, or the
    refusal already decided for it) and return the DIMSE status and ErrorComment
    to answer with, once the instance is durable, indexed and audited.

    Each C-STORE has its own audit entry naming its SOP Instance UID.  For
    an instance the pipeline commits (stored, replaced, or refused inside
    the transaction) the pipeline's audit hook writes it in the same
    transaction as the index row, from the source's ``origin``: a crash
    loses both or neither.  Whatever is answered without a commit (refused
    before storing, a duplicate, a conflict kept, an error) is audited
    here, with the status it gets, before that status leaves; when the
    entry cannot be written, no success or warning is sent (0xA700).
    Both receive paths (pynetdicom's handler, the lean asyncio one) call
    this, so they answer alike."""
    if isinstance(data, IngestResult):
        result = data
    else:
        try:
            if isinstance(data, Path):
                result = archive.pipeline.ingest_file(data, source)
            else:
                result = archive.pipeline.ingest(data, source)
        except Exception:  # noqa: BLE001 - the index or the store failed under us
            log.exception("C-STORE could not be processed")
            result = IngestResult(
                None, code="index-error", reason="the archive could not process the instance"
            )
    if not result.sop_instance_uid:
        result.sop_instance_uid = affected_sop_instance_uid
    status, code, reason = result.dimse_status, result.code, result.reason
    if not result.audited:
        try:
            assert source.origin is not None
            archive.audit.write(store_audit_entry(source.origin, result))
        except Exception:  # noqa: BLE001 - logged by the audit log; fail closed below
            log.exception(
                "C-STORE audit entry not written",
                extra={"sop_instance_uid": result.sop_instance_uid},
            )
            if status == 0x0000 or 0xB000 <= status <= 0xBFFF:
                status, code = DIMSE_STATUS["audit-error"], "audit-error"
                reason = "the audit trail could not be written; retry later"
    OPERATIONS.labels("C-STORE", f"0x{status:04X}").inc()
    OPERATION_SECONDS.labels("C-STORE").observe(time.perf_counter() - started)
    if status == 0x0000:
        return 0x0000, ""
    return status, STORE_COMMENT.get(code, reason)[:64]


@dataclass
class FindPlan:
    """What a C-FIND answers, decided once for both receive paths: the
    matches (``query`` set, ``rows`` to answer one by one, then success) or
    a failure to answer alone (``query`` None: ``status``, ``comment``)."""

    status: int = 0xFF00
    comment: str = ""
    query: Query | None = None
    #: the identifier's element tags, in order (see :func:`query_from_identifier`)
    tags: list = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)


def plan_find(
    archive: Archive,
    identifier: Callable[[], Dataset],
    peer: Peer | None,
    aet: str,
    address: str,
) -> FindPlan:
    """Decode the C-FIND identifier (``identifier()``), search in the peer's
    site scope and write the request's one audit entry; the failures are
    counted here (``OPERATIONS``), the matches by the caller as it sends them.

    A query the archive cannot answer as asked -- an identifier that does
    not decode included -- is 0xA900 with the reason as ErrorComment; a
    look-up by UID of a study outside the peer's scope is "no match",
    audited as denied naming that study; when the audit entry cannot be
    written nothing is answered but 0xA700.  pynetdicom's handler and the
    lean asyncio path both call this, so they answer alike."""
    scope = None if peer is None else peer.scope

    def audit(outcome: str, **fields: Any) -> None:
        audit_peer(archive, aet, address, peer, "dicom.c-find", outcome, **fields)

    try:
        try:
            query, tags = query_from_identifier(
                identifier(), scope, extra_attributes(archive.config)
            )
        except QueryError:
            raise
        except Exception as exc:  # noqa: BLE001 - hostile bytes: pydicom decodes lazily
            raise QueryError(f"the identifier cannot be decoded: {exc}") from exc
        query.identity = archive.identity  # PatientID may be an INS or a regional ID
        rows = _search_audited(archive, query, scope, aet, address, peer)
        if rows is not None:
            return FindPlan(query=query, tags=tags, rows=rows)
        rows = search(archive.db, query)
    except QueryError as exc:
        try:
            audit("failed", status=0xA900, detail={"error": str(exc)})
        except AuditUnavailable:
            OPERATIONS.labels("C-FIND", "0xA700").inc()
            return FindPlan(0xA700, AUDIT_REFUSAL)
        OPERATIONS.labels("C-FIND", "0xA900").inc()
        return FindPlan(0xA900, str(exc)[:64])
    study = _named_study(query.keys)
    outcome, detail = "allowed", {}
    # no match for a look-up by UID of a study outside the peer's scope:
    # answered "no match" all the same, audited as denied with that study
    hidden = [] if rows else hidden_studies(archive.db, query.keys, scope)
    if hidden:
        outcome, study = "denied", (hidden[0] if len(hidden) == 1 else None)
        detail = {"studies": hidden} if len(hidden) > 1 else {}
    try:
        audit(
            outcome,
            study_uid=study,
            detail={"level": query.level, "keys": query.keys, "results": len(rows), **detail},
        )
    except AuditUnavailable:
        OPERATIONS.labels("C-FIND", "0xA700").inc()
        return FindPlan(0xA700, AUDIT_REFUSAL)  # before any match leaves
    return FindPlan(query=query, tags=tags, rows=rows)


def _named_study(keys: dict[str, str]) -> str | None:
    """The study a C-FIND's entry names: the one UID it looks up (none for a list)."""
    study = keys.get("StudyInstanceUID")
    return study if study and "\\" not in study else None


def _search_audited(
    archive: Archive,
    query: Query,
    scope: Scope | None,
    aet: str,
    address: str,
    peer: Peer | None,
) -> list[dict[str, Any]] | None:
    """The matches of a C-FIND with its audit entry written by the search's
    own statement (PostgreSQL, :meth:`AuditLog.counted`): one round trip and
    one commit, where the search and then the entry were two; the entry is
    durable before any match leaves all the same.  Taken only when the entry
    does not depend on what the search finds: no look-up by UID that a
    site-bound peer may be denied (:func:`may_hide`).  An entry naming a
    study gets its patient read by the INSERT, as the two-step path's does.

    None when not taken, or when the statement failed without writing the
    entry: then :func:`plan_find` searches and audits in two steps, which
    tells the search's failure from the audit trail's."""
    if archive.db.dialect != "postgresql" or may_hide(query.keys, scope):
        return None
    entry = peer_entry(
        aet,
        address,
        peer,
        "dicom.c-find",
        "allowed",
        study_uid=_named_study(query.keys),
        detail={"level": query.level, "keys": query.keys},
    )
    return archive.audit.carried(
        lambda counted: search(archive.db, query, counted=counted), entry, "results"
    )


def refuse_peer(archive: Archive, decision: Decision, calling_aet: str, address: str) -> None:
    """Log, count and audit an association refused by the peer table (the
    caller sends the A-ASSOCIATE-RJ: permanent, service user, calling AE
    title not recognised)."""
    ASSOCIATIONS.labels("rejected").inc()
    log.warning(
        "association rejected: %s",
        decision.reason,
        extra={"calling_aet": calling_aet, "address": address, "reason": decision.reason},
    )
    try:
        audit_peer(
            archive,
            calling_aet,
            address,
            None,
            "dicom.associate",
            "denied",
            detail={"reason": decision.reason},
        )
    except AuditUnavailable:
        pass  # logged and counted; the association is refused all the same


def audit_peer(
    archive: Archive,
    aet: str,
    address: str,
    peer: Peer | None,
    action: str,
    outcome: str,
    study_uid: str | None = None,
    detail: dict | None = None,
    status: int | None = None,
) -> None:
    """Write one audit entry for a peer.  Raises :class:`AuditUnavailable`
    when it cannot be written: the caller refuses the operation (fail
    closed) rather than serve it unaudited."""
    archive.audit.write(peer_entry(aet, address, peer, action, outcome, study_uid, detail, status))


def peer_entry(
    aet: str,
    address: str,
    peer: Peer | None,
    action: str,
    outcome: str,
    study_uid: str | None = None,
    detail: dict | None = None,
    status: int | None = None,
) -> AuditEntry:
    """The audit entry of an operation of a peer (see :func:`audit_peer`)."""
    role = None if peer is None else ("regional-peer" if peer.regional else "site-peer")
    return AuditEntry(
        aet or "unknown",
        "peer",
        action,
        outcome,
        role=role,
        status=status,
        study_uid=study_uid,
        source=f"{aet}@{address}",
        detail={**({"site": peer.site} if peer else {}), **(detail or {})},
    )


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


#: ErrorComment of an operation refused because its audit entry cannot be written
AUDIT_REFUSAL = "audit trail cannot be written: access refused"


def _audit_refusal(service: str, status: int) -> Dataset:
    """The refusal (0xA7xx, out of resources) of an operation whose audit entry
    could not be written: no data is served unaudited."""
    OPERATIONS.labels(service, f"0x{status:04X}").inc()
    return _failure(status, AUDIT_REFUSAL)


def _accepted_by_sop_class(assoc: Any) -> dict[str, set[str]]:
    """SOP class → transfer syntaxes the peer accepted for storage towards it.

    Only the contexts on which we may act as the storage SCU count: on a C-GET
    association these are the ones the peer proposed with the SCP role (there
    ``as_scp`` is false, ``as_scu`` true); pynetdicom sends C-STORE only on those.
    """
    accepted: dict[str, set[str]] = {}
    for cx in assoc.accepted_contexts:
        if not cx.as_scu:
            continue
        accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    return accepted


def _contexts_for(items: list[StoredObject]) -> list:
    """Presentation contexts to propose to a C-MOVE destination: per SOP class,
    the stored syntaxes first, then the uncompressed ones every SCP takes."""
    by_class: dict[str, list[str]] = {}
    for item in items:
        syntaxes = by_class.setdefault(item.sop_class_uid, [])
        if item.transfer_syntax not in syntaxes:
            syntaxes.append(item.transfer_syntax)
    contexts = []
    for sop_class, syntaxes in by_class.items():
        for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts not in syntaxes:
                syntaxes.append(ts)
        # one context per syntax so that the SCP can accept each independently
        for ts in syntaxes:
            contexts.append(build_context(sop_class, [ts]))
    return contexts[:128]
