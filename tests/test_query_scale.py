"""Searches at scale: pages that cover every match exactly once in a stable
order, and PostgreSQL plans that read indexes, not whole tables, for the
query mix of issue 17 (benchmarks/bench_scale.py times it)."""

from __future__ import annotations

import pytest
from multidict import MultiDict

from archive.index import open_database
from archive.index.statistics import analyse
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


def test_a_site_bound_search_by_date_and_modality_finds_its_own_sites_studies_only(
    loaded,
) -> None:
    """The adversary of the date-index path (on PostgreSQL the modality is
    matched in the date index, migration 0023): another site's studies of the
    same dates and modality stay out of a site-bound caller's answer."""
    db, _ = loaded
    params = {"StudyDate": "20160101-20261231", "ModalitiesInStudy": "CT,MG,MR,US", "limit": "1000"}
    mine = search(db, _qido("STUDY", params, Scope.of(["DEPISTAGE"])))
    everyone = search(db, _qido("STUDY", params, None))
    sites = {
        r[0]
        for r in db.query(
            f"SELECT site FROM studies WHERE study_uid IN ({', '.join('?' * len(mine))})",
            [r["StudyInstanceUID"] for r in mine],
        )
    }
    assert mine and sites == {"DEPISTAGE"}
    assert len(everyone) > len(mine)


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


@pytest.mark.parametrize(
    ("dates", "modalities"),
    [
        ("20200101-20200331", {"CT"}),  # a quarter: on SQLite, matched on the study's row
        ("20200101-20200331", {"CT", "MR"}),
        ("20200101-20200331", {"T"}),  # a part of a value matches nothing
        ("20200101-20201231", {"CT"}),  # wider: through study_modalities
    ],
)
def test_dates_with_a_modality_find_the_studies_of_those_dates_with_any_of_those_modalities(
    loaded, dates: str, modalities: set[str]
) -> None:
    db, shape = loaded
    first, last = dates.split("-")
    expected = {
        s.uid
        for n in range(1, shape.studies + 1)
        if first <= (s := scale_data.study(SEED, n, shape)).date <= last
        and modalities & set(s.modalities.split("\\"))
    }
    params = {"StudyDate": dates, "ModalitiesInStudy": ",".join(sorted(modalities))}
    found = search(db, _qido("STUDY", {**params, "limit": "1000"}, None))
    assert {r["StudyInstanceUID"] for r in found} == expected
    assert expected or modalities == {"T"}


_WEEK, _TWO_YEARS = "20200301-20200307", "20180101-20191231"


