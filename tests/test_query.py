"""The one query model (C-FIND and QIDO-RS): DICOM matching rules, translated
to SQL identically on SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import replace

import pytest

from archive.index import Catalog, open_database
from archive.index import upgrade as upgrade_index
from archive.query import Query, QueryError, search
from archive.security.scope import Scope
from tests.test_index import record


@pytest.fixture
def db(index_url: str):
    db = open_database(index_url)
    upgrade_index(db)
    cat = Catalog(db)
    rows = [
        # study 1.1: Müller, CT + SR, site A, 2026-01-15 10:30
        replace(
            record(
                "1.1.1.1",
                study="1.1",
                series="1.1.1",
                pid="P1",
                issuer="A",
                modality="CT",
                site="A",
            ),
            patient_name="MÜLLER^Hans",
            study_date="20260115",
            study_time="103000",
            accession_number="ACC-001",
        ),
        replace(
            record(
                "1.1.1.2",
                study="1.1",
                series="1.1.1",
                pid="P1",
                issuer="A",
                modality="CT",
                site="A",
            ),
            patient_name="MÜLLER^Hans",
            study_date="20260115",
            study_time="103000",
            accession_number="ACC-001",
            instance_number=2,
        ),
        replace(
            record(
                "1.1.2.1",
                study="1.1",
                series="1.1.2",
                pid="P1",
                issuer="A",
                modality="SR",
                site="A",
            ),
            patient_name="MÜLLER^Hans",
            study_date="20260115",
            study_time="103000",
            accession_number="ACC-001",
        ),
        # study 1.2: Côté, MR, site B, 2026-02-01 08:05
        replace(
            record(
                "1.2.1.1",
                study="1.2",
                series="1.2.1",
                pid="P2",
                issuer="B",
                modality="MR",
                site="B",
            ),
            patient_name="CÔTÉ^Zoé",
            study_date="20260201",
            study_time="080500",
            accession_number="ACC-002",
        ),
        # study 1.3: same PatientID P2 at another issuer, MG, 2025-12-31 23:59
        replace(
            record(
                "1.3.1.1",
                study="1.3",
                series="1.3.1",
                pid="P2",
                issuer="C",
                modality="MG",
                site="C",
            ),
            patient_name="DOE^JANE",
            study_date="20251231",
            study_time="235900",
            accession_number="X_1",
        ),
    ]
    cat.commit(rows)
    yield db
    db.close()


def uids(rows: list[dict], key: str = "StudyInstanceUID") -> list[str]:
    return sorted(r[key] for r in rows)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({}, ["1.1", "1.2", "1.3"]),  # universal
        ({"PatientName": ""}, ["1.1", "1.2", "1.3"]),  # empty value: universal
        ({"PatientID": "P2"}, ["1.2", "1.3"]),
        ({"PatientID": "P2", "IssuerOfPatientID": "B"}, ["1.2"]),
        ({"PatientName": "müller^hans"}, ["1.1"]),  # PN: case-insensitive, accents kept
        ({"PatientName": "MÜL*"}, ["1.1"]),
        ({"PatientName": "C?T?^*"}, ["1.2"]),
        ({"PatientName": "*^ZOÉ"}, ["1.2"]),
        ({"PatientName": "MULLER*"}, []),  # no accent folding
        ({"PatientName": "DOE^JANE^^"}, ["1.3"]),  # trailing empty components
        ({"StudyDate": "20260115"}, ["1.1"]),
        ({"StudyDate": "20260101-20260131"}, ["1.1"]),
        ({"StudyDate": "-20260115"}, ["1.1", "1.3"]),
        ({"StudyDate": "20260116-"}, ["1.2"]),
        ({"StudyTime": "10"}, ["1.1"]),  # a time stands for its precision
        ({"StudyTime": "0800-1031"}, ["1.1", "1.2"]),
        ({"StudyTime": "2359-"}, ["1.3"]),
        ({"StudyInstanceUID": "1.1\\1.3"}, ["1.1", "1.3"]),
        ({"AccessionNumber": "ACC*"}, ["1.1", "1.2"]),
        ({"AccessionNumber": "acc*"}, []),  # non-PN matching is case-sensitive
        ({"AccessionNumber": "X_1"}, ["1.3"]),
        ({"AccessionNumber": "X?1"}, ["1.3"]),
        ({"AccessionNumber": "X%1"}, []),  # SQL wildcards are literal
        ({"ModalitiesInStudy": "SR"}, ["1.1"]),
        ({"ModalitiesInStudy": "CT"}, ["1.1"]),
        ({"ModalitiesInStudy": "MR\\MG"}, ["1.2", "1.3"]),
        ({"ModalitiesInStudy": "C?"}, ["1.1"]),
        ({"ModalitiesInStudy": "T"}, []),
        # with a date too: on PostgreSQL matched on the study's own list (migration 0023)
        ({"StudyDate": "20260101-20261231", "ModalitiesInStudy": "SR"}, ["1.1"]),
        ({"StudyDate": "20260101-20261231", "ModalitiesInStudy": "MR\\MG\\SR"}, ["1.1", "1.2"]),
        ({"StudyDate": "-20260115", "ModalitiesInStudy": "MR\\MG"}, ["1.3"]),
        ({"StudyDate": "20260115", "ModalitiesInStudy": "MR\\MG"}, []),
        ({"StudyDate": "2026*", "ModalitiesInStudy": "C?"}, ["1.1"]),
        ({"StudyDate": "20260101-20261231", "ModalitiesInStudy": "T"}, []),
        ({"StudyDate": "20260101-20261231", "ModalitiesInStudy": "\\"}, []),
        ({"PatientName": "*", "StudyDate": "2026*"}, ["1.1", "1.2"]),
    ],
)
def test_study_level_matching(db, keys: dict, expected: list[str]) -> None:
    assert uids(search(db, Query("STUDY", keys))) == expected


def test_study_answers_carry_counters_and_modalities(db) -> None:
    [row] = search(
        db,
        Query(
            "STUDY",
            {"StudyInstanceUID": "1.1"},
            return_keys=[
                "NumberOfStudyRelatedSeries",
                "NumberOfStudyRelatedInstances",
                "ModalitiesInStudy",
                "PatientName",
                "NotAnIndexedKeyword",
            ],
        ),
    )
    assert row == {
        "StudyInstanceUID": "1.1",
        "NumberOfStudyRelatedSeries": 2,
        "NumberOfStudyRelatedInstances": 3,
        "ModalitiesInStudy": "CT\\SR",
        "PatientName": "MÜLLER^Hans",
    }


def test_patient_level_keeps_issuers_apart_and_counts_their_studies(db) -> None:
    rows = search(
        db,
        Query(
            "PATIENT",
            {"PatientID": "P2"},
            return_keys=["NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances"],
        ),
    )
    assert sorted(
        (
            r["IssuerOfPatientID"],
            r["NumberOfPatientRelatedStudies"],
            r["NumberOfPatientRelatedInstances"],
        )
        for r in rows
    ) == [("B", 1, 1), ("C", 1, 1)]


def test_a_list_of_values_for_a_single_valued_code_matches_any_of_them(db) -> None:
    rows = search(db, Query("SERIES", {"Modality": "CT\\MR"}))
    assert sorted({r["SeriesInstanceUID"] for r in rows}) == ["1.1.1", "1.2.1"]
    rows = search(db, Query("SERIES", {"Modality": "M?\\SR"}))
    assert sorted({r["SeriesInstanceUID"] for r in rows}) == ["1.1.2", "1.2.1", "1.3.1"]


def test_series_and_image_levels(db) -> None:
    series = search(
        db,
        Query(
            "SERIES",
            {"StudyInstanceUID": "1.1", "Modality": ""},
            return_keys=["NumberOfSeriesRelatedInstances"],
        ),
    )
    assert sorted(
        (r["SeriesInstanceUID"], r["Modality"], r["NumberOfSeriesRelatedInstances"]) for r in series
    ) == [("1.1.1", "CT", 2), ("1.1.2", "SR", 1)]
    images = search(db, Query("IMAGE", {"SeriesInstanceUID": "1.1.1", "InstanceNumber": "2"}))
    assert uids(images, "SOPInstanceUID") == ["1.1.1.2"]
    assert uids(search(db, Query("IMAGE", {"Modality": "MR"})), "SOPInstanceUID") == ["1.2.1.1"]


def test_scope_limits_results_and_counts_in_sql(db) -> None:
    assert uids(search(db, Query("STUDY", scope=Scope.of(["A", "C"])))) == ["1.1", "1.3"]
    assert search(db, Query("STUDY", scope=Scope.of())) == []
    patients = search(
        db,
        Query(
            "PATIENT",
            {"PatientID": "P2"},
            scope=Scope.of(["B"]),
            return_keys=["NumberOfPatientRelatedStudies"],
        ),
    )
    assert [(p["IssuerOfPatientID"], p["NumberOfPatientRelatedStudies"]) for p in patients] == [
        ("B", 1)
    ]


def test_limit_and_offset_page_in_a_stable_order(db) -> None:
    pages = [search(db, Query("STUDY", limit=2, offset=o)) for o in (0, 2, 4)]
    assert [len(p) for p in pages] == [2, 1, 0]
    assert uids(pages[0] + pages[1]) == ["1.1", "1.2", "1.3"]
    assert len(search(db, Query("STUDY", offset=1))) == 2


@pytest.mark.parametrize(
    ("level", "keys", "message"),
    [
        ("STUDY", {"PatientWeight": "70"}, "PatientWeight"),
        ("STUDY", {"StudyDate": "2026-01-15"}, "YYYYMMDD"),
        ("STUDY", {"StudyDate": "20260101-2026"}, "YYYYMMDD"),
        ("STUDY", {"StudyTime": "25h"}, "HHMMSS"),
        ("STUDY", {"StudyDate": "20261345"}, "YYYYMMDD"),  # no 13th month
        ("STUDY", {"StudyDate": "20260230-20260301"}, "YYYYMMDD"),  # no 30 February
        ("STUDY", {"StudyTime": "256199"}, "HHMMSS"),
        ("STUDY", {"StudyInstanceUID": "1.2.*"}, "not a valid UID"),
        ("STUDY", {"Modality": "CT"}, "SERIES-level"),
        ("SERIES", {"SeriesNumber": "one"}, "integer"),
        ("STUDY", {"NumberOfStudyRelatedInstances": "3"}, "returned but not matched"),
        ("WORKLIST", {}, "level"),
    ],
)
def test_bad_queries_say_what_is_wrong(db, level: str, keys: dict, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        search(db, Query(level, keys))
