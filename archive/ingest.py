"""The one ingest pipeline, used by C-STORE, STOW-RS and ``imag import``.

bytes → parse the header (no pixel decode) → validate → resolve the patient
(identity plugin) → write the object durably → commit the index rows → only
then report success.

The two halves can run in different places: :meth:`IngestPipeline.prepare`
(parse, validate, hash, write the object) is safe to run in many threads or
processes at once, and :class:`IndexWriter` commits prepared instances in
group transactions from one thread, so that concurrent senders share one
durable commit instead of paying one each.

**One ownership rule** for every path (C-STORE, STOW-RS, ``imag import``, and
so routing receivers): an instance is added only to a study, series and
patient of the sender's own site, unless the sender is regional or an admin
(:attr:`Source.may_write` is None).  The rule is checked before anything is
written (a cheap early refusal) and again inside the commit transaction, where
the unique Study Instance UID decides which site owns a study two sites create
at once (see :mod:`archive.index.catalog`).

**Conflicts tell the truth**: a different object under a stored SOP Instance
UID kept by policy ``keep`` is reported with code ``conflict`` and is not
:attr:`IngestResult.ok`; the same object stays an idempotent success.

**The same data set by any path is a duplicate**: a C-STORE receiver builds
the file meta itself (pynetdicom's ``encoded_dataset``), STOW-RS and ``imag
import`` keep the sender's (its implementation UID and version, source AE
title, preamble), so one instance arriving by two paths is two files.  Each
object gets two digests in one read (:func:`digests_of_bytes`,
:func:`digests_of_file`): of the whole object (its identity in the store,
what ``imag verify`` checks) and of the bytes after its File Meta Information
group (the data set as encoded in its transfer syntax); an equal data set
digest makes a re-send a duplicate (C-STORE 0x0000, STOW-RS 200, import
"already stored") at prepare time and again in the commit transaction.
A relay that re-encodes the data set (dcmtk's storescu drops the trailing
padding, writes sequence lengths, sends an Implicit VR file as Explicit VR)
changes its bytes, not its content: a third digest, of the content
(:mod:`archive.contentdigest`), makes that a duplicate too.  Other values,
another byte order or other pixel bytes are a conflict (see
:func:`archive.index.catalog.same_object`).

**Digests when needed**: the data set and content digests only ever serve
comparisons with an instance already stored under the same SOP Instance
UID, and most objects are new.  An object stored as received gets only its
whole-object digest at ingest (one SHA-256 pass instead of two plus a walk
of its elements: about 15% of the ingest's CPU); the other two are read
back from the stored object by :func:`stored_digests` on the rare
occasion a comparison needs them, at prepare time (a re-send) or in the
commit transaction (two copies arriving at once), and give the same answer
as digests computed on arrival.  An object that is transcoded gets all
three at once, since they describe it as received.  Rows indexed before the
digests existed are compared the same way.

**Writing while hashing**: the object store key of an instance ends with its
digest, yet a lone sender's new instance stored as received does not wait
for it: its object is written and fsynced to a temporary file beside its
final place by another thread (:meth:`storage.ObjectStore.stage`) while this
one hashes it (hashlib and file writes release the GIL; hashing it in a third
thread while the header is parsed was measured slower: three threads busy on
two cores), then renamed to its key and its folder fsynced.
When there are as many instances in preparation as cores, each is prepared
in its own thread as before: another thread would only add its cost.  The
data set offset
comes from the header parse (:attr:`archive.parse.Header.dataset_start`), not
from a second read of the file meta.  Nothing is answered before both the
object and the index row are durable, as before; a refusal or a failure
after the write began removes the temporary file.

**Indexed while made durable**: for a caller that commits in this process
(:meth:`IngestPipeline.ingest`: C-STORE, STOW-RS), a new object's last
durable steps (the end of its fsync, its rename, its folder's fsync) run
while the index writer runs the instance's statements; a commit hook run
last in the transaction waits for them before COMMIT, so an index row is
never durable before its object, and an object that fails then rolls its
instance back (``storage-error``).  About a tenth of a lone sender's round
trip.  ``imag import``'s worker processes prepare objects durable before
they hand them over.

**C-STORE audit**: an instance whose :class:`Source` names an ``origin`` gets
its audit entry written by a commit hook, in the transaction of its index
row, so no acknowledged instance can lack one (a crash loses both or neither)
and an audit trail that cannot be written fails the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO

from archive.codecs import LossySource, TranscodeError, transcode
from archive.config import Config
from archive.contentdigest import content_digest
from archive.identity import IdentityPlugin, Source, load_identity_plugin
from archive.index import Catalog, Database, InstanceRecord, StoreOutcome
from archive.index.catalog import (
    CommitHook,
    CommitResult,
    Origin,
    StoredInstance,
    conflict_reason,
    foreign_instance,
    may_write,
)
from archive.index.db import utcnow
from archive.index.statistics import Statistics
from archive.metrics import (
    INDEX_BATCH_SIZE,
    INDEX_COMMIT_SECONDS,
    INGEST_BYTES,
    INGEST_INSTANCES,
    INGEST_REJECTED,
    INGEST_SECONDS,
    TRANSCODE_SECONDS,
)
from archive.parse import (
    Header,
    Limits,
    Rejected,
    dataset_offset,
    index_fields,
    parse_header,
    parse_header_file,
)
from archive.query import extra_attributes
from archive.security.audit import AuditEntry, AuditLog, AuditUnavailable
from archive.uids import object_key
from storage import ObjectStore, StagedPut, StorageError

log = logging.getLogger(__name__)

#: ``store_as`` policies and the transfer syntax each stores in
POLICY_TARGETS = {
    "htj2k-lossless": "1.2.840.10008.1.2.4.201",
    "j2k-lossless": "1.2.840.10008.1.2.4.90",
    "jpegls-lossless": "1.2.840.10008.1.2.4.80",
    "rle-lossless": "1.2.840.10008.1.2.5",
}


#: The status a C-STORE is answered with, by the pipeline's rejection code
#: (PS3.4 B.2.3; 0x0124 Refused: Not Authorized is PS3.7 C.4).
DIMSE_STATUS = {
    "too-large": 0xA700,  # Refused: out of resources
    "inflated-too-large": 0xA700,
    "decoded-too-large": 0xA700,
    "too-deep": 0xA700,
    "storage-error": 0xA700,
    "index-error": 0xA700,
    "audit-error": 0xA700,
    "missing-attribute": 0xA900,  # Error: data set does not match SOP class
    "invalid-uid": 0xA900,
    "inconsistent": 0xA900,
    "inconsistent-pixel-data": 0xA900,
    "forbidden": 0x0124,  # Refused: Not Authorized
}
#: A different object under a stored SOP Instance UID, kept by policy 'keep':
#: the C-STORE warning "Elements Discarded" (PS3.4 B.2.3).  Of the three
#: C-STORE warnings it is the one that says what happened: what was sent was
#: not kept (here all of it).  0xB000 "Coercion of data elements" would claim
#: the sent values were stored modified, 0xB007 that the data set does not
#: match its SOP class; neither is true.  The ErrorComment says the rest.
CONFLICT_WARNING = 0xB006
CANNOT_UNDERSTAND = 0xC000


@dataclass
class IngestResult:
    """What happened to one offered object."""

    outcome: StoreOutcome | None  # None: rejected
    sop_instance_uid: str = ""
    study_uid: str = ""
    series_uid: str = ""
    sop_class_uid: str = ""
    object_key: str = ""
    size: int = 0
    code: str = ""  # rejection code ("conflict" for KEPT)
    reason: str = ""  # rejection reason, for the sender
    #: its audit entry was committed with the index transaction (C-STORE origin)
    audited: bool = False

    @property
    def ok(self) -> bool:
        """Whether the sender may be told the instance is stored: stored,
        replaced, or the same data set as what is stored (whatever its file
        meta).  A conflict kept by policy 'keep' is not (the object sent was
        not stored)."""
        return self.outcome in (StoreOutcome.STORED, StoreOutcome.DUPLICATE, StoreOutcome.REPLACED)

    @property
    def dimse_status(self) -> int:
        """The C-STORE status this result is answered with."""
        if self.ok:
            return 0x0000
        if self.outcome is StoreOutcome.KEPT:
            return CONFLICT_WARNING
        return DIMSE_STATUS.get(self.code, CANNOT_UNDERSTAND)

    @property
    def audit_outcome(self) -> str:
        """allowed (stored), denied (another site's data) or failed."""
        if self.ok:
            return "allowed"
        return "denied" if self.code == "forbidden" else "failed"

    @classmethod
    def rejected(cls, exc: Rejected, **uids: str) -> IngestResult:
        return cls(None, code=exc.code, reason=exc.reason, **uids)


def too_large(size: int, limit: int) -> Rejected:
    """The refusal of an object over ``ingest.max_object_bytes``: the
    pipeline's, and a receiver's that discarded the bytes as they came."""
    return Rejected(
        "too-large",
        f"the object is {size} bytes, over the limit of {limit} (setting ingest.max_object_bytes)",
    )


@dataclass(frozen=True)
class Digests:
    """The two SHA-256 digests of an incoming object."""

    #: of the whole object: its identity in the store (object key, ``imag verify``)
    whole: bytes
    #: of the bytes after the File Meta Information group: the same whoever
    #: wrote the file meta (a C-STORE receiver writes its own)
    dataset: bytes
    #: of the data set's content, whatever its encoding (:mod:`archive.contentdigest`);
    #: None when not computed or when the data set cannot be walked
    content: bytes | None = None


#: bytes read at a time when hashing a file
HASH_CHUNK = 1 << 20


def digests_of_bytes(
    data: bytes,
    start: int,
    transfer_syntax: str | None = None,
    pool: Executor | None = None,
    *,
    full: bool = True,
) -> Digests:
    """The digests of an object in memory whose data set starts at ``start``
    (the content digest too when its ``transfer_syntax`` is given).

    SHA-256 digests cannot be combined afterwards, so the data set bytes go
    through both hashes; the meta part is hashed once, and nothing is copied
    (memoryview slices).  With a ``pool``, the whole object's hash runs in
    one of its threads while this one computes the other two: hashlib
    releases the GIL on large buffers, so on a second core the answer of a
    lone sender comes sooner (the CPU spent is the same).  With ``full``
    false, only the whole object's digest (the others are None)."""
    view = memoryview(data)
    if not full:
        return Digests(hashlib.sha256(view).digest(), None)
    whole_of = hashlib.sha256
    whole: Future[hashlib._Hash] | None = pool.submit(whole_of, view) if pool else None
    dataset = hashlib.sha256(view[start:])
    content = None
    if transfer_syntax is not None:
        content = content_digest(BytesIO(data), start, transfer_syntax)
    whole_digest = (whole.result() if whole is not None else whole_of(view)).digest()
    return Digests(whole_digest, dataset.digest(), content)


def digests_of_file(
    fp: BinaryIO, start: int, transfer_syntax: str | None = None, *, full: bool = True
) -> Digests:
    """The digests of an object in a file, a bounded chunk at a time (objects
    of several GB): each chunk goes to the whole object's hash, and its part
    from byte ``start`` on to the data set's; the content digest (when the
    ``transfer_syntax`` is given) in a second streamed read.  With ``full``
    false, only the whole object's digest."""
    fp.seek(0)
    if not full:
        start, transfer_syntax = 1 << 62, None  # no byte reaches the data set's hash
    whole, dataset = hashlib.sha256(), hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    pos = 0
    while n := fp.readinto(buffer):
        chunk = view[:n]
        whole.update(chunk)
        if pos + n > start:
            dataset.update(chunk[max(0, start - pos) :])
        pos += n
    if not full:
        return Digests(whole.digest(), None)
    content = None
    if transfer_syntax is not None:
        content = content_digest(fp, start, transfer_syntax)
    return Digests(whole.digest(), dataset.digest(), content)


def stored_digests(store: ObjectStore, key: str, transfer_syntax: str) -> Digests | None:
    """The digests of an object stored as received, read back from the
    store (its data set starts after its file meta); None when it cannot be
    read.  For the rows whose data set and content digests were left to be
    computed when a comparison needs them."""
    try:
        with store.open(key) as src:
            if src.seekable():
                return digests_of_file(src, dataset_offset(src), transfer_syntax or None)
            with tempfile.TemporaryFile() as fp:  # an S3 body: read once, then walked
                shutil.copyfileobj(src, fp, HASH_CHUNK)
                return digests_of_file(fp, dataset_offset(fp), transfer_syntax or None)
    except (StorageError, OSError, Rejected):
        return None


@dataclass
class Prepared:
    """An instance whose index row is not yet committed, and whose object is
    durable or becomes durable before that row commits."""

    record: InstanceRecord
    source_kind: str
    started: float
    #: the object being renamed to its key and its folder fsynced while the
    #: index writer runs the instance's statements (see :meth:`IngestPipeline.ingest`);
    #: None when the object is durable already
    durable: Future[int] | None = None


class NotDurable(Exception):
    """An object whose write failed after its instance was handed to the index
    writer: its transaction must not commit."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"the object could not be stored: {cause}")


class IngestPipeline:
    """Parse, validate, store and index incoming DICOM objects."""

    def __init__(
        self,
        config: Config,
        store: ObjectStore,
        db: Database,
        identity: IdentityPlugin | None = None,
        *,
        writer: bool = True,
    ) -> None:
        self.config = config
        self.store = store
        self.db = db
        self.catalog = Catalog(db, self._stored_digests)
        self.identity = identity or load_identity_plugin(config["plugins.identity"], config)
        self.max_bytes: int = config["ingest.max_object_bytes"]
        self.on_conflict: str = config["ingest.on_conflict"]
        #: the attributes indexed beyond the core's (``index.extra_attributes``)
        self.extra = extra_attributes(config)
        #: writes the C-STORE audit entries inside the index transaction
        self.audit = AuditLog(db, config["audit.syslog"], node=config.node)
        self.writer = (
            IndexWriter(
                self.catalog,
                store,
                config["ingest.batch_size"],
                self.on_conflict,
                # the audit hook last: its entries are the last writes before COMMIT
                hooks=[*commit_hooks(config), audit_hook(self.audit)],
            )
            if writer
            else None
        )
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        #: instances in :meth:`_prepare` now, and the cores they may share
        self._busy = 0
        self._cores = max(1, (os.cpu_count() or 1) - 1)
        self._sweep_staging()

    def _sweep_staging(self) -> None:
        """Delete the objects a process killed while writing them early left in
        the staging folder (live ones, locked by their writer, stay)."""
        try:
            removed = self.store.sweep_staging(STAGING_NEAR)
        except StorageError as exc:
            log.warning("staging folder not swept", extra={"error": str(exc)})
            return
        if removed:
            log.info("left-over staged objects deleted", extra={"files": removed})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    # -- first half: runs anywhere, in parallel --------------------------------------

    def prepare(
        self, data: bytes, source: Source, *, overlap: bool = False
    ) -> Prepared | IngestResult:
        """Validate ``data`` and make its object durable.

        Returns a :class:`Prepared` to commit, or a final :class:`IngestResult`
        when nothing needs committing (rejected, or already stored).  With
        ``overlap``, a new object's last durable steps (its fsync, rename and
        folder fsync) may still be running when this returns
        (:attr:`Prepared.durable`): for a caller that commits it in this
        process, whose index writer waits for them before its COMMIT.
        """
        return self._prepare(
            source,
            len(data),
            lambda: parse_header(data, Limits.from_config(self.config)),
            lambda header, full: digests_of_bytes(
                data,
                _start(header, lambda: BytesIO(data)),
                header.transfer_syntax,
                self._spare_pool(),
                full=full,
            ),
            lambda key, body: self.store.put(key, data if body is None else body),
            data=data,
            overlap=overlap,
        )

    def prepare_file(self, path: str | os.PathLike, source: Source) -> Prepared | IngestResult:
        """Like :meth:`prepare` for an object in a file, which is never loaded
        whole: the header is parsed alone, the digest computed and the object
        stored by streaming (objects of several GB)."""
        try:
            fp = open(path, "rb")  # noqa: SIM115 - closed below, after the lambdas ran
        except OSError as exc:
            return IngestResult.rejected(Rejected("unreadable", f"cannot read the file: {exc}"))
        with fp:
            size = os.fstat(fp.fileno()).st_size

            def digest(header: Header, full: bool) -> Digests:
                return digests_of_file(
                    fp, _start(header, lambda: fp), header.transfer_syntax, full=full
                )

            def put(key: str, body: bytes | None) -> None:
                fp.seek(0)
                self.store.put(key, fp if body is None else body)

            limits = Limits.from_config(self.config)
            return self._prepare(
                source, size, lambda: parse_header_file(fp, size, limits), digest, put
            )

    def _prepare(
        self,
        source: Source,
        size: int,
        header_of: Callable[[], Header],
        digest_of: Callable[[Header, bool], Digests],
        put: Callable[[str, bytes | None], object],
        data: bytes | None = None,
        overlap: bool = False,
    ) -> Prepared | IngestResult:
        started = time.perf_counter()
        durable: Future[int] | None = None
        stager: Executor | None = None  # the pool writing the staged object
        uids: dict[str, str] = {}
        staged: Future[StagedPut] | None = None
        with self._pool_lock:
            self._busy += 1
        try:
            if size > self.max_bytes:
                raise too_large(size, self.max_bytes)
            target = self.target_for(source.site)
            early = self._spare_pool() if data is not None else None
            if early is not None and target is None:
                # Stored as received (no policy re-encodes this site's objects):
                # the object is written and fsynced by another thread while
                # this one parses and checks it (the write and the fsync
                # release the GIL).  Dropped if the object is refused or
                # already stored.
                staged = early.submit(self.store.stage, data, STAGING_NEAR)
                stager = early
            header = header_of()
            uids = {
                "sop_instance_uid": header.sop_instance_uid,
                "study_uid": header.study_uid,
                "series_uid": header.series_uid,
                "sop_class_uid": header.sop_class_uid,
            }
            # Ownership, before anything is written (checked again at commit).
            sites = source.may_write
            refusal, known = self.catalog.admission(
                header.study_uid, header.series_uid, header.sop_instance_uid, sites
            )
            if refusal is not None:
                raise Rejected(refusal.code, refusal.reason)
            if known is not None and not may_write(sites, known.site):
                refusal = foreign_instance(header.sop_instance_uid, sites)
                raise Rejected(refusal.code, refusal.reason)
            ds = header.dataset
            who = self.identity.resolve(ds, source)
            pool = self._spare_pool() if staged is None else None
            if (
                pool is not None
                and data is not None
                and known is None
                and target in (None, header.transfer_syntax)
            ):
                # A new instance stored as received: its object is written and
                # fsynced by another thread while this one hashes it (hashlib
                # and the write release the GIL); it gets its digest-derived
                # name once both are done (:meth:`ObjectStore.stage`).
                stager = pool
                staged = pool.submit(
                    self.store.stage,
                    data,
                    object_key(
                        header.study_uid, header.series_uid, header.sop_instance_uid, "0" * 64
                    ),
                )
            # The data set and content digests only serve comparisons with a
            # stored instance: computed now when one is known or when the
            # object will be transcoded (they describe it as received), else
            # read from the stored object if a comparison ever needs them.
            digests = digest_of(
                header, known is not None or target not in (None, header.transfer_syntax)
            )
            digest = digests.whole
            key = object_key(
                header.study_uid, header.series_uid, header.sop_instance_uid, digest.hex()
            )
            if known is not None:
                known = self._with_digests(known, digest)
            same = known is not None and known.matches(digest, digests.dataset, digests.content)
            if (
                known is not None
                and known.integrity == "ok"
                and (same or self.on_conflict == "keep")
            ):
                if same:
                    result = IngestResult(
                        StoreOutcome.DUPLICATE,
                        object_key=known.object_key,
                        size=known.size,
                        **uids,
                    )
                else:
                    log.warning(
                        "different object under a stored SOP Instance UID: kept the stored one",
                        extra={
                            "sop_instance_uid": header.sop_instance_uid,
                            "source": source.kind,
                            "calling_aet": source.calling_aet,
                        },
                    )
                    result = IngestResult(
                        StoreOutcome.KEPT,
                        object_key=known.object_key,
                        size=known.size,
                        code="conflict",
                        reason=conflict_reason(header.sop_instance_uid),
                        **uids,
                    )
                self._count(source.kind, result, started)
                return result
            fields = index_fields(ds, self.extra)
            stored_ts, body, original = header.transfer_syntax, None, None
            if target and data is not None and target != header.transfer_syntax:
                body = self._transcode(data, target, header)
                if body is not None:
                    stored_ts, original = target, digest
                    digest, size = hashlib.sha256(body).digest(), len(body)
                    key = object_key(
                        header.study_uid, header.series_uid, header.sop_instance_uid, digest.hex()
                    )
            record = InstanceRecord(
                issuer=who.issuer,
                patient_id=who.patient_id,
                site=source.site,
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                study_uid=header.study_uid,
                series_uid=header.series_uid,
                stored_ts=stored_ts,
                original_ts=header.transfer_syntax,
                object_key=key,
                size=size,
                sha256=digest,
                received_at=utcnow(),
                original_sha256=original,
                dataset_sha256=digests.dataset,  # as received, even when transcoded
                content_sha256=digests.content,
                calling_aet=source.calling_aet,
                may_write=sites,
                origin=source.origin,
                identity=who,
                **fields,
            )
            try:
                if staged is not None and body is None:
                    pending, staged = staged, None
                    if overlap and stager is not None:
                        # in the pool that writes it, after its write: a
                        # worker that takes this has taken the write before
                        # it (first in, first out), so never waits on a
                        # task still queued
                        durable = stager.submit(_commit_staged, pending, key)
                    else:
                        pending.result().commit(key)
                else:
                    put(key, body)
            except StorageError as exc:
                raise Rejected("storage-error", f"the object could not be stored: {exc}") from None
        except Rejected as exc:
            result = IngestResult.rejected(exc, **uids)
            self._count(source.kind, result, started)
            log.info(
                "instance rejected",
                extra={"code": exc.code, "reason": exc.reason, "source": source.kind, **uids},
            )
            return result
        finally:
            if staged is not None:  # not committed: nothing may stay of it
                _drop(staged)
            with self._pool_lock:
                self._busy -= 1
        return Prepared(record, source.kind, started, durable)

    def _stored_digests(
        self, key: str, transfer_syntax: str
    ) -> tuple[bytes | None, bytes | None] | None:
        digests = stored_digests(self.store, key, transfer_syntax)
        return None if digests is None else (digests.dataset, digests.content)

    def _with_digests(self, known: StoredInstance, received: bytes) -> StoredInstance:
        """``known`` with the data set and content digests it was stored
        without (an object stored as received), read from its object when
        the whole-object digests alone cannot say it is the same object."""
        if (
            known.dataset_sha256 is not None
            or known.original_sha256 is not None
            or known.integrity != "ok"
            or received == known.sha256
        ):
            return known
        digests = stored_digests(self.store, known.object_key, known.stored_ts)
        if digests is None:
            return known
        return dataclasses.replace(
            known, dataset_sha256=digests.dataset, content_sha256=digests.content
        )

    def _spare_pool(self) -> ThreadPoolExecutor | None:
        """The threads that write staged objects and hash whole objects, when
        a core is likely idle (fewer instances in preparation than cores: a
        lone sender); None when every core has an instance of its own to
        prepare, where handing work to another thread only adds its cost."""
        with self._pool_lock:
            if self._busy > self._cores:
                return None
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max(4, min(32, self.config["ingest.batch_size"])),
                    thread_name_prefix="imag-ingest-write",
                )
            return self._pool

    def target_for(self, site: str) -> str | None:
        """The transfer syntax the site's policy stores in (None: as received)."""
        return POLICY_TARGETS.get(self.config.store_as_for(site))

    def _transcode(self, data: bytes, target: str, header: Header) -> bytes | None:
        """The object re-encoded for storage, None to store it as received
        (data that arrived lossy is never re-encoded)."""
        verify = (
            self.config["transcode.verify"] == "always"
            or random.random() < self.config["transcode.verify_sample"]
        )
        started = time.perf_counter()
        try:
            body = transcode(data, target, verify=verify)
        except LossySource:
            return None
        except TranscodeError as exc:
            raise Rejected(
                "corrupt-pixel-data",
                f"the pixel data cannot be re-encoded losslessly as the storage policy asks: {exc}",
            ) from None
        TRANSCODE_SECONDS.labels(target).observe(time.perf_counter() - started)
        return body

    # -- second half: the index commit ---------------------------------------------------

    def commit(self, prepared: Prepared) -> Future[IngestResult]:
        """Queue a prepared instance for the group-commit writer."""
        assert self.writer is not None, "this pipeline has no index writer"
        future = self.writer.submit(prepared)
        future.add_done_callback(lambda f: self._count_future(prepared, f))
        return future

    def ingest(self, data: bytes, source: Source) -> IngestResult:
        """Store one object; return once it is durable and indexed (or rejected).

        The object's fsync, rename and folder fsync overlap the index
        writer's statements for it; the writer's COMMIT waits for them, so
        an index row never commits before its object is durable, and a
        write that fails then rolls the instance back (``storage-error``)."""
        step = self.prepare(data, source, overlap=True)
        if isinstance(step, IngestResult):
            return step
        return self.commit(step).result()

    def ingest_file(self, path: str | os.PathLike, source: Source) -> IngestResult:
        """:meth:`ingest` for an object in a file, streamed rather than loaded."""
        step = self.prepare_file(path, source)
        if isinstance(step, IngestResult):
            return step
        return self.commit(step).result()

    # -- metrics --------------------------------------------------------------------------

    def _count_future(self, prepared: Prepared, future: Future[IngestResult]) -> None:
        if future.cancelled() or future.exception() is not None:
            # the index failed under it (an outage): answered with an error by
            # the caller, and counted here so that failed stores show somewhere
            INGEST_INSTANCES.labels(prepared.source_kind, "failed").inc()
            return
        result = future.result()
        self._count(prepared.source_kind, result, prepared.started)
        if result.outcome in (StoreOutcome.STORED, StoreOutcome.REPLACED):
            INGEST_BYTES.labels(prepared.source_kind).inc(result.size)

    @staticmethod
    def _count(kind: str, result: IngestResult, started: float) -> None:
        INGEST_INSTANCES.labels(kind, result.outcome or "rejected").inc()
        if result.outcome is None:
            INGEST_REJECTED.labels(result.code).inc()
        INGEST_SECONDS.labels(kind).observe(time.perf_counter() - started)


