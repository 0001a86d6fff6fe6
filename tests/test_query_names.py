"""Accent- and case-insensitive name matching (QIDO-RS ``fuzzymatching=true``):
``*cote*`` finds CÔTÉ, ``MUL*`` finds MÜLLER, on SQLite and PostgreSQL, for
rows stored from now on and for rows stored before the migration that added
the folded names."""

from __future__ import annotations

from dataclasses import replace

import psycopg
import pytest

from archive.index import Catalog, open_database
from archive.index import upgrade as upgrade_index
from archive.index.names import FOLD_FROM, fold
from archive.query import Query, search
from archive.security.scope import Scope
from tests.test_index import record

NAMES = {
    "1.1": ("CÔTÉ^Zoé", "A"),
    "1.2": ("MÜLLER^Hans", "A"),
    "1.3": ("Lefèvre^Hélène", "B"),
    "1.4": ("N'DIAYE^Aïssatou", "B"),
    "1.5": ("COTE^Paul", "A"),  # already without accents
    "1.6": ("LEBŒUF^Noël", "A"),
    "1.7": ("DUPONT^Jean", "B"),
}


@pytest.fixture
def db(index_url: str):
    db = open_database(index_url)
    upgrade_index(db)
    rows = [
        replace(
            record(f"{study}.1.1", study=study, series=f"{study}.1", pid=f"P{study}", site=site),
            patient_name=name,
        )
        for study, (name, site) in NAMES.items()
    ]
    Catalog(db).commit(rows)
    yield db
    db.close()


def found(db, name: str, fuzzy: bool, scope: Scope | None = None) -> list[str]:
    query = Query("STUDY", {"PatientName": name}, fuzzy=fuzzy, scope=scope)
    return sorted(r["StudyInstanceUID"] for r in search(db, query))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("*cote*", ["1.1", "1.5"]),  # contains, without the accents the name has
        ("*CÔTÉ*", ["1.1", "1.5"]),  # accents in the query are folded too
        ("cote^zoe", ["1.1"]),  # single value
        ("MUL*", ["1.2"]),  # prefix
        ("mül*", ["1.2"]),
        ("lefevre^helene", ["1.3"]),
        ("*NDIAYE*", ["1.4"]),  # the apostrophe is dropped
        ("n'diaye*", ["1.4"]),
        ("LEBOEUF*", ["1.6"]),  # Œ is OE
        ("C?TE^*", ["1.1", "1.5"]),
        ("*zz*", []),
        ("*%*", []),  # LIKE's own wildcards are literal characters
        ("_*", []),
    ],
)
def test_fuzzy_matching_ignores_case_and_accents(db, name: str, expected: list[str]) -> None:
    assert found(db, name, fuzzy=True) == expected


def test_without_fuzzy_matching_accents_still_count(db) -> None:
    assert found(db, "*cote*", fuzzy=False) == ["1.5"]
    assert found(db, "*côté*", fuzzy=False) == ["1.1"]
    assert found(db, "MUL*", fuzzy=False) == []
    assert found(db, "mül*", fuzzy=False) == ["1.2"]
    assert found(db, "n'diaye^aïssatou", fuzzy=False) == ["1.4"]
    assert found(db, "*%*", fuzzy=False) == []


def in_order(db, name: str, fuzzy: bool) -> list[str]:
    query = Query("STUDY", {"PatientName": name}, fuzzy=fuzzy)
    return [r["StudyInstanceUID"] for r in search(db, query)]


def test_a_name_prefix_answers_by_name_and_a_contains_match_by_insertion(db) -> None:
    """A prefix is read in name order from the name indexes; a
    contains-match in insertion order (archive.query._order)."""
    assert in_order(db, "*e*", fuzzy=True) == ["1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7"]
    # COTE^PAUL before COTE^ZOE (folded), whatever the insertion order
    assert in_order(db, "co*", fuzzy=True) == ["1.5", "1.1"]
    # upper-cased: COTE^PAUL sorts before CÔTÉ^ZOÉ too (Ô is after O)
    assert in_order(db, "C*", fuzzy=False) == ["1.5", "1.1"]


def test_a_renamed_patient_is_found_by_the_new_name_only(db) -> None:
    """Studies carry a copy of their patient's names (migrations 0020/0021);
    the index keeps it in step when a patient row is renamed or a study moved
    to another patient, whoever writes it."""
    with db.transaction():
        db.execute(
            "UPDATE patients SET patient_name = ?, patient_name_norm = ?, "
            "patient_name_fold = ? WHERE patient_id = 'P1.7'",
            ("DURAND^Jeanne", "DURAND^JEANNE", "DURAND^JEANNE"),
        )
    assert found(db, "dupont*", fuzzy=True) == []
    assert found(db, "durand*", fuzzy=True) == ["1.7"]
    assert found(db, "DURAND^JEANNE", fuzzy=False) == ["1.7"]
    with db.transaction():
        db.execute(
            "UPDATE studies SET patient_ref = (SELECT id FROM patients WHERE "
            "patient_id = 'P1.1') WHERE study_uid = '1.7'"
        )
    assert found(db, "durand*", fuzzy=True) == []
    assert found(db, "*cote^zoe*", fuzzy=True) == ["1.1", "1.7"]
    assert found(db, "CÔTÉ*", fuzzy=False) == ["1.1", "1.7"]


