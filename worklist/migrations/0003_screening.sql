-- Worklist, component "worklist", version 3: screening mammography second reading.
--
-- * `screening_exams`: one per screening study, recognised by a
--   [[screening.rules]] rule when the study becomes stable (`burst`: the
--   study.stable event; `study_uid` unique: a later burst of the same study
--   makes no second exam).  `patient_ref` is the woman's local identity at the
--   producing site; her other rounds are found through the regional identity.
--   `exam_date` is the study date (ISO), what every deadline counts from.
--   `state`: 'AWAITING L1' -> 'AWAITING L2' (negative at L1: `request_uid` is
--   the second read's reading request, kind 'screening', whose claims and
--   leases are the worklist's) -> 'CLOSED'; or 'AWAITING L1' -> 'CLOSED'
--   (positive at L1).  `l1` and `l2` (JSON) are the readings as recorded;
--   `outcome` the programme's result once closed: NEGATIVE, POSITIVE_L1,
--   POSITIVE_L2 (recalled for a deferred work-up) or INADEQUATE (views to
--   redo).  `letters_at`: when the result letters were queued;
--   `late_alerted_at`: when the exam-to-letter deadline alert fired.
-- * `screening_readers`: accreditation of second readers, with its dates
--   (`accredited_until` NULL: open-ended); `revoked_at` ends it early.
CREATE TABLE screening_exams (
    id {pk},
    study_uid TEXT NOT NULL UNIQUE,
    site TEXT NOT NULL,
    patient_ref {bigint},
    rule TEXT NOT NULL,
    burst {bigint} UNIQUE,
    exam_date TEXT NOT NULL,
    recognised_at {timestamp} NOT NULL,
    state TEXT NOT NULL,
    l1_reader TEXT,
    l1_at {timestamp},
    l1 TEXT,
    l1_outcome TEXT,
    request_uid TEXT UNIQUE,
    l2_reader TEXT,
    l2_at {timestamp},
    l2 TEXT,
    l2_verdict TEXT,
    outcome TEXT,
    closed_at {timestamp},
    recipients TEXT NOT NULL DEFAULT '{{}}',
    letters_at {timestamp},
    late_alerted_at {timestamp}
);
CREATE INDEX screening_exams_by_site ON screening_exams (site, state, exam_date, id);
CREATE INDEX screening_exams_by_state ON screening_exams (state, exam_date, id);
CREATE INDEX screening_exams_by_patient ON screening_exams (patient_ref);
CREATE INDEX screening_exams_by_date ON screening_exams (exam_date, id);

CREATE TABLE screening_readers (
    name TEXT NOT NULL PRIMARY KEY,
    accredited_from TEXT NOT NULL,
    accredited_until TEXT,
    reference TEXT NOT NULL DEFAULT '',
    revoked_at {timestamp},
    updated_by TEXT NOT NULL,
    updated_at {timestamp} NOT NULL
);
