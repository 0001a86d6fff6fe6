"""The one query model behind C-FIND and QIDO-RS.

A :class:`Query` names a level (PATIENT, STUDY, SERIES, IMAGE), matching keys
with DICOM values, and return keys.  :func:`search` translates it once into
SQL for either index backend, following the matching rules of PS3.4 C.2.2.2:

* universal matching: an empty value matches everything (the key is returned);
* single value matching; for PN case-insensitive (names are compared on an
  upper-cased copy, so MÜLLER matches müller), trailing "^" ignored; with
  :attr:`Query.fuzzy` (QIDO-RS ``fuzzymatching=true``) accent-insensitive
  too, on a folded copy (:mod:`archive.index.names`: ``*cote*`` finds CÔTÉ);
* wildcard matching with ``*`` and ``?`` (LIKE, so prefix patterns use the
  indexes);
* range matching for DA and TM (``A-B``, ``-B``, ``A-``);
* list of UID matching (``uid1\\uid2``);
* ModalitiesInStudy matches when any of the study's modalities matches any
  value of the key.

**Extra attributes.**  The series- and instance-level keys configured in
``index.extra_attributes`` (:mod:`archive.index.extra`: ImageLaterality,
ViewPosition, Laterality, ProtocolName... by default) are matched like the
columns, by VR -- single value, wildcard, a list of values (any matches),
DA/TM ranges, UID lists -- as an ``EXISTS`` on their side table; a
multi-valued attribute matches when any of its values does.  They are
returned as the columns are (one query per answer page fetches them).  Pass
them with :attr:`Query.extra` (:func:`extra_attributes` of the configuration);
a keyword neither a column nor configured stays unknown to the search.

Access scope (the sites and reading groups a caller may see) is a WHERE clause of the same SQL,
so counts, limits and offsets are right by construction.

**Order and pages.**  Answers come by insertion (row id); a study search
matching StudyDate comes by date, then insertion (the order of the
``(study_date, id)`` indexes); one matching PatientName with a prefix or a
whole name, by that name, then insertion (the studies' copies of their
patient's names, migrations 0020/0021).  A page (``limit``/``offset``)
selects the page's ids first -- from the indexes and the tables its keys
need, so that an offset skips index entries rather than joined rows -- then
reads those rows (migrations 0018/0019 describe the indexes).

**Search by INS or regional identifier.**  When the query carries the identity
provider (:attr:`Query.identity`) and an exact PatientID with an
IssuerOfPatientID (or an issuer qualifier OID, :attr:`Query.patient_oid`)
that the provider knows -- ``ASIP-SANTE-INS-NIR`` and a valid matricule, or
the regional issuer and a regional identifier -- the patient match becomes
"one of that person's local identities" (``p.id IN (...)``, see
:meth:`archive.identity.IdentityPlugin.patient_refs`), or the plain local
match for a producer that filed the INS as its PatientID.  The scope still
applies, so each site finds only its own studies of that person.  Answers
carry each study's *local* PatientID and IssuerOfPatientID (what the site
that filed it knows the patient as), never another site's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any

from archive.index.catalog import normalise_pn
from archive.index.db import CountedWrite, Database
from archive.index.extra import ExtraAttribute, ExtraAttributes, read_values
from archive.index.names import fold
from archive.security.scope import Scope, study_clause
from archive.uids import is_valid_uid

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_DEPTH = {name: i for i, name in enumerate(LEVELS)}


class QueryError(ValueError):
    """A query the archive cannot answer as asked: unknown attribute, bad value."""


@dataclass(frozen=True)
class Attr:
    keyword: str
    level: str
    column: str  # SQL expression
    vr: str
    match: bool = True  # may be used as a matching key
    #: an extra attribute (index.extra_attributes): held in a side table, not a column
    extra: ExtraAttribute | None = None


# The attributes the index holds, by keyword.  Counts come from the counters
# kept on studies and series, so returning them costs nothing.
ATTRIBUTES: dict[str, Attr] = {
    a.keyword: a
    for a in [
        Attr("PatientID", "PATIENT", "p.patient_id", "LO"),
        Attr("IssuerOfPatientID", "PATIENT", "p.issuer", "LO"),
        Attr("PatientName", "PATIENT", "p.patient_name", "PN"),
        Attr("PatientBirthDate", "PATIENT", "p.birth_date", "DA"),
        Attr("PatientSex", "PATIENT", "p.sex", "CS"),
        Attr("NumberOfPatientRelatedStudies", "PATIENT", "", "IS", match=False),
        Attr("NumberOfPatientRelatedSeries", "PATIENT", "", "IS", match=False),
        Attr("NumberOfPatientRelatedInstances", "PATIENT", "", "IS", match=False),
        Attr("StudyInstanceUID", "STUDY", "st.study_uid", "UI"),
        Attr("StudyDate", "STUDY", "st.study_date", "DA"),
        Attr("StudyTime", "STUDY", "st.study_time", "TM"),
        Attr("AccessionNumber", "STUDY", "st.accession_number", "SH"),
        Attr("StudyID", "STUDY", "st.study_id", "SH"),
        Attr("StudyDescription", "STUDY", "st.study_description", "LO"),
        Attr("ReferringPhysicianName", "STUDY", "st.referring_physician_name", "PN"),
        Attr("ModalitiesInStudy", "STUDY", "st.modalities", "CS"),
        Attr("InstitutionName", "STUDY", "st.institution_name", "LO"),
        Attr("NumberOfStudyRelatedSeries", "STUDY", "st.num_series", "IS", match=False),
        Attr("NumberOfStudyRelatedInstances", "STUDY", "st.num_instances", "IS", match=False),
        Attr("SeriesInstanceUID", "SERIES", "se.series_uid", "UI"),
        Attr("Modality", "SERIES", "se.modality", "CS"),
        Attr("SeriesNumber", "SERIES", "se.series_number", "IS"),
        Attr("SeriesDescription", "SERIES", "se.series_description", "LO"),
        Attr("BodyPartExamined", "SERIES", "se.body_part_examined", "CS"),
        Attr("PerformedProcedureStepStartDate", "SERIES", "se.pps_start_date", "DA"),
        Attr("PerformedProcedureStepStartTime", "SERIES", "se.pps_start_time", "TM"),
        Attr("NumberOfSeriesRelatedInstances", "SERIES", "se.num_instances", "IS", match=False),
        Attr("SOPInstanceUID", "IMAGE", "i.sop_instance_uid", "UI"),
        Attr("SOPClassUID", "IMAGE", "i.sop_class_uid", "UI"),
        Attr("InstanceNumber", "IMAGE", "i.instance_number", "IS"),
        Attr("NumberOfFrames", "IMAGE", "i.number_of_frames", "IS"),
    ]
}
_NORMALISED = {
    "p.patient_name": "p.patient_name_norm",
    "st.referring_physician_name": "st.referring_physician_name_norm",
}
# fuzzy matching (Query.fuzzy): names compared folded (archive.index.names)
_FOLDED = {
    "p.patient_name": "p.patient_name_fold",
    "st.referring_physician_name": "st.referring_physician_name_fold",
}
_FROM = {
    "PATIENT": "patients p",
    "STUDY": "studies st JOIN patients p ON p.id = st.patient_ref",
    "SERIES": "series se JOIN studies st ON st.id = se.study_ref "
    "JOIN patients p ON p.id = st.patient_ref",
    "IMAGE": "instances i JOIN series se ON se.id = i.series_ref "
    "JOIN studies st ON st.id = se.study_ref JOIN patients p ON p.id = st.patient_ref",
}
UNIQUE_KEYS = {
    "PATIENT": ("PatientID", "IssuerOfPatientID"),
    "STUDY": ("StudyInstanceUID",),
    "SERIES": ("SeriesInstanceUID",),
    "IMAGE": ("SOPInstanceUID",),
}
_FROM_NO_PATIENT = {
    "STUDY": "studies st",
    "SERIES": "series se JOIN studies st ON st.id = se.study_ref",
    "IMAGE": "instances i JOIN series se ON se.id = i.series_ref "
    "JOIN studies st ON st.id = se.study_ref",
}
_PATIENT_REF = re.compile(r"\bp\.")
_ORDER = {"PATIENT": "p.id", "STUDY": "st.id", "SERIES": "se.id", "IMAGE": "i.id"}


def _matches(query: Query, keyword: str) -> bool:
    """Whether ``query`` matches on ``keyword`` (not universal matching)."""
    return (query.keys.get(keyword) or "").strip() not in ("", "*")


def _order(query: Query) -> str:
    """The order answers come in, stable across pages: insertion (the row
    id); a study search that matches StudyDate goes by date first, the order
    of the (study_date, id) indexes, so that its first page is read from the
    index instead of sorting every study of the range.  One that matches
    PatientName (and not StudyDate) with a value that does not start with a
    wildcard -- a prefix, an exact name -- goes by the patient's name as it
    compares it (upper-cased, or folded for fuzzy matching), the order of
    the (patient_name_norm, id) and (patient_name_fold, id) indexes, for the
    same reason.  A contains-match (``*cote*``) stays in id order: walking a
    name index for it reads every name sorted before the matches, walking
    the studies in id order about page size / share of matches rows,
    however large the table."""
    if query.level == "STUDY" and _matches(query, "StudyDate"):
        return "st.study_date, st.id"
    if query.level == "STUDY" and _matches(query, "PatientName"):
        column, text = _study_patient_name(query.keys["PatientName"].strip(), query.fuzzy)
        if not text.startswith(("*", "?")):
            return f"{column}, st.id"
    return _ORDER[query.level]


_DATE_RE = re.compile(r"^\d{8}$")
_TIME_RE = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")


class _Check:
    """Whole-value checks of DA and TM query values (a real calendar date, a
    real time of day), with the ``match`` interface of a compiled pattern."""

    def __init__(self, vr: str) -> None:
        self.vr = vr

    def match(self, value: str) -> bool:
        if self.vr == "DA":
            return _calendar_date(value) is not None
        m = _TIME_RE.match(value)
        if not m or (m[4] and not m[3]):
            return False
        hh, mm, ss = int(m[1]), int(m[2] or 0), int(m[3] or 0)
        return hh < 24 and mm < 60 and ss < 61  # 60: leap second


def _calendar_date(value: str) -> date | None:
    """The date a DA value (YYYYMMDD) names, None if it names none."""
    if not _DATE_RE.match(value):
        return None
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except ValueError:
        return None


_DATE = _Check("DA")
_TIME = _Check("TM")


if TYPE_CHECKING:
    from archive.config import Config

_EXTRA_CACHE: dict[str, ExtraAttributes] = {}


def extra_attributes(config: Config) -> ExtraAttributes:
    """The extra attributes ``config`` indexes (``index.extra_attributes``),
    without those the index holds as columns already (BodyPartExamined,
    PerformedProcedureStepStartDate...: matched and returned from their
    column).  Built once per distinct setting value."""
    value = config["index.extra_attributes"]
    key = repr(sorted((k, tuple(v)) for k, v in value.items()))
    found = _EXTRA_CACHE.get(key)
    if found is None:
        found = _EXTRA_CACHE[key] = ExtraAttributes.from_setting(value, skip=ATTRIBUTES)
    return found


def attribute(keyword: str, extra: ExtraAttributes | None = None) -> Attr | None:
    """The attribute a keyword names: an index column, or a configured extra one."""
    found = ATTRIBUTES.get(keyword)
    if found is not None or extra is None:
        return found
    e = extra.get(keyword)
    return None if e is None else Attr(keyword, e.level, "", e.vr, extra=e)


@dataclass
class Query:
    """A search at one level: matching keys (keyword → DICOM value string,
    empty for universal matching) and extra return keys."""

    level: str
    keys: dict[str, str] = field(default_factory=dict)
    return_keys: Sequence[str] = ()
    limit: int | None = None
    offset: int = 0
    #: the studies the caller may see (sites, reading groups); None = everything
    scope: Scope | None = None
    #: the identity provider, to search by an INS or a regional identifier
    #: (:meth:`archive.identity.IdentityPlugin.patient_refs`); None: local IDs only
    identity: Any = None
    #: UniversalEntityID of the Issuer of Patient ID Qualifiers Sequence sent
    #: with PatientID (the INS OID), when the query gives one
    patient_oid: str = ""
    #: the configured extra attributes (:func:`extra_attributes`); None: columns only
    extra: ExtraAttributes | None = None
    #: fuzzy matching of person names (QIDO-RS ``fuzzymatching=true``):
    #: case- and accent-insensitive, ``*cote*`` finds CÔTÉ (archive.index.names)
    fuzzy: bool = False

    def __post_init__(self) -> None:
        if self.level not in _DEPTH:
            raise QueryError(f"unknown query level {self.level!r}: use one of {LEVELS}")


@dataclass
class _Sql:
    where: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)

    def add(self, clause: str, *params: Any) -> None:
        self.where.append(clause)
        self.params.extend(params)


def _like(value: str) -> str:
    escaped = value.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return escaped.replace("*", "%").replace("?", "_")


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _time_bound(value: str, upper: bool) -> str:
    """A TM value as an inclusive bound: "12" is 12:00:00 as a lower bound and
    12:59:59.999999 as an upper one (a time stands for its whole precision)."""
    if not _TIME.match(value):
        raise QueryError(f"invalid time {value!r}: expected HHMMSS (or HH, HHMM, HHMMSS.FFFFFF)")
    whole, dot, _ = value.partition(".")
    if not upper:
        return whole.ljust(6, "0")
    if dot:
        return value
    return whole + "235959"[len(whole) :] + ".999999"


def _match(sql: _Sql, attr: Attr, value: str, fuzzy: bool = False) -> None:
    column = _NORMALISED.get(attr.column, attr.column)
    if fuzzy and attr.column in _FOLDED:
        column = _FOLDED[attr.column]
    if attr.vr == "UI":
        uids = value.split("\\")
        for uid in uids:
            if not is_valid_uid(uid):
                raise QueryError(f"{attr.keyword}: {uid!r} is not a valid UID")
        if len(uids) == 1:
            sql.add(f"{column} = ?", uids[0])
        else:
            sql.add(f"{column} IN ({', '.join('?' * len(uids))})", *uids)
        return
    if attr.vr in ("DA", "TM"):
        check = _DATE if attr.vr == "DA" else _TIME
        if value.count("-") > 1:
            raise QueryError(_bad(attr, value))
        if "-" in value:
            lo, _, hi = value.partition("-")
            if not lo and not hi:
                raise QueryError(f"{attr.keyword}: empty range {value!r}")
            for part in (lo, hi):
                if part and not check.match(part):
                    raise QueryError(_bad(attr, part))
            if attr.vr == "TM":
                lo = _time_bound(lo, upper=False) if lo else ""
                hi = _time_bound(hi, upper=True) if hi else ""
            if lo:
                sql.add(f"{column} >= ?", lo)
            if hi:
                sql.add(f"{column} <= ?", hi)
            return
        if _has_wildcard(value):
            sql.add(f"{column} LIKE ? ESCAPE '!'", _like(value))
            return
        if not check.match(value):
            raise QueryError(_bad(attr, value))
        if attr.vr == "TM":  # a time matches every time within its precision
            sql.add(f"{column} >= ?", _time_bound(value, upper=False))
            sql.add(f"{column} <= ?", _time_bound(value, upper=True))
        else:
            sql.add(f"{column} = ?", value)
        return
    if attr.vr == "IS":
        try:
            number = int(value)
        except ValueError:
            raise QueryError(f"{attr.keyword}: {value!r} is not an integer") from None
        if not -(2**31) <= number < 2**31:  # IS values are 32-bit (PS3.5 6.2)
            raise QueryError(f"{attr.keyword}: {value!r} is outside the range of an IS value")
        sql.add(f"{column} = ?", number)
        return
    if attr.keyword == "ModalitiesInStudy":
        # rows of study_modalities (one per modality of a study), which an
        # index serves both ways: "this study's" and "the studies with MR"
        alternatives = []
        for modality in (m for m in value.split("\\") if m):
            if _has_wildcard(modality):
                alternatives.append("sm.modality LIKE ? ESCAPE '!'")
                sql.params.append(_like(modality))
            else:
                alternatives.append("sm.modality = ?")
                sql.params.append(modality)
        sql.where.append(
            "st.id IN (SELECT sm.study_ref FROM study_modalities sm WHERE "
            + " OR ".join(alternatives or ["1 = 0"])
            + ")"
        )
        return
    if attr.vr == "CS" and "\\" in value:
        # several values (QIDO's comma list): any of them matches
        alternatives = [v for v in value.split("\\") if v]
        clauses = []
        for v in alternatives:
            if _has_wildcard(v):
                clauses.append(f"{column} LIKE ? ESCAPE '!'")
                sql.params.append(_like(v))
            else:
                clauses.append(f"{column} = ?")
                sql.params.append(v)
        sql.where.append("(" + " OR ".join(clauses) + ")")
        return
    if attr.vr == "PN":
        value = normalise_pn(value) or ""
        if fuzzy and attr.column in _FOLDED:
            value = fold(value) or ""
    if _has_wildcard(value):
        sql.add(f"{column} LIKE ? ESCAPE '!'", _like(value))
    else:
        sql.add(f"{column} = ?", value)


def _study_patient_name(value: str, fuzzy: bool) -> tuple[str, str]:
    """How a study search matches a PatientName value: on the study's copy
    of its patient's upper-cased name, or of its folded name for fuzzy
    matching (migrations 0020/0021: matching on the patient row left the
    planner walking every study in id order, looking its patient up).
    Returns (column, value to compare)."""
    norm = normalise_pn(value) or ""
    if fuzzy:
        return "st.patient_name_fold", fold(norm) or ""
    return "st.patient_name_norm", norm


def _match_study_patient_name(sql: _Sql, value: str, fuzzy: bool) -> None:
    column, text = _study_patient_name(value, fuzzy)
    if _has_wildcard(text):
        sql.add(f"{column} LIKE ? ESCAPE '!'", _like(text))
    else:
        sql.add(f"{column} = ?", text)


def _modalities_in_row(db: Database, query: Query, value: str) -> bool:
    """Whether ModalitiesInStudy is matched on the study row's own list rather
    than through ``study_modalities``, when the search also matches StudyDate
    and the value has no wildcard (a pattern is matched row by row, in
    study_modalities): always on PostgreSQL (its date indexes carry the list,
    migration 0023); on SQLite for a date or a closed range of at most
    :data:`_ROW_MATCHED_DAYS` days.

    SQLite, given ``st.id IN (SELECT ... FROM study_modalities ...)``, reads
    every study of the modality (it cannot tell a week of dates is narrow:
    its statistics hold no value distribution), then each by key: one week
    of CT cost 130 ms at 10^7 instances, 39 ms site-bound, growing with the
    archive.  Matched on the row, the search walks the range's dates and
    checks each study's list (at 10^6 instances: one week of CT 12.0 -> 0.3
    ms, one day 4.2 -> 0.1).  That walk stops at a page's worth of matches,
    but for a modality no study of the range has it reads the whole range
    (~2.3 us a study: a quarter of a 10^7-instance archive's ~25,000 studies,
    ~60 ms), where the list of the modality's studies is empty at once:
    hence the bound, the windows of a reading worklist (a day, a week, a
    month, a quarter); a wider or open range keeps the list."""
    when = (query.keys.get("StudyDate") or "").strip()
    if query.level != "STUDY" or when in ("", "*") or _has_wildcard(value):
        return False
    return db.dialect == "postgresql" or _days(when) <= _ROW_MATCHED_DAYS


#: the widest StudyDate range (days) whose studies SQLite walks to match a modality on the row
_ROW_MATCHED_DAYS = 92


def _days(when: str) -> float:
    """How many days a StudyDate value spans: 1 for a date, the closed
    range's length, infinity for an open or malformed one (whose error, if
    any, the date's own match raises)."""
    lo, dash, hi = when.partition("-")
    first, last = _calendar_date(lo), _calendar_date(hi if dash else lo)
    if first is None or last is None:
        return float("inf")
    return (last - first).days + 1


