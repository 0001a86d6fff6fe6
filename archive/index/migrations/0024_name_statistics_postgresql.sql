-- dialect: postgresql
-- A name contains-match (*muller*) planned on what the names really are
-- (issue 17).  Its page of ids comes either from walking an index in id
-- order until the page is full (a common name) or from the trigram index,
-- which finds every match before the page is sorted out of them (a rare
-- one); the planner chooses by its estimate of how many studies match.  With
-- the default statistics target (100 most common values of ~3,500 distinct
-- names, 100 histogram bounds) that estimate missed by two orders of
-- magnitude for common names outside the sample's top 100: at 10^7
-- instances *muller* was estimated at 61 studies of its 5,561, read from
-- the trigram index and sorted (8-9 ms), where the walk takes 2 ms.  A
-- larger sample of the name columns (ANALYZE reads 300 x the target rows)
-- makes the estimate of a common name right, and the rare ones still go to
-- the trigram index (*zzz*: 0.02 ms).  ANALYZE here so that the new sample
-- is used at once, not at autovacuum's next pass (about 4 s for 10^6
-- studies).
ALTER TABLE studies
    ALTER COLUMN patient_name_norm SET STATISTICS 1000,
    ALTER COLUMN patient_name_fold SET STATISTICS 1000;
ALTER TABLE patients
    ALTER COLUMN patient_name_norm SET STATISTICS 1000,
    ALTER COLUMN patient_name_fold SET STATISTICS 1000;
ANALYZE studies;
ANALYZE patients;
