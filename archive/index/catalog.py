"""Reading and writing the patient / study / series / instance rows.

``Catalog.commit`` is the index half of the ingest pipeline: it takes a batch
of instance records whose objects are already durable in the object store and
commits their rows in one transaction, keeping study and series counts,
sizes and ModalitiesInStudy current.  Everything that reads the index for
administration (stats, verify) lives here too; searches get their own module.
The values of the extra indexed attributes (:mod:`archive.index.extra`)
go into their side tables in the same transaction, one multi-row insert per
batch; a replaced instance's values are the new object's.

**Ownership.**  A study, its series and its instances belong to the site that
created the study (``studies.site``); a local patient identity belongs to the
site that filed it (``patients.site``, see :mod:`archive.identity`).  A record
whose sender may write only for some sites (``InstanceRecord.may_write``) is
refused when its study, its series or its SOP Instance UID belongs to another
site, and a series that exists under another study is refused whoever sends
it (a series belongs to one study).  The pipeline checks this before writing
the object (a cheap early refusal); :meth:`Catalog.commit` checks it again
inside the transaction, after its ``ON CONFLICT`` inserts, so that when two
sites create the same new study at once the study's unique UID decides which
one owns it and the other is refused: a constraint, not check-then-insert.

**Duplicates.**  An instance sent again under a stored SOP Instance UID is a
duplicate (an idempotent success) when it is the same data set, whatever file
meta it came with: a C-STORE receiver writes its own file meta (another
implementation UID and version, no source AE title), so the same instance
imported from a file and then sent by C-STORE (or routed again by a peer) is
two files with one data set.  :func:`same_object` compares the digest of the
data set bytes (``instances.dataset_sha256``, the bytes after the File Meta
Information group), then the digest of its content
(``instances.content_sha256``, :mod:`archive.contentdigest`: the same values
re-encoded by a relay -- trailing padding dropped, sequence lengths made
explicit, Implicit VR sent as Explicit VR -- are the same content) and, for
rows stored before those columns, the whole-object digests.  Other values,
another byte order or other pixel bytes are another data set, so still a
conflict.
"""

from __future__ import annotations

import enum
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from archive.index import extra as extra_attributes
from archive.index.db import Database, utcnow
from archive.index.extra import ExtraValue
from archive.index.names import fold

log = logging.getLogger(__name__)


class StoreOutcome(enum.StrEnum):
    """What committing one instance did."""

    STORED = "stored"  # new SOP Instance UID
    DUPLICATE = "duplicate"  # the same data set already stored: idempotent success
    KEPT = "kept"  # different object under a known UID, policy 'keep': stored one kept
    REPLACED = "replaced"  # different object under a known UID, policy 'replace'
    #: nothing written: the study, series or instance belongs to another site, or
    #: the series to another study (``CommitResult.code`` / ``reason`` say which).
    #: Only in :class:`CommitResult`; the pipeline turns it into a rejection.
    REFUSED = "refused"


@dataclass(frozen=True)
class Origin:
    """Who sent an instance and from where, for the audit entry committed with
    its index row (C-STORE); None for paths audited per request (STOW-RS) or
    not per instance (``imag import``)."""

    actor: str  # the calling AE title
    actor_kind: str = "peer"
    role: str | None = None  # "site-peer", "regional-peer", None: unknown AE
    source: str = ""  # "AET@address"
    site: str = ""  # the peer's site, when bound to one


@dataclass
class InstanceRecord:
    """Everything the index keeps about one instance, extracted at ingest."""

    # patient (site + issuer + patient_id is the key)
    issuer: str
    patient_id: str
    patient_name: str | None
    birth_date: str | None
    sex: str | None
    # study
    study_uid: str
    study_date: str | None
    study_time: str | None
    accession_number: str | None
    study_id: str | None
    study_description: str | None
    referring_physician_name: str | None
    institution_name: str | None
    site: str
    # series
    series_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    body_part_examined: str | None
    pps_start_date: str | None
    pps_start_time: str | None
    # instance
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    number_of_frames: int | None
    stored_ts: str
    original_ts: str
    object_key: str
    size: int
    sha256: bytes
    received_at: datetime = field(default_factory=utcnow)
    #: digest of the bytes as received, when the stored object was transcoded
    original_sha256: bytes | None = None
    #: digest of the data set bytes as received (after the file meta, see
    #: :func:`same_object`); None only for records made without one
    dataset_sha256: bytes | None = None
    #: digest of the data set's content as received, whatever its encoding
    #: (:mod:`archive.contentdigest`); None when it could not be computed
    content_sha256: bytes | None = None
    #: the sender's AE title (routing rules match on it; not stored)
    calling_aet: str = ""
    #: the sites whose studies the sender may add to; None: any (regional, admin)
    may_write: frozenset[str] | None = None
    #: who sent it, when its audit entry commits with its row (C-STORE)
    origin: Origin | None = None
    #: what the identity provider resolved (:class:`archive.identity.PatientIdentity`,
    #: with the INS, status and traits it read), for its commit hook; not stored
    identity: Any = None
    #: values of the configured extra attributes (:mod:`archive.index.extra`):
    #: the series-level ones are written with a new series, the instance-level
    #: ones with the instance row
    extra: tuple[ExtraValue, ...] = ()