def test_a_study_written_without_its_patients_names_gets_them(db) -> None:
    """A writer other than the catalog (a repair by hand, a plugin) that
    inserts a study without the copies still leaves it findable by name."""
    with db.transaction():
        ref = db.scalar("SELECT id FROM patients WHERE patient_id = 'P1.2'")
        db.execute(
            "INSERT INTO studies (patient_ref, study_uid, site, created_at, updated_at) "
            "VALUES (?, '2.1', 'A', '2024-01-01T00:00:00+00:00', '2024-01-01T00:00:00+00:00')",
            (ref,),
        )
    assert found(db, "mul*", fuzzy=True) == ["1.2", "2.1"]
    assert found(db, "MÜLLER^HANS", fuzzy=False) == ["1.2", "2.1"]


def test_fuzzy_matching_stays_within_the_callers_sites(db) -> None:
    """The adversary: a user of site B fishing for site A's patients by a
    loose name pattern finds only site B's."""
    assert found(db, "*e*", fuzzy=True, scope=Scope.of(["B"])) == ["1.3", "1.4", "1.7"]
    assert found(db, "*cote*", fuzzy=True, scope=Scope.of(["B"])) == []


def test_names_stored_before_the_migration_are_found_fuzzily_after_it(index_url: str) -> None:
    db = open_database(index_url)
    try:
        upgrade_index(db, until=15)  # the schema before the folded names
        with db.transaction():
            db.execute(
                "INSERT INTO patients (site, issuer, patient_id, patient_name, "
                "patient_name_norm, created_at) VALUES ('A', 'A', 'OLD', 'Côté^Zoé', "
                "'CÔTÉ^ZOÉ', '2020-01-01T00:00:00+00:00')"
            )
            ref = db.scalar("SELECT id FROM patients WHERE patient_id = 'OLD'")
            db.execute(
                "INSERT INTO studies (patient_ref, study_uid, site, referring_physician_name, "
                "referring_physician_name_norm, created_at, updated_at) VALUES (?, '9.9', 'A', "
                "'Müller^Hans', 'MÜLLER^HANS', '2020-01-01T00:00:00+00:00', "
                "'2020-01-01T00:00:00+00:00')",
                (ref,),
            )
        upgrade_index(db)
        assert found(db, "*cote*", fuzzy=True) == ["9.9"]
        assert found(db, "côté*", fuzzy=False) == ["9.9"]  # back-filled by 0020/0021
        query = Query("STUDY", {"ReferringPhysicianName": "muller*"}, fuzzy=True)
        assert [r["StudyInstanceUID"] for r in search(db, query)] == ["9.9"]
    finally:
        db.close()


@pytest.mark.postgres
def test_postgresqls_fold_function_folds_exactly_as_python_does(pg_url: str) -> None:
    """Rows back-filled by the migration (SQL) and rows stored later (Python)
    must fold alike, or a name would be found only if stored after it."""
    db = open_database(pg_url)
    try:
        upgrade_index(db)
        samples = [*FOLD_FROM, "Œ", "Æ", "'", "\u2019", "-", "^", " ", "ß"]
        samples += [n.upper() for n, _ in NAMES.values()]
        samples += ["SAINT-JEAN^MARIE-ÈVE", "NGUYỄN^THỊ", "ØSTERGÅRD^SØREN", "ŁUKASZ"]
        for text in samples:
            assert db.scalar("SELECT imag_fold(?)", (text,)) == fold(text), text
    finally:
        db.close()


@pytest.mark.postgres
def test_name_contains_uses_trigram_indexes_on_postgresql(pg_url: str) -> None:
    """pg_trgm is created by the migration (Debian ships it with PostgreSQL):
    both the literal and the folded names have a trigram index."""
    db = open_database(pg_url)
    try:
        upgrade_index(db)
        indexes = {
            r[0] for r in db.query("SELECT indexname FROM pg_indexes WHERE tablename = 'patients'")
        }
        assert {"patients_by_name_trgm", "patients_by_name_fold_trgm"} <= indexes
    finally:
        db.close()
    with psycopg.connect(pg_url) as conn:
        ext = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'").fetchone()
    assert ext is not None
