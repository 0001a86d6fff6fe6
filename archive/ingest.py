"""The one ingest pipeline, used by C-STORE, STOW-RS and ``imag import``.

bytes → parse the header (no pixel decode) → validate → resolve the patient
(identity plugin) → write the object durably → commit the index rows → only
then report success.

The two halves can run in different places: :meth:`IngestPipeline.prepare`
(parse, validate, hash, write the object) is safe to run in many threads or
processes at once, and :class:`IndexWriter` commits prepared instances in
group transactions from one thread, so that concurrent senders share one
durable commit instead of paying one each.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from archive.config import Config
from archive.identity import IdentityPlugin, Source, load_identity_plugin
from archive.index import Catalog, Database, InstanceRecord, StoreOutcome
from archive.index.catalog import CommitHook
from archive.index.db import utcnow
from archive.metrics import (
    INDEX_BATCH_SIZE,
    INDEX_COMMIT_SECONDS,
    INGEST_BYTES,
    INGEST_INSTANCES,
    INGEST_REJECTED,
    INGEST_SECONDS,
    TRANSCODE_SECONDS,
)
from archive.parse import Header, Rejected, index_fields, parse_header, parse_header_file
from archive.routing import commit_hook as routing_hook
from archive.stability import commit_hook
from archive.transcode import LossySource, TranscodeError, transcode
from archive.uids import object_key
from storage import ObjectStore, StorageError

log = logging.getLogger(__name__)

#: ``store_as`` policies and the transfer syntax each stores in
POLICY_TARGETS = {
    "htj2k-lossless": "1.2.840.10008.1.2.4.201",
    "j2k-lossless": "1.2.840.10008.1.2.4.90",
    "jpegls-lossless": "1.2.840.10008.1.2.4.80",
    "rle-lossless": "1.2.840.10008.1.2.5",
}


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
    code: str = ""  # rejection code
    reason: str = ""  # rejection reason, for the sender

    @property
    def ok(self) -> bool:
        """Whether the sender may be told the instance is stored."""
        return self.outcome is not None

    @classmethod
    def rejected(cls, exc: Rejected, **uids: str) -> IngestResult:
        return cls(None, code=exc.code, reason=exc.reason, **uids)


@dataclass
class Prepared:
    """An instance whose object is durable and whose index row is not yet committed."""

    record: InstanceRecord
    source_kind: str
    started: float


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
        self.catalog = Catalog(db)
        self.identity = identity or load_identity_plugin(config["plugins.identity"])
        self.max_bytes: int = config["ingest.max_object_bytes"]
        self.site_policy: dict[str, str] = {
            s["name"]: s["store_as"] for s in config["sites"] if s.get("store_as")
        }
        self.on_conflict: str = config["ingest.on_conflict"]
        self.writer = (
            IndexWriter(
                self.catalog,
                store,
                config["ingest.batch_size"],
                self.on_conflict,
                hooks=[commit_hook(config), routing_hook(config)],
            )
            if writer
            else None
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    # -- first half: runs anywhere, in parallel --------------------------------------

    def prepare(self, data: bytes, source: Source) -> Prepared | IngestResult:
        """Validate ``data`` and make its object durable.

        Returns a :class:`Prepared` to commit, or a final :class:`IngestResult`
        when nothing needs committing (rejected, or already stored).
        """
        return self._prepare(
            source,
            len(data),
            lambda: parse_header(data),
            lambda: hashlib.sha256(data).digest(),
            lambda key, body: self.store.put(key, data if body is None else body),
            data=data,
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

            def digest() -> bytes:
                fp.seek(0)
                return hashlib.file_digest(fp, "sha256").digest()

            def put(key: str, body: bytes | None) -> None:
                fp.seek(0)
                self.store.put(key, fp if body is None else body)

            return self._prepare(source, size, lambda: parse_header_file(fp, size), digest, put)

    def _prepare(
        self,
        source: Source,
        size: int,
        header_of: Callable[[], Header],
        digest_of: Callable[[], bytes],
        put: Callable[[str, bytes | None], object],
        data: bytes | None = None,
    ) -> Prepared | IngestResult:
        started = time.perf_counter()
        uids: dict[str, str] = {}
        try:
            if size > self.max_bytes:
                raise Rejected(
                    "too-large",
                    f"the object is {size} bytes, over the limit of {self.max_bytes} "
                    "(setting ingest.max_object_bytes)",
                )
            header = header_of()
            uids = {
                "sop_instance_uid": header.sop_instance_uid,
                "study_uid": header.study_uid,
                "series_uid": header.series_uid,
                "sop_class_uid": header.sop_class_uid,
            }
            if source.scope is not None:
                owner = self.catalog.study_site(header.study_uid)
                if owner is not None and owner not in source.scope.sites:
                    raise Rejected(
                        "forbidden",
                        f"study {header.study_uid} belongs to another site than the sender's "
                        f"({', '.join(sorted(source.scope.sites)) or 'none'})",
                    )
            ds = header.dataset
            who = self.identity.resolve(ds, source)
            digest = digest_of()
            key = object_key(
                header.study_uid, header.series_uid, header.sop_instance_uid, digest.hex()
            )
            known = self.catalog.find_instance(header.sop_instance_uid)
            if (
                known is not None
                and known.integrity == "ok"
                and (known.matches(digest) or self.on_conflict == "keep")
            ):
                outcome = StoreOutcome.DUPLICATE if known.matches(digest) else StoreOutcome.KEPT
                if outcome is StoreOutcome.KEPT:
                    log.warning(
                        "different object under a stored SOP Instance UID: kept the stored one",
                        extra={
                            "sop_instance_uid": header.sop_instance_uid,
                            "source": source.kind,
                            "calling_aet": source.calling_aet,
                        },
                    )
                result = IngestResult(outcome, object_key=known.object_key, size=known.size, **uids)
                self._count(source.kind, result, started)
                return result
            fields = index_fields(ds)
            stored_ts, body, original = header.transfer_syntax, None, None
            target = self.target_for(source.site)
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
                calling_aet=source.calling_aet,
                **fields,
            )
            try:
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
        return Prepared(record, source.kind, started)

    def target_for(self, site: str) -> str | None:
        """The transfer syntax the site's policy stores in (None: as received)."""
        policy = self.site_policy.get(site) or self.config["store_as"]
        return POLICY_TARGETS.get(policy)

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
        """Store one object; return once it is durable and indexed (or rejected)."""
        step = self.prepare(data, source)
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
        if not future.cancelled() and future.exception() is None:
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


class IndexWriter:
    """Commits prepared instances from one thread, many per transaction.

    Whatever is queued while a transaction runs goes into the next one, so the
    cost of a durable commit is shared by every sender waiting at that moment.
    A batch that fails is retried one instance at a time so that one bad row
    cannot fail its neighbours.
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

    def _commit(self, batch: list[tuple[Prepared, Future]]) -> None:
        started = time.perf_counter()
        try:
            results = self.catalog.commit(
                [p.record for p, _ in batch], self.on_conflict, self.hooks
            )
        except Exception:  # noqa: BLE001 - isolate the failing row below
            if len(batch) > 1:
                for one in batch:
                    self._commit([one])
                return
            prepared, future = batch[0]
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
            if result.obsolete_key:
                try:
                    self.store.delete(result.obsolete_key)
                except StorageError:
                    log.warning(
                        "could not delete an obsolete object; imag verify will report it",
                        extra={"object_key": result.obsolete_key},
                    )
            future.set_result(_result(prepared.record, result.outcome, None, key=result.object_key))


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
