-- Share links (component "sharing"): a capability to view (and perhaps
-- download) one study, or some of its series, without an account.
--
-- Only SHA-256 digests of the secrets (the link's, the sessions', the
-- one-time codes') are stored: a copy of the index opens nothing.  ``series``
-- is a JSON array of series UIDs, NULL for the whole study; ``permissions`` a
-- JSON array ("view", "download").  A share is never deleted: revocation and
-- lock are columns, the access log keeps pointing at it.

CREATE TABLE shares (
    id {pk},
    secret_hash TEXT NOT NULL UNIQUE,
    study_uid TEXT NOT NULL,
    series TEXT,
    permissions TEXT NOT NULL,
    audience TEXT NOT NULL,
    not_before {timestamp} NOT NULL,
    expires_at {timestamp} NOT NULL,
    second_factor TEXT,
    recipient TEXT,
    code_hash TEXT,
    code_expires_at {timestamp},
    failures INTEGER NOT NULL DEFAULT 0,
    locked_at {timestamp},
    revoked_at {timestamp},
    revoked_by TEXT,
    last_used_at {timestamp},
    uses INTEGER NOT NULL DEFAULT 0,
    created_by TEXT NOT NULL,
    created_site TEXT NOT NULL DEFAULT '',
    created_at {timestamp} NOT NULL
);
CREATE INDEX shares_by_creator ON shares (created_by, id);
CREATE INDEX shares_by_study ON shares (study_uid);

-- The browser sessions a link's secret is exchanged for (cookie imag_share).
-- ``verified`` 0: the second factor is still to be given (the session opens
-- only /share/verify).
CREATE TABLE share_sessions (
    id {pk},
    session_hash TEXT NOT NULL UNIQUE,
    share_ref {ref} NOT NULL REFERENCES shares (id),
    verified INTEGER NOT NULL DEFAULT 0,
    created_at {timestamp} NOT NULL,
    last_seen_at {timestamp} NOT NULL
);
CREATE INDEX share_sessions_by_share ON share_sessions (share_ref);

-- What happened to a link, for its creator (GET /api/shares/{id}/accesses).
CREATE TABLE share_accesses (
    id {pk},
    share_ref {ref} NOT NULL REFERENCES shares (id),
    at {timestamp} NOT NULL,
    address TEXT NOT NULL DEFAULT '',
    what TEXT NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX share_accesses_by_share ON share_accesses (share_ref, id);

-- Requests per client address and minute on the public share pages, shared
-- by every process on this index (incremented atomically, upsert + RETURNING).
CREATE TABLE share_rate (
    address TEXT NOT NULL,
    window_start {bigint} NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (address, window_start)
);
