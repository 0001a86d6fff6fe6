-- dialect: sqlite
-- Queries that stay fast at 10^7 instances (issue 17; 0019 is the PostgreSQL
-- twin).  ModalitiesInStudy was four LIKEs on the studies.modalities text
-- list, which no index can serve: each study's modalities are now also rows
-- of a narrow side table, written with the series row that brings a new
-- modality (archive/index/catalog.py) and back-filled here from the series.
-- * The primary key (study_ref, modality) answers "does this study have CT"
--   (a search already narrowed by date, patient or UID);
-- * (modality, study_ref) answers "the studies with MR" in study order, so a
--   page of them is read from the index alone.
-- SQLite's secondary indexes end with the rowid, so studies_by_date is
-- already (study_date, id) and serves a date range in the order the search
-- pages in (archive/query.py); studies_by_site adds (site, id) for the pages of
-- a site-bound caller without other keys.
CREATE TABLE study_modalities (
    study_ref {ref} NOT NULL REFERENCES studies (id),
    modality TEXT NOT NULL,
    PRIMARY KEY (study_ref, modality)
);
CREATE INDEX study_modalities_by_modality ON study_modalities (modality, study_ref);
INSERT INTO study_modalities (study_ref, modality)
SELECT DISTINCT study_ref, modality FROM series WHERE modality IS NOT NULL AND modality <> '';
CREATE INDEX studies_by_site ON studies (site);