def _match_modalities_in_row(sql: _Sql, value: str, dialect: str) -> None:
    """ModalitiesInStudy (any of the values) on the study's backslash-joined list.

    A search by date and modality (one week of CT) pages through a date
    index in date order; matched through study_modalities, each study of the
    range was looked up there, one index probe per study (at 10^7 instances a
    week's page of CT studies cost 3-4 ms of PostgreSQL's time, 2 more to plan
    the join).  The date indexes hold the list, so the check is made as the
    index is read, with no probe (0.2 ms for that page).  On SQLite the list
    is read from the study's row, found by the date index's key."""
    wanted = [m for m in value.split("\\") if m]
    if dialect == "postgresql":
        sql.add("string_to_array(st.modalities, '\\') && ?::text[]", wanted)
        return
    if not wanted:
        sql.add("1 = 0")
        return
    # '\CT\SR\' holds '\CT\' and not '\T\': whole values only
    sql.add(
        "(" + " OR ".join(["instr('\\' || st.modalities || '\\', ?) > 0"] * len(wanted)) + ")",
        *(f"\\{m}\\" for m in wanted),
    )


_OWNER = {"SERIES": "se.id", "IMAGE": "i.id"}


def _match_extra(sql: _Sql, attr: Attr, value: str) -> None:
    """An extra attribute's matching key as an EXISTS on its side table: any
    of its stored values matches any value of the key (a backslash list;
    QIDO's comma list), each by the rules of its VR."""
    e = attr.extra
    assert e is not None
    inner = _Sql()
    alternatives = []
    for v in value.split("\\"):
        v = v.strip()
        if not v:
            continue
        one = _Sql()
        if attr.vr == "IS" and not _has_wildcard(v):
            try:
                number = int(v)
            except ValueError:
                raise QueryError(f"{attr.keyword}: {v!r} is not an integer") from None
            one.add("x.value = ?", str(number))  # stored in canonical form
        else:
            _match(one, Attr(attr.keyword, attr.level, "x.value", attr.vr), v)
        alternatives.append("(" + " AND ".join(one.where) + ")")
        inner.params.extend(one.params)
    if not alternatives:
        return
    sql.add(
        f"EXISTS (SELECT 1 FROM {e.table} x WHERE x.{e.ref} = {_OWNER[e.level]} "
        f"AND x.tag = ? AND ({' OR '.join(alternatives)}))",
        e.tag,
        *inner.params,
    )


