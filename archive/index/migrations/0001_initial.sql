-- IMAG index, version 1: the patient / study / series / instance hierarchy.
--
-- One schema for SQLite and PostgreSQL; {pk}, {ref}, {bigint}, {blob} and
-- {timestamp} are replaced by the dialect's types when the migration runs.
--
-- Designed for 10^8 instances a year:
-- * Children point at their parent through integer surrogate keys, never
--   through UIDs: an instance row carries an 8-byte series reference instead of
--   a 64-character UID, which keeps the largest table and its indexes narrow
--   (the instance table dominates: ~100x the series rows, ~1000x the studies).
-- * The instance table has exactly two secondary indexes: the unique SOP
--   Instance UID (idempotent re-send, C-GET/WADO by UID) and
--   (series_ref, instance_number) which serves "list a series in order" and
--   every study/series-level retrieval by walking series first.  Anything else
--   on instances would cost write throughput on every ingest.
-- * Searches (C-FIND, QIDO-RS) are answered from the small tables: studies
--   carry their own counts, total size and the ModalitiesInStudy list, kept
--   current in the same transaction as the instance insert, so no search ever
--   aggregates over instances.
-- * Study searches are indexed on what worklists and portals filter by:
--   date (with site, for per-site views), accession number, the patient
--   reference; patient searches on the normalised name and on PatientID alone
--   (cross-issuer lookups).  Names are matched on an upper-cased copy so that
--   case-insensitive PN matching can use an index.
-- * Patients are unique on (issuer, patient_id): two sites using the same
--   local ID for different people stay two patients.
-- * sha256 is stored as 32 raw bytes, half the size of its hex form.

CREATE TABLE patients (
    id {pk},
    issuer TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    patient_name TEXT,
    patient_name_norm TEXT,
    birth_date TEXT,
    sex TEXT,
    created_at {timestamp} NOT NULL,
    UNIQUE (issuer, patient_id)
);
CREATE INDEX patients_by_name ON patients (patient_name_norm);
CREATE INDEX patients_by_patient_id ON patients (patient_id);

CREATE TABLE studies (
    id {pk},
    patient_ref {ref} NOT NULL REFERENCES patients (id),
    study_uid TEXT NOT NULL UNIQUE,
    study_date TEXT,
    study_time TEXT,
    accession_number TEXT,
    study_id TEXT,
    study_description TEXT,
    referring_physician_name TEXT,
    referring_physician_name_norm TEXT,
    modalities TEXT NOT NULL DEFAULT '',
    institution_name TEXT,
    site TEXT NOT NULL DEFAULT '',
    num_series INTEGER NOT NULL DEFAULT 0,
    num_instances INTEGER NOT NULL DEFAULT 0,
    total_bytes {bigint} NOT NULL DEFAULT 0,
    created_at {timestamp} NOT NULL,
    updated_at {timestamp} NOT NULL
);
CREATE INDEX studies_by_patient ON studies (patient_ref);
CREATE INDEX studies_by_date ON studies (study_date);
CREATE INDEX studies_by_site_date ON studies (site, study_date);
CREATE INDEX studies_by_accession ON studies (accession_number);

CREATE TABLE series (
    id {pk},
    study_ref {ref} NOT NULL REFERENCES studies (id),
    series_uid TEXT NOT NULL UNIQUE,
    modality TEXT,
    series_number INTEGER,
    series_description TEXT,
    body_part_examined TEXT,
    pps_start_date TEXT,
    pps_start_time TEXT,
    num_instances INTEGER NOT NULL DEFAULT 0,
    total_bytes {bigint} NOT NULL DEFAULT 0,
    created_at {timestamp} NOT NULL,
    updated_at {timestamp} NOT NULL
);
CREATE INDEX series_by_study ON series (study_ref);

CREATE TABLE instances (
    id {pk},
    series_ref {ref} NOT NULL REFERENCES series (id),
    sop_instance_uid TEXT NOT NULL UNIQUE,
    sop_class_uid TEXT NOT NULL,
    instance_number INTEGER,
    number_of_frames INTEGER,
    stored_ts TEXT NOT NULL,
    original_ts TEXT NOT NULL,
    object_key TEXT NOT NULL,
    size {bigint} NOT NULL,
    sha256 {blob} NOT NULL,
    received_at {timestamp} NOT NULL,
    -- 'ok', or 'missing' once `imag verify --repair` found the object gone
    integrity TEXT NOT NULL DEFAULT 'ok'
);
CREATE INDEX instances_by_series ON instances (series_ref, instance_number);
