-- Which node wrote an audit row (setting node.name), when several imag serve
-- nodes share one index.  Rows written before this migration have none.
ALTER TABLE audit ADD COLUMN node TEXT;
