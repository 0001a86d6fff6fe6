-- Durable event subscriptions (archive/events.py).  An event may carry a JSON
-- detail (events that services add, e.g. report.validated with its report).
-- event_deliveries records each delivery of an event to a transactional
-- subscriber in the transaction of the subscriber's own writes; its primary
-- key makes a re-run of the same delivery (a worker killed after the commit,
-- before the job was marked done) a no-op: exactly once.
ALTER TABLE changes ADD COLUMN detail TEXT;
CREATE TABLE event_deliveries (
    subscriber TEXT NOT NULL,
    seq {bigint} NOT NULL,
    delivered_at {timestamp} NOT NULL,
    PRIMARY KEY (subscriber, seq)
);
