-- Principals, API tokens, reading-group grants and the audit trail.
--
-- principals: users (people) and service accounts (integrations).  role is
-- one of archive.security.roles.ROLES; sites and groups are JSON arrays of
-- names (few per principal, always read whole).
CREATE TABLE principals (
    id {pk},
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL DEFAULT 'user',
    role TEXT NOT NULL,
    sites TEXT NOT NULL DEFAULT '[]',
    groups TEXT NOT NULL DEFAULT '[]',
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at {timestamp} NOT NULL
);

-- tokens: API tokens are 256-bit random secrets shown once; only their
-- SHA-256 is kept (a slow hash adds nothing for secrets this long).
CREATE TABLE tokens (
    id {pk},
    principal_ref {ref} NOT NULL REFERENCES principals (id),
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at {timestamp} NOT NULL,
    expires_at {timestamp},
    revoked_at {timestamp},
    last_used_at {timestamp}
);
CREATE INDEX tokens_by_principal ON tokens (principal_ref);

-- study_groups: studies routed to a reading group are visible to its members
-- whatever their sites.
CREATE TABLE study_groups (
    study_uid TEXT NOT NULL,
    group_name TEXT NOT NULL,
    granted_at {timestamp} NOT NULL,
    PRIMARY KEY (group_name, study_uid)
);
CREATE INDEX study_groups_by_study ON study_groups (study_uid);

-- audit: append-only (triggers in the next migrations refuse UPDATE and
-- DELETE).  One row per access to patient data or security event.
CREATE TABLE audit (
    id {pk},
    at {timestamp} NOT NULL,
    actor TEXT NOT NULL,
    actor_kind TEXT NOT NULL,
    role TEXT,
    action TEXT NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER,
    study_uid TEXT,
    patient_id TEXT,
    source TEXT,
    detail TEXT
);
CREATE INDEX audit_by_time ON audit (at);
CREATE INDEX audit_by_study ON audit (study_uid);
CREATE INDEX audit_by_patient ON audit (patient_id);
CREATE INDEX audit_by_actor ON audit (actor, at);
