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
    ],
)
def test_fuzzy_matching_ignores_case_and_accents(db, name: str, expected: list[str]) -> None:
    assert found(db, name, fuzzy=True) == expected


def test_without_fuzzy_matching_accents_still_count(db) -> None:
    assert found(db, "*cote*", fuzzy=False) == ["1.5"]
    assert found(db, "*côté*", fuzzy=False) == ["1.1"]
    assert found(db, "MUL*", fuzzy=False) == []


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
