-- Extra indexed attributes (setting index.extra_attributes, archive/index/extra.py):
-- series- and instance-level keys beyond the columns above -- ImageLaterality,
-- ViewPosition, Laterality, ProtocolName... -- that viewers' hanging protocols
-- and the screening flow search on.
--
-- Two narrow side tables, one row per value (a multi-valued attribute has one
-- row per value, n its position): the series or instance reference, the tag
-- (an integer, narrower than its keyword) and the value as text.  The instance
-- table keeps its two secondary indexes: an instance carrying none of the
-- configured attributes costs nothing, one that does costs a few narrow rows,
-- written by one multi-row insert per ingest batch in the transaction of the
-- instance row.
-- * The primary key (ref, tag, n) answers "the values of this row" (returned
--   keys, and the EXISTS probe of a search already narrowed to a study or a
--   series);
-- * (tag, value, ref) answers "the rows with this value" (a search driven by
--   the extra key itself, e.g. /instances?ImageLaterality=L).
--
-- Only instances stored from now on are indexed here: `imag db
-- reindex-attributes` fills the side tables from the stored objects (and
-- again after index.extra_attributes changes), with progress.
CREATE TABLE series_attributes (
    series_ref {ref} NOT NULL REFERENCES series (id),
    tag INTEGER NOT NULL,
    n INTEGER NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (series_ref, tag, n)
);
CREATE INDEX series_attributes_by_value ON series_attributes (tag, value, series_ref);

CREATE TABLE instance_attributes (
    instance_ref {ref} NOT NULL REFERENCES instances (id),
    tag INTEGER NOT NULL,
    n INTEGER NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (instance_ref, tag, n)
);
CREATE INDEX instance_attributes_by_value ON instance_attributes (tag, value, instance_ref);
