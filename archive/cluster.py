"""One configuration for the cluster, and the nodes that run it.

Several ``imag serve`` nodes share one index and one store; they must agree
on who may send (peers), what is accepted (ingest limits, conflict policy), how
it is stored and routed (sites, store_as, routes) and how callers are
authenticated -- the *cluster-wide* settings (:data:`archive.config.CLUSTER_WIDE`
and plugins' settings marked ``cluster``).  A node configured differently would
accept what another refuses, or route a study twice; nothing showed it.

So the index keeps the cluster's view: one digest per cluster-wide setting
(``cluster_config``), and each node's heartbeat (``nodes``).  At start-up a
node compares its own settings with the cluster's:

* the same: it joins;
* different, and no *other* node is live (a single node restarted with a new
  configuration, or the whole cluster stopped for a change): its values become
  the cluster's, the change logged;
* different while another node is live: it refuses to start, naming each
  setting that differs and the live nodes (or, with ``cluster.check = warn``
  on a node deliberately run differently, starts with a warning).  A rolling change is made by
  ``imag config publish`` on a node with the new file, then restarting the
  nodes one by one.

An ``imag worker`` runs the cluster's jobs (transcoding into the store,
routing, letters) with its own settings and publishes nothing: it starts only
when its cluster-wide settings are the published ones (:func:`check_worker`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from archive.config import Config
from archive.index.db import Database

log = logging.getLogger(__name__)

#: a node writes its heartbeat this often ...
HEARTBEAT_SECONDS = 10
#: ... and is live while its last one is younger than this
LIVE_SECONDS = 3 * HEARTBEAT_SECONDS

#: PostgreSQL advisory lock serialising nodes that start together
_ADVISORY_KEY = 0x494D4147_434C5553  # "IMAG" "CLUS"


class ClusterConfigError(RuntimeError):
    """This node's cluster-wide settings differ from the running cluster's."""


@dataclass(frozen=True)
class NodeInfo:
    name: str
    started_at: datetime
    last_seen: datetime
    stopped_at: datetime | None
    config_digest: str

    def live(self, now: datetime) -> bool:
        return self.stopped_at is None and now - self.last_seen < timedelta(seconds=LIVE_SECONDS)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def settings_digests(config: Config) -> dict[str, tuple[str, str]]:
    """Cluster-wide setting -> (digest, canonical JSON value)."""
    out = {}
    for key, value in config.cluster_values().items():
        text = _canonical(value)
        out[key] = (hashlib.sha256(text.encode()).hexdigest(), text)
    return out


def _overall(digests: dict[str, tuple[str, str]]) -> str:
    return hashlib.sha256(_canonical({k: d for k, (d, _) in digests.items()}).encode()).hexdigest()


def _differing(mine: dict[str, tuple[str, str]], theirs: dict[str, tuple]) -> list[str]:
    """The settings whose digests differ (set on one side only included)."""
    return sorted(
        key
        for key in set(mine) | set(theirs)
        if mine.get(key, ("",))[0] != theirs.get(key, ("",))[0]
    )


def _dt(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def nodes(db: Database) -> list[NodeInfo]:
    """Every node that ever joined, most recently seen first."""
    rows = db.query(
        "SELECT name, started_at, last_seen, stopped_at, config_digest FROM nodes "
        "ORDER BY last_seen DESC"
    )
    return [NodeInfo(r[0], _dt(r[1]), _dt(r[2]), _dt(r[3]), r[4]) for r in rows]


def published(db: Database) -> dict[str, tuple[str, str, str]]:
    """The cluster's view: setting -> (digest, value, node that published it)."""
    return {
        r[0]: (r[1], r[2], r[3])
        for r in db.query("SELECT key, digest, value, node FROM cluster_config")
    }


