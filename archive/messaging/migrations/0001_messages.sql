-- Messaging, component "messaging", version 1: one row per message sent
-- through archive.messaging.send (a report to a GP, a share link, a screening
-- letter), whatever the transport.
--
-- * The complete RFC 5322 bytes are built once, when the message is queued,
--   and kept in `body`: every delivery attempt sends exactly the same bytes
--   with the same Message-ID, so a receiver (or the outbox file name) sees a
--   re-run of an at-least-once job as the same message, never a new one.
-- * `delivered_to` (JSON list) holds the recipients a server already accepted
--   when others were refused: a retry goes to the remaining ones only.
-- * `attachments` is a JSON summary (file name, type, size, SHA-256) for the
--   API; the attachment bodies are inside `body` only.
-- * `site` is the producing site of the sender (empty for regional senders):
--   a site's users see their site's messages, nobody else's.
CREATE TABLE messages (
    id {pk},
    message_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    delivered_to TEXT NOT NULL DEFAULT '[]',
    subject TEXT NOT NULL,
    purpose TEXT NOT NULL DEFAULT '',
    study_uid TEXT,
    site TEXT NOT NULL DEFAULT '',
    created_by TEXT NOT NULL,
    attachments TEXT NOT NULL DEFAULT '[]',
    size {bigint} NOT NULL,
    body {blob} NOT NULL,
    job_id {bigint},
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    transport TEXT,
    created_at {timestamp} NOT NULL,
    updated_at {timestamp} NOT NULL,
    sent_at {timestamp}
);
CREATE INDEX messages_by_state ON messages (state, id);
CREATE INDEX messages_by_site ON messages (site, id);
