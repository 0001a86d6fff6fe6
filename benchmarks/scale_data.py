"""Synthetic index rows at scale, bulk-loaded through the real schema.

The query benchmark (:mod:`benchmarks.bench_scale`) needs an index of 10^5 to
10^7 instances; storing that many objects through the ingest pipeline would
take days, and the queries only read the index.  So this module opens the
index with the real migrations (:func:`archive.index.upgrade`) and writes the
rows the ingest path would have written -- COPY on PostgreSQL, executemany on
SQLite -- in chunks, with progress.

Every value is a pure function of (seed, row number): the benchmark draws its
query values (a patient ID, an accession number, a study UID...) from the same
functions without reading the database back, and two loads of one size are
identical.

Shape (the issue's figures at 10^7: 10^6 studies, 3·10^6 series, 6.7·10^5
patients): one study per 10 instances, 1-5 series per study (3 on average),
its 10 instances spread over them; 0.67 patients per study, each patient
belonging to one of 7 sites (of unequal size) with all its studies; study
dates uniform over 10 years; French (and a few other) names, many with
accents, in a skewed distribution (a common name like MARTIN is ~100x a rare
one); a realistic modality mix (CT, MR, CR/DX, US, MG, a few PT/NM/XA; SR
reports beside one study in five).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from archive.index import open_database, upgrade
from archive.index.catalog import normalise_pn
from archive.index.db import Database
from archive.index.names import fold

SITES = (
    ("CHU_NORD", 30),
    ("CHU_SUD", 22),
    ("CH_OUEST", 14),
    ("CLINIQUE_EST", 12),
    ("CABINET_RADIO_1", 9),
    ("CABINET_RADIO_2", 8),
    ("DEPISTAGE", 5),
)
SITE_NAMES = tuple(s for s, _ in SITES)
_SITE_CUM = []
_total = 0
for _site, _weight in SITES:
    _total += _weight
    _SITE_CUM.append(_total)

# Surnames, most common first (weights follow a Zipf-like curve): French,
# Réunionese, Québécois, and the accents and apostrophes they carry.
# fmt: off
SURNAMES = (
    "MARTIN", "PAYET", "HOARAU", "BERNARD", "GRONDIN", "THOMAS", "PETIT", "DUBOIS", "ROBERT",
    "RICHARD", "DURAND", "LEROY", "MOREAU", "SIMON", "LAURENT", "LEFÈVRE", "MICHEL", "GARCIA",
    "DAVID", "BERTRAND", "ROUX", "VINCENT", "FOURNIER", "MOREL", "GIRARD", "ANDRÉ", "MERCIER",
    "DUPONT", "LAMBERT", "BONNET", "FRANÇOIS", "MARTINEZ", "CÔTÉ", "HÉBERT", "GAGNÉ",
    "BÉLANGER", "LÉVESQUE", "TECHER", "RIVIÈRE", "MÜLLER", "N'DIAYE", "NGUYỄN", "BOYER",
    "FONTAINE", "GAUTHIER", "PELLETIER", "CHÂTEAU", "BRUNEAU", "LEBŒUF", "DESCHÊNES", "FORTIN",
    "GÉRARD", "CARON", "MAILLOT", "LEGROS", "ÉTIENNE", "D'ALMEIDA", "SAINT-JEAN", "LE GALL",
    "BŒUF", "NOËL", "JOLY", "BARRÉ", "AUBÉ", "PLOURDE", "TRÉPANIER",
)
GIVEN = (
    "Jean", "Marie", "Pierre", "Zoé", "Hélène", "José", "Jérôme", "Chloé", "Léa", "Noël",
    "Françoise", "Anaïs", "Maëlle", "Éloïse", "Loïc", "Cédric", "Thérèse", "Agnès", "Raphaël",
    "Inès", "Céline", "Rémi", "Aurélie", "Benoît", "Gaëlle", "Joël", "Amélie", "Clément",
    "Océane", "Hugo",
)
# fmt: on
_NAME_WEIGHTS = [1.0 / (i + 1) for i in range(len(SURNAMES))]
_NAME_CUM = []
_acc = 0.0
for _w in _NAME_WEIGHTS:
    _acc += _w
    _NAME_CUM.append(_acc)

# (modality, weight, SOP class, bytes per instance)
MODALITIES = (
    ("CT", 30, "1.2.840.10008.5.1.4.1.1.2", 525_000),
    ("MR", 15, "1.2.840.10008.5.1.4.1.1.4", 135_000),
    ("CR", 14, "1.2.840.10008.5.1.4.1.1.1", 8_000_000),
    ("DX", 10, "1.2.840.10008.5.1.4.1.1.1.1", 9_000_000),
    ("US", 12, "1.2.840.10008.5.1.4.1.1.6.1", 900_000),
    ("MG", 12, "1.2.840.10008.5.1.4.1.1.1.2", 25_000_000),
    ("PT", 3, "1.2.840.10008.5.1.4.1.1.128", 70_000),
    ("NM", 2, "1.2.840.10008.5.1.4.1.1.20", 260_000),
    ("XA", 2, "1.2.840.10008.5.1.4.1.1.12.1", 4_000_000),
)
_MOD_CUM = []
_acc = 0.0
for _m in MODALITIES:
    _acc += _m[1]
    _MOD_CUM.append(_acc)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"
DESCRIPTIONS = {
    "CT": ("TDM THORAX", "TDM ABDOMEN-PELVIS", "SCANNER CÉRÉBRAL", "ANGIO-TDM"),
    "MR": ("IRM CÉRÉBRALE", "IRM GENOU", "IRM RACHIS LOMBAIRE"),
    "CR": ("RADIO THORAX", "RADIO BASSIN"),
    "DX": ("RADIO THORAX", "RADIO POIGNET", "RADIO CHEVILLE"),
    "US": ("ÉCHOGRAPHIE ABDOMINALE", "ÉCHO-DOPPLER"),
    "MG": ("MAMMOGRAPHIE DE DÉPISTAGE", "MAMMOGRAPHIE BILATÉRALE"),
    "PT": ("TEP-TDM CORPS ENTIER",),
    "NM": ("SCINTIGRAPHIE OSSEUSE",),
    "XA": ("CORONAROGRAPHIE",),
}
EXPLICIT_LE = "1.2.840.10008.1.2.1"
ROOT = "1.2.826.0.1.3680043.10.1105"  # a private UID root for synthetic rows
FIRST_DAY = date(2016, 1, 1)
DAYS = 3653  # ten years
NOW = datetime(2026, 1, 1, tzinfo=UTC)
INSTANCES_PER_STUDY = 10
PATIENTS_PER_STUDY = 0.67


def _pick(cum: Sequence[float], r: float) -> int:
    x = r * cum[-1]
    lo, hi = 0, len(cum) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cum[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Shape:
    """How many rows of each kind a load of ``instances`` instances has."""

    instances: int

    @property
    def studies(self) -> int:
        return max(1, self.instances // INSTANCES_PER_STUDY)

    @property
    def patients(self) -> int:
        return max(1, int(self.studies * PATIENTS_PER_STUDY))


@dataclass(frozen=True)
class Patient:
    id: int
    site: str
    patient_id: str
    name: str
    birth_date: str
    sex: str


@dataclass(frozen=True)
class Series:
    id: int
    uid: str
    modality: str
    number: int
    description: str
    instances: int
    sop_class: str
    size: int


@dataclass(frozen=True)
class Study:
    id: int
    patient: int  # patients.id
    uid: str
    date: str
    time: str
    accession: str
    description: str
    site: str
    series: tuple[Series, ...]

    @property
    def modalities(self) -> str:
        return "\\".join(sorted({s.modality for s in self.series}))


def patient(seed: int, number: int) -> Patient:
    """Patient ``number`` (1-based, its row id)."""
    rng = random.Random(seed * 7_919 + number)
    site = SITE_NAMES[_pick(_SITE_CUM, rng.random())]
    surname = SURNAMES[_pick(_NAME_CUM, rng.random())]
    given = GIVEN[int(rng.random() * len(GIVEN))]
    if rng.random() < 0.05:  # compound surnames
        surname += "-" + SURNAMES[_pick(_NAME_CUM, rng.random())]
    birth = FIRST_DAY - timedelta(days=int(rng.random() * 90 * 365))
    return Patient(
        number,
        site,
        f"{site[:3]}{number:09d}",
        f"{surname}^{given}",
        birth.strftime("%Y%m%d"),
        "F" if rng.random() < 0.52 else "M",
    )


def study(seed: int, number: int, shape: Shape) -> Study:
    """Study ``number`` (1-based, its row id), with its series."""
    rng = random.Random(seed * 104_729 + number)
    patients = shape.patients
    owner = number if number <= patients else 1 + int(rng.random() * patients)
    site = patient(seed, owner).site
    day = FIRST_DAY + timedelta(days=int(rng.random() * DAYS))
    seconds = 7 * 3600 + int(rng.random() * 12 * 3600)
    main = MODALITIES[_pick(_MOD_CUM, rng.random())]
    k = 1 + int(rng.random() * 5)  # 1..5 series, 3 on average
    counts = [INSTANCES_PER_STUDY // k] * k
    for i in range(INSTANCES_PER_STUDY % k):
        counts[i] += 1
    series = []
    first_series = (number - 1) * 5 + 1  # 5 ids reserved per study
    for i in range(k):
        mod = main
        if i == k - 1 and k > 1 and rng.random() < 0.6:
            mod = ("SR", 0, SR_CLASS, 30_000)
        elif i > 0 and rng.random() < 0.15:  # a second modality (PET-CT, CT + XA...)
            mod = MODALITIES[_pick(_MOD_CUM, rng.random())]
        descr = DESCRIPTIONS.get(mod[0], ("COMPTE RENDU",))
        series.append(
            Series(
                first_series + i,
                f"{ROOT}.2.{first_series + i}",
                mod[0],
                i + 1,
                descr[int(rng.random() * len(descr))],
                counts[i],
                mod[2],
                mod[3],
            )
        )
    descr = DESCRIPTIONS.get(main[0], ("EXAMEN",))
    return Study(
        number,
        owner,
        f"{ROOT}.1.{number}",
        day.strftime("%Y%m%d"),
        f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
        f"{site[:3]}{day.year}{number:08d}",
        descr[int(rng.random() * len(descr))],
        site,
        tuple(series),
    )


def instance_uid(series: Series, i: int) -> str:
    return f"{ROOT}.3.{series.id}.{i + 1}"


# --------------------------------------------------------------------------- rows

PATIENT_COLUMNS = (
    "id",
    "site",
    "issuer",
    "patient_id",
    "patient_name",
    "patient_name_norm",
    "patient_name_fold",
    "birth_date",
    "sex",
    "created_at",
)
STUDY_COLUMNS = (
    "id",
    "patient_ref",
    "study_uid",
    "study_date",
    "study_time",
    "accession_number",
    "study_id",
    "study_description",
    "modalities",
    "institution_name",
    "site",
    "num_series",
    "num_instances",
    "total_bytes",
    "created_at",
    "updated_at",
    "patient_name_norm",  # the patient's, copied (migrations 0020/0021)
    "patient_name_fold",
)
SERIES_COLUMNS = (
    "id",
    "study_ref",
    "series_uid",
    "modality",
    "series_number",
    "series_description",
    "num_instances",
    "total_bytes",
    "created_at",
    "updated_at",
)
INSTANCE_COLUMNS = (
    "id",
    "series_ref",
    "sop_instance_uid",
    "sop_class_uid",
    "instance_number",
    "stored_ts",
    "original_ts",
    "object_key",
    "size",
    "sha256",
    "received_at",
)


def _patient_row(p: Patient) -> tuple:
    return (
        p.id,
        p.site,
        p.site,  # the site's own issuer
        p.patient_id,
        p.name,
        normalise_pn(p.name),
        fold(normalise_pn(p.name)),
        p.birth_date,
        p.sex,
        NOW,
    )


def _study_rows(s: Study, owner: Patient) -> tuple[tuple, list[tuple], list[tuple]]:
    series_rows, instance_rows = [], []
    total = 0
    for se in s.series:
        size = se.size * se.instances
        total += size
        series_rows.append(
            (se.id, s.id, se.uid, se.modality, se.number, se.description, se.instances, size)
            + (NOW, NOW)
        )
        first = (se.id - 1) * INSTANCES_PER_STUDY + 1  # 10 ids reserved per series
        for i in range(se.instances):
            uid = instance_uid(se, i)
            instance_rows.append(
                (
                    first + i,
                    se.id,
                    uid,
                    se.sop_class,
                    i + 1,
                    EXPLICIT_LE,
                    EXPLICIT_LE,
                    f"{s.uid}/{se.uid}/{uid}.dcm",
                    se.size,
                    (first + i).to_bytes(32, "big"),
                    NOW,
                )
            )
    study_row = (
        s.id,
        s.patient,
        s.uid,
        s.date,
        s.time,
        s.accession,
        str(s.id % 100_000),
        s.description,
        s.modalities,
        s.site.replace("_", " "),
        s.site,
        len(s.series),
        INSTANCES_PER_STUDY,
        total,
        NOW,
        NOW,
        normalise_pn(owner.name),
        fold(normalise_pn(owner.name)),
    )
    return study_row, series_rows, instance_rows


# --------------------------------------------------------------------------- writers


class _Writer:
    """Bulk insert of rows with explicit ids into one backend."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def write(self, table: str, columns: Sequence[str], rows: list[tuple]) -> None:
        if not rows:
            return
        if self.db.dialect == "postgresql":
            # COPY writes identity columns as given (no OVERRIDING needed)
            copy_sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
            with (
                self.db.connection() as conn,
                conn.transaction(),
                conn.cursor() as cur,
                cur.copy(copy_sql) as copy,
            ):
                for row in rows:
                    copy.write_row(row)
        else:
            marks = ", ".join("?" * len(columns))
            with self.db.transaction():
                self.db.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                    [tuple(_sqlite_value(v) for v in row) for row in rows],
                )

    def finish(self) -> None:
        if self.db.dialect == "postgresql":
            for table in ("patients", "studies", "series", "instances"):
                self.db.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT COALESCE(MAX(id), 1) FROM {table}))"
                )
            # what autovacuum does after a bulk load (inserts trigger a VACUUM
            # since PostgreSQL 13): statistics, and the visibility map without
            # which an index-only scan reads each row's heap page, and the
            # planner, knowing it, walks other indexes
            self.db.execute("VACUUM ANALYZE")


