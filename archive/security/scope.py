"""Access scope: which studies a caller may see, as SQL.

A scope is the caller's sites plus the reading groups studies were routed to.
``None`` stands for "everything" (admins, regional peers).  A scope may be
narrowed to some studies, and within them to some series (a share link's
capability: "this study, only these series"); empty means no narrowing.  A
narrowing without sites or groups is the whole of the scope: a capability
reaches what it names, nothing else.  The clause is
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
    #: only these studies (empty: no narrowing by study)
    studies: frozenset[str] = field(default_factory=frozenset)
    #: only these series of them (empty: every series of the studies in scope)
    series: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(
        cls,
        sites: Iterable[str] = (),
        groups: Iterable[str] = (),
        studies: Iterable[str] = (),
        series: Iterable[str] = (),
    ) -> Scope:
        return cls(
            frozenset(s for s in sites if s),
            frozenset(g for g in groups if g),
            frozenset(s for s in studies if s),
            frozenset(s for s in series if s),
        )


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
    studies = sorted(scope.studies)
    narrow = f"{alias}.study_uid IN ({', '.join('?' * len(studies))})" if studies else ""
    if not parts:
        return (f"({narrow})", list(studies)) if narrow else ("1 = 0", [])
    clause = "(" + " OR ".join(parts) + ")"
    if narrow:
        return f"({clause} AND {narrow})", [*params, *studies]
    return clause, params


def series_clause(scope: Scope | None, alias: str) -> tuple[str, list[str]] | None:
    """A boolean SQL expression true for the rows of ``series AS alias`` the
    scope's series narrowing lets through; None when it narrows nothing.
    Applied, beside :func:`study_clause`, wherever series or instances are
    listed or read: the study clause alone would let every series of a
    shared study through."""
    if scope is None or not scope.series:
        return None
    series = sorted(scope.series)
    return f"{alias}.series_uid IN ({', '.join('?' * len(series))})", series
