"""The INS as the ANS defines it and as DICOM carries it: matricule check keys
(the ANS and python-stdnum test vectors, Corsica, overseas departments), the
OIDs (test and demo refused outside a test configuration), where the ANS
DRIM-M examples put it in a data set, the status codes and the five traits."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from archive.identity.ins import (
    INS_ISSUER,
    OID_DEMO_NIR,
    OID_NIA,
    OID_NIR,
    OID_TEST_NIR,
    InsError,
    Reading,
    Traits,
    check_ins,
    differences,
    is_valid_matricule,
    matricule_error,
    normalise_name,
    observe,
    status_code,
    traits_match,
)

VALID = ["295109912611193", "253072B07300470", "253072A07300443", "279035121518989"]
#: overseas births: 3-digit departments (Martinique 972, Guadeloupe 971, Guyane 973),
#: keys worked out by hand from 97 - (13 digits mod 97)
OVERSEAS = {"185059721234524": "97212", "292039730501252": "97305"}


@pytest.mark.parametrize("matricule", VALID)
def test_the_ans_test_vectors_are_valid_matricules(matricule: str) -> None:
    assert matricule_error(matricule) is None


def test_a_wrong_check_key_is_refused_with_the_expected_key() -> None:
    assert matricule_error("295109912611199") == (
        "the check key is 99, the matricule's digits give 93"
    )


@pytest.mark.parametrize("matricule", ["253072B07300470", "253072A07300443"])
def test_corsica_keys_are_computed_after_2a_19_and_2b_18(matricule: str) -> None:
    assert is_valid_matricule(matricule)
    # the same digits with the other Corsican department: the key no longer fits
    other = matricule.replace("2B", "2X").replace("2A", "2B").replace("2X", "2A")
    assert not is_valid_matricule(other)
    # the department read as 20 (Corsica before 1976) does not give this key either
    assert not is_valid_matricule(matricule[:5] + "20" + matricule[7:])


@pytest.mark.parametrize(("matricule", "birthplace"), OVERSEAS.items())
def test_overseas_births_use_three_digit_departments(matricule: str, birthplace: str) -> None:
    assert is_valid_matricule(matricule)
    ins = check_ins(matricule, OID_NIR)
    ds = _ins_dataset(matricule, OID_NIR)
    assert observe(ds, "A", Reading()).traits.birthplace == birthplace
    assert ins.is_nir


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("29510991261119", "15 characters, not 14"),
        ("2951099126111933", "15 characters, not 16"),
        ("295109912611X93", "all digits"),
        ("995109912611193", "sex (1-8)"),
        ("", "15 characters, not 0"),
    ],
)
def test_a_malformed_matricule_says_what_is_wrong(value: str, reason: str) -> None:
    assert reason in (matricule_error(value) or "")


def test_the_oids_say_what_the_identifier_is_and_unknown_oids_are_refused() -> None:
    assert check_ins("279035121518989", OID_NIR).kind == "INS-NIR"
    assert check_ins("279035121518989", OID_NIA).kind == "INS-NIA"
    assert check_ins("279035121518989", "").oid == OID_NIR  # the INS issuer alone: a NIR
    with pytest.raises(InsError, match="not an INS OID"):
        check_ins("279035121518989", "1.2.3.4")


@pytest.mark.parametrize("oid", [OID_TEST_NIR, OID_DEMO_NIR])
def test_test_and_demo_oids_are_refused_outside_a_test_configuration(oid: str) -> None:
    with pytest.raises(InsError, match="identity.accept_test_ins"):
        check_ins("279035121518989", oid)
    assert check_ins("279035121518989", oid, accept_test=True).oid == oid


def _ins_dataset(matricule: str, oid: str, *, in_other_ids: bool = False) -> Dataset:
    """A data set encoded as the ANS DRIM-M KOS example: the INS as the main
    PatientID with its issuer and qualifiers, or (``in_other_ids``) a local
    IPP as PatientID and the INS in Other Patient IDs Sequence."""
    ins = Dataset()
    ins.PatientID = matricule
    ins.IssuerOfPatientID = INS_ISSUER
    qualifier = Dataset()
    qualifier.UniversalEntityID = oid
    qualifier.UniversalEntityIDType = "ISO"
    ins.IssuerOfPatientIDQualifiersSequence = [qualifier]
    ins.TypeOfPatientID = "TEXT"
    ds = Dataset()
    if in_other_ids:
        ds.PatientID = "IPP101"
        ds.IssuerOfPatientID = "CHU-A"
        ds.OtherPatientIDsSequence = [ins]
    else:
        ds.PatientID = ins.PatientID
        ds.IssuerOfPatientID = ins.IssuerOfPatientID
        ds.IssuerOfPatientIDQualifiersSequence = ins.IssuerOfPatientIDQualifiersSequence
    ds.PatientName = "DE VINCI^RUTH^ALICE"
    ds.PatientBirthDate = "19790315"
    ds.PatientSex = "F"
    return ds


@pytest.mark.parametrize("in_other_ids", [False, True])
def test_the_ins_is_read_where_the_drim_m_examples_put_it(in_other_ids: bool) -> None:
    seen = observe(
        _ins_dataset("279035121518989", OID_NIR, in_other_ids=in_other_ids), "A", Reading()
    )
    assert seen.ins is not None and seen.ins.matricule == "279035121518989"
    assert seen.ins.oid == OID_NIR
    assert seen.ins_error == ""
    assert seen.traits == Traits("DE VINCI", "RUTH", "RUTH ALICE", "19790315", "F", "51215")


def test_a_malformed_ins_claim_is_no_ins_and_says_why() -> None:
    seen = observe(_ins_dataset("295109912611199", OID_NIR), "A", Reading())
    assert seen.ins is None
    assert "check key is 99" in seen.ins_error


def test_a_test_ins_is_refused_unless_the_configuration_accepts_it() -> None:
    ds = _ins_dataset("279035121518989", OID_TEST_NIR)
    assert observe(ds, "A", Reading()).ins is None
    assert "test configuration" in observe(ds, "A", Reading()).ins_error
    assert observe(ds, "A", Reading(accept_test_ins=True)).ins is not None


def test_the_birth_name_and_given_names_come_from_patient_birth_name_when_sent() -> None:
    ds = _ins_dataset("279035121518989", OID_NIR)
    ds.PatientName = "MARTIN^RUTH"  # the name used
    ds.PatientBirthName = "DE VINCI^RUTH^ALICE MARIE"
    traits = observe(ds, "A", Reading()).traits
    assert (traits.birth_name, traits.first_given_name, traits.given_names) == (
        "DE VINCI",
        "RUTH",
        "RUTH ALICE MARIE",
    )


def test_a_configured_birthplace_attribute_wins_over_the_nir() -> None:
    ds = _ins_dataset("279035121518989", OID_NIR)
    ds.add_new(0x00111010, "LO", "99")  # private creator block
    ds.add_new(0x00110010, "LO", "REGION")
    ds.add_new(0x00111010, "LO", "97209")
    traits = observe(ds, "A", Reading(birthplace_attribute="0011,1010")).traits
    assert traits.birthplace == "97209"


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("QUAL", "QUAL"),
        ("qualifiée", "QUAL"),
        ("VALI", "VALI"),
        ("Récupérée", "RECUP"),
        ("RECUP", "RECUP"),
        ("PROV", "PROV"),
        ("provisional", "PROV"),
        ("GOOD", None),
    ],
)
def test_status_codes_are_mapped_explicitly(value: str, code: str | None) -> None:
    assert status_code(value) == code


def test_the_status_is_read_from_the_configured_attribute_or_the_qualifying_site() -> None:
    ds = _ins_dataset("279035121518989", OID_NIR)
    assert observe(ds, "A", Reading()).status == "PROV"  # nothing says more
    assert observe(ds, "A", Reading(qualifying_sites=frozenset({"A"}))).status == "QUAL"
    assert observe(ds, "B", Reading(qualifying_sites=frozenset({"A"}))).status == "PROV"
    ds.PatientComments = "RECUP"
    reading = Reading(status_attribute="PatientComments", qualifying_sites=frozenset({"A"}))
    assert observe(ds, "A", reading).status == "RECUP"  # explicit beats the site's default
    ds.PatientComments = "SURE"
    seen = observe(ds, "B", reading)
    assert seen.status == "PROV" and "not one of" in seen.status_error


def test_near_matching_ignores_accents_hyphens_and_case_and_exact_does_not() -> None:
    assert normalise_name("Hélène-Marie  d'Arc") == "HELENE MARIE D ARC"
    a = Traits("DUPONT", "JEAN-PIERRE", "JEAN-PIERRE", "19800101", "M", "")
    b = Traits("Dupont", "Jean Pierre", "Jean Pierre", "19800101", "M", "97209")
    assert traits_match(a, b, near=True)
    assert not traits_match(a, b, near=False)
    assert differences(a, b, near=True) == []


def test_traits_match_needs_every_strict_trait() -> None:
    a = Traits("DUPONT", "MARIE", "MARIE", "19800101", "F", "97209")
    assert not traits_match(a, Traits("DUPONT", "MARIE", "MARIE", "19800102", "F", "97209"))
    assert not traits_match(a, Traits("DUPONT", "MARIE", "MARIE", "19800101", "M", "97209"))
    assert not traits_match(a, Traits("DUPONT", "MARIE", "MARIE", "19800101", "F", "97101"))
    assert not traits_match(Traits(), Traits())  # nothing known is no match
    assert traits_match(a, Traits("DUPONT", "MARIE", "", "19800101", "F", ""))
