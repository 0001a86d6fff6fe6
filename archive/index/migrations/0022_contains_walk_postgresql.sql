-- dialect: postgresql
-- A name contains-match (*lefevre*) that stays flat with the table (issue
-- 17).  A study search by a contains-match pages in id order (archive/
-- query.py), which the planner serves one of two ways: the pg_trgm GIN
-- index finds every match, then the page is sorted out of them -- cheap for
-- a rare name, growing with the table for a common one -- or an index in id
-- order is walked until the page is full: page size / share of matches
-- entries, whatever the size of the table.  The walk had to read each
-- study's heap row for its name (studies_pkey; (site, id)), so for a
-- site-bound caller the planner preferred reading the whole site's part of
-- (site, patient_name_fold, id), index only, and sorting its matches: at
-- 10^6 instances 15 ms for *lefevre*, ten times more at 10^7.
--
-- With both name copies in the (site, id) and id indexes (INCLUDE), the walk
-- is index only: the planner takes it for common names (*lefevre*, *a*:
-- about 2 and 0.5 ms at 10^6 instances, stopping at the page) and the
-- trigram index for rare ones (*zzz*, *trepanier*), by its estimates of the
-- share of matches.  studies_by_site_id is replaced by its covering twin
-- (the same keys: paging by site in id order is served as before).
DROP INDEX IF EXISTS studies_by_site_id;
CREATE INDEX studies_by_site_id ON studies (site, id)
    INCLUDE (patient_name_norm, patient_name_fold);
CREATE INDEX studies_by_id_names ON studies (id)
    INCLUDE (patient_name_norm, patient_name_fold);
