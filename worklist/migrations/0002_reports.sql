-- Worklist, component "worklist", version 2: the reports of reading requests.
--
-- * `reports`: one per request (`request_uid`), the four chapters of the
--   national teleradiology specification, the reader (account and display
--   name as signed) and its state: `draft` while the holder writes it,
--   `validated` once signed -- then it never changes again.
-- * `report_addenda`: texts added after validation, numbered from 1 per
--   report, each `draft` then `validated` by its author (its own signature).
-- * `report_versions`: what each validation stored and sent.  Version 0 is
--   the report, version n the report with its addenda 1..n.  The UIDs of the
--   SR and the Encapsulated PDF (two series: a series has one Modality) are
--   fixed here, in the validation's transaction, before anything is stored, so
--   that a re-run of the storage job makes the same objects (the ingest takes
--   an identical re-send as a duplicate).  `stored_at`: both are in the
--   archive; `message_ref`: the message queued to the requester (messages.id;
--   never queued twice); `delivery`: '' (to do), 'queued', or why not
--   ('no address': the request has no reply_to).
CREATE TABLE reports (
    id {pk},
    request_uid TEXT NOT NULL UNIQUE,
    study_uid TEXT NOT NULL,
    site TEXT NOT NULL,
    reader TEXT NOT NULL,
    reader_name TEXT NOT NULL,
    indications TEXT NOT NULL DEFAULT '',
    technique TEXT NOT NULL DEFAULT '',
    results TEXT NOT NULL DEFAULT '',
    conclusion TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    created_at {timestamp} NOT NULL,
    updated_at {timestamp} NOT NULL,
    validated_at {timestamp}
);

CREATE TABLE report_addenda (
    id {pk},
    request_uid TEXT NOT NULL,
    number INTEGER NOT NULL,
    text TEXT NOT NULL,
    author TEXT NOT NULL,
    author_name TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at {timestamp} NOT NULL,
    updated_at {timestamp} NOT NULL,
    validated_at {timestamp},
    UNIQUE (request_uid, number)
);

CREATE TABLE report_versions (
    id {pk},
    request_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    sr_series_uid TEXT NOT NULL,
    sr_sop_uid TEXT NOT NULL,
    pdf_series_uid TEXT NOT NULL,
    pdf_sop_uid TEXT NOT NULL,
    created_at {timestamp} NOT NULL,
    stored_at {timestamp},
    message_ref {bigint},
    delivery TEXT NOT NULL DEFAULT '',
    UNIQUE (request_uid, version)
);
