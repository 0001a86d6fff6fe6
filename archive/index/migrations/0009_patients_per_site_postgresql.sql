-- dialect: postgresql
-- A local patient identity belongs to one site (see archive/identity.py and
-- 0008, its SQLite twin): patients are unique on (site, issuer, patient_id).
-- Each existing patient goes to the site of its first study; a patient whose
-- studies belong to several sites is split, every other site getting its own
-- copy of the row.
ALTER TABLE patients ADD COLUMN site TEXT NOT NULL DEFAULT '';
UPDATE patients p SET site = COALESCE(
    (SELECT st.site FROM studies st WHERE st.patient_ref = p.id ORDER BY st.id LIMIT 1), '');
ALTER TABLE patients DROP CONSTRAINT patients_issuer_patient_id_key;
CREATE UNIQUE INDEX patients_by_site_issuer_id ON patients (site, issuer, patient_id);
INSERT INTO patients (site, issuer, patient_id, patient_name, patient_name_norm, birth_date,
                      sex, created_at)
SELECT DISTINCT st.site, p.issuer, p.patient_id, p.patient_name, p.patient_name_norm,
       p.birth_date, p.sex, p.created_at
FROM studies st JOIN patients p ON p.id = st.patient_ref
WHERE st.site <> p.site;
UPDATE studies st SET patient_ref = p2.id
FROM patients p, patients p2
WHERE p.id = st.patient_ref AND st.site <> p.site
  AND p2.site = st.site AND p2.issuer = p.issuer AND p2.patient_id = p.patient_id;