@dataclass(frozen=True)
class CommitResult:
    outcome: StoreOutcome
    #: an object key that no index row references any more after this commit
    #: (the replaced object, or the new object that policy 'keep' refused);
    #: the caller deletes it once the transaction is durable.
    obsolete_key: str | None = None
    #: the key the index now holds for this SOP Instance UID
    object_key: str = ""
    #: why the instance was not stored (REFUSED: "forbidden" / "inconsistent";
    #: KEPT: "conflict"), in words the sender may read
    code: str = ""
    reason: str = ""
    #: the Patient ID of the study's patient in the index, once the instance
    #: is in its study (its C-STORE audit entry names it without a look-up);
    #: None when not known
    patient_id: str | None = None


CommitHook = Callable[["Database", list[tuple[InstanceRecord, CommitResult]]], None]


@dataclass(frozen=True)
class Refusal:
    """Why an instance may not be added where it says it belongs.  The reason
    names only what the sender sent: never another site's study, patient or
    site name."""

    code: str  # "forbidden" (another site's) or "inconsistent"
    reason: str


def may_write(sites: frozenset[str] | None, owner: str) -> bool:
    """Whether a sender writing for ``sites`` (None: any) may add to data of ``owner``."""
    return sites is None or owner in sites


def _yours(sites: frozenset[str] | None) -> str:
    return ", ".join(sorted(sites or ())) or "none"


def foreign_study(study_uid: str, sites: frozenset[str] | None) -> Refusal:
    return Refusal(
        "forbidden",
        f"study {study_uid} belongs to another site than the sender's ({_yours(sites)}); "
        "a site adds instances only to its own studies",
    )


def foreign_series(series_uid: str, sites: frozenset[str] | None, owner: str) -> Refusal:
    """A series already stored under another study than the one the instance names."""
    if not may_write(sites, owner):
        return Refusal(
            "forbidden",
            f"series {series_uid} belongs to a study of another site than the sender's "
            f"({_yours(sites)}); a site adds instances only to its own series",
        )
    return Refusal(
        "inconsistent",
        f"series {series_uid} is already stored under another study; a series belongs to "
        "one study: check the instance's Study and Series Instance UIDs",
    )


def foreign_instance(sop_instance_uid: str, sites: frozenset[str] | None) -> Refusal:
    return Refusal(
        "forbidden",
        f"SOP Instance UID {sop_instance_uid} is stored in a study of another site than the "
        f"sender's ({_yours(sites)}); it cannot be stored or replaced by this sender",
    )


def same_object(
    received: bytes,
    received_dataset: bytes | None,
    stored: bytes,
    stored_original: bytes | None,
    stored_dataset: bytes | None,
    received_content: bytes | None = None,
    stored_content: bytes | None = None,
) -> bool:
    """Whether an object received under a stored SOP Instance UID is the one
    stored, so a duplicate: the same bytes (the stored object, or what it was
    transcoded from), or the same data set under another file meta (equal
    digests of the bytes after the File Meta Information group).

    Or the same content (equal content digests, :mod:`archive.contentdigest`):
    the values a relay re-encoded without changing them (trailing padding
    dropped, sequence lengths made explicit, Implicit VR sent as Explicit VR).
    Other values, another byte order or other pixel bytes (a lossless
    re-compression included) are a conflict.  A row stored before these
    digests were recorded (None) is compared by the digests it has."""
    if received in (stored, stored_original):
        return True
    if stored_dataset is not None and received_dataset == stored_dataset:
        return True
    return stored_content is not None and received_content == stored_content


def conflict_reason(sop_instance_uid: str) -> str:
    return (
        f"a different object is already stored under SOP Instance UID {sop_instance_uid}; "
        "the stored one was kept and the object sent was not stored "
        "(setting ingest.on_conflict = keep)"
    )