#: Where an object written before its header is read waits for its key: a
#: key no instance can have (not a UID), in a folder of its own.
STAGING_NEAR = "incoming/object"


class IndexWriter:
    """Commits prepared instances from one thread, many per transaction.

    Whatever is queued while a transaction runs goes into the next one, so the
    cost of a durable commit is shared by every sender waiting at that moment.
    A batch that fails is retried one instance at a time so that one bad row
    cannot fail its neighbours.  An instance refused for ownership inside the
    transaction is not a failure: it gets its refusal, the others commit.
    """

    def __init__(
        self,
        catalog: Catalog,
        store: ObjectStore,
        batch_size: int,
        on_conflict: str,
        hooks: Sequence[CommitHook] = (),
    ) -> None:
        self.catalog = catalog
        self.hooks = list(hooks)
        self.store = store
        self.batch_size = batch_size
        self.on_conflict = on_conflict
        self._queue: queue.Queue[tuple[Prepared, Future] | None] = queue.Queue()
        #: the SQLite planner's statistics, gathered again as the index grows
        self.statistics = Statistics(catalog.db)
        self.statistics.start()
        self._thread = threading.Thread(target=self._run, name="imag-index-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, prepared: Prepared) -> Future[IngestResult]:
        if self._closed:
            raise RuntimeError("the index writer is closed")
        future: Future[IngestResult] = Future()
        self._queue.put((prepared, future))
        return future

    def close(self) -> None:
        """Commit everything queued, then stop."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self.batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)
            self.statistics.count(len(batch))

    def _commit(self, batch: list[tuple[Prepared, Future]]) -> None:
        started = time.perf_counter()
        hooks = self.hooks
        if any(p.durable is not None for p, _ in batch):
            hooks = [*hooks, _wait_durable(batch)]
        try:
            results = self.catalog.commit([p.record for p, _ in batch], self.on_conflict, hooks)
        except Exception as exc:  # noqa: BLE001 - isolate the failing row below
            if len(batch) > 1:
                for one in batch:
                    self._commit([one])
                return
            prepared, future = batch[0]
            if isinstance(exc, NotDurable):  # nothing of it committed
                log.info(
                    "instance rejected",
                    extra={
                        "code": "storage-error",
                        "reason": str(exc),
                        "sop_instance_uid": prepared.record.sop_instance_uid,
                    },
                )
                future.set_result(
                    _result(prepared.record, None, Rejected("storage-error", str(exc)))
                )
                return
            if isinstance(exc, AuditUnavailable):  # logged by the audit log
                future.set_result(
                    _result(
                        prepared.record,
                        None,
                        Rejected(
                            "audit-error",
                            "the audit trail could not be written, so the instance was not "
                            "stored; retry later",
                        ),
                    )
                )
                return
            log.exception(
                "index commit failed", extra={"sop_instance_uid": prepared.record.sop_instance_uid}
            )
            # The object stays in the store unindexed; `imag verify` reports it
            # as an orphan.  Deleting it here could remove an object that a
            # concurrent commit indexed under the same content-derived key.
            future.set_result(
                _result(
                    prepared.record,
                    None,
                    Rejected("index-error", "the index could not record the instance; retry later"),
                )
            )
            return
        INDEX_COMMIT_SECONDS.observe(time.perf_counter() - started)
        INDEX_BATCH_SIZE.observe(len(batch))
        for (prepared, future), result in zip(batch, results, strict=True):
            record = prepared.record
            obsolete = result.obsolete_key
            if result.outcome is StoreOutcome.REFUSED and not self._referenced(record):
                obsolete = record.object_key  # the refused sender's own object
            if obsolete:
                try:
                    self.store.delete(obsolete)
                except StorageError:
                    log.warning(
                        "could not delete an obsolete object; imag verify will report it",
                        extra={"object_key": obsolete},
                    )
            outcome = ingest_result(record, result)
            outcome.audited = record.origin is not None
            future.set_result(outcome)

    def _referenced(self, record: InstanceRecord) -> bool:
        """Whether an index row points at the object a refused record wrote: an
        identical object sent by the owning site has the same content-derived
        key, and must stay.  (When the check fails, keep the object: an orphan
        is reported by ``imag verify``; a deleted object that is indexed is lost.)"""
        try:
            return self.catalog.references(record.object_key, record.sop_instance_uid)
        except Exception:  # noqa: BLE001 - see the docstring
            log.warning("could not check a refused object's key", exc_info=True)
            return True


def _start(header: Header, stream: Callable[[], BinaryIO]) -> int:
    """Where the data set of a parsed object starts: what its parse read, or
    (when the file meta was left to pydicom) :func:`dataset_offset` of it."""
    if header.dataset_start is not None:
        return header.dataset_start
    return dataset_offset(stream())


def _commit_staged(staged: Future[StagedPut], key: str) -> int:
    """``staged``, once written, renamed to ``key`` and its folder fsynced."""
    return staged.result().commit(key)


def _wait_durable(batch: list[tuple[Prepared, Future]]) -> CommitHook:
    """The commit hook that holds the transaction of ``batch`` until each of
    its objects is durable; run last, just before COMMIT."""

    def wait(db: object, done: object) -> None:
        for prepared, _ in batch:
            if prepared.durable is not None:
                try:
                    prepared.durable.result()
                except Exception as exc:  # noqa: BLE001 - StorageError, or the write's own
                    raise NotDurable(exc) from exc

    return wait


def _drop(staged: Future[StagedPut]) -> None:
    """Remove a staged object that will not be committed (the instance was
    refused or failed after its write began)."""
    try:
        staged.result().abort()
    except StorageError:
        pass  # nothing was written


def ingest_result(record: InstanceRecord, result: CommitResult) -> IngestResult:
    """The pipeline's answer for a record that :meth:`Catalog.commit` decided on."""
    if result.outcome is StoreOutcome.REFUSED:
        return _result(record, None, Rejected(result.code, result.reason))
    out = _result(record, result.outcome, None, key=result.object_key)
    out.code, out.reason = result.code, result.reason
    return out


def _result(
    record: InstanceRecord, outcome: StoreOutcome | None, rejected: Rejected | None, key: str = ""
) -> IngestResult:
    return IngestResult(
        outcome,
        sop_instance_uid=record.sop_instance_uid,
        study_uid=record.study_uid,
        series_uid=record.series_uid,
        sop_class_uid=record.sop_class_uid,
        object_key=key or record.object_key,
        size=record.size,
        code=rejected.code if rejected else "",
        reason=rejected.reason if rejected else "",
    )


def store_audit_entry(
    origin: Origin, result: IngestResult, patient_id: str | None = None
) -> AuditEntry:
    """The audit entry of one C-STORE: who sent it, the study it names, what
    became of it (the status it is answered with), and its SOP Instance UID;
    ``patient_id``, the study's patient when the commit knows it (else the
    audit log looks it up from the study)."""
    detail: dict = {"instances": [result.sop_instance_uid] if result.sop_instance_uid else []}
    if origin.site:
        detail["site"] = origin.site
    detail["result"] = str(result.outcome) if result.outcome is not None else "refused"
    if result.code:
        detail["code"] = result.code
    if not result.ok and result.reason:
        detail["reason"] = result.reason
    return AuditEntry(
        origin.actor,
        origin.actor_kind,
        "dicom.c-store",
        result.audit_outcome,
        role=origin.role,
        status=result.dimse_status,
        study_uid=result.study_uid or None,
        patient_id=patient_id,
        source=origin.source,
        detail=detail,
    )


def commit_hooks(config: Config) -> list[CommitHook]:
    """What plugins do inside each commit of new instances (``imag_ingest_commit_hooks``:
    the core's change events and study stability, routing of single instances)."""
    from archive import plugins

    return plugins.listed("imag_ingest_commit_hooks", config=config)


def audit_hook(audit: AuditLog) -> CommitHook:
    """A commit hook writing the audit entry of every record that names its
    origin (C-STORE), in the commit's transaction: the entry is durable
    exactly when the index row is, and when it cannot be written the
    transaction fails and the instance is not acknowledged."""

    def hook(db: Database, done: list[tuple[InstanceRecord, CommitResult]]) -> None:
        for record, result in done:
            if record.origin is not None:
                outcome = ingest_result(record, result)
                audit.write(store_audit_entry(record.origin, outcome, result.patient_id))

    return hook
