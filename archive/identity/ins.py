"""The national health identifier (INS) and the reference traits, as DICOM carries them.

Pure functions, no I/O: called on the ingest hot path by the identity
provider (:meth:`archive.identity.regional.RegionalIdentity.resolve`) and by
the query model when a search names an INS.

**The matricule** (NIR, or NIA for people awaiting one) is 15 characters: sex
(1), birth year (2), month (2), department (2, ``2A``/``2B`` for Corsica, or
3 digits 971-988 overseas, the commune then taking 2), commune (3), serial
(3), and a key = 97 - (the first 13 digits mod 97), computed after 2A -> 19
and 2B -> 18.

**The OIDs** (FR Core): INS-NIR 1.2.250.1.213.1.4.8, INS-NIA .9, and the
test and demo NIR .10 and .11.  Test and demo identifiers are refused unless
the archive runs a test configuration (setting ``identity.accept_test_ins``):
a production index must never link real people through the ANS's test INS.

**Where DICOM carries it** (the ANS DRIM-M examples): PatientID = the
matricule with IssuerOfPatientID ``ASIP-SANTE-INS-NIR`` and the Issuer of
Patient ID Qualifiers Sequence giving UniversalEntityID = the OID with
UniversalEntityIDType ``ISO``; or the same identifier as an item of the Other
Patient IDs Sequence (the local IPP then being the main PatientID).  An item
naming the INS issuer or an INS OID is an INS claim: when the matricule or
the OID is wrong the claim is refused with a reason (the identity stays a
plain local one), never silently half-used.

**Identity status** (RNIV EXI SI 07): PROV, VALI, RECUP, QUAL.  DICOM has no
standard attribute for it, so the status is read from the attribute named by
``identity.status_attribute`` (a keyword or a ``gggg,eeee`` tag, private or
not; empty: none), whose value must be one of the four codes (or the French
words they stand for); anything else is ignored and logged.  Without an
explicit status, an INS sent by a site listed in ``identity.qualifying_sites``
is QUAL: such a site declares, by configuration, that it sends the matricule
only for qualified identities, which is what the RNIV requires of it.  Any
other identity is PROV: the archive never upgrades a status by itself.

**The five reference traits**: birth name, first given name at birth and the
list of given names, birth date, sex, INSEE code of the birthplace.  The
birth name and given names come from PatientBirthName (0010,1005) when sent,
else from PatientName: family name component, then the given names as the
given and middle components split on spaces (the first one is the first given
name).  DICOM has no birthplace attribute: the trait is read from the
attribute named by ``identity.birthplace_attribute`` when configured, else
derived from an INS-NIR, whose characters 6-10 are the INSEE code of the
birthplace (department + commune, or 99 + country for a birth abroad).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import Tag

INS_ISSUER = "ASIP-SANTE-INS-NIR"
OID_NIR = "1.2.250.1.213.1.4.8"
OID_NIA = "1.2.250.1.213.1.4.9"
OID_TEST_NIR = "1.2.250.1.213.1.4.10"
OID_DEMO_NIR = "1.2.250.1.213.1.4.11"
#: OID -> what it names
OIDS = {
    OID_NIR: "INS-NIR",
    OID_NIA: "INS-NIA",
    OID_TEST_NIR: "INS-NIR (test)",
    OID_DEMO_NIR: "INS-NIR (demo)",
}
TEST_OIDS = frozenset({OID_TEST_NIR, OID_DEMO_NIR})

#: identity status codes (FR Core IdentityStatus), and the words mapped onto them
STATUSES = ("PROV", "VALI", "RECUP", "QUAL")
_STATUS_WORDS = {
    "PROV": "PROV",
    "PROVISOIRE": "PROV",
    "PROVISIONAL": "PROV",
    "VALI": "VALI",
    "VALIDEE": "VALI",
    "VALIDATED": "VALI",
    "RECUP": "RECUP",
    "RECUPEREE": "RECUP",
    "RETRIEVED": "RECUP",
    "QUAL": "QUAL",
    "QUALIFIEE": "QUAL",
    "QUALIFIED": "QUAL",
}

_MATRICULE = re.compile(r"^[1-8]\d{4}(?:\d{2}|2A|2B)\d{8}$")


class InsError(ValueError):
    """An INS claim that cannot be used; the message says why, in words an
    administrator can act on."""


def matricule_error(matricule: str) -> str | None:
    """Why ``matricule`` is not a valid INS matricule, or None when it is."""
    text = matricule.strip().upper()
    if len(text) != 15:
        return f"an INS matricule has 15 characters, not {len(text)}"
    if not _MATRICULE.match(text):
        return (
            "an INS matricule is sex (1-8), year, month, department "
            "(2 digits, 2A or 2B, or 97x overseas), commune, serial and key, all digits"
        )
    body = text[:13].replace("2A", "19").replace("2B", "18")
    key = 97 - int(body) % 97
    if int(text[13:]) != key:
        return f"the check key is {text[13:]}, the matricule's digits give {key:02d}"
    return None


def is_valid_matricule(matricule: str) -> bool:
    return matricule_error(matricule) is None


def birthplace_of(matricule: str) -> str:
    """The INSEE code of the birthplace encoded in a NIR: characters 6-10
    (department + commune; 97x + 2 digits overseas; 99 + country abroad)."""
    return matricule.strip().upper()[5:10]


@dataclass(frozen=True)
class Ins:
    """A validated INS: the matricule and the OID saying what kind it is."""

    matricule: str
    oid: str

    @property
    def kind(self) -> str:
        return OIDS.get(self.oid, self.oid)

    @property
    def is_nir(self) -> bool:
        return self.oid in (OID_NIR, OID_TEST_NIR, OID_DEMO_NIR)


def check_ins(matricule: str, oid: str, *, accept_test: bool = False) -> Ins:
    """The INS (matricule, OID), validated; :class:`InsError` says why not.
    An empty OID with the INS issuer is read as INS-NIR (the ANS examples
    always send it, some producers do not)."""
    text = matricule.strip().upper()
    oid = oid.strip() or OID_NIR
    if oid not in OIDS:
        raise InsError(f"OID {oid} is not an INS OID (INS-NIR {OID_NIR}, INS-NIA {OID_NIA})")
    if oid in TEST_OIDS and not accept_test:
        raise InsError(
            f"OID {oid} is the {OIDS[oid]} identifier, refused outside a test configuration "
            "(setting identity.accept_test_ins)"
        )
    error = matricule_error(text)
    if error is not None:
        raise InsError(f"INS {text[:20]!r} is malformed: {error}")
    return Ins(text, oid)


@dataclass(frozen=True)
class Traits:
    """The five reference traits of an identity (any of them may be unknown: "")."""

    birth_name: str = ""
    first_given_name: str = ""
    #: every given name at birth, space-separated (INSi's form)
    given_names: str = ""
    birth_date: str = ""
    sex: str = ""  # M, F or "" (unknown / other)
    birthplace: str = ""  # INSEE code

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Traits:
        values = values or {}
        return cls(**{k: str(values.get(k) or "") for k in cls.__dataclass_fields__})


NAME_TRAITS = ("birth_name", "first_given_name")


def normalise_name(value: str, *, near: bool = True) -> str:
    """The form names are compared in.  ``near``: accents removed, case
    folded, hyphens, apostrophes and runs of spaces made one space (JEAN-PIERRE
    = Jean Pierre, Hélène = HELENE); otherwise only surrounding spaces are
    trimmed and case is folded (DICOM producers upper-case names freely)."""
    text = value.strip()
    if not near:
        return text.upper()
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    stripped = re.sub(r"[-'’`.,]", " ", stripped.upper())
    return " ".join(stripped.split())


def traits_match(a: Traits, b: Traits, *, near: bool = True) -> bool:
    """Whether two identities' traits designate the same person: the birth
    name, first given name, birth date and sex all known and equal (names in
    the compared form), and the birthplace equal when both know it.  Near
    matching also takes equal lists of given names for equal first given
    names: "MARIE-CLAIRE" sent as "MARIE CLAIRE" is one first name read as two."""
    for name in NAME_TRAITS:
        x = normalise_name(getattr(a, name), near=near)
        y = normalise_name(getattr(b, name), near=near)
        if x and x == y:
            continue
        if near and name == "first_given_name":
            x, y = normalise_name(a.given_names), normalise_name(b.given_names)
            if x and x == y:
                continue
        return False
    if not a.birth_date or a.birth_date != b.birth_date:
        return False
    if not a.sex or a.sex != b.sex:
        return False
    return not (a.birthplace and b.birthplace and a.birthplace != b.birthplace)


def differences(a: Traits, b: Traits, *, near: bool = True) -> list[str]:
    """The traits known on both sides that differ (names in the compared form)."""
    out = []
    for name in Traits.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if name in NAME_TRAITS or name == "given_names":
            x, y = normalise_name(x, near=near), normalise_name(y, near=near)
        if x and y and x != y:
            out.append(name)
    return out


@dataclass(frozen=True)
class Observed:
    """What an instance says about its patient, beyond the local key: read by
    :func:`observe`, fast and without side effects."""

    ins: Ins | None = None
    #: why an INS claim was refused (the identity stays a plain local one)
    ins_error: str = ""
    status: str = "PROV"
    traits: Traits = field(default_factory=Traits)
    #: why the status attribute's value was ignored
    status_error: str = ""

    def as_detail(self) -> dict[str, Any]:
        return {
            "ins": self.ins.matricule if self.ins else "",
            "ins_oid": self.ins.oid if self.ins else "",
            "ins_error": self.ins_error,
            "status": self.status,
            "traits": self.traits.as_dict(),
        }


@dataclass(frozen=True)
class Reading:
    """How to read identities (from the ``identity.*`` settings)."""

    accept_test_ins: bool = False
    status_attribute: str = ""
    birthplace_attribute: str = ""
    qualifying_sites: frozenset[str] = frozenset()


def _text(value: Any) -> str:
    if value is None:
        return ""
    return str(value).strip()


def _qualifier_oid(item: Dataset) -> str:
    seq = item.get("IssuerOfPatientIDQualifiersSequence")
    for q in seq or ():
        oid = _text(q.get("UniversalEntityID"))
        if oid:
            return oid
    return ""


def _ins_claims(ds: Dataset) -> Iterable[tuple[str, str]]:
    """(matricule, OID) of every identifier that claims to be an INS: the
    main PatientID, then the Other Patient IDs items."""
    for item in [ds, *(ds.get("OtherPatientIDsSequence") or ())]:
        issuer = _text(item.get("IssuerOfPatientID"))
        oid = _qualifier_oid(item)
        pid = _text(item.get("PatientID"))
        if pid and (issuer == INS_ISSUER or oid in OIDS):
            yield pid, oid


def _attribute(ds: Dataset, name: str) -> str:
    """The value of the attribute named by a keyword or a ``gggg,eeee`` tag."""
    name = name.strip()
    if not name:
        return ""
    if "," in name or (len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name)):
        group, _, element = name.replace("(", "").replace(")", "").partition(",")
        tag = Tag(int(group, 16), int(element, 16)) if element else Tag(int(name, 16))
        elem = ds.get(tag)
        return _text(elem.value if elem is not None else None)
    return _text(ds.get(name))


def read_traits(ds: Dataset, ins: Ins | None, birthplace_attribute: str = "") -> Traits:
    """The reference traits an instance carries (see the module's docstring)."""
    birth = ds.get("PatientBirthName")
    name = birth if birth not in (None, "") else ds.get("PatientName")
    family = given = middle = ""
    if name not in (None, ""):
        family = _text(getattr(name, "family_name", ""))
        given = _text(getattr(name, "given_name", ""))
        middle = _text(getattr(name, "middle_name", ""))
    given_names = " ".join((given + " " + middle).split())
    sex = _text(ds.get("PatientSex")).upper()
    birthplace = _attribute(ds, birthplace_attribute) if birthplace_attribute else ""
    if not birthplace and ins is not None and ins.is_nir:
        birthplace = birthplace_of(ins.matricule)
    return Traits(
        birth_name=family,
        first_given_name=given_names.split(" ")[0] if given_names else "",
        given_names=given_names,
        birth_date=_text(ds.get("PatientBirthDate")),
        sex=sex if sex in ("M", "F") else "",
        birthplace=birthplace,
    )


def status_code(value: str) -> str | None:
    """The status code a value stands for (PROV, VALI, RECUP, QUAL), or None."""
    word = normalise_name(value).replace(" ", "")
    return _STATUS_WORDS.get(word)


def observe(ds: Dataset, site: str, reading: Reading) -> Observed:
    """The INS, status and traits an instance carries (no side effect)."""
    ins: Ins | None = None
    ins_error = ""
    for matricule, oid in _ins_claims(ds):
        try:
            ins = check_ins(matricule, oid, accept_test=reading.accept_test_ins)
            ins_error = ""
            break
        except InsError as exc:
            ins_error = ins_error or str(exc)
    status, status_error = "PROV", ""
    raw = _attribute(ds, reading.status_attribute) if reading.status_attribute else ""
    code = status_code(raw) if raw else None
    if raw and code is None:
        status_error = f"identity status {raw[:20]!r} is not one of {', '.join(STATUSES)}"
    if code is not None:
        status = code
    elif ins is not None and site in reading.qualifying_sites:
        status = "QUAL"
    traits = read_traits(ds, ins, reading.birthplace_attribute)
    return Observed(ins, ins_error, status, traits, status_error)
