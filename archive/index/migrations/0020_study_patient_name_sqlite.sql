-- dialect: sqlite
-- Name searches that stay flat at 10^7 instances (issue 17; 0021 is the
-- PostgreSQL twin, with the reasons).  Each study carries its patient's
-- upper-cased and folded names (names.fold()), so a study search by
-- PatientName reads studies alone: a prefix pages in (name, id) order from
-- an index of the name it compares (upper-cased; folded for fuzzy
-- matching), a contains-match in id order.  SQLite's secondary indexes end
-- with the rowid: (patient_name_fold) is (patient_name_fold, id).
--
-- The copies equal the names of the study's patient_ref at all times: the
-- catalog writes them with the study, this fills existing rows, and the
-- triggers fill them for a study inserted without them and follow a patient
-- renamed or a study moved to another patient (no code does either today; a
-- merge or a repair by hand must not make a study unfindable by its name).
ALTER TABLE studies ADD COLUMN patient_name_norm TEXT;
ALTER TABLE studies ADD COLUMN patient_name_fold TEXT;
UPDATE studies SET
    patient_name_norm = (SELECT p.patient_name_norm FROM patients p WHERE p.id = studies.patient_ref),
    patient_name_fold = (SELECT p.patient_name_fold FROM patients p WHERE p.id = studies.patient_ref);
CREATE INDEX studies_by_patient_name_norm ON studies (patient_name_norm);
CREATE INDEX studies_by_site_patient_name_norm ON studies (site, patient_name_norm);
CREATE INDEX studies_by_patient_name_fold ON studies (patient_name_fold);
CREATE INDEX studies_by_site_patient_name_fold ON studies (site, patient_name_fold);
CREATE TRIGGER studies_patient_name_on_insert AFTER INSERT ON studies
WHEN NEW.patient_name_norm IS NULL AND NEW.patient_name_fold IS NULL
BEGIN
    UPDATE studies SET
        patient_name_norm = (SELECT p.patient_name_norm FROM patients p WHERE p.id = NEW.patient_ref),
        patient_name_fold = (SELECT p.patient_name_fold FROM patients p WHERE p.id = NEW.patient_ref)
    WHERE id = NEW.id;
END;
CREATE TRIGGER studies_patient_name_on_update
AFTER UPDATE OF patient_ref, patient_name_norm, patient_name_fold ON studies
WHEN NOT EXISTS (SELECT 1 FROM patients p WHERE p.id = NEW.patient_ref
                 AND p.patient_name_norm IS NEW.patient_name_norm
                 AND p.patient_name_fold IS NEW.patient_name_fold)
BEGIN
    UPDATE studies SET
        patient_name_norm = (SELECT p.patient_name_norm FROM patients p WHERE p.id = NEW.patient_ref),
        patient_name_fold = (SELECT p.patient_name_fold FROM patients p WHERE p.id = NEW.patient_ref)
    WHERE id = NEW.id;
END;
CREATE TRIGGER patients_name_to_studies
AFTER UPDATE OF patient_name_norm, patient_name_fold ON patients
WHEN NEW.patient_name_norm IS NOT OLD.patient_name_norm
    OR NEW.patient_name_fold IS NOT OLD.patient_name_fold
BEGIN
    UPDATE studies SET patient_name_norm = NEW.patient_name_norm,
                       patient_name_fold = NEW.patient_name_fold
    WHERE patient_ref = NEW.id;
END;
