-- The regional patient index (archive/identity/regional.py), component "identity".
--
-- identity_regional: one row per regional identity (a person as the region
-- knows them), with its regional identifier, its INS when known, its status
-- and the five reference traits.  A merged identity keeps its row (and its
-- fields, as they were) with merged_into naming the survivor, so that an
-- unmerge restores it exactly.
-- identity_links: each local identity (a patients row: site + issuer +
-- patient_id) belongs to one regional identity; the link keeps what the
-- producer last said of the patient (INS, status, traits).
-- identity_queue: link proposals and identity-vigilance conflicts, with their
-- resolution.
-- identity_merges: every merge, with the snapshot unmerge restores.
-- identity_seen: fingerprints of the identity observations already recorded,
-- so that ingest records an identity.observed event only for what is new;
-- with the observation itself (site, local key, INS, traits), which the event
-- names by its fingerprint only: the change feed (GET /changes) carries no
-- demographics.
CREATE TABLE identity_regional (
    id {pk},
    regional_id TEXT NOT NULL UNIQUE,
    ins TEXT,
    ins_oid TEXT,
    status TEXT NOT NULL DEFAULT 'PROV',
    birth_name TEXT NOT NULL DEFAULT '',
    first_given_name TEXT NOT NULL DEFAULT '',
    given_names TEXT NOT NULL DEFAULT '',
    birth_date TEXT NOT NULL DEFAULT '',
    sex TEXT NOT NULL DEFAULT '',
    birthplace TEXT NOT NULL DEFAULT '',
    merged_into {ref} REFERENCES identity_regional (id),
    created_at {timestamp} NOT NULL,
    updated_at {timestamp} NOT NULL
);
CREATE INDEX identity_regional_by_ins ON identity_regional (ins);
CREATE INDEX identity_regional_by_birth_date ON identity_regional (birth_date);

CREATE TABLE identity_links (
    patient_ref {ref} NOT NULL PRIMARY KEY REFERENCES patients (id),
    regional_ref {ref} NOT NULL REFERENCES identity_regional (id),
    ins TEXT,
    ins_oid TEXT,
    status TEXT NOT NULL DEFAULT 'PROV',
    birth_name TEXT NOT NULL DEFAULT '',
    first_given_name TEXT NOT NULL DEFAULT '',
    given_names TEXT NOT NULL DEFAULT '',
    birth_date TEXT NOT NULL DEFAULT '',
    sex TEXT NOT NULL DEFAULT '',
    birthplace TEXT NOT NULL DEFAULT '',
    linked_at {timestamp} NOT NULL,
    updated_at {timestamp} NOT NULL
);
CREATE INDEX identity_links_by_regional ON identity_links (regional_ref);
CREATE INDEX identity_links_by_ins ON identity_links (ins);

CREATE TABLE identity_queue (
    id {pk},
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    regional_a {ref} REFERENCES identity_regional (id),
    regional_b {ref} REFERENCES identity_regional (id),
    patient_ref {ref} REFERENCES patients (id),
    detail TEXT NOT NULL DEFAULT '{{}}',
    state TEXT NOT NULL DEFAULT 'open',
    created_at {timestamp} NOT NULL,
    decided_at {timestamp},
    decided_by TEXT,
    note TEXT
);
CREATE INDEX identity_queue_by_state ON identity_queue (state, id);
CREATE INDEX identity_queue_by_pair ON identity_queue (regional_a, regional_b);

CREATE TABLE identity_merges (
    id {pk},
    survivor_ref {ref} NOT NULL REFERENCES identity_regional (id),
    merged_ref {ref} NOT NULL REFERENCES identity_regional (id),
    snapshot TEXT NOT NULL,
    merged_at {timestamp} NOT NULL,
    merged_by TEXT NOT NULL,
    undone_at {timestamp},
    undone_by TEXT
);

CREATE TABLE identity_seen (
    fingerprint TEXT NOT NULL PRIMARY KEY,
    seen_at {timestamp} NOT NULL,
    observation TEXT NOT NULL
);