@dataclass(frozen=True)
class StoredInstance:
    id: int
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    object_key: str
    size: int
    sha256: bytes
    integrity: str
    original_sha256: bytes | None = None
    stored_ts: str = ""
    #: the site owning the instance's study
    site: str = ""
    #: digest of the data set as received (None: stored before it was recorded)
    dataset_sha256: bytes | None = None
    #: digest of the content as received (None: not recorded)
    content_sha256: bytes | None = None

    def matches(
        self,
        received_sha256: bytes,
        dataset_sha256: bytes | None = None,
        content_sha256: bytes | None = None,
    ) -> bool:
        """Whether an object with these digests (whole object, data set after
        its file meta, content) is the one stored: see :func:`same_object`."""
        return same_object(
            received_sha256,
            dataset_sha256,
            self.sha256,
            self.original_sha256,
            self.dataset_sha256,
            content_sha256,
            self.content_sha256,
        )


def normalise_pn(name: str | None) -> str | None:
    """The form person names are matched in: upper case (MÜLLER matches
    Müller), without trailing empty components ("DOE^JOHN^^" is "DOE^JOHN")."""
    if name is None:
        return None
    return name.upper().rstrip("^ ")


@dataclass
class _StudyRow:
    id: int
    site: str
    #: the Patient ID of its patient, when read or written with it
    patient_id: str | None = None


def _study_row(r: InstanceRecord, ref: int, site: str, issuer: str, patient_id: str) -> _StudyRow:
    """The study row ``r`` names, read with its patient's (issuer, Patient ID):
    an instance naming another patient goes into the study all the same
    (logged)."""
    if (issuer, patient_id) != (r.issuer, r.patient_id) and may_write(r.may_write, site):
        log.warning(
            "instance names another patient than its stored study; kept the study's",
            extra={"study_uid": r.study_uid, "sop_instance_uid": r.sop_instance_uid},
        )
    return _StudyRow(ref, site, patient_id)


@dataclass
class _SeriesRow:
    id: int
    study_ref: int
    study_uid: str
    site: str


@dataclass
class _Existing:
    """The stored row of a SOP Instance UID, as a commit sees it."""

    id: int
    series_ref: int
    object_key: str
    size: int
    sha256: bytes
    original_sha256: bytes | None
    integrity: str
    site: str
    dataset_sha256: bytes | None = None
    content_sha256: bytes | None = None
    stored_ts: str = ""


class _Undo(Exception):
    """Abandon one record of a batch: what it wrote is rolled back to its savepoint."""

    def __init__(self, result: CommitResult) -> None:
        self.result = result


