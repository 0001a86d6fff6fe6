-- Worklist, component "worklist", version 4: the result letters of screening exams.
--
-- * `screening_letters`: one row per closed exam and recipient (`recipient`:
--   woman, radiologist, gp), written in the transaction that sets the exam's
--   `letters_at` (the `screening.result` subscriber's, exactly once per
--   exam: `UNIQUE (study_uid, recipient)` refuses a second letter even if the
--   subscriber were run again).  `status`: 'queued' (`message_ref` is the
--   message queued through the messaging plugin, messages.id), 'no address'
--   (the first reading named no address for this recipient: skipped), or
--   'refused' (the messaging plugin refused the message; `detail` says why).
CREATE TABLE screening_letters (
    id {pk},
    study_uid TEXT NOT NULL,
    recipient TEXT NOT NULL,
    address TEXT,
    message_ref {bigint},
    status TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    created_at {timestamp} NOT NULL,
    UNIQUE (study_uid, recipient)
);
