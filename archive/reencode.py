"""``imag transcode``: bring what is already stored in line with the storage policy.

Each instance whose stored transfer syntax differs from its site's policy
(``store_as`` / ``[[sites]] store_as``, or ``--to``) is read, re-encoded
losslessly and verified in worker processes, written under a new key, and
switched over in the index in one transaction; the old object is deleted
only after that commit.  An interruption at any point leaves every instance
pointing at a complete object (at worst an unreferenced new copy, which
``imag verify --repair`` removes), and a re-run continues where it stopped:
converted instances no longer match.  Data that arrived lossy is left as is.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from archive.codecs import LossySource, TranscodeError, transcode
from archive.config import Config
from archive.ingest import POLICY_TARGETS
from archive.pool import BoundedPool
from archive.runtime import Archive, open_object_store
from archive.uids import object_key


@dataclass(frozen=True)
class Task:
    instance_id: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    object_key: str
    target: str


@dataclass
class ReencodeSummary:
    converted: int = 0
    skipped_lossy: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # SOP Instance UID, reason
    bytes_before: int = 0
    bytes_after: int = 0

    def as_dict(self) -> dict:
        return {
            "converted": self.converted,
            "skipped_lossy": self.skipped_lossy,
            "failed": len(self.failed),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }


def pending(
    archive: Archive, to: str | None = None, site: str | None = None, batch: int = 500
) -> Iterator[Task]:
    """Instances whose stored syntax differs from their policy's, in id order,
    fetched in keyset pages (10^8 rows never in one result)."""
    last = 0
    while True:
        sql = (
            "SELECT i.id, st.study_uid, se.series_uid, i.sop_instance_uid, i.object_key, "
            "i.stored_ts, st.site FROM instances i JOIN series se ON se.id = i.series_ref "
            "JOIN studies st ON st.id = se.study_ref WHERE i.id > ? AND i.integrity = 'ok'"
        )
        params: list[object] = [last]
        if site is not None:
            sql += " AND st.site = ?"
            params.append(site)
        rows = archive.db.query(sql + " ORDER BY i.id LIMIT ?", [*params, batch])
        if not rows:
            return
        for iid, study, series, sop, key, stored_ts, row_site in rows:
            target = POLICY_TARGETS.get(to or archive.config.store_as_for(row_site))
            if target and stored_ts != target:
                yield Task(iid, study, series, sop, key, target)
        last = rows[-1][0]


_store = None


def _init(config: Config) -> None:
    global _store
    _store = open_object_store(config)


def _convert(task: Task) -> tuple[Task, str, int, int, bytes | None, str]:
    """(task, outcome, old size, new size, new digest, new key or reason)."""
    assert _store is not None
    data = _store.get(task.object_key)
    try:
        body = transcode(data, task.target, verify=True)
    except LossySource:
        return task, "lossy", len(data), len(data), None, ""
    except TranscodeError as exc:
        return task, "failed", len(data), len(data), None, str(exc)
    digest = hashlib.sha256(body).digest()
    key = object_key(task.study_uid, task.series_uid, task.sop_instance_uid, digest.hex())
    _store.put(key, body)
    return task, "converted", len(data), len(body), digest, key


def reencode(
    archive: Archive,
    *,
    to: str | None = None,
    site: str | None = None,
    workers: int = 0,
    on_done: Callable[[Task, str], None] | None = None,
) -> ReencodeSummary:
    """Convert every pending instance; see the module doc.  ``on_done`` is
    called in this process for each instance as it completes (progress);
    Ctrl-C stops the run once the instances being converted are done
    (:class:`archive.pool.BoundedPool`), and a re-run continues."""
    summary = ReencodeSummary()
    workers = workers or os.cpu_count() or 1

    def converted(result: tuple[Task, str, int, int, bytes | None, str]) -> None:
        task, outcome, before, after, digest, detail = result
        if outcome == "converted":
            switched = archive.catalog.switch_object(
                task.instance_id, task.object_key, detail, after, digest, task.target
            )
            if switched:
                archive.store.delete(task.object_key)
                summary.converted += 1
                summary.bytes_before += before
                summary.bytes_after += after
            else:  # replaced meanwhile: our copy is not referenced
                archive.store.delete(detail)
        elif outcome == "lossy":
            summary.skipped_lossy += 1
        else:
            summary.failed.append((task.sop_instance_uid, detail))
        if on_done is not None:
            on_done(task, outcome)

    with BoundedPool(workers, per_worker=4, initializer=_init, initargs=(archive.config,)) as pool:
        for task in pending(archive, to=to, site=site):
            pool.submit(_convert, task, converted)
    return summary