def _sqlite_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _chunks(start: int, stop: int, size: int) -> Iterator[range]:
    for first in range(start, stop, size):
        yield range(first, min(first + size, stop))


def load(
    url: str,
    instances: int,
    seed: int = 1,
    report: Callable[[str], None] | None = None,
    chunk: int = 20_000,
    studies_only: bool = False,
) -> Shape:
    """Open the index at ``url`` with the real migrations and bulk-load a
    synthetic archive of about ``instances`` instances into it (empty
    index expected).  Returns its shape; ``report`` gets progress lines.
    ``studies_only``: patients and studies, no series or instance rows --
    the plans of study searches at the size of a ten times larger archive
    for a tenth of the time (tests/test_query_scale.py)."""
    say = report or (lambda text: print(text, file=sys.stderr, flush=True))
    shape = Shape(instances)
    db = open_database(url)
    try:
        upgrade(db)
        writer = _Writer(db)
        started = time.monotonic()
        for rows in _chunks(1, shape.patients + 1, chunk * 5):
            batch = [_patient_row(patient(seed, n)) for n in rows]
            writer.write("patients", PATIENT_COLUMNS, batch)
        say(f"  {shape.patients:,} patients in {time.monotonic() - started:.1f} s")
        done = 0
        for rows in _chunks(1, shape.studies + 1, max(1, chunk // INSTANCES_PER_STUDY)):
            studies, modalities, series, insts = [], [], [], []
            for n in rows:
                one = study(seed, n, shape)
                st, se, ins = _study_rows(one, patient(seed, one.patient))
                modalities += [(one.id, m) for m in one.modalities.split("\\")]
                studies.append(st)
                series += se
                insts += ins
            writer.write("studies", STUDY_COLUMNS, studies)
            writer.write("study_modalities", ("study_ref", "modality"), modalities)
            if not studies_only:
                writer.write("series", SERIES_COLUMNS, series)
                writer.write("instances", INSTANCE_COLUMNS, insts)
            done += len(insts)
            elapsed = time.monotonic() - started
            if rows.stop > shape.studies or (rows.start // len(rows)) % 10 == 0:
                say(
                    f"  {done:,}/{shape.studies * INSTANCES_PER_STUDY:,} instances "
                    f"({done / elapsed:,.0f}/s, {elapsed:.0f} s)"
                )
        writer.finish()
        say(f"  loaded in {time.monotonic() - started:.1f} s")
    finally:
        db.close()
    return shape
