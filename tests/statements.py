"""The SQL statements a piece of code runs, to prove how many round trips
to the index it makes (every read and write of :class:`~archive.index.db.Database`
goes through ``Database._run``; ``executemany`` aside)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from archive.index.db import Database


@contextmanager
def statements_run(db: Database) -> Iterator[list[str]]:
    """The SQL text of every statement ``db`` runs inside the block, in order."""
    seen: list[str] = []
    run = db._run  # noqa: SLF001 - the one funnel every statement takes

    def counting(sql: str, *args: object, **kwargs: object) -> object:
        seen.append(sql)
        return run(sql, *args, **kwargs)

    db._run = counting  # type: ignore[method-assign]  # noqa: SLF001
    try:
        yield seen
    finally:
        db._run = run  # type: ignore[method-assign]  # noqa: SLF001