def _bad(attr: Attr, value: str) -> str:
    form = "YYYYMMDD" if attr.vr == "DA" else "HHMMSS"
    return (
        f"{attr.keyword}: {value!r} is not a valid {attr.vr} value (expected {form} or a range A-B)"
    )


def _patient_counts(scope_sql: str) -> dict[str, str]:
    where = f"FROM studies s2 WHERE s2.patient_ref = p.id{scope_sql}"
    return {
        "NumberOfPatientRelatedStudies": f"(SELECT COUNT(*) {where})",
        "NumberOfPatientRelatedSeries": f"(SELECT COALESCE(SUM(s2.num_series), 0) {where})",
        "NumberOfPatientRelatedInstances": f"(SELECT COALESCE(SUM(s2.num_instances), 0) {where})",
    }


def _narrowed(
    db: Database, shown: list[str], count_scope: str, count_params: list[Any]
) -> dict[str, tuple[str, list[Any]]]:
    """The study and patient attributes that summarise series, computed over
    the series a narrowed scope shows (a share of some series of a study):
    the stored counters and ModalitiesInStudy would reveal the hidden ones.
    keyword -> (SQL expression, its parameters)."""
    marks = ", ".join("?" * len(shown))
    of_study = f"FROM series sx WHERE sx.study_ref = st.id AND sx.series_uid IN ({marks})"
    of_patient = (
        f"FROM series sx JOIN studies s2 ON s2.id = sx.study_ref "
        f"WHERE s2.patient_ref = p.id{count_scope} AND sx.series_uid IN ({marks})"
    )
    modalities: dict[str, set[str]] = {}
    rows = db.query(
        "SELECT st.study_uid, se.modality FROM series se JOIN studies st ON st.id = se.study_ref "
        f"WHERE se.series_uid IN ({marks})",
        shown,
    )
    for study_uid, modality in rows:
        bucket = modalities.setdefault(str(study_uid), set())
        if modality:
            bucket.add(str(modality))
    cases = [(uid, "\\".join(sorted(found))) for uid, found in sorted(modalities.items())]
    in_study = (
        "CASE st.study_uid " + " ".join("WHEN ? THEN ?" for _ in cases) + " ELSE '' END"
        if cases
        else "''"
    )
    patient = [*count_params, *shown]
    return {
        "NumberOfStudyRelatedSeries": (f"(SELECT COUNT(*) {of_study})", list(shown)),
        "NumberOfStudyRelatedInstances": (
            f"(SELECT COALESCE(SUM(sx.num_instances), 0) {of_study})",
            list(shown),
        ),
        "ModalitiesInStudy": (in_study, [v for case in cases for v in case]),
        "NumberOfPatientRelatedStudies": (f"(SELECT COUNT(DISTINCT s2.id) {of_patient})", patient),
        "NumberOfPatientRelatedSeries": (f"(SELECT COUNT(*) {of_patient})", patient),
        "NumberOfPatientRelatedInstances": (
            f"(SELECT COALESCE(SUM(sx.num_instances), 0) {of_patient})",
            patient,
        ),
    }