@dataclass
class _Batch:
    """What one commit learnt and changed so far, shared by its records."""

    patients: dict[tuple[str, str, str], int] = field(default_factory=dict)
    studies: dict[str, _StudyRow] = field(default_factory=dict)
    series: dict[str, _SeriesRow] = field(default_factory=dict)
    new_series_by_study: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    # (count, bytes) deltas per series and per study
    d_series: dict[int, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    d_study: dict[int, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    series_study: dict[int, int] = field(default_factory=dict)
    #: extra attribute rows (ref, tag, n, value) to insert at the end, per level
    extra_rows: dict[str, list[tuple[int, int, int, str]]] = field(
        default_factory=lambda: {"SERIES": [], "IMAGE": []}
    )


#: the instance columns a commit writes from its record, inserted or replaced alike
_ROW_COLUMNS = (
    "sop_class_uid",
    "instance_number",
    "number_of_frames",
    "stored_ts",
    "original_ts",
    "object_key",
    "size",
    "sha256",
    "received_at",
    "original_sha256",
    "dataset_sha256",
    "content_sha256",
)


def _row_values(r: InstanceRecord) -> tuple:
    return tuple(getattr(r, column) for column in _ROW_COLUMNS)


#: reads the data set and content digests of a stored object (its key, its
#: transfer syntax); None when the object cannot be read
StoredDigests = Callable[[str, str], "tuple[bytes | None, bytes | None] | None"]


class Catalog:
    """The archive's view of the index tables.

    ``stored_digests`` lets a commit compare an instance whose data set and
    content digests were not computed at ingest (an object stored as
    received gets only its whole-object digest, see :mod:`archive.ingest`)
    with the row stored under its SOP Instance UID: the missing digests are
    then read from the objects themselves, only in that rare case."""

    def __init__(self, db: Database, stored_digests: StoredDigests | None = None) -> None:
        self.db = db
        self.stored_digests = stored_digests

    # -- writes -----------------------------------------------------------------

    def commit(
        self,
        records: Sequence[InstanceRecord],
        on_conflict: str = "keep",
        hooks: Sequence[CommitHook] = (),
    ) -> list[CommitResult]:
        """Commit ``records`` in one transaction and say what happened to each.

        A record refused for ownership (REFUSED), or that turns out a duplicate
        or a kept conflict, leaves no row behind (what it created is rolled
        back to its savepoint) while the other records of the batch commit.
        ``hooks`` run inside the transaction with (record, result) pairs, so
        what they write (the change feed, stability jobs, audit entries)
        commits with the rows or not at all."""
        db = self.db
        now = db.clock.now()
        results: list[CommitResult] = []
        with db.transaction(pipeline=True):  # the counters' UPDATEs and the hooks' writes
            batch = _Batch()
            for r in records:
                results.append(self._commit_one(r, on_conflict, batch, now))

            for ref, (count, size) in batch.d_series.items():
                db.execute(
                    "UPDATE series SET num_instances = num_instances + ?, "
                    "total_bytes = total_bytes + ?, updated_at = ? WHERE id = ?",
                    (count, size, now, ref),
                )
            new_series = dict(batch.new_series_by_study)
            for ref, (count, size) in batch.d_study.items():
                db.execute(
                    "UPDATE studies SET num_instances = num_instances + ?, "
                    "total_bytes = total_bytes + ?, num_series = num_series + ?, "
                    "updated_at = ? WHERE id = ?",
                    (count, size, new_series.pop(ref, 0), now, ref),
                )
            for ref, count in new_series.items():
                db.execute(
                    "UPDATE studies SET num_series = num_series + ? WHERE id = ?", (count, ref)
                )
            for level, rows in batch.extra_rows.items():  # one multi-row insert per batch
                extra_attributes.insert(db, level, rows)
            done = list(zip(records, results, strict=True))
            for hook in hooks:
                hook(db, done)
        return results

    def _commit_one(
        self, r: InstanceRecord, on_conflict: str, batch: _Batch, now: datetime
    ) -> CommitResult:
        """Commit one record inside the batch's transaction."""
        sites = r.may_write
        # Read-only checks first: a refusal found here has written nothing.
        study = batch.studies.get(r.study_uid)
        series = batch.series.get(r.series_uid)
        read_series = series is not None
        if study is None and series is None:
            # most instances belong to a series the index has: one read finds both
            series, study = self._find_series_and_study(r)
            read_series = True
        if study is None:
            study = self._find_study(r)
        if study is not None and not may_write(sites, study.site):
            return _refused(foreign_study(r.study_uid, sites))
        if not read_series:
            series = self._find_series(r.series_uid)
        if series is not None and series.study_uid != r.study_uid:
            return _refused(foreign_series(r.series_uid, sites, series.site))
        creating = study is None or series is None
        existing = self._find_existing(r.sop_instance_uid) if creating else None
        if existing is not None:
            decided = _decide(r, existing, on_conflict, self.stored_digests)
            if decided is not None:
                return decided  # nothing to create for an instance that will not be stored
        # Writes.  Creating a study or a series may still be refused when a
        # concurrent transaction created it first (the ON CONFLICT insert waits
        # for it): a savepoint lets this record alone be undone.
        if creating:
            self.db.execute("SAVEPOINT imag_record")
        added_patient: tuple[tuple[str, str, str], int] | None = None
        try:
            if study is None:
                study, added_patient = self._create_study(r, batch, now)
            new_series = False
            if series is None:
                series, new_series = self._create_series(r, study, now)
            result, moved, instance_id = self._instance(r, series.id, on_conflict, existing)
        except _Undo as undo:
            if creating:
                self.db.execute("ROLLBACK TO SAVEPOINT imag_record")
                self.db.execute("RELEASE SAVEPOINT imag_record")
            return undo.result
        if creating:
            self.db.execute("RELEASE SAVEPOINT imag_record")
        # The record is in: remember what it created for the next records.
        if added_patient is not None:
            batch.patients[added_patient[0]] = added_patient[1]
        batch.studies[r.study_uid] = study
        batch.series[r.series_uid] = series
        batch.series_study[series.id] = study.id
        if new_series:
            batch.new_series_by_study[study.id] += 1
        if result.outcome == StoreOutcome.REPLACED:  # its values are the new object's
            extra_attributes.delete(self.db, "IMAGE", [instance_id])
        for v in r.extra:
            if v.level == "IMAGE":
                batch.extra_rows["IMAGE"].append((instance_id, v.tag, v.n, v.value))
            elif new_series:  # a series' values are its first instance's, as its columns
                batch.extra_rows["SERIES"].append((series.id, v.tag, v.n, v.value))
        for ref, count, size in moved:
            if ref not in batch.series_study:
                batch.series_study[ref] = self.db.scalar(
                    "SELECT study_ref FROM series WHERE id = ?", (ref,)
                )
            batch.d_series[ref][0] += count
            batch.d_series[ref][1] += size
            batch.d_study[batch.series_study[ref]][0] += count
            batch.d_study[batch.series_study[ref]][1] += size
        if study.patient_id is not None:
            result = replace(result, patient_id=study.patient_id)
        return result

    def _find_study(self, r: InstanceRecord) -> _StudyRow | None:
        row = self.db.query_one(
            "SELECT st.id, st.site, p.issuer, p.patient_id FROM studies st "
            "JOIN patients p ON p.id = st.patient_ref WHERE st.study_uid = ?",
            (r.study_uid,),
        )
        if row is None:
            return None
        return _study_row(r, *row)

    def _find_series_and_study(
        self, r: InstanceRecord
    ) -> tuple[_SeriesRow | None, _StudyRow | None]:
        """The series of ``r`` and, when it is in ``r``'s study, that study
        (else None: the caller reads the study by its UID)."""
        row = self.db.query_one(
            "SELECT se.id, se.study_ref, st.study_uid, st.site, p.issuer, p.patient_id "
            "FROM series se JOIN studies st ON st.id = se.study_ref "
            "JOIN patients p ON p.id = st.patient_ref WHERE se.series_uid = ?",
            (r.series_uid,),
        )
        if row is None:
            return None, None
        series = _SeriesRow(*row[:4])
        if series.study_uid != r.study_uid:
            return series, None
        return series, _study_row(r, row[1], row[3], row[4], row[5])

    def _find_series(self, series_uid: str) -> _SeriesRow | None:
        row = self.db.query_one(
            "SELECT se.id, se.study_ref, st.study_uid, st.site FROM series se "
            "JOIN studies st ON st.id = se.study_ref WHERE se.series_uid = ?",
            (series_uid,),
        )
        return _SeriesRow(*row) if row else None

    def _find_existing(self, sop_instance_uid: str) -> _Existing | None:
        row = self.db.query_one(
            "SELECT i.id, i.series_ref, i.object_key, i.size, i.sha256, i.original_sha256, "
            "i.integrity, st.site, i.dataset_sha256, i.content_sha256, i.stored_ts "
            "FROM instances i JOIN series se ON se.id = i.series_ref "
            "JOIN studies st ON st.id = se.study_ref WHERE i.sop_instance_uid = ?",
            (sop_instance_uid,),
        )
        if row is None:
            return None
        return _Existing(
            row[0],
            row[1],
            row[2],
            int(row[3]),
            bytes(row[4]),
            bytes(row[5]) if row[5] is not None else None,
            row[6],
            row[7],
            bytes(row[8]) if row[8] is not None else None,
            bytes(row[9]) if row[9] is not None else None,
            row[10] or "",
        )

    def _patient(self, r: InstanceRecord, now: datetime) -> tuple[int, bool]:
        """The patient row of (site, issuer, patient ID), created if needed;
        and whether this call created it."""
        db = self.db
        key = (r.site, r.issuer, r.patient_id)
        where = "SELECT id FROM patients WHERE site = ? AND issuer = ? AND patient_id = ?"
        row = db.query_one(where, key)
        if row:
            return row[0], False
        row = db.query_one(
            "INSERT INTO patients (site, issuer, patient_id, patient_name, patient_name_norm, "
            "patient_name_fold, birth_date, sex, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (site, issuer, patient_id) DO NOTHING RETURNING id",
            (
                r.site,
                r.issuer,
                r.patient_id,
                r.patient_name,
                normalise_pn(r.patient_name),
                fold(normalise_pn(r.patient_name)),
                r.birth_date,
                r.sex,
                now,
            ),
        )
        if row:
            return row[0], True
        # another process inserted it between our SELECT and INSERT
        return db.scalar(where, key), False

    def _create_study(
        self, r: InstanceRecord, batch: _Batch, now: datetime
    ) -> tuple[_StudyRow, tuple[tuple[str, str, str], int] | None]:
        """Insert the study (and its patient); raise :class:`_Undo` when a
        concurrent transaction created it first for a site the sender may not
        write for."""
        db = self.db
        key = (r.site, r.issuer, r.patient_id)
        added = None
        patient_ref = batch.patients.get(key)
        if patient_ref is None:
            patient_ref, _created = self._patient(r, now)
            added = (key, patient_ref)
        row = db.query_one(
            "INSERT INTO studies (patient_ref, study_uid, study_date, study_time, "
            "accession_number, study_id, study_description, referring_physician_name, "
            "referring_physician_name_norm, referring_physician_name_fold, institution_name, site, "
            "created_at, updated_at, patient_name_norm, patient_name_fold) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            # the patient row's names, which may predate this instance's (0020/0021)
            "(SELECT patient_name_norm FROM patients WHERE id = ?), "
            "(SELECT patient_name_fold FROM patients WHERE id = ?)) "
            "ON CONFLICT (study_uid) DO NOTHING RETURNING id",
            (
                patient_ref,
                r.study_uid,
                r.study_date,
                r.study_time,
                r.accession_number,
                r.study_id,
                r.study_description,
                r.referring_physician_name,
                normalise_pn(r.referring_physician_name),
                fold(normalise_pn(r.referring_physician_name)),
                r.institution_name,
                r.site,
                now,
                now,
                patient_ref,
                patient_ref,
            ),
        )
        if row:
            return _StudyRow(row[0], r.site, r.patient_id), added
        # A concurrent transaction created it first: the unique Study Instance
        # UID decided who owns it.
        found = db.query_one("SELECT id, site FROM studies WHERE study_uid = ?", (r.study_uid,))
        study = _StudyRow(found[0], found[1])
        if not may_write(r.may_write, study.site):
            raise _Undo(_refused(foreign_study(r.study_uid, r.may_write)))
        return study, added

    def _create_series(
        self, r: InstanceRecord, study: _StudyRow, now: datetime
    ) -> tuple[_SeriesRow, bool]:
        """Insert the series under ``study``; raise :class:`_Undo` when a
        concurrent transaction created it first under another study."""
        db = self.db
        row = db.query_one(
            "INSERT INTO series (study_ref, series_uid, modality, series_number, "
            "series_description, body_part_examined, pps_start_date, pps_start_time, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (series_uid) DO NOTHING RETURNING id",
            (
                study.id,
                r.series_uid,
                r.modality,
                r.series_number,
                r.series_description,
                r.body_part_examined,
                r.pps_start_date,
                r.pps_start_time,
                now,
                now,
            ),
        )
        if not row:
            series = self._find_series(r.series_uid)
            assert series is not None
            if series.study_ref != study.id:
                raise _Undo(_refused(foreign_series(r.series_uid, r.may_write, series.site)))
            return series, False
        if r.modality:
            current = db.scalar("SELECT modalities FROM studies WHERE id = ?", (study.id,)) or ""
            values = [m for m in current.split("\\") if m]
            if r.modality not in values:
                values.append(r.modality)
                db.execute(
                    "UPDATE studies SET modalities = ? WHERE id = ?",
                    ("\\".join(sorted(values)), study.id),
                )
                # the same, as rows an index can search (ModalitiesInStudy)
                db.execute(
                    "INSERT INTO study_modalities (study_ref, modality) VALUES (?, ?) "
                    "ON CONFLICT DO NOTHING",
                    (study.id, r.modality),
                )
        return _SeriesRow(row[0], study.id, r.study_uid, study.site), True

    def _instance(
        self, r: InstanceRecord, series_ref: int, on_conflict: str, existing: _Existing | None
    ) -> tuple[CommitResult, list[tuple[int, int, int]], int]:
        """Insert or reconcile one instance; return the result, the
        (series_ref, count delta, bytes delta) moves it causes and the
        instance row's id.  Raise
        :class:`_Undo` when it is not stored after all (a concurrent
        transaction stored that SOP Instance UID first)."""
        db = self.db
        if existing is None:
            row = db.query_one(
                f"INSERT INTO instances (series_ref, sop_instance_uid, {', '.join(_ROW_COLUMNS)}) "
                f"VALUES (?, ?, {', '.join('?' * len(_ROW_COLUMNS))}) "
                "ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id",
                (series_ref, r.sop_instance_uid, *_row_values(r)),
            )
            if row:
                stored = CommitResult(StoreOutcome.STORED, object_key=r.object_key)
                return stored, [(series_ref, 1, r.size)], row[0]
            existing = self._find_existing(r.sop_instance_uid)
            assert existing is not None
            decided = _decide(r, existing, on_conflict, self.stored_digests)
            if decided is not None:
                raise _Undo(decided)
        db.execute(
            f"UPDATE instances SET series_ref = ?, {', '.join(c + ' = ?' for c in _ROW_COLUMNS)}, "
            "integrity = 'ok' WHERE id = ?",
            (series_ref, *_row_values(r), existing.id),
        )
        log.warning(
            "different object under a stored SOP Instance UID: replaced the stored one"
            if existing.integrity == "ok"
            else "missing object restored by a new copy",
            extra={"sop_instance_uid": r.sop_instance_uid},
        )
        obsolete = existing.object_key if existing.object_key != r.object_key else None
        return (
            CommitResult(StoreOutcome.REPLACED, obsolete, r.object_key),
            [(existing.series_ref, -1, -existing.size), (series_ref, 1, r.size)],
            existing.id,
        )

    def switch_object(
        self,
        instance_id: int,
        expected_key: str,
        new_key: str,
        new_size: int,
        new_sha256: bytes,
        stored_ts: str,
    ) -> bool:
        """Point an instance at a re-encoded copy of its object, in one
        transaction, only if it still points at ``expected_key`` (a concurrent
        replace wins); the digest of the received bytes is kept for duplicate
        detection.  Returns whether the switch happened."""
        with self.db.transaction():
            row = self.db.query_one(
                "SELECT series_ref, size, sha256, original_sha256 FROM instances "
                "WHERE id = ? AND object_key = ?",
                (instance_id, expected_key),
            )
            if row is None:
                return False
            series_ref, old_size, old_sha, original = row
            self.db.execute(
                "UPDATE instances SET object_key = ?, size = ?, sha256 = ?, stored_ts = ?, "
                "original_sha256 = ? WHERE id = ?",
                (
                    new_key,
                    new_size,
                    new_sha256,
                    stored_ts,
                    bytes(original) if original is not None else bytes(old_sha),
                    instance_id,
                ),
            )
            delta = new_size - int(old_size)
            self.db.execute(
                "UPDATE series SET total_bytes = total_bytes + ? WHERE id = ?", (delta, series_ref)
            )
            self.db.execute(
                "UPDATE studies SET total_bytes = total_bytes + ? WHERE id = "
                "(SELECT study_ref FROM series WHERE id = ?)",
                (delta, series_ref),
            )
        return True

    def mark_integrity(self, instance_id: int, state: str) -> None:
        with self.db.transaction():
            self.db.execute("UPDATE instances SET integrity = ? WHERE id = ?", (state, instance_id))

    # -- reads ------------------------------------------------------------------

    def study_site(self, study_uid: str) -> str | None:
        """The producing site a stored study belongs to (None: no such study)."""
        return self.db.scalar("SELECT site FROM studies WHERE study_uid = ?", (study_uid,))

    def admission(
        self,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        sites: frozenset[str] | None,
    ) -> tuple[Refusal | None, StoredInstance | None]:
        """Why an instance of ``study_uid`` / ``series_uid`` may not be added
        by a sender writing for ``sites`` (None: any), or None; and the
        instance already stored under ``sop_instance_uid``, or None.  One
        read, nothing written: the pipeline's early refusal, before the
        object is stored (:meth:`commit` checks again inside its
        transaction), asked for every instance, where a second round trip
        to PostgreSQL would cost more than either look-up."""
        row = self.db.query_one(
            "SELECT (SELECT site FROM studies WHERE study_uid = ?), "
            "(SELECT st.study_uid FROM series se JOIN studies st ON st.id = se.study_ref "
            "WHERE se.series_uid = ?), "
            "(SELECT st.site FROM series se JOIN studies st ON st.id = se.study_ref "
            "WHERE se.series_uid = ?), known.* "
            f"FROM (SELECT 1 AS one) AS here LEFT JOIN ({_STORED_SELECT} "
            "WHERE i.sop_instance_uid = ?) AS known ON 1 = 1",
            (study_uid, series_uid, series_uid, sop_instance_uid),
        )
        assert row is not None
        study_site, series_study, series_site = row[:3]
        known = _stored(row[3:]) if row[3] is not None else None
        if study_site is not None and not may_write(sites, study_site):
            return foreign_study(study_uid, sites), known
        if series_study is not None and series_study != study_uid:
            return foreign_series(series_uid, sites, series_site), known
        return None, known

    def references(self, object_key: str, sop_instance_uid: str) -> bool:
        """Whether an index row points at ``object_key``.  Keys embed the SOP
        Instance UID, so only that UID's row can (no scan of the instance table)."""
        key = self.db.scalar(
            "SELECT object_key FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        )
        return key == object_key

    def find_instance(self, sop_instance_uid: str) -> StoredInstance | None:
        row = self.db.query_one(
            _STORED_SELECT + " WHERE i.sop_instance_uid = ?", (sop_instance_uid,)
        )
        return _stored(row) if row else None

    def iter_instances(self, batch: int = 1000) -> Iterator[StoredInstance]:
        """Every instance, in id order, fetched in keyset-paginated batches so
        that walking 10^8 rows never holds a long transaction or a big result."""
        last = 0
        while True:
            rows = self.db.query(
                _STORED_SELECT + " WHERE i.id > ? ORDER BY i.id LIMIT ?", (last, batch)
            )
            if not rows:
                return
            for row in rows:
                yield _stored(row)
            last = rows[-1][0]

    def counts(self) -> dict[str, int]:
        db = self.db
        studies, instances, size = db.query_one(
            "SELECT COUNT(*), COALESCE(SUM(num_instances), 0), COALESCE(SUM(total_bytes), 0) "
            "FROM studies"
        )
        return {
            "patients": int(db.scalar("SELECT COUNT(*) FROM patients")),
            "studies": int(studies),
            "series": int(db.scalar("SELECT COUNT(*) FROM series")),
            "instances": int(instances),
            "bytes": int(size),
        }

    def stats(self) -> dict[str, Any]:
        """Totals, and breakdowns by producing site and by modality, from the
        per-study and per-series counters (no scan of the instance table)."""
        db = self.db
        out: dict[str, Any] = self.counts()
        out["by_site"] = {
            site: {"studies": int(n), "instances": int(i), "bytes": int(b)}
            for site, n, i, b in db.query(
                "SELECT site, COUNT(*), SUM(num_instances), SUM(total_bytes) FROM studies "
                "GROUP BY site ORDER BY site"
            )
        }
        out["by_modality"] = {
            (mod or ""): {"series": int(n), "instances": int(i), "bytes": int(b)}
            for mod, n, i, b in db.query(
                "SELECT modality, COUNT(*), SUM(num_instances), SUM(total_bytes) FROM series "
                "GROUP BY modality ORDER BY modality"
            )
        }
        return out


def _refused(refusal: Refusal) -> CommitResult:
    return CommitResult(StoreOutcome.REFUSED, code=refusal.code, reason=refusal.reason)


def _decide(
    r: InstanceRecord,
    existing: _Existing,
    on_conflict: str,
    stored_digests: StoredDigests | None = None,
) -> CommitResult | None:
    """What happens to ``r`` given the row already stored under its SOP
    Instance UID: refused (another site's), a duplicate (the same data set,
    whatever its file meta: :func:`same_object`), a kept conflict, or None
    when ``r`` replaces it (policy 'replace', or the stored object is
    missing).  Digests either side lacks (objects stored as received) are
    read from its object with ``stored_digests`` when the whole-object
    digests differ."""
    if not may_write(r.may_write, existing.site):
        return _refused(foreign_instance(r.sop_instance_uid, r.may_write))
    received = r.original_sha256 or r.sha256
    healthy = existing.integrity == "ok"
    obsolete = r.object_key if r.object_key != existing.object_key else None
    r_dataset, r_content = r.dataset_sha256, r.content_sha256
    e_dataset, e_content = existing.dataset_sha256, existing.content_sha256
    if healthy and stored_digests and received not in (existing.sha256, existing.original_sha256):
        if r_dataset is None and r.original_sha256 is None:
            r_dataset, r_content = stored_digests(r.object_key, r.stored_ts) or (None, None)
        if e_dataset is None and existing.original_sha256 is None:
            e_dataset, e_content = stored_digests(existing.object_key, existing.stored_ts) or (
                None,
                None,
            )
    if healthy and same_object(
        received,
        r_dataset,
        existing.sha256,
        existing.original_sha256,
        e_dataset,
        r_content,
        e_content,
    ):
        return CommitResult(StoreOutcome.DUPLICATE, obsolete, existing.object_key)
    if healthy and on_conflict == "keep":
        log.warning(
            "different object under a stored SOP Instance UID: kept the stored one",
            extra={"sop_instance_uid": r.sop_instance_uid},
        )
        return CommitResult(
            StoreOutcome.KEPT,
            obsolete,
            existing.object_key,
            code="conflict",
            reason=conflict_reason(r.sop_instance_uid),
        )
    return None


_STORED_SELECT = (
    "SELECT i.id, i.sop_instance_uid, st.study_uid, se.series_uid, i.object_key, i.size, "
    "i.sha256, i.integrity, i.original_sha256, i.stored_ts, st.site, i.dataset_sha256, "
    "i.content_sha256 FROM instances i "
    "JOIN series se ON se.id = i.series_ref "
    "JOIN studies st ON st.id = se.study_ref"
)


def _stored(row: tuple) -> StoredInstance:
    return StoredInstance(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        int(row[5]),
        bytes(row[6]),
        row[7],
        bytes(row[8]) if row[8] is not None else None,
        row[9],
        row[10],
        bytes(row[11]) if row[11] is not None else None,
        bytes(row[12]) if row[12] is not None else None,
    )