def _publish(db: Database, digests: dict[str, tuple[str, str]], node: str, now: datetime) -> None:
    db.execute("DELETE FROM cluster_config")
    db.executemany(
        "INSERT INTO cluster_config (key, digest, value, node, updated_at) VALUES (?, ?, ?, ?, ?)",
        [(key, digest, value, node, now) for key, (digest, value) in sorted(digests.items())],
    )


def _lock(db: Database) -> None:
    if db.dialect == "postgresql":
        db.execute("SELECT pg_advisory_xact_lock(?)", (_ADVISORY_KEY,))


def join(db: Database, config: Config) -> list[str]:
    """Check this node's cluster-wide settings against the cluster's and record
    it as live; return the settings whose cluster value this node changed (none
    when they agreed).  Raises :class:`ClusterConfigError` when they differ
    while another node is live."""
    node = config.node
    mine = settings_digests(config)
    with db.transaction():
        _lock(db)
        now = db.clock.now()
        theirs = published(db)
        differ = _differing(mine, theirs)
        live = [n.name for n in nodes(db) if n.name != node and n.live(now)]
        if differ and theirs and live:
            message = (
                f"this node's {', '.join(differ)} differ from the cluster's, which "
                f"node(s) {', '.join(live)} are running: give every node the same "
                "configuration file (`imag config cluster` shows the cluster's values), or "
                "for a rolling change run `imag config publish` with the new file first"
            )
            _refuse(config, message)
        elif differ:
            _publish(db, mine, node, now)
        overall = _overall(mine)
        db.execute(
            "INSERT INTO nodes (name, started_at, last_seen, stopped_at, config_digest) "
            "VALUES (?, ?, ?, NULL, ?) ON CONFLICT (name) DO UPDATE SET "
            "started_at = excluded.started_at, last_seen = excluded.last_seen, "
            "stopped_at = NULL, config_digest = excluded.config_digest",
            (node, now, now, overall),
        )
    return differ if theirs and not live else []


def check_worker(db: Database, config: Config) -> None:
    """Check an ``imag worker``'s cluster-wide settings against the published
    ones (live nodes or not: the jobs it runs were made under them).  Raises
    :class:`ClusterConfigError` naming the settings that differ (with
    ``cluster.check = warn``, logs it and returns); nothing published yet (no
    ``imag serve`` ever started on this index) is nothing to disagree with."""
    mine = settings_digests(config)
    theirs = published(db)
    differ = _differing(mine, theirs)
    if not theirs or not differ:
        return
    message = (
        f"this worker's {', '.join(differ)} differ from the cluster's: give it the "
        "configuration file of the nodes (`imag config cluster` shows the cluster's values), "
        "or make its file the cluster's with `imag config publish`"
    )
    _refuse(config, message)


def _refuse(config: Config, message: str) -> None:
    """Refuse to start (:class:`ClusterConfigError`), or with ``cluster.check
    = warn`` log ``message`` and go on."""
    if config["cluster.check"] != "warn":
        raise ClusterConfigError(message)
    log.warning(message + " (cluster.check = warn: starting anyway)")


def publish(db: Database, config: Config) -> list[str]:
    """Make this configuration the cluster's (``imag config publish``); return
    the settings that changed.  Running nodes keep what they started with;
    nodes started afterwards must agree with it."""
    mine = settings_digests(config)
    with db.transaction():
        _lock(db)
        theirs = published(db)
        changed = _differing(mine, theirs)
        _publish(db, mine, config.node + " (imag config publish)", db.clock.now())
    return changed


def heartbeat(db: Database, node: str) -> None:
    """This node is still running."""
    db.execute("UPDATE nodes SET last_seen = ? WHERE name = ?", (db.clock.now(), node))


def leave(db: Database, node: str) -> None:
    """This node stopped cleanly: no longer live (a restart with a new
    configuration is then not held back by its own old row)."""
    now = db.clock.now()
    db.execute("UPDATE nodes SET last_seen = ?, stopped_at = ? WHERE name = ?", (now, now, node))