def attributes_for(level: str, extra: ExtraAttributes | None = None) -> list[str]:
    """Keywords an answer at ``level`` can carry (its level and those above),
    the configured extra attributes included."""
    depth = _DEPTH[level]
    return [
        k
        for k, a in ATTRIBUTES.items()
        if _DEPTH[a.level] <= depth
        and not (a.level == "PATIENT" and a.column == "" and level != "PATIENT")
    ] + [e.keyword for e in (extra or ()) if _DEPTH[e.level] <= depth]


def search(
    db: Database, query: Query, *, counted: CountedWrite | None = None
) -> list[dict[str, Any]]:
    """Run ``query``; return one dict per match with the matching and return
    keys (keyword → value; None for an empty value), in the order of
    :func:`_order` (insertion; a study search matching StudyDate by date).

    ``counted`` (PostgreSQL only): a write the search's statement carries,
    which may read how many rows it found -- the request's audit entry, so
    that the search and its entry are one round trip and one commit.  If
    the statement fails, the write did not commit, unless the connection
    was lost after its COMMIT (:meth:`AuditLog.carried` looks)."""
    if counted is not None and db.dialect != "postgresql":
        raise ValueError("a search carries a write on PostgreSQL only")
    depth = _DEPTH[query.level]
    sql = _Sql()
    by_person = _person_match(db, query)
    if by_person is not None:
        sql.add(*by_person)
    for keyword, value in query.keys.items():
        if by_person is not None and keyword in ("PatientID", "IssuerOfPatientID"):
            continue
        attr = attribute(keyword, query.extra)
        if attr is None:
            raise QueryError(f"{keyword} is not an attribute this archive can match on")
        if _DEPTH[attr.level] > depth:
            raise QueryError(
                f"{keyword} is a {attr.level}-level attribute; it cannot be "
                f"matched in a {query.level}-level query"
            )
        if not attr.match:
            raise QueryError(f"{keyword} can be returned but not matched on")
        value = (value or "").strip()
        if value and value != "*":
            if attr.extra is not None:
                _match_extra(sql, attr, value)
            elif keyword == "PatientName" and query.level == "STUDY":
                _match_study_patient_name(sql, value, query.fuzzy)
            elif keyword == "ModalitiesInStudy" and _modalities_in_row(db, query, value):
                _match_modalities_in_row(sql, value, db.dialect)
            else:
                _match(sql, attr, value, query.fuzzy)

    count_scope, count_params = "", []
    if query.scope is not None:
        if query.level == "PATIENT":
            clause, params = study_clause(query.scope, "s3")
            sql.add(
                f"EXISTS (SELECT 1 FROM studies s3 WHERE s3.patient_ref = p.id AND {clause})",
                *params,
            )
        else:
            clause, params = study_clause(query.scope, "st")
            sql.add(clause, *params)
        clause, count_params = study_clause(query.scope, "s2")
        count_scope = f" AND {clause}"
    shown = sorted(query.scope.series) if query.scope is not None else []
    narrowed: dict[str, tuple[str, list[Any]]] = {}
    if shown:
        narrowed = _narrowed(db, shown, count_scope, count_params)
        marks = ", ".join("?" * len(shown))
        if query.level in ("SERIES", "IMAGE"):
            sql.add(f"se.series_uid IN ({marks})", *shown)
        elif query.level == "STUDY":  # found through a series shown, never a hidden one
            sql.add(
                f"EXISTS (SELECT 1 FROM series sx WHERE sx.study_ref = st.id "
                f"AND sx.series_uid IN ({marks}))",
                *shown,
            )

    wanted = _ordered(
        [*UNIQUE_KEYS[query.level], *query.keys, *query.return_keys], query.level, query.extra
    )
    extras = [e for k in wanted if (e := _extra(k, query.extra)) is not None]
    columns = [k for k in wanted if _extra(k, query.extra) is None]
    counts = _patient_counts(count_scope)
    select: list[str] = []
    select_params: list[Any] = []
    for keyword in columns:
        attr = ATTRIBUTES[keyword]
        if keyword in narrowed:
            select.append(narrowed[keyword][0])
            select_params.extend(narrowed[keyword][1])
        elif keyword in counts:
            select.append(counts[keyword])
            select_params.extend(count_params)
        else:
            select.append(attr.column)
    owners = [level for level in _OWNER if any(e.level == level for e in extras)]
    select += [_OWNER[level] for level in owners]  # to fetch the extra values by
    where = " WHERE " + " AND ".join(sql.where) if sql.where else ""
    order = _order(query)
    # a write carried by a page's search counts the page's ids (the CTE
    # ``found``), each one row; by another search, its rows, kept in order
    carried_page = counted is not None and query.limit is not None
    if counted is not None and not carried_page:
        select.append(f"row_number() OVER (ORDER BY {order}) AS found_seq")
    params = select_params + sql.params
    if query.limit is not None:
        # A page: its ids first, from the tables and indexes the matching
        # needs (OFFSET skips index entries, not joined rows), then the
        # page's rows with everything they return.
        key = _ORDER[query.level]
        needs_patients = query.level == "PATIENT" or _PATIENT_REF.search(where)
        inner = _FROM[query.level] if needs_patients else _FROM_NO_PATIENT[query.level]
        ids = f"FROM {inner}{where} ORDER BY {order}"  # the page's ids
        page_params = list(sql.params)
        if db.dialect == "postgresql" and not _RANGE.search(where):
            # The page's size and offset written in the statement, not sent
            # as parameters: for a generic plan PostgreSQL guesses a
            # parameter LIMIT at a tenth of the table, which priced every
            # generic plan above the custom ones, so it planned each search
            # again (0.3-0.8 ms of planning, 29 indexes on studies, for a
            # 0.3 ms execution).  Integers, never text from the request.
            # Not for a range (a date, a time), whose best plan depends on
            # its width: there the parameters keep PostgreSQL planning each
            # search for its values (a week of CT ran 0.6 ms slower on the
            # generic plan).
            ids += f" LIMIT {int(query.limit)}"
            if query.offset:
                ids += f" OFFSET {int(query.offset)}"
        else:
            ids += " LIMIT ? OFFSET ?"
            page_params += [query.limit, query.offset]
        params = [*select_params, *page_params]
        if db.dialect == "postgresql":
            # The page's ids as an array: its <= 1,001 rows are then read by
            # primary key whatever the table's size.  Joined to a subquery
            # instead, the planner hashed the whole table below ~10^6 rows
            # (a sequential scan of 10^4 studies: 2.9 ms of a 100-row page's
            # 3 ms of SQL at 10^5 instances, 0.3 ms read by key).  A carried
            # write counts the page's ids, the CTE ``found`` (materialized:
            # read once); materializing the rows themselves, numbered to keep
            # their order, cost 0.36 ms more per 100-row page than the search
            # alone (0.89 ms, 10^7 instances).
            page = "SELECT page_id FROM found" if carried_page else f"SELECT {key} {ids}"
            text = (
                f"SELECT {', '.join(select)} FROM {_FROM[query.level]} "
                f"WHERE {key} = ANY(ARRAY({page})) ORDER BY {order}"
            )
            if carried_page:
                assert counted is not None
                text = (
                    f"WITH found AS MATERIALIZED (SELECT {key} AS page_id {ids}), "
                    f"written AS ({counted.sql}) {text}"
                )
                params = [*page_params, *counted.params, *select_params]
        else:
            first, _, rest = _FROM[query.level].partition(" JOIN ")
            text = (
                f"SELECT {', '.join(select)} FROM (SELECT {key} AS page_id {ids}) page "
                f"JOIN {first} ON {key} = page.page_id"
                + (f" JOIN {rest}" if rest else "")
                + f" ORDER BY {order}"
            )
    else:
        text = f"SELECT {', '.join(select)} FROM {_FROM[query.level]}{where} ORDER BY {order}"
        if query.offset:
            text += " LIMIT -1 OFFSET ?" if db.dialect == "sqlite" else " OFFSET ?"
            params.append(query.offset)
    if counted is not None and not carried_page:
        text = (
            f"WITH found AS MATERIALIZED ({text}), written AS ({counted.sql}) "
            "SELECT * FROM found ORDER BY found_seq"
        )
        params = [*params, *counted.params]
    # a LIKE's plan depends on its pattern (a rare name: the trigram index;
    # a common one: a walk in id order that stops at the page; a prefix: a
    # name range), which a generic plan of a prepared statement does not see
    rows = db.query(text, params, prepare=False) if " LIKE " in where else db.query(text, params)
    found = [dict(zip(columns, row, strict=False)) for row in rows]
    if not extras:  # the columns are what is wanted, in its order
        return found
    for i, level in enumerate(owners):
        refs = [int(row[len(columns) + i]) for row in rows]
        at_level = [e for e in extras if e.level == level]
        values = read_values(db, level, refs, [e.tag for e in at_level])
        for answer, ref in zip(found, refs, strict=True):
            for e in at_level:
                answer[e.keyword] = values.get((ref, e.tag))
    return [{k: answer.get(k) for k in wanted} for answer in found]


