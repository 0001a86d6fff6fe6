-- dialect: sqlite
-- foreign_keys: off
-- A local patient identity belongs to one site (see archive/identity.py):
-- patients are unique on (site, issuer, patient_id) instead of (issuer,
-- patient_id), so that a sender naming another site's IssuerOfPatientID and
-- a guessed PatientID files its own patient row and never sees that site's.
--
-- SQLite cannot drop a table constraint: the table is rebuilt (SQLite's
-- twelve-step procedure; the runner turns foreign key enforcement off around
-- this migration and checks every reference before it commits).  Each
-- existing patient goes to the site of its first study; a patient whose
-- studies belong to several sites is split: every other site gets its own
-- copy of the row and its studies point at it.
CREATE TABLE patients_new (
    id {pk},
    site TEXT NOT NULL DEFAULT '',
    issuer TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    patient_name TEXT,
    patient_name_norm TEXT,
    birth_date TEXT,
    sex TEXT,
    created_at {timestamp} NOT NULL,
    UNIQUE (site, issuer, patient_id)
);
INSERT INTO patients_new (id, site, issuer, patient_id, patient_name, patient_name_norm,
                          birth_date, sex, created_at)
SELECT p.id,
       COALESCE((SELECT st.site FROM studies st WHERE st.patient_ref = p.id
                 ORDER BY st.id LIMIT 1), ''),
       p.issuer, p.patient_id, p.patient_name, p.patient_name_norm, p.birth_date, p.sex,
       p.created_at
FROM patients p;
DROP TABLE patients;
ALTER TABLE patients_new RENAME TO patients;
CREATE INDEX patients_by_name ON patients (patient_name_norm);
CREATE INDEX patients_by_patient_id ON patients (patient_id);
INSERT INTO patients (site, issuer, patient_id, patient_name, patient_name_norm, birth_date,
                      sex, created_at)
SELECT DISTINCT st.site, p.issuer, p.patient_id, p.patient_name, p.patient_name_norm,
       p.birth_date, p.sex, p.created_at
FROM studies st JOIN patients p ON p.id = st.patient_ref
WHERE st.site <> p.site;
UPDATE studies SET patient_ref = (
    SELECT p2.id FROM patients p JOIN patients p2
        ON p2.issuer = p.issuer AND p2.patient_id = p.patient_id
    WHERE p.id = studies.patient_ref AND p2.site = studies.site)
WHERE site <> (SELECT p.site FROM patients p WHERE p.id = studies.patient_ref);
