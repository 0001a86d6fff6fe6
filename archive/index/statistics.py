"""The SQLite planner's statistics, gathered as the embedded index grows.

PostgreSQL's autovacuum analyses a table as it grows.  SQLite has nothing
of the kind, and without ``sqlite_stat1`` its planner takes an equality on
any index as selective: a site-bound search by PatientID walked the site's
part of ``studies_by_site`` (a seventh of all studies, the site being one of
seven) instead of looking the patient up in ``patients_by_patient_id`` --
at 10^7 instances 250 ms instead of 0.7, and 94 ms instead of 0.7 for an
AccessionNumber (``benchmarks/bench_scale.py --backends sqlite``).

So the index is analysed when an archive's index writer is made and again
as the instances committed through it reach 1,000, 2,000, 4,000 ... and every million past that:
each time ``ANALYZE`` samples about :data:`ANALYSIS_LIMIT` entries of each
index (``PRAGMA analysis_limit``), 13 ms at 10^6 instances where reading
every entry took 156 ms and holds the write lock as long.  What the planner
needs is how many rows a key value has (seven sites, one study per
accession number), which a sample of that size gives and which does not
change much as the archive grows.
"""

from __future__ import annotations

import logging
import time

from archive.index.db import Database

log = logging.getLogger(__name__)

#: about how many entries of each index ``ANALYZE`` reads
ANALYSIS_LIMIT = 10_000
#: how long an analysis waits for another connection's write to end
BUSY_WAIT_MS = 2_000
#: instances committed before the first analysis after the one at opening
FIRST = 1_000
#: the longest run of committed instances between two analyses
LONGEST = 1_000_000


def analyse(db: Database) -> None:
    """Gather the planner's statistics of an SQLite index (nothing to do on
    PostgreSQL, whose autovacuum does it)."""
    if db.dialect != "sqlite":
        return
    started = time.perf_counter()
    with db.connection() as conn:
        waits = conn.execute("PRAGMA busy_timeout").fetchone()[0]
        # another process's write holds the lock for milliseconds; a long
        # one (a bulk import) is not waited for: the next mark tries again
        conn.execute(f"PRAGMA busy_timeout={BUSY_WAIT_MS}")
        try:
            conn.execute(f"PRAGMA analysis_limit={ANALYSIS_LIMIT}")
            conn.execute("ANALYZE")
        finally:
            conn.execute(f"PRAGMA busy_timeout={waits}")
    db.renew_connections()  # connections open until now plan without them
    log.debug(
        "index statistics gathered",
        extra={"seconds": round(time.perf_counter() - started, 3)},
    )


class Statistics:
    """When the instances committed through one writer call for a new
    analysis (:func:`analyse`): after :data:`FIRST`, then each time their
    number doubles, at most :data:`LONGEST` apart."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.committed = 0
        self.next = FIRST if db.dialect == "sqlite" else None

    def start(self) -> None:
        """The writer is made: statistics of the index as it is now."""
        if self.next is not None:
            self._analyse()

    def _analyse(self) -> None:
        try:
            analyse(self.db)
        except Exception:  # noqa: BLE001 - the next mark tries again
            log.warning("index statistics not gathered", exc_info=True)

    def count(self, instances: int) -> None:
        """``instances`` more were committed: analyse when their total
        reaches the next mark.  A failure is logged, never raised: stale
        statistics cost time, not answers."""
        if self.next is None:
            return
        self.committed += instances
        if self.committed < self.next:
            return
        self.next = min(2 * self.next, self.committed + LONGEST)
        self._analyse()
