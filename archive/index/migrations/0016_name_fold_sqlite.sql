-- dialect: sqlite
-- Accent-insensitive name matching (QIDO-RS fuzzymatching=true, see
-- archive/index/names.py and 0017, its PostgreSQL twin): a folded copy of each
-- name, filled here for existing rows by imag_fold() -- names.fold(),
-- registered on every SQLite connection of the index -- and at ingest for new
-- ones.  The index serves prefixes (MUL*: case_sensitive_like is on, so LIKE
-- 'MUL%' is a range); contains-matching reads the (small) patients table.
ALTER TABLE patients ADD COLUMN patient_name_fold TEXT;
ALTER TABLE studies ADD COLUMN referring_physician_name_fold TEXT;
UPDATE patients SET patient_name_fold = imag_fold(patient_name_norm)
    WHERE patient_name_norm IS NOT NULL;
UPDATE studies SET referring_physician_name_fold = imag_fold(referring_physician_name_norm)
    WHERE referring_physician_name_norm IS NOT NULL;
CREATE INDEX patients_by_name_fold ON patients (patient_name_fold);
