"""The SQL index: what queries need, on SQLite (embedded) or PostgreSQL."""

from archive.index.catalog import Catalog, InstanceRecord, StoreOutcome
from archive.index.db import Database, open_database
from archive.index.migrate import current_version, upgrade

__all__ = [
    "Catalog",
    "Database",
    "InstanceRecord",
    "StoreOutcome",
    "current_version",
    "open_database",
    "upgrade",
]
