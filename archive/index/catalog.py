"""Reading and writing the patient / study / series / instance rows.

``Catalog.commit`` is the index half of the ingest pipeline: it takes a batch
of instance records whose objects are already durable in the object store and
commits their rows in one transaction, keeping study and series counts,
sizes and ModalitiesInStudy current.  Everything that reads the index for
administration (stats, verify) lives here too; searches get their own module.
"""

from __future__ import annotations

import enum
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from archive.index.db import Database, utcnow

log = logging.getLogger(__name__)


class StoreOutcome(enum.StrEnum):
    """What committing one instance did."""

    STORED = "stored"  # new SOP Instance UID
    DUPLICATE = "duplicate"  # identical bytes already stored: idempotent success
    KEPT = "kept"  # different object under a known UID, policy 'keep': stored one kept
    REPLACED = "replaced"  # different object under a known UID, policy 'replace'


@dataclass
class InstanceRecord:
    """Everything the index keeps about one instance, extracted at ingest."""

    # patient (issuer + patient_id is the key)
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
    #: the sender's AE title (routing rules match on it; not stored)
    calling_aet: str = ""


@dataclass(frozen=True)
class CommitResult:
    outcome: StoreOutcome
    #: an object key that no index row references any more after this commit
    #: (the replaced object, or the new object that policy 'keep' refused);
    #: the caller deletes it once the transaction is durable.
    obsolete_key: str | None = None
    #: the key the index now holds for this SOP Instance UID
    object_key: str = ""


CommitHook = Callable[["Database", list[tuple[InstanceRecord, CommitResult]]], None]


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

    def matches(self, received_sha256: bytes) -> bool:
        """Whether bytes with this digest are the object stored (or the object
        as received, before it was transcoded)."""
        return received_sha256 in (self.sha256, self.original_sha256)


def normalise_pn(name: str | None) -> str | None:
    """The form person names are matched in: upper case (MÜLLER matches
    Müller), without trailing empty components ("DOE^JOHN^^" is "DOE^JOHN")."""
    if name is None:
        return None
    return name.upper().rstrip("^ ")


