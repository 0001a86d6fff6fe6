"""Versioned schema migrations, applied by ``imag db upgrade`` and on start.

Migrations are the numbered ``migrations/NNNN_name.sql`` files, applied in
order, each in its own transaction together with its row in
``schema_migrations``; so a crash mid-upgrade leaves the previous version
intact.  On PostgreSQL an advisory lock makes concurrent starts of several
processes safe: one upgrades, the others wait and then find nothing to do --
the creation of ``schema_migrations`` itself included (``CREATE TABLE IF NOT
EXISTS`` is not safe under concurrency).

Each **component** has its own version sequence: the core's files are
component ``core``; a plugin ships its own folder of ``NNNN_name.sql`` files
through the ``imag_migrations`` hook (:class:`Migrations`), applied after the
core's, so a service's schema evolves without renumbering anyone else's.

A migration's leading comment lines may carry headers:

* ``-- dialect: NAME``: it runs only on that backend (elsewhere it is recorded
  as applied with nothing to do);
* ``-- foreign_keys: off``: on SQLite it runs with foreign key enforcement off
  and checks every reference (``PRAGMA foreign_key_check``) before it commits.
  SQLite's way to change a table constraint is to rebuild the table, and a
  referenced table cannot be dropped while enforcement is on; the pragma
  cannot change inside a transaction, so the runner sets it around it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from archive.index.db import TYPES, Database, utcnow

log = logging.getLogger(__name__)
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_ADVISORY_KEY = 0x1A4A6  # arbitrary, constant: "IMAG schema"
_HEADER = re.compile(r"^--\s*(dialect|foreign_keys)\s*:\s*(\S+)\s*$", re.IGNORECASE)


CORE = "core"


@dataclass(frozen=True)
class Migrations:
    """A component's migrations: its name (unique, e.g. the plugin's) and the
    folder of its ``NNNN_name.sql`` files (``importlib.resources.files(...)``
    of a package, or a path)."""

    component: str
    folder: Traversable | Path


def core_migrations() -> Migrations:
    return Migrations(CORE, resources.files("archive.index").joinpath("migrations"))


def available(migrations: Migrations | None = None) -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration of a component (the core's by
    default)."""
    folder = (migrations or core_migrations()).folder
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match[1]), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def components() -> list[Migrations]:
    """The core's migrations, then each plugin's (``imag_migrations``)."""
    from archive import plugins

    found = [core_migrations()]
    for plugin, m in plugins.collect("imag_migrations"):
        if any(m.component == other.component for other in found):
            raise plugins.PluginError(
                f"migration component {m.component!r} of plugin {plugin} is already used"
            )
        found.append(m)
    return found


def headers(sql: str) -> dict[str, str]:
    """The ``-- key: value`` lines at the top of a migration."""
    found: dict[str, str] = {}
    for line in sql.lstrip().splitlines():
        match = _HEADER.match(line.strip())
        if not match:
            break
        found[match[1].lower()] = match[2].strip().lower()
    return found


def _statements(sql: str, dialect: str) -> list[str]:
    """The statements of a migration for ``dialect``.  A migration whose
    headers say ``-- dialect: NAME`` runs only there (elsewhere it is recorded
    as applied with nothing to do), so both backends keep one version sequence."""
    wanted = headers(sql).get("dialect")
    if wanted is not None and wanted != dialect:
        return []
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    body = body.format(**TYPES[dialect])
    return _split(body)


_TOKEN = re.compile(r"\$\$|\bBEGIN\b|\bEND\b|;", re.IGNORECASE)


def _split(body: str) -> list[str]:
    """Split on ``;`` except inside ``$$ ... $$`` (PostgreSQL function bodies)
    and ``BEGIN ... END`` (SQLite trigger bodies)."""
    statements, start, dollar, depth = [], 0, False, 0
    for match in _TOKEN.finditer(body):
        token = match[0].upper()
        if token == "$$":
            dollar = not dollar
        elif dollar:
            continue
        elif token == "BEGIN":
            depth += 1
        elif token == "END":
            depth = max(0, depth - 1)
        elif depth == 0:
            statements.append(body[start : match.start()])
            start = match.end()
    statements.append(body[start:])
    return [s.strip() for s in statements if s.strip()]


_TABLE = (
    "CREATE TABLE {name} (component TEXT NOT NULL, version INTEGER NOT NULL, "
    "name TEXT NOT NULL, applied_at TEXT NOT NULL, PRIMARY KEY (component, version))"
)


