-- The example plugin's own tables, versioned as component "example".
-- example_deliveries counts how many times the subscriber ran for each
-- study.stable event: exactly once means every row has runs = 1.
CREATE TABLE example_deliveries (
    seq {bigint} PRIMARY KEY,
    study_uid TEXT NOT NULL,
    runs INTEGER NOT NULL
);
CREATE TABLE example_touches (
    id {pk},
    note TEXT NOT NULL
);