#: a range match (:func:`_match`), whose best plan depends on its bounds
_RANGE = re.compile(r" [<>]= \?")


def _extra(keyword: str, extra: ExtraAttributes | None) -> ExtraAttribute | None:
    """The configured extra attribute a returned keyword is (None: a column)."""
    if extra is None or keyword in ATTRIBUTES:
        return None
    return extra.get(keyword)


def _person_match(db: Database, query: Query) -> tuple[str, ...] | None:
    """The patient clause (and its parameters) of a search by INS or regional
    identifier, or None when the query's PatientID is a plain local one."""
    if query.identity is None:
        return None
    patient_id = (query.keys.get("PatientID") or "").strip()
    issuer = (query.keys.get("IssuerOfPatientID") or "").strip()
    if not patient_id or _has_wildcard(patient_id) or "\\" in patient_id:
        return None
    if not (issuer or query.patient_oid) or _has_wildcard(issuer):
        return None
    refs = query.identity.patient_refs(db, patient_id, issuer, query.patient_oid)
    if refs is None:
        return None
    # a producer that sent the INS as its PatientID filed it as such: found
    # even before the regional index has linked it
    clauses, params = [], []
    if refs:
        clauses.append(f"p.id IN ({', '.join('?' * len(refs))})")
        params += refs
    if issuer:
        clauses.append("(p.patient_id = ? AND p.issuer = ?)")
        params += [patient_id, issuer]
    if not clauses:
        return ("1 = 0",)
    return ("(" + " OR ".join(clauses) + ")", *params)


def _ordered(keywords: Iterable[str], level: str, extra: ExtraAttributes | None) -> list[str]:
    """Known keywords, deduplicated, valid at ``level`` (others are dropped:
    a return key the index does not hold is answered empty by the caller)."""
    depth = _DEPTH[level]
    seen: dict[str, None] = {}
    for keyword in keywords:
        attr = attribute(keyword, extra)
        if attr is None or _DEPTH[attr.level] > depth:
            continue
        if attr.level == "PATIENT" and attr.column == "" and level != "PATIENT":
            continue
        seen[keyword] = None
    return list(seen)