class Catalog:
    """The archive's view of the index tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- writes -----------------------------------------------------------------

    def commit(
        self,
        records: Sequence[InstanceRecord],
        on_conflict: str = "keep",
        hooks: Sequence[CommitHook] = (),
    ) -> list[CommitResult]:
        """Commit ``records`` in one transaction and say what happened to each.

        ``hooks`` run inside the transaction with (record, result) pairs, so
        what they write (the change feed, stability jobs) commits with the
        rows or not at all."""
        db = self.db
        now = utcnow()
        results: list[CommitResult] = []
        with db.transaction():
            patients: dict[tuple[str, str], int] = {}
            studies: dict[str, int] = {}
            series: dict[str, int] = {}
            series_study: dict[int, int] = {}
            new_series_by_study: dict[int, int] = defaultdict(int)
            # (count, bytes) deltas per series and per study
            d_series: dict[int, list[int]] = defaultdict(lambda: [0, 0])
            d_study: dict[int, list[int]] = defaultdict(lambda: [0, 0])

            for r in records:
                pkey = (r.issuer, r.patient_id)
                if pkey not in patients:
                    patients[pkey] = self._patient(r, now)
                if r.study_uid not in studies:
                    studies[r.study_uid] = self._study(r, patients[pkey], now)
                study_ref = studies[r.study_uid]
                if r.series_uid not in series:
                    series_ref, created = self._series(r, study_ref, now)
                    series[r.series_uid] = series_ref
                    if created:
                        new_series_by_study[study_ref] += 1
                series_ref = series[r.series_uid]
                series_study[series_ref] = study_ref

                result, moved = self._instance(r, series_ref, on_conflict)
                results.append(result)
                for ref, count, size in moved:
                    if ref not in series_study:
                        series_study[ref] = db.scalar(
                            "SELECT study_ref FROM series WHERE id = ?", (ref,)
                        )
                    d_series[ref][0] += count
                    d_series[ref][1] += size
                    d_study[series_study[ref]][0] += count
                    d_study[series_study[ref]][1] += size

            for ref, (count, size) in d_series.items():
                db.execute(
                    "UPDATE series SET num_instances = num_instances + ?, "
                    "total_bytes = total_bytes + ?, updated_at = ? WHERE id = ?",
                    (count, size, now, ref),
                )
            for ref, (count, size) in d_study.items():
                db.execute(
                    "UPDATE studies SET num_instances = num_instances + ?, "
                    "total_bytes = total_bytes + ?, num_series = num_series + ?, "
                    "updated_at = ? WHERE id = ?",
                    (count, size, new_series_by_study.pop(ref, 0), now, ref),
                )
            for ref, count in new_series_by_study.items():
                db.execute(
                    "UPDATE studies SET num_series = num_series + ? WHERE id = ?", (count, ref)
                )
            done = list(zip(records, results, strict=True))
            for hook in hooks:
                hook(db, done)
        return results

    def _patient(self, r: InstanceRecord, now: datetime) -> int:
        db = self.db
        row = db.query_one(
            "SELECT id FROM patients WHERE issuer = ? AND patient_id = ?", (r.issuer, r.patient_id)
        )
        if row:
            return row[0]
        row = db.query_one(
            "INSERT INTO patients (issuer, patient_id, patient_name, patient_name_norm, "
            "birth_date, sex, created_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (issuer, patient_id) DO NOTHING RETURNING id",
            (
                r.issuer,
                r.patient_id,
                r.patient_name,
                normalise_pn(r.patient_name),
                r.birth_date,
                r.sex,
                now,
            ),
        )
        if row:
            return row[0]
        # another process inserted it between our SELECT and INSERT
        return db.scalar(
            "SELECT id FROM patients WHERE issuer = ? AND patient_id = ?", (r.issuer, r.patient_id)
        )

    def _study(self, r: InstanceRecord, patient_ref: int, now: datetime) -> int:
        db = self.db
        row = db.query_one(
            "SELECT id, patient_ref FROM studies WHERE study_uid = ?", (r.study_uid,)
        )
        if row:
            if row[1] != patient_ref:
                log.warning(
                    "instance names another patient than its stored study; kept the study's",
                    extra={"study_uid": r.study_uid, "sop_instance_uid": r.sop_instance_uid},
                )
            return row[0]
        row = db.query_one(
            "INSERT INTO studies (patient_ref, study_uid, study_date, study_time, "
            "accession_number, study_id, study_description, referring_physician_name, "
            "referring_physician_name_norm, institution_name, site, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
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
                r.institution_name,
                r.site,
                now,
                now,
            ),
        )
        if row:
            return row[0]
        return db.scalar("SELECT id FROM studies WHERE study_uid = ?", (r.study_uid,))

    def _series(self, r: InstanceRecord, study_ref: int, now: datetime) -> tuple[int, bool]:
        db = self.db
        row = db.query_one("SELECT id FROM series WHERE series_uid = ?", (r.series_uid,))
        if row:
            return row[0], False
        row = db.query_one(
            "INSERT INTO series (study_ref, series_uid, modality, series_number, "
            "series_description, body_part_examined, pps_start_date, pps_start_time, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (series_uid) DO NOTHING RETURNING id",
            (
                study_ref,
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
            return db.scalar("SELECT id FROM series WHERE series_uid = ?", (r.series_uid,)), False
        if r.modality:
            current = db.scalar("SELECT modalities FROM studies WHERE id = ?", (study_ref,)) or ""
            values = [m for m in current.split("\\") if m]
            if r.modality not in values:
                values.append(r.modality)
                db.execute(
                    "UPDATE studies SET modalities = ? WHERE id = ?",
                    ("\\".join(sorted(values)), study_ref),
                )
        return row[0], True

    def _instance(
        self, r: InstanceRecord, series_ref: int, on_conflict: str
    ) -> tuple[CommitResult, list[tuple[int, int, int]]]:
        """Insert or reconcile one instance; return the result and the
        (series_ref, count delta, bytes delta) moves it causes."""
        db = self.db
        row = db.query_one(
            "INSERT INTO instances (series_ref, sop_instance_uid, sop_class_uid, "
            "instance_number, number_of_frames, stored_ts, original_ts, object_key, size, "
            "sha256, received_at, original_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id",
            (
                series_ref,
                r.sop_instance_uid,
                r.sop_class_uid,
                r.instance_number,
                r.number_of_frames,
                r.stored_ts,
                r.original_ts,
                r.object_key,
                r.size,
                r.sha256,
                r.received_at,
                r.original_sha256,
            ),
        )
        if row:
            return CommitResult(StoreOutcome.STORED, object_key=r.object_key), [
                (series_ref, 1, r.size)
            ]
        old_id, old_series, old_key, old_size, old_sha, old_original, integrity = db.query_one(
            "SELECT id, series_ref, object_key, size, sha256, original_sha256, integrity "
            "FROM instances WHERE sop_instance_uid = ?",
            (r.sop_instance_uid,),
        )
        received = r.original_sha256 or r.sha256
        same = received in (bytes(old_sha), bytes(old_original) if old_original else None)
        if same and integrity == "ok":
            obsolete = r.object_key if r.object_key != old_key else None
            return CommitResult(StoreOutcome.DUPLICATE, obsolete, old_key), []
        if on_conflict == "keep" and integrity == "ok":
            log.warning(
                "different object under a stored SOP Instance UID: kept the stored one",
                extra={"sop_instance_uid": r.sop_instance_uid},
            )
            obsolete = r.object_key if r.object_key != old_key else None
            return CommitResult(StoreOutcome.KEPT, obsolete, old_key), []
        db.execute(
            "UPDATE instances SET series_ref = ?, sop_class_uid = ?, instance_number = ?, "
            "number_of_frames = ?, stored_ts = ?, original_ts = ?, object_key = ?, size = ?, "
            "sha256 = ?, received_at = ?, original_sha256 = ?, integrity = 'ok' WHERE id = ?",
            (
                series_ref,
                r.sop_class_uid,
                r.instance_number,
                r.number_of_frames,
                r.stored_ts,
                r.original_ts,
                r.object_key,
                r.size,
                r.sha256,
                r.received_at,
                r.original_sha256,
                old_id,
            ),
        )
        log.warning(
            "different object under a stored SOP Instance UID: replaced the stored one"
            if integrity == "ok"
            else "missing object restored by a new copy",
            extra={"sop_instance_uid": r.sop_instance_uid},
        )
        obsolete = old_key if old_key != r.object_key else None
        return (
            CommitResult(StoreOutcome.REPLACED, obsolete, r.object_key),
            [(old_series, -1, -old_size), (series_ref, 1, r.size)],
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


_STORED_SELECT = (
    "SELECT i.id, i.sop_instance_uid, st.study_uid, se.series_uid, i.object_key, i.size, "
    "i.sha256, i.integrity, i.original_sha256, i.stored_ts FROM instances i "
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
    )
