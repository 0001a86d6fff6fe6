-- dialect: postgresql
-- A study search by date and modality (one week of CT: a viewer's most
-- common worklist query) that reads one index (issue 17).  The page of ids
-- walks a date index in date order; ModalitiesInStudy was matched through
-- study_modalities, one index probe per study of the range until the page
-- was full -- at 10^7 instances 3-4 ms of a week's CT page, and 2 ms more
-- to plan the join.  With the study's own list of modalities in the date
-- indexes (INCLUDE), archive/query.py matches it as the index is read
-- (string_to_array(modalities, '\') && the values): 0.2 ms for that page,
-- index only.  The indexes keep their keys, so date searches without a
-- modality are served as before; a search by modality alone still reads
-- study_modalities (its index finds the studies with MR whatever their date).
DROP INDEX IF EXISTS studies_by_date_id;
CREATE INDEX studies_by_date_id ON studies (study_date, id) INCLUDE (modalities);
DROP INDEX IF EXISTS studies_by_site_date_id;
CREATE INDEX studies_by_site_date_id ON studies (site, study_date, id) INCLUDE (modalities);
