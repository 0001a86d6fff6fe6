"""Access scope: which studies a caller may see, as SQL.

A scope is the caller's sites plus the reading groups studies were routed to.
``None`` stands for "everything" (admins, regional peers).  The clause is
added to the query itself, so counts, limits and offsets are right by
construction and nothing outside the scope is ever read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scope:
    """The sites and reading groups whose studies a caller may see."""

    sites: frozenset[str] = field(default_factory=frozenset)
    groups: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, sites: Iterable[str] = (), groups: Iterable[str] = ()) -> Scope:
        return cls(frozenset(s for s in sites if s), frozenset(g for g in groups if g))


def study_clause(scope: Scope, alias: str) -> tuple[str, list[str]]:
    """A boolean SQL expression true for the rows of ``studies AS alias`` in scope."""
    parts: list[str] = []
    params: list[str] = []
    sites = sorted(scope.sites)
    groups = sorted(scope.groups)
    if sites:
        parts.append(f"{alias}.site IN ({', '.join('?' * len(sites))})")
        params.extend(sites)
    if groups:
        parts.append(
            f"{alias}.study_uid IN (SELECT sg.study_uid FROM study_groups sg "
            f"WHERE sg.group_name IN ({', '.join('?' * len(groups))}))"
        )
        params.extend(groups)
    if not parts:
        return "1 = 0", []
    return "(" + " OR ".join(parts) + ")", params
