"""Reading the audit trail from a test: the rows a request added, by id."""

from __future__ import annotations

from archive.index.db import Database

COLUMNS = (
    "actor",
    "actor_kind",
    "role",
    "action",
    "outcome",
    "status",
    "study_uid",
    "patient_id",
    "source",
    "detail",
)


class AuditCursor:
    """Remembers the last audit row id so that a test can ask what came after."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.last = self.position()

    def position(self) -> int:
        return int(self.db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))

    def new_rows(self) -> list[dict]:
        """The rows written since the cursor was made (or last read), oldest first."""
        rows = self.db.query(
            f"SELECT id, {', '.join(COLUMNS)} FROM audit WHERE id > ? ORDER BY id", (self.last,)
        )
        if rows:
            self.last = int(rows[-1][0])
        return [dict(zip(COLUMNS, row[1:], strict=True)) for row in rows]
