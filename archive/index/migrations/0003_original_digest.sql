-- Transcoding: an instance stored in another transfer syntax than it arrived
-- in keeps the SHA-256 of the bytes it arrived as, so that a re-send of the
-- same object is recognised as a duplicate without transcoding it again.
-- NULL when the stored object is the received one (then sha256 is that digest).
ALTER TABLE instances ADD COLUMN original_sha256 {blob};
