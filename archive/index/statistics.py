"""The SQLite planner's statistics, gathered as the embedded index grows.

PostgreSQL's autovacuum analyses a table as it grows.  SQLite has nothing
of the kind, and without ``sqlite_stat1`` its planner takes an equality on
any index as selective: a site-bound search by PatientID walked the site's
part of ``studies_by_site`` (a seventh of all studies, the site being one of
seven) instead of looking the patient up in ``patients_by_patient_id`` --
at 10^7 instances 250 ms instead of 0.7, and 94 ms instead of 0.7 for an
AccessionNumber (``benchmarks/bench_scale.py --backends sqlite``).

So an index writer analyses the index when it is made and again each time
the studies have doubled since (at most :data:`LONGEST` studies apart),
looking at their number every :data:`CHECK_EVERY` instances it commits.
Not while there are fewer than :data:`MIN_STUDIES`: statistics taken then
describe a moment, not the archive -- taken while one large study was being
received, they said every table had one row, and SQLite then read studies
and patients whole for every search (a C-FIND by PatientID 2.7 -> 5.0 ms
after a 1,000-slice push), while without statistics a small index is
planned well.  ``ANALYZE`` samples about :data:`ANALYSIS_LIMIT` entries of
each index (``PRAGMA analysis_limit``): 13 ms at 10^6 instances, where
reading every entry took 156 ms holding the write lock.
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
#: no statistics below this many studies (SQLite plans a small index well without)
MIN_STUDIES = 200
#: instances committed between two looks at the number of studies
CHECK_EVERY = 1_000
#: the most studies added between two analyses
LONGEST = 100_000


def analyse(db: Database) -> None:
    """Gather the planner's statistics of an SQLite index (nothing to do on
    PostgreSQL, whose autovacuum does it)."""
    if db.dialect != "sqlite":
        return
    started = time.perf_counter()
    with db.connection() as conn:
        waits = conn.execute("PRAGMA busy_timeout").fetchone()[0]
        # another process's write holds the lock for milliseconds; a long
        # one (a bulk import) is not waited for: the next look tries again
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
    """When one index writer's index calls for a new analysis
    (:func:`analyse`): at the writer's start, then whenever the studies have
    doubled since the last one, never below :data:`MIN_STUDIES`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.enabled = db.dialect == "sqlite"
        #: the studies when this writer last analysed (None: not yet)
        self.analysed_at: int | None = None
        self._since_look = 0

    def studies(self) -> int:
        """About how many studies the index holds (the highest id: one
        look-up, where counting reads them all)."""
        return int(self.db.scalar("SELECT COALESCE(MAX(id), 0) FROM studies"))

    def start(self) -> None:
        """The writer is made: statistics of the index as it is now."""
        if self.enabled:
            self._look()

    def count(self, instances: int) -> None:
        """``instances`` more were committed: look at the studies every
        :data:`CHECK_EVERY` of them."""
        if not self.enabled:
            return
        self._since_look += instances
        if self._since_look >= CHECK_EVERY:
            self._since_look = 0
            self._look()

    def _look(self) -> None:
        """Analyse if the studies call for it.  A failure is logged, never
        raised: stale statistics cost time, not answers."""
        try:
            studies = self.studies()
            if studies < MIN_STUDIES:
                return
            last = self.analysed_at
            if last is not None and studies < min(2 * last, last + LONGEST):
                return
            analyse(self.db)
            self.analysed_at = studies
        except Exception:  # noqa: BLE001 - the next look tries again
            log.warning("index statistics not gathered", exc_info=True)
