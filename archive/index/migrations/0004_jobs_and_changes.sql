-- Durable jobs and the change feed.
--
-- jobs: everything deferred (study stability, forwarding, re-transcoding) is a
-- row here.  Workers claim due rows atomically (PostgreSQL: FOR UPDATE SKIP
-- LOCKED; SQLite: one writer at a time), hold them under a lease, and retry
-- with back-off until max_attempts, after which a job is 'dead' and keeps its
-- last error.  dedupe_key makes "at most one pending job per key" (one pending
-- stability check per study) a constraint rather than a race.  Running jobs
-- are not covered: work that arrives while a job with the same key runs must
-- get a pending job of its own, not be merged into one about to finish.
-- Upserts name the same predicate: ON CONFLICT (dedupe_key) WHERE state = 'pending'.
CREATE TABLE jobs (
    id {pk},
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    dedupe_key TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    due_at {timestamp} NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 10,
    lease_until {timestamp},
    worker TEXT,
    last_error TEXT,
    created_at {timestamp} NOT NULL,
    updated_at {timestamp} NOT NULL
);
CREATE INDEX jobs_by_due ON jobs (state, due_at);
CREATE UNIQUE INDEX jobs_pending_dedupe ON jobs (dedupe_key) WHERE state = 'pending';

-- changes: the ordered, durable log of what happened to the archive, read by
-- integrations through GET /changes?since=<seq>.  seq only grows.
CREATE TABLE changes (
    seq {pk},
    type TEXT NOT NULL,
    at {timestamp} NOT NULL,
    site TEXT,
    study_uid TEXT,
    series_uid TEXT,
    sop_instance_uid TEXT
);
