-- dialect: postgresql
-- Queries that stay fast at 10^7 instances (issue 17; 0018 is the SQLite
-- twin, with the reasons for study_modalities).
-- * A date range is paged in (study_date, id) order (archive/query.py), so
--   the first page of "one year" reads 100 index entries instead of sorting
--   every study of the year: (study_date, id) for everyone, (site,
--   study_date, id) for a site-bound caller.  They replace the indexes on
--   (study_date) and (site, study_date), of which they are extensions.
-- * (site, id): the pages of a site-bound caller without other keys, in id
--   order, skipped over in the index (OFFSET counts index entries only: the
--   search pages ids first and joins the page's rows after).
CREATE TABLE study_modalities (
    study_ref {ref} NOT NULL REFERENCES studies (id),
    modality TEXT NOT NULL,
    PRIMARY KEY (study_ref, modality)
);
CREATE INDEX study_modalities_by_modality ON study_modalities (modality, study_ref);
INSERT INTO study_modalities (study_ref, modality)
SELECT DISTINCT study_ref, modality FROM series WHERE modality IS NOT NULL AND modality <> '';
CREATE INDEX studies_by_date_id ON studies (study_date, id);
CREATE INDEX studies_by_site_date_id ON studies (site, study_date, id);
CREATE INDEX studies_by_site_id ON studies (site, id);
DROP INDEX studies_by_date;
DROP INDEX studies_by_site_date;
