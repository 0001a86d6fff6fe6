-- dialect: postgresql
-- Wildcard searches (PatientName=MULL*, PatientID=12*, AccessionNumber=A2026*)
-- become LIKE 'prefix%'.  PostgreSQL's default b-tree indexes, ordered by the
-- database locale, cannot serve LIKE; text_pattern_ops indexes can.  SQLite
-- serves such LIKEs from the plain indexes because every connection sets
-- PRAGMA case_sensitive_like=ON (names are matched on an upper-cased copy).
CREATE INDEX patients_by_name_pattern ON patients (patient_name_norm text_pattern_ops);
CREATE INDEX patients_by_patient_id_pattern ON patients (patient_id text_pattern_ops);
CREATE INDEX studies_by_accession_pattern ON studies (accession_number text_pattern_ops);
