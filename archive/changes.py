"""The change feed: an ordered, durable log of what happened to the archive.

Rows are written in the same transaction as the change itself (an instance's
index rows, a study's stability decision) by :func:`archive.events.record`,
so the feed never shows something that did not happen nor misses something
that did.  Integrations read it over HTTP (``GET /changes?since=<seq>``);
services inside IMAG subscribe durably through :mod:`archive.events`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from archive.index.db import Database

log = logging.getLogger(__name__)

#: the core's event types (plugins add theirs: :func:`archive.events.event_types`)
TYPES = ("instance.stored", "instance.replaced", "instance.deleted", "study.stable")


@dataclass(frozen=True)
class Change:
    seq: int
    type: str
    at: str
    site: str | None
    study_uid: str | None
    series_uid: str | None
    sop_instance_uid: str | None
    detail: dict | None = None

    def as_dict(self) -> dict:
        return {
            "seq": self.seq,
            "type": self.type,
            "time": self.at,
            "site": self.site,
            "study": self.study_uid,
            "series": self.series_uid,
            "instance": self.sop_instance_uid,
            **({"detail": self.detail} if self.detail else {}),
        }


def read(
    db: Database, since: int = 0, limit: int = 100, types: Iterable[str] | None = None
) -> list[Change]:
    """Changes with a sequence number above ``since``, oldest first."""
    sql = (
        "SELECT seq, type, at, site, study_uid, series_uid, sop_instance_uid, detail "
        "FROM changes "
        "WHERE seq > ?"
    )
    params: list[object] = [since]
    wanted = list(types or [])
    if wanted:
        sql += f" AND type IN ({', '.join('?' * len(wanted))})"
        params += wanted
    rows = db.query(sql + " ORDER BY seq LIMIT ?", [*params, limit])
    return [
        Change(
            r[0],
            r[1],
            r[2] if isinstance(r[2], str) else r[2].isoformat(),
            *r[3:7],
            json.loads(r[7]) if r[7] else None,
        )
        for r in rows
    ]


def last_seq(db: Database) -> int:
    return int(db.scalar("SELECT COALESCE(MAX(seq), 0) FROM changes"))
