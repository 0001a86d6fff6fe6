"""Migrations per component: an index created before components upgrades in
place, and concurrent upgrades of a fresh database do not trip over each other."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from archive.index import open_database
from archive.index.migrate import CORE, available, components, current_version, upgrade


def test_an_index_from_before_components_keeps_its_history_as_the_cores(index_url: str) -> None:
    db = open_database(index_url)
    try:
        db.execute(
            "CREATE TABLE schema_migrations "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        for version, name, _ in available()[:3]:  # as an older imag left it
            db.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, "2026-01-01T00:00:00+00:00"),
            )
        assert current_version(db) == 3
        rows = db.query("SELECT component, version FROM schema_migrations ORDER BY version")
        assert rows == [(CORE, 1), (CORE, 2), (CORE, 3)]
    finally:
        db.close()


def test_processes_upgrading_a_fresh_index_at_once_all_succeed(index_url: str) -> None:
    errors: list[BaseException] = []
    applied: list[list[str]] = []

    def run() -> None:
        db = open_database(index_url)
        try:
            applied.append(upgrade(db))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    names = [name for _, name, _ in available()]
    names += [  # the core's own plugins' components too (identity, orientation...)
        f"{m.component}/{name}" for m in components()[1:] for _, name, _ in available(m)
    ]
    assert sorted(n for run_names in applied for n in run_names) == sorted(names)  # each once
    db = open_database(index_url)
    try:
        assert current_version(db) == available()[-1][0]
    finally:
        db.close()


def test_a_new_sqlite_index_held_by_another_connection_is_opened_once_it_is_free(
    tmp_path: Path,
) -> None:
    """Switching a new file to WAL reads it, then needs its exclusive lock; while
    another connection is writing to it SQLite refuses at once, without its
    busy wait (waiting could deadlock): a process started beside another on a
    new data folder must wait, not fail (three processes upgrading a new index
    at once met it)."""
    path = tmp_path / "index.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # still in rollback-journal mode
    holder.execute("CREATE TABLE t (x)")  # a writer holds its reserved lock
    opened: list[str] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            db = open_database(f"sqlite:///{path}")
            try:
                opened.append(db.scalar("PRAGMA journal_mode"))
            finally:
                db.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=open_it)
    thread.start()
    thread.join(timeout=0.3)
    assert thread.is_alive() and not errors, errors  # waiting, not failed
    holder.execute("COMMIT")
    holder.close()
    thread.join(timeout=30)
    assert not errors, errors
    assert opened == ["wal"]
