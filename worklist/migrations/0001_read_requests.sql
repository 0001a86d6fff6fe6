-- Worklist, component "worklist", version 1: the teleradiology reading requests.
--
-- One row per request: a study a site asks to be read (created when a study
-- of a teleradiology-enabled site becomes stable, by a [[routes]] rule of kind
-- "read", or by a site user for tele-expertise), in the UPS states of
-- worklist/ups.py.
--
-- * `uid` is the request's UPS SOP Instance UID (UPS-RS addresses it by it).
-- * `group_name` is the reading group on call for the site when the request
--   was created (the orientation plugin); NULL when nobody was: such requests
--   are shown to the coordinators (admins) as unassigned.
-- * `burst` is the change-feed sequence number of the study.stable event that
--   created it: unique, so one stable burst never makes two requests.
-- * `fields` (JSON) holds the clinical content of the request (requesting
--   physician, context, question, region, contraindications, previous
--   results, exam type, consent); `missing` (JSON list) the mandatory fields a
--   route-created request still lacks.
-- * `transaction_uid`, `performer`, `lease_until`: the claim.  A claim whose
--   lease passes returns the request to SCHEDULED; the Transaction UID is then
--   forgotten, so the late holder's changes are refused (C301).
-- * `priority_rank` orders STAT (0) before URGENT (1) before ROUTINE (2).
CREATE TABLE read_requests (
    id {pk},
    uid TEXT NOT NULL UNIQUE,
    study_uid TEXT NOT NULL,
    site TEXT NOT NULL,
    group_name TEXT,
    kind TEXT NOT NULL,
    origin TEXT NOT NULL,
    created_by TEXT NOT NULL,
    state TEXT NOT NULL,
    priority TEXT NOT NULL,
    priority_rank INTEGER NOT NULL,
    due_at {timestamp} NOT NULL,
    created_at {timestamp} NOT NULL,
    updated_at {timestamp} NOT NULL,
    fields TEXT NOT NULL DEFAULT '{{}}',
    missing TEXT NOT NULL DEFAULT '[]',
    reply_to TEXT NOT NULL DEFAULT '',
    burst {bigint} UNIQUE,
    transaction_uid TEXT,
    performer TEXT,
    claimed_at {timestamp},
    lease_until {timestamp},
    first_claimed_at {timestamp},
    claims INTEGER NOT NULL DEFAULT 0,
    completed_at {timestamp},
    completed_by TEXT,
    canceled_at {timestamp},
    canceled_by TEXT,
    cancel_requested_at {timestamp},
    cancel_requested_by TEXT,
    cancel_reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX read_requests_queue ON read_requests (state, priority_rank, due_at, id);
CREATE INDEX read_requests_by_group ON read_requests (group_name, state, priority_rank, due_at, id);
CREATE INDEX read_requests_by_site ON read_requests (site, state, id);
CREATE INDEX read_requests_by_study ON read_requests (study_uid);
CREATE INDEX read_requests_leases ON read_requests (lease_until);

-- The series the worklist itself stores in a study (a report's structured
-- report and PDF): they make the study stable again, which must not ask for
-- the study to be read once more.
CREATE TABLE read_outputs (
    series_uid TEXT NOT NULL PRIMARY KEY,
    request_uid TEXT NOT NULL,
    created_at {timestamp} NOT NULL
);