@pytest.mark.parametrize("scope", [None, Scope.of(["CHU_NORD"])], ids=["admin", "site"])
def test_on_sqlite_a_week_with_a_modality_walks_the_weeks_dates_not_the_modalitys_studies(
    index_url: str, scope: Scope | None
) -> None:
    """SQLite, given the studies of a modality as a list, read every one of
    them (one week of CT: 130 ms at 10^7 instances, 39 site-bound); matched on
    the study's own list, the page walks the week's dates (0.3 ms at 10^6).
    A range wider than a quarter keeps the list: a walk of its dates would
    read them all for a modality none of them has."""
    if not index_url.startswith("sqlite"):
        pytest.skip(
            "PostgreSQL: test_a_date_range_with_a_modality_pages_through_a_date_index_alone"
        )
    scale_data.load(index_url, 3_000, SEED, report=lambda text: None)
    db = open_database(index_url)
    try:
        analyse(db)  # as imag serve's index writer does when it is made
        week = plan_of(
            db, "/studies", {"StudyDate": "20200301-20200307", "ModalitiesInStudy": "CT"}, scope
        )
        wide = plan_of(
            db, "/studies", {"StudyDate": "20180101-20191231", "ModalitiesInStudy": "CT"}, scope
        )
    finally:
        db.close()
    index = "studies_by_site_date (site=? AND " if scope else "studies_by_date (study_date>?"
    assert index in week and "study_modalities" not in week, week
    assert "study_modalities" in wide, wide


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
    with the table and the offset; the page's own <= 101 rows are then read
    by key too (joined to the page as a subquery, the planner hashed the
    whole studies table at this size: 2.9 ms of a 3 ms page)."""
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
                nodes = plan.split("; ")
                inner = [n for n in nodes if n.endswith(("_1", " sm"))]
                if not inner or any("Seq Scan" in n for n in nodes):
                    bad.append(f"{spec.name} ({caller}): {plan}")
        assert bad == []
    finally:
        db.close()


@pytest.fixture(scope="module")
def pg_studies_of_a_larger_archive(pg_admin_url: str):
    """The patients and studies of a 10^6-instance archive (10^5 studies;
    no series or instance rows), bulk-loaded through the real schema and
    vacuumed as autovacuum would: the size at which a study search's plan
    is the one it keeps as the archive grows (at 10^4 studies, reading a
    whole site's part of a name index is still the cheapest way)."""
    from tests.pgserver import fresh_database  # a plugin module: imported by pytest first

    with fresh_database(pg_admin_url, "imag_scale") as url:
        scale_data.load(url, 1_000_000, SEED, report=lambda text: None, studies_only=True)
        yield url


@pytest.mark.postgres
@pytest.mark.parametrize("scope", [None, Scope.of(["CHU_NORD"])], ids=["admin", "site"])
def test_a_date_range_with_a_modality_pages_through_a_date_index_alone(
    pg_studies_of_a_larger_archive: str, scope: Scope | None
) -> None:
    """One week of CT: the page of ids is read from the date index, each
    study's modalities checked in the same index (migration 0023), none
    looked up in study_modalities (one probe per study of the week: 3-4 ms
    of the page at 10^7 instances)."""
    db = open_database(pg_studies_of_a_larger_archive)
    try:
        params = {"StudyDate": "20200301-20200307", "ModalitiesInStudy": "CT"}
        plan = plan_of(db, "/studies", params, scope)
    finally:
        db.close()
    index = "studies_by_site_date_id" if scope else "studies_by_date_id"
    assert f"Index Only Scan using {index} on studies st_1;" in plan, plan
    assert "study_modalities" not in plan


#: the page-of-ids scans that stop once the page is full: an index in id order,
#: read alone (the names are in it, migration 0022)
_WALKS = (
    "Index Only Scan using studies_by_site_id ",
    "Index Only Scan using studies_by_id_names ",
)


@pytest.mark.postgres
@pytest.mark.parametrize("fuzzy", [False, True], ids=["plain", "fuzzy"])
@pytest.mark.parametrize("scope", [None, Scope.of(["CHU_NORD"])], ids=["admin", "site"])
def test_a_name_contains_match_pages_by_walking_ids_or_from_the_trigram_index(
    pg_studies_of_a_larger_archive: str, fuzzy: bool, scope: Scope | None
) -> None:
    """A contains-match (``*lefevre*``) pages in id order: its page of ids
    comes from a walk of an index in that order, index only, that stops at
    the page (a common name), or from the trigram index (a rare one) --
    never from a name b-tree read whole and sorted, nor from the table read
    whole, which grow with the archive (at 10^6 instances a site-bound
    ``*lefevre*`` read 30,000 entries of (site, patient_name_fold, id):
    15 ms), nor from studies_pkey reading each study's row for its name."""
    db = open_database(pg_studies_of_a_larger_archive)
    try:
        bad = []
        names = ["*lefèvre*", "*côté*", "*müller*", "*hébert*", "*martin*", "*a*", "*zzz*"]
        for name in names:
            params = {"PatientName": name} | ({"fuzzymatching": "true"} if fuzzy else {})
            plan = plan_of(db, "/studies", params, scope)
            nodes = plan.split(" ", 1)[1].split("; ")
            trigram = any(n.startswith("Bitmap Index Scan on ") and "_trgm" in n for n in nodes)
            for node in (n for n in nodes if n.endswith(" st_1")):
                if not (node.startswith(_WALKS) or (node.startswith("Bitmap Heap") and trigram)):
                    bad.append(f"{name}: {plan}")
        assert bad == []
    finally:
        db.close()


@pytest.mark.postgres
def test_the_planner_knows_how_many_studies_a_name_contains_match_finds(
    pg_studies_of_a_larger_archive: str,
) -> None:
    """Whether a contains-match walks ids or reads the trigram index is the
    planner's choice by its estimate of the matches.  With the default
    statistics target the estimate of a name outside the sample's 100 most
    common values missed by up to two orders of magnitude (here *trepanier*:
    6 studies of 298; at 10^7 instances *muller* 61 of 5,561, read from the
    trigram index and sorted: 8-9 ms instead of 2).  Migration 0024 samples
    the name columns more widely: each estimate is within a factor of two."""
    import re

    db = open_database(pg_studies_of_a_larger_archive)
    try:
        off = []
        names = {
            "patient_name_fold": ["LEFEVRE", "COTE", "MULLER", "HEBERT", "MARTIN", "TREPANIER"],
            "patient_name_norm": ["LEFÈVRE", "CÔTÉ", "MÜLLER", "HÉBERT", "TRÉPANIER"],
        }
        for column, values in names.items():
            for value in values:
                where, pattern = f"{column} LIKE ?", [f"%{value}%"]
                plan = db.query(f"EXPLAIN SELECT id FROM studies WHERE {where}", pattern)[0][0]
                estimate = int(re.search(r"rows=(\d+)", plan).group(1))
                found = db.scalar(f"SELECT count(*) FROM studies WHERE {where}", pattern)
                assert found >= 100, f"{value}: too rare in the test data to tell ({found})"
                if not found / 2 <= estimate <= found * 2:
                    off.append(f"{column} {value}: estimated {estimate}, {found} found")
        assert off == []
    finally:
        db.close()


@pytest.mark.postgres
def test_a_name_pattern_search_is_planned_for_its_pattern_each_time(pg_url: str) -> None:
    """psycopg prepares a statement run five times on a connection, and
    PostgreSQL may then run one generic plan whatever the values: after a
    run of ``*lefevre*`` (a walk of ids that stops at the page) a rare
    ``*trepanier*`` walked a whole site instead of reading the trigram index
    (at 10^6 instances 48 ms instead of 11).  A search matching a LIKE
    pattern is therefore never prepared; the others still are."""
    from archive.index import upgrade

    db = open_database(pg_url)
    try:
        upgrade(db)
        site = Scope.of(["CHU_NORD"])
        by_name = _qido("STUDY", {"PatientName": "*lefevre*", "fuzzymatching": "true"}, site)
        by_id = _qido("STUDY", {"PatientID": "PAT-1"}, site)
        for _ in range(8):
            search(db, by_name)
            search(db, by_id)
        with db.connection() as conn:  # the pool's one connection, which ran them
            prepared = [r[0] for r in conn.execute("SELECT statement FROM pg_prepared_statements")]
        assert not [s for s in prepared if " LIKE " in s]
        assert [s for s in prepared if "p.patient_id = " in s]
    finally:
        db.close()


@pytest.mark.postgres
def test_a_page_search_runs_one_generic_plan_once_prepared(
    pg_studies_of_a_larger_archive: str,
) -> None:
    """A page of studies (no filter, at an offset, by PatientID) is planned
    once per connection: its size and offset are written in the statement,
    so PostgreSQL prices its generic plan as it prices the custom ones and
    keeps it.  Sent as parameters, the LIMIT was guessed at a tenth
    of the table (here 10^4 studies) and every search planned again: 0.3-0.8
    ms on 29 indexes, more than the 0.3 ms the search itself took at 10^7
    instances.  (A date range keeps its page as parameters: PostgreSQL then
    weighs a plan for its values against the generic one -- a week of CT ran
    0.6 ms slower on the generic plan at 10^7.)  Where a value's custom plan
    costs about what the generic one does (a common modality, a site-bound
    page), keeping the generic plan is the planner's call on its sample of
    the table, so it is not asked here."""
    db = open_database(pg_studies_of_a_larger_archive)
    try:
        site = Scope.of(["CHU_NORD"])
        pages = [
            _qido("STUDY", {"limit": "100"}, None),
            _qido("STUDY", {"limit": "100", "offset": "100"}, None),
            _qido("STUDY", {"limit": "100", "PatientID": "CHU000000007"}, site),
        ]
        for _ in range(12):
            for query in pages:
                search(db, query)
        with db.connection() as conn:  # the pool's one connection, which ran them
            prepared = conn.execute(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements "
                "WHERE statement LIKE '%FROM studies st%'"
            ).fetchall()
        assert all(generic > 0 for _, generic, _ in prepared), prepared
        assert len(prepared) == len(pages)  # one statement per page (an offset is its own)
    finally:
        db.close()
