"""Study stability: a study with no new instance for ``stable_after_seconds``
emits one ``study.stable`` change per burst of arrivals.

Every commit of new instances (re)schedules one pending ``study.stability``
job per study, due ``stable_after`` after the arrival (the pending-only
dedupe key pushes an existing pending job later instead of adding one).
When the job runs it looks at the study's last arrival: old enough, it
records ``study.stable``; otherwise it schedules itself for the new time.
An instance arriving while the job runs gets a pending job of its own,
hence a new burst and, later, a new event.

"Now" is the index's clock (``db.clock``): the catalog stamps arrivals with
it and the queue compares due times with it, so a test that gives the
archive a :class:`~archive.clock.FakeClock` makes studies stable by advancing
it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from archive import events
from archive.config import Config
from archive.hookspecs import hookimpl
from archive.index.catalog import CommitResult, InstanceRecord, StoreOutcome
from archive.index.db import Database
from archive.jobs import JobQueue

KIND = "study.stability"


def stable_after(config: Config, site: str) -> int:
    """Seconds of quiet after which a study of ``site`` is stable (its
    ``[[sites]]`` entry's, else the archive-wide ``stable_after_seconds``)."""
    return config.stable_after_for(site)


def schedule(db: Database, study_uid: str, site: str, due_at: datetime) -> None:
    """Create or push the study's pending stability job (inside the caller's
    transaction, which JobQueue.enqueue joins)."""
    JobQueue(db).push(
        KIND,
        {"study_uid": study_uid, "site": site},
        due_at=due_at,
        dedupe_key=f"stable:{study_uid}",
    )


def commit_hook(config: Config):  # noqa: ANN201 - a Catalog.commit hook
    """Record instance changes and (re)schedule stability, in the commit's transaction."""

    def hook(db: Database, done: Sequence[tuple[InstanceRecord, CommitResult]]) -> None:
        rows = []
        studies: dict[str, str] = {}
        for record, result in done:
            if result.outcome is StoreOutcome.STORED:
                kind = "instance.stored"
            elif result.outcome is StoreOutcome.REPLACED:
                kind = "instance.replaced"
            else:
                continue
            rows.append(
                (kind, record.site, record.study_uid, record.series_uid, record.sop_instance_uid)
            )
            studies[record.study_uid] = record.site
        if not rows:
            return
        now = db.clock.now()
        events.record(db, rows, at=now)
        for study_uid, site in studies.items():
            schedule(db, study_uid, site, now + timedelta(seconds=stable_after(config, site)))

    return hook


def run(archive, payload: dict) -> None:  # noqa: ANN001 - Archive; a job handler
    """The ``study.stability`` job: emit ``study.stable`` or look again later."""
    study_uid, site = payload["study_uid"], payload.get("site", "")
    db = archive.db
    wait = timedelta(seconds=stable_after(archive.config, site))
    with db.transaction():
        last = db.scalar("SELECT updated_at FROM studies WHERE study_uid = ?", (study_uid,))
        if last is None:
            return  # the study is gone
        last_at = last if isinstance(last, datetime) else datetime.fromisoformat(last)
        now = db.clock.now()
        if last_at + wait <= now:
            # routing and every other subscriber of study.stable get their jobs here
            events.record(db, [("study.stable", site, study_uid, None, None)], at=now)
        else:
            schedule(db, study_uid, site, last_at + wait)


@hookimpl
def imag_job_kinds() -> dict:
    return {KIND: run}


@hookimpl
def imag_ingest_commit_hooks(config: Config) -> list:
    return [commit_hook(config)]