def _ensure_table(db: Database) -> None:
    """Create ``schema_migrations`` (or give an older one its ``component``
    column), under the advisory lock on PostgreSQL."""
    with db.transaction():
        if db.dialect == "postgresql":
            db.execute("SELECT pg_advisory_xact_lock(?)", (_ADVISORY_KEY,))
            exists = db.scalar("SELECT to_regclass('schema_migrations') IS NOT NULL")
            columns = {
                r[0]
                for r in db.query(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = 'schema_migrations' AND table_schema = current_schema()"
                )
            }
        else:
            columns = {r[1] for r in db.query("PRAGMA table_info(schema_migrations)")}
            exists = bool(columns)
        if not exists:
            db.execute(_TABLE.format(name="schema_migrations"))
        elif "component" not in columns:
            # before components: one sequence, the core's; the key changes, so rebuild
            db.execute(_TABLE.format(name="schema_migrations_new"))
            db.execute(
                "INSERT INTO schema_migrations_new (component, version, name, applied_at) "
                f"SELECT '{CORE}', version, name, applied_at FROM schema_migrations"
            )
            db.execute("DROP TABLE schema_migrations")
            db.execute("ALTER TABLE schema_migrations_new RENAME TO schema_migrations")


def current_version(db: Database, component: str = CORE) -> int:
    """The schema version of a component in the index (0 for none yet)."""
    _ensure_table(db)
    return int(
        db.scalar(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations WHERE component = ?",
            (component,),
        )
    )


def upgrade(db: Database, until: int | None = None) -> list[str]:
    """Apply every pending migration, the core's then each plugin's (the core's
    only up to version ``until`` when given: a test of a migration starts from
    the schema before it); return the names applied (``component/name`` for
    plugins')."""
    _ensure_table(db)
    applied: list[str] = []
    for migrations in components() if until is None else [core_migrations()]:
        for name in _upgrade_component(db, migrations, until):
            applied.append(
                name if migrations.component == CORE else f"{migrations.component}/{name}"
            )
    return applied


def _upgrade_component(db: Database, migrations: Migrations, until: int | None) -> list[str]:
    applied: list[str] = []
    component = migrations.component
    for version, name, sql in available(migrations):
        if until is not None and version > until:
            break
        if db.dialect == "sqlite" and headers(sql).get("foreign_keys") == "off":
            if _apply_without_foreign_keys(db, component, version, name, sql):
                log.info(
                    "index migration applied", extra={"migration": name, "component": component}
                )
                applied.append(name)
            continue
        with db.transaction():
            if db.dialect == "postgresql":
                db.execute("SELECT pg_advisory_xact_lock(?)", (_ADVISORY_KEY,))
            done = db.scalar(
                "SELECT 1 FROM schema_migrations WHERE component = ? AND version = ?",
                (component, version),
            )
            if done:
                continue
            for statement in _statements(sql, db.dialect):
                db.execute(statement)
            db.execute(
                "INSERT INTO schema_migrations (component, version, name, applied_at) "
                "VALUES (?, ?, ?, ?)",
                (component, version, name, utcnow().isoformat()),
            )
        log.info("index migration applied", extra={"migration": name, "component": component})
        applied.append(name)
    return applied


def _apply_without_foreign_keys(
    db: Database, component: str, version: int, name: str, sql: str
) -> bool:
    """Apply one SQLite migration with foreign key enforcement off on its
    connection (the pragma is a no-op inside a transaction, so it is set
    before BEGIN and restored after), refusing to commit if any reference
    is left dangling.  Returns whether it was applied (False: already was)."""
    with db.connection() as conn:
        conn.execute("PRAGMA foreign_keys=OFF")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                done = conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE component = ? AND version = ?",
                    (component, version),
                ).fetchone()
                if not done:
                    for statement in _statements(sql, "sqlite"):
                        conn.execute(statement)
                    dangling = conn.execute("PRAGMA foreign_key_check").fetchall()
                    if dangling:
                        raise RuntimeError(
                            f"migration {name} would leave {len(dangling)} dangling "
                            f"references (first: {dangling[0]}); nothing was changed"
                        )
                    conn.execute(
                        "INSERT INTO schema_migrations (component, version, name, applied_at) "
                        "VALUES (?, ?, ?, ?)",
                        (component, version, name, utcnow().isoformat()),
                    )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.execute("PRAGMA foreign_keys=ON")
    return not done
