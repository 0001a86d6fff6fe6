-- dialect: postgresql
-- Name searches that stay flat at 10^7 instances (issue 17; 0020 is the
-- SQLite twin).  A study search by PatientName walked studies_pkey in id
-- order, looking each study's patient up, until it had a page: 40-60 ms at
-- 10^7 instances, growing with the table.  Each study now carries its
-- patient's upper-cased and folded names (names.fold()), so the search reads
-- studies alone (archive/query.py), on one of them: the upper-cased name
-- (case-insensitive matching), the folded one (fuzzymatching=true):
-- * a prefix (MUL*) or an exact name pages in (name, id) order, read in
--   order from (name, id) or (site, name, id);
-- * a contains-match (*cote*) pages in id order: either a pg_trgm GIN index
--   finds the (few) matches, or studies_pkey / (site, id) are walked until
--   the page is full, which for a common name takes page size / share of
--   matches rows whatever the size of the table.
-- Both copies are COLLATE "C": LIKE 'MUL%' is a b-tree range only in a C
-- collation (the database's may be another, e.g. C.UTF-8), and byte order is
-- the order SQLite sorts the same columns in, so both backends page alike.
-- One name per search: a search on both (the folded one to narrow, the
-- upper-cased one to decide) multiplied two nearly equivalent selectivities,
-- and the planner, expecting a handful of rows, sorted every match.
--
-- The copies equal the names of the study's patient_ref at all times: the
-- catalog writes them with the study, this fills existing rows, and the
-- triggers fill them for a study inserted without them and follow a patient
-- renamed or a study moved to another patient (no code does either today; a
-- merge or a repair by hand must not make a study unfindable by its name).
ALTER TABLE studies ADD COLUMN patient_name_norm TEXT COLLATE "C";
ALTER TABLE studies ADD COLUMN patient_name_fold TEXT COLLATE "C";
UPDATE studies st SET patient_name_norm = p.patient_name_norm,
                      patient_name_fold = p.patient_name_fold
    FROM patients p WHERE p.id = st.patient_ref
    AND (p.patient_name_norm IS NOT NULL OR p.patient_name_fold IS NOT NULL);
CREATE INDEX studies_by_patient_name_norm ON studies (patient_name_norm, id);
CREATE INDEX studies_by_site_patient_name_norm ON studies (site, patient_name_norm, id);
CREATE INDEX studies_by_patient_name_fold ON studies (patient_name_fold, id);
CREATE INDEX studies_by_site_patient_name_fold ON studies (site, patient_name_fold, id);
CREATE FUNCTION imag_study_patient_name() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    SELECT p.patient_name_norm, p.patient_name_fold
        INTO NEW.patient_name_norm, NEW.patient_name_fold
        FROM patients p WHERE p.id = NEW.patient_ref;
    RETURN NEW;
END $$;
CREATE TRIGGER studies_patient_name_on_insert BEFORE INSERT ON studies
FOR EACH ROW WHEN (NEW.patient_name_norm IS NULL AND NEW.patient_name_fold IS NULL)
EXECUTE FUNCTION imag_study_patient_name();
CREATE TRIGGER studies_patient_name_on_update
BEFORE UPDATE OF patient_ref, patient_name_norm, patient_name_fold ON studies
FOR EACH ROW EXECUTE FUNCTION imag_study_patient_name();
CREATE FUNCTION imag_patient_name_to_studies() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE studies SET patient_name_norm = NEW.patient_name_norm,
                       patient_name_fold = NEW.patient_name_fold
        WHERE patient_ref = NEW.id;
    RETURN NULL;
END $$;
CREATE TRIGGER patients_name_to_studies
AFTER UPDATE OF patient_name_norm, patient_name_fold ON patients
FOR EACH ROW WHEN (NEW.patient_name_norm IS DISTINCT FROM OLD.patient_name_norm
                   OR NEW.patient_name_fold IS DISTINCT FROM OLD.patient_name_fold)
EXECUTE FUNCTION imag_patient_name_to_studies();
DO $$
BEGIN
    CREATE INDEX studies_by_patient_name_trgm ON studies
        USING gin (patient_name_norm gin_trgm_ops);
    CREATE INDEX studies_by_patient_name_fold_trgm ON studies
        USING gin (patient_name_fold gin_trgm_ops);
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE USING MESSAGE = 'pg_trgm unavailable (' || SQLERRM
        || '): study searches by a name contains-match will not use an index';
END $$;
