"""Searches at scale: pages that cover every match exactly once in a stable
order, and PostgreSQL plans that read indexes, not whole tables, for the
query mix of issue 17 (benchmarks/bench_scale.py times it)."""

from __future__ import annotations

import pytest
from multidict import MultiDict

from archive.index import open_database
from archive.query import Query, search
from archive.security.scope import Scope
from benchmarks import scale_data
from benchmarks.bench_scale import SEED, plan_of, query_mix, samples
from dicomweb.qido import build_query

PAGE = 7


@pytest.fixture
def loaded(index_url: str):
    """3,000 instances (300 studies, 7 sites) bulk-loaded through the real schema."""
    shape = scale_data.load(index_url, 3_000, SEED, report=lambda text: None)
    db = open_database(index_url)
    yield db, shape
    db.close()


def _qido(level: str, params: dict[str, str], scope: Scope | None) -> Query:
    query, fields = build_query(level, MultiDict(params), {})
    query.return_keys = fields
    query.scope = scope
    return query


PAGED = [
    ("STUDY", {}),
    ("STUDY", {"StudyDate": "20180101-20221231"}),
    ("STUDY", {"StudyDate": "20180101-20221231", "ModalitiesInStudy": "CT"}),
    ("STUDY", {"ModalitiesInStudy": "MR,US"}),
    ("STUDY", {"PatientName": "*e*", "fuzzymatching": "true"}),
    ("STUDY", {"PatientName": "P*", "fuzzymatching": "true"}),  # in name order
    ("STUDY", {"PatientName": "*R*"}),
    ("STUDY", {"PatientName": "M*"}),
    ("SERIES", {"Modality": "SR"}),
    ("PATIENT", {}),
]


@pytest.mark.parametrize(("level", "params"), PAGED)
@pytest.mark.parametrize("scope", [None, Scope.of(["CHU_NORD"])], ids=["admin", "site"])
def test_pages_return_every_match_exactly_once_in_a_stable_order(
    loaded, level: str, params: dict[str, str], scope: Scope | None
) -> None:
    db, _ = loaded
    if level == "PATIENT":
        everything = search(db, Query("PATIENT", {}, ["PatientName"], scope=scope))
        key = "PatientID"
    else:
        everything = search(db, _qido(level, {**params, "limit": "1000"}, scope))
        key = "SeriesInstanceUID" if level == "SERIES" else "StudyInstanceUID"
    assert len(everything) > PAGE  # several pages
    assert len(everything) < 1000
    seen = []
    offset = 0
    while True:
        if level == "PATIENT":
            query = Query("PATIENT", {}, ["PatientName"], scope=scope, limit=PAGE, offset=offset)
        else:
            query = _qido(level, {**params, "limit": str(PAGE), "offset": str(offset)}, scope)
            query.limit = PAGE  # build_query asks one more, to know if the answer is cut
        page = search(db, query)
        assert len(page) <= PAGE
        if not page:
            break
        seen += [row[key] for row in page]
        offset += PAGE
    assert seen == [row[key] for row in everything]
    assert len(set(seen)) == len(seen)


def test_a_site_bound_caller_pages_through_its_own_sites_studies_only(loaded) -> None:
    """The adversary: a deep offset does not reach another site's studies."""
    db, _ = loaded
    mine = search(db, _qido("STUDY", {"limit": "1000"}, Scope.of(["DEPISTAGE"])))
    sites = {
        r[0]
        for r in db.query(
            f"SELECT site FROM studies WHERE study_uid IN ({', '.join('?' * len(mine))})",
            [r["StudyInstanceUID"] for r in mine],
        )
    }
    assert sites == {"DEPISTAGE"}
    beyond = _qido("STUDY", {"limit": "10", "offset": str(len(mine))}, Scope.of(["DEPISTAGE"]))
    assert search(db, beyond) == []


def test_modalities_in_study_matches_any_of_the_studys_modalities(loaded) -> None:
    db, shape = loaded
    expected = {
        s.uid
        for n in range(1, shape.studies + 1)
        if {"SR", "PT"} & set((s := scale_data.study(SEED, n, shape)).modalities.split("\\"))
    }
    found = search(db, _qido("STUDY", {"ModalitiesInStudy": "SR,P?", "limit": "1000"}, None))
    assert {r["StudyInstanceUID"] for r in found} == expected
    assert expected


#: at 10^4 studies the planner reads the studies table whole for a name
#: contains-match (cheaper there than the trigram index or a walk of the
#: primary key: a cost choice that flips with size; at 10^5 studies and up
#: it reads studies_pkey, (site, id) or the trigram index -- bench_scale
#: prints the plans).  Prefixes read the name indexes at every size.
_COST_CHOICE = ("PatientName contains", "PatientName fuzzy contains")


@pytest.mark.postgres
def test_the_query_mix_pages_through_indexes_on_postgresql(pg_url: str) -> None:
    """EXPLAIN of the SQL each QIDO query of the mix runs (10^5 instances,
    analysed as autovacuum would), for a site-bound caller and for an admin:
    the page of ids is read from an index (a date range, the modalities, the
    id order, an exact key), never by a sequential scan -- that is what grows
    with the table and the offset; the page's own <= 101 rows are then
    joined by whichever way the planner finds cheapest."""
    shape = scale_data.load(pg_url, 100_000, SEED, report=lambda text: None)
    db = open_database(pg_url)
    try:
        bad = []
        picks = {"site": samples(shape, 3, "CHU_NORD"), "admin": samples(shape, 3, None)}
        for spec in query_mix(deep_offset=1_000):
            if spec.name in _COST_CHOICE:
                continue
            for caller, scope in (("site", Scope.of(["CHU_NORD"])), ("admin", None)):
                path, params = spec.qido(picks[caller][0], 0)
                plan = plan_of(db, path, params, scope)
                inner = [n for n in plan.split("; ") if n.endswith(("_1", " sm"))]
                if not inner or any("Seq Scan" in n for n in inner):
                    bad.append(f"{spec.name} ({caller}): {plan}")
        assert bad == []
    finally:
        db.close()
