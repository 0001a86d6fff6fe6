"""The regional patient index on each index backend: instances go through the
real ingest pipeline, the ``identity`` subscriber runs on a real job worker,
and what the index then holds -- links, proposals, conflicts, merges -- is
read back from its tables.  Search by INS goes through the one query model
with each site's scope."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from archive import plugins
from archive.config import Config
from archive.identity import Source
from archive.identity.ins import INS_ISSUER, OID_NIR
from archive.identity.regional import SYSTEM, Actor, IdentityError, RegionalIdentity, RegionalIndex
from archive.jobs import Worker
from archive.query import Query, search
from archive.runtime import Archive
from archive.security.scope import Scope
from tests.dicomfiles import make_instance

INS = "279035121518989"  # the ANS test INS (a valid NIR)
OFFICER = Actor("vigilance-officer", "user", "identity-vigilance", "127.0.0.1")


def instance(
    patient_id: str,
    issuer: str,
    name: str = "DE VINCI^RUTH",
    birth: str = "19790315",
    *,
    sex: str = "F",
    ins: str | None = None,
    in_other_ids: bool = False,
    study: str | None = None,
) -> bytes:
    """A CT instance of one patient; ``ins`` encoded as the ANS DRIM-M examples do."""

    def edit(ds: pydicom.FileDataset) -> None:
        ds.PatientID = patient_id
        ds.IssuerOfPatientID = issuer
        ds.PatientName = name
        ds.PatientBirthDate = birth
        ds.PatientSex = sex
        if ins is not None:
            item = Dataset()
            item.PatientID = ins
            item.IssuerOfPatientID = INS_ISSUER
            qualifier = Dataset()
            qualifier.UniversalEntityID = OID_NIR
            qualifier.UniversalEntityIDType = "ISO"
            item.IssuerOfPatientIDQualifiersSequence = [qualifier]
            if in_other_ids:
                item.TypeOfPatientID = "TEXT"
                ds.OtherPatientIDsSequence = [item]
            else:
                ds.PatientID = ins
                ds.IssuerOfPatientID = INS_ISSUER
                ds.IssuerOfPatientIDQualifiersSequence = [qualifier]

    return make_instance(edit, study=study)


@pytest.fixture
def regional(make_config: Callable[..., Config], index_url: str) -> Iterator[Archive]:
    with Archive(make_config(index_url=index_url)) as archive:
        yield archive


def store(archive: Archive, data: bytes, site: str) -> str:
    result = archive.pipeline.ingest(data, Source("import", site=site))
    assert result.ok, result.reason
    return result.study_uid


def settle(archive: Archive) -> None:
    """Run every due job (the identity subscriber's among them) to the end."""
    worker = Worker(archive, "identity-test", poll_interval=0.02).start()
    try:
        assert worker.wait_idle(60)
    finally:
        worker.stop()


def index(archive: Archive) -> RegionalIndex:
    provider = archive.identity
    assert isinstance(provider, RegionalIdentity)
    return provider.index(archive.db, archive.audit)


def regional_of(archive: Archive, site: str, patient_id: str) -> str:
    return archive.db.scalar(
        "SELECT r.regional_id FROM identity_links l JOIN patients p ON p.id = l.patient_ref "
        "JOIN identity_regional r ON r.id = l.regional_ref WHERE p.site = ? AND p.patient_id = ?",
        (site, patient_id),
    )


def by_ins(archive: Archive, scope: Scope | None, ins: str = INS) -> set[str]:
    query = Query(
        "STUDY",
        {"PatientID": ins, "IssuerOfPatientID": INS_ISSUER},
        ["StudyInstanceUID"],
        scope=scope,
        identity=archive.identity,
    )
    return {row["StudyInstanceUID"] for row in search(archive.db, query)}


def audit_actions(archive: Archive) -> list[tuple[str, str, dict]]:
    return [
        (r[0], r[1], json.loads(r[2] or "{}"))
        for r in archive.db.query("SELECT actor, action, detail FROM audit ORDER BY id")
    ]


def test_two_producers_sending_the_same_woman_under_two_local_ids_get_a_link_proposal(
    regional: Archive,
) -> None:
    store(regional, instance("IPP-A-1", "CHU-A", "Hélène^Marie-Claire"), "A")
    store(regional, instance("B-77", "CLINIQUE-B", "HELENE^MARIE CLAIRE"), "B")
    settle(regional)
    a, b = regional_of(regional, "A", "IPP-A-1"), regional_of(regional, "B", "B-77")
    assert a and b and a != b  # nothing merged by itself
    [item] = index(regional).queue()
    assert (item["kind"], item["reason"], item["state"]) == ("proposal", "near-traits", "open")
    assert {item["regional_a"], item["regional_b"]} == {a, b}
    assert ("identity-index", "identity.proposal.queued") in [
        x[:2] for x in audit_actions(regional)
    ]


def test_the_same_site_under_two_ids_or_different_traits_is_not_proposed(
    regional: Archive,
) -> None:
    store(regional, instance("IPP-1", "CHU-A"), "A")
    store(regional, instance("IPP-2", "CHU-A"), "A")  # a duplicate within a site: its own PACS'
    store(regional, instance("B-1", "CLINIQUE-B", birth="19790316"), "B")
    store(regional, instance("C-1", "CLINIQUE-C", sex="M"), "C")
    settle(regional)
    assert index(regional).queue() == []


def test_exact_matching_proposes_only_identical_names(
    make_config: Callable[..., Config], index_url: str
) -> None:
    config = make_config(index_url=index_url, settings={"identity.near_match": False})
    with Archive(config) as archive:
        store(archive, instance("A-1", "CHU-A", "HÉLÈNE^MARIE"), "A")
        store(archive, instance("B-1", "CLINIQUE-B", "HELENE^MARIE"), "B")
        store(archive, instance("C-1", "CLINIQUE-C", "Hélène^Marie"), "C")
        settle(archive)
        [item] = index(archive).queue()  # A and C: the same letters, case aside
        assert item["reason"] == "same-traits"
        assert {item["regional_a"], item["regional_b"]} == {
            regional_of(archive, "A", "A-1"),
            regional_of(archive, "C", "C-1"),
        }


def test_the_same_ins_with_another_birth_date_is_a_conflict_in_the_queue(
    regional: Archive,
) -> None:
    store(regional, instance("IPP-A", "CHU-A", ins=INS, in_other_ids=True), "A")
    store(
        regional, instance("B-9", "CLINIQUE-B", birth="19790513", ins=INS, in_other_ids=True), "B"
    )
    settle(regional)
    [item] = index(regional).queue()
    assert (item["kind"], item["reason"]) == ("conflict", "ins-traits")
    assert item["detail"]["traits"] == ["birth_date"]
    assert item["regional_a"] == regional_of(regional, "A", "IPP-A")
    assert item["regional_b"] == regional_of(regional, "B", "B-9")
    # the INS still finds both (each site's producer says it is this INS), until resolved
    assert len(by_ins(regional, None)) == 2


def test_an_ins_links_two_sites_and_each_site_finds_only_its_own_studies_by_ins(
    regional: Archive,
) -> None:
    # site A sends the INS as the main PatientID, site B in Other Patient IDs
    a = store(regional, instance(INS, INS_ISSUER, ins=INS), "A")
    b = store(regional, instance("B-9", "CLINIQUE-B", ins=INS, in_other_ids=True), "B")
    c = store(regional, instance("C-3", "CLINIQUE-C", "DURAND^JEANNE", "19500101"), "C")
    settle(regional)
    assert regional_of(regional, "A", INS) == regional_of(regional, "B", "B-9")
    assert index(regional).queue() == []  # the INS and the traits agree: linked, nothing to ask
    assert by_ins(regional, None) == {a, b}
    assert by_ins(regional, Scope.of(["A"])) == {a}
    assert by_ins(regional, Scope.of(["B"])) == {b}
    assert by_ins(regional, Scope.of(["C"])) == set()  # another site: nothing, no hint
    assert c not in by_ins(regional, None)
    # the answer carries the site's own local identifiers
    rows = search(
        regional.db,
        Query(
            "STUDY",
            {"PatientID": INS, "IssuerOfPatientID": INS_ISSUER},
            ["StudyInstanceUID", "PatientName"],
            scope=Scope.of(["B"]),
            identity=regional.identity,
        ),
    )
    assert [(r["PatientID"], r["IssuerOfPatientID"]) for r in rows] == [("B-9", "CLINIQUE-B")]
    # by regional identifier too
    rid = regional_of(regional, "B", "B-9")
    query = Query(
        "STUDY",
        {"PatientID": rid, "IssuerOfPatientID": "IMAG-RPI"},
        ["StudyInstanceUID"],
        identity=regional.identity,
    )
    assert {r["StudyInstanceUID"] for r in search(regional.db, query)} == {a, b}


def test_a_malformed_ins_is_filed_as_a_plain_local_id_with_the_reason_logged(
    regional: Archive, caplog: pytest.LogCaptureFixture
) -> None:
    bad = "295109912611199"
    with caplog.at_level(logging.WARNING, logger="archive.identity.regional"):
        study = store(regional, instance(bad, INS_ISSUER, ins=bad), "A")
    assert any(
        "INS refused" in r.getMessage() and "check key is 99" in r.__dict__.get("reason", "")
        for r in caplog.records
    )
    settle(regional)
    link = regional.db.query_one(
        "SELECT l.ins, r.ins FROM identity_links l JOIN identity_regional r "
        "ON r.id = l.regional_ref JOIN patients p ON p.id = l.patient_ref WHERE p.patient_id = ?",
        (bad,),
    )
    assert link == (None, None)  # no INS recorded anywhere
    # searched as what it was filed as: the producer's local ID, in its own scope
    assert by_ins(regional, Scope.of(["A"]), bad) == {study}
    assert by_ins(regional, Scope.of(["B"]), bad) == set()


def test_the_same_local_id_with_other_traits_over_time_is_a_conflict(regional: Archive) -> None:
    store(regional, instance("IPP-5", "CHU-A", birth="19790315"), "A")
    settle(regional)
    store(regional, instance("IPP-5", "CHU-A", birth="19790316"), "A")
    settle(regional)
    [item] = index(regional).queue()
    assert (item["kind"], item["reason"]) == ("conflict", "local-traits")
    assert item["detail"]["before"]["birth_date"] == "19790315"
    assert item["detail"]["after"]["birth_date"] == "19790316"
    # the regional identity keeps its reference traits
    assert index(regional).regional(item["regional_a"])["birth_date"] == "19790315"


def test_ingest_records_one_observation_per_new_identity_not_per_instance(
    regional: Archive,
) -> None:
    study = generate_uid()
    for _ in range(5):
        store(regional, instance("IPP-7", "CHU-A", study=study), "A")
    store(regional, instance("IPP-7", "CHU-A", birth="19800101", study=study), "A")
    count = regional.db.scalar("SELECT COUNT(*) FROM changes WHERE type = 'identity.observed'")
    assert count == 2


def snapshot(archive: Archive) -> dict[str, Any]:
    """Everything the regional index holds about identities, field by field,
    and which studies each regional identity reaches."""
    db = archive.db
    regional = db.query("SELECT * FROM identity_regional ORDER BY id")
    links = db.query("SELECT * FROM identity_links ORDER BY patient_ref")
    queue = db.query(
        "SELECT id, kind, reason, regional_a, regional_b, patient_ref, detail, state, "
        "decided_at, decided_by, note FROM identity_queue ORDER BY id"
    )
    studies = {
        r[0]: index(archive).show(r[0], None)
        for r in db.query("SELECT regional_id FROM identity_regional ORDER BY id")
    }
    patients = db.query("SELECT * FROM patients ORDER BY id")
    study_rows = db.query("SELECT id, patient_ref, study_uid, site FROM studies ORDER BY id")
    return {
        "regional": regional,
        "links": links,
        "queue": queue,
        "shown": studies,
        "patients": patients,
        "studies": study_rows,
    }


def test_merge_then_unmerge_restores_both_identities_and_their_studies_exactly(
    regional: Archive,
) -> None:
    a1 = store(regional, instance("IPP-A", "CHU-A", ins=INS, in_other_ids=True), "A")
    a2 = store(regional, instance("IPP-A", "CHU-A", ins=INS, in_other_ids=True), "A")
    b1 = store(regional, instance("B-9", "CLINIQUE-B"), "B")
    settle(regional)
    [proposal] = index(regional).queue()
    survivor, merged = regional_of(regional, "A", "IPP-A"), regional_of(regional, "B", "B-9")
    before = snapshot(regional)

    merge = index(regional).accept(proposal["id"], OFFICER, "same woman, checked")
    assert (merge["survivor"], merge["merged"]) == (survivor, merged)  # the INS holder survives
    shown = index(regional).show(survivor, None)
    assert sorted(s for li in shown["local_identities"] for s in li["studies"]) == sorted(
        [a1, a2, b1]
    )
    assert index(regional).show(merged, None)["merged_into"] == survivor
    assert by_ins(regional, None) == {a1, a2, b1}
    assert by_ins(regional, Scope.of(["B"])) == {b1}
    assert index(regional).queue("accepted")[0]["id"] == proposal["id"]

    index(regional).unmerge(merge["id"], OFFICER, "wrong after all")
    after = snapshot(regional)
    for part in before:
        assert after[part] == before[part], part
    assert by_ins(regional, None) == {a1, a2}

    entries = [(actor, action) for actor, action, _ in audit_actions(regional)]
    assert ("vigilance-officer", "identity.merged") in entries
    assert ("vigilance-officer", "identity.proposal.accepted") in entries
    assert ("vigilance-officer", "identity.unmerged") in entries


def test_a_merge_can_be_redone_and_undone_again_and_a_double_unmerge_is_refused(
    regional: Archive,
) -> None:
    store(regional, instance("IPP-A", "CHU-A"), "A")
    store(regional, instance("B-9", "CLINIQUE-B", birth="20010101"), "B")
    settle(regional)
    a, b = regional_of(regional, "A", "IPP-A"), regional_of(regional, "B", "B-9")
    before = snapshot(regional)
    first = index(regional).merge(a, b, OFFICER)
    index(regional).unmerge(first["id"], OFFICER)
    with pytest.raises(IdentityError, match="already undone") as refused:
        index(regional).unmerge(first["id"], OFFICER)
    assert refused.value.status == 409
    assert snapshot(regional) == before
    second = index(regional).merge(b, a, OFFICER)
    assert second["id"] != first["id"]
    assert index(regional).show(a, None)["merged_into"] == b


def test_merges_that_cannot_be_are_refused_and_change_nothing(regional: Archive) -> None:
    store(regional, instance("IPP-A", "CHU-A"), "A")
    store(regional, instance("B-9", "CLINIQUE-B", birth="20010101"), "B")
    store(regional, instance("C-1", "CLINIQUE-C", birth="20020202"), "C")
    settle(regional)
    a, b, c = (regional_of(regional, s, p) for s, p in (("A", "IPP-A"), ("B", "B-9"), ("C", "C-1")))
    before = snapshot(regional)
    cases = [
        (lambda: index(regional).merge(a, a, OFFICER), 409, "into itself"),
        (lambda: index(regional).merge(a, "RPI999999999", OFFICER), 404, "no regional identity"),
        (lambda: index(regional).unmerge(4242, OFFICER), 404, "no merge 4242"),
        (lambda: index(regional).accept(4242, OFFICER), 404, "no item 4242"),
    ]
    for call, status, message in cases:
        with pytest.raises(IdentityError, match=message) as refused:
            call()
        assert refused.value.status == status
    assert snapshot(regional) == before
    # a later merge of the survivor must be undone first
    first = index(regional).merge(a, b, OFFICER)
    index(regional).merge(c, a, OFFICER)
    with pytest.raises(IdentityError, match="unmerge that one first"):
        index(regional).unmerge(first["id"], OFFICER)


def test_two_identities_with_different_ins_are_never_merged(regional: Archive) -> None:
    other = "185059721234524"
    store(regional, instance("IPP-A", "CHU-A", ins=INS, in_other_ids=True), "A")
    store(regional, instance("B-9", "CLINIQUE-B", ins=other, in_other_ids=True), "B")
    settle(regional)
    assert index(regional).queue() == []  # same traits, but two INS: two people
    with pytest.raises(IdentityError, match="two different INS"):
        index(regional).merge(
            regional_of(regional, "A", "IPP-A"), regional_of(regional, "B", "B-9"), OFFICER
        )


def test_a_conflict_is_resolved_by_dismissing_with_a_note_or_by_merging(
    regional: Archive,
) -> None:
    store(regional, instance("IPP-A", "CHU-A", ins=INS, in_other_ids=True), "A")
    store(
        regional, instance("B-9", "CLINIQUE-B", birth="19790513", ins=INS, in_other_ids=True), "B"
    )
    settle(regional)
    [conflict] = index(regional).queue()
    with pytest.raises(IdentityError, match="needs a note"):
        index(regional).resolve(conflict["id"], OFFICER, "dismiss")
    with pytest.raises(IdentityError, match="not a proposal"):
        index(regional).accept(conflict["id"], OFFICER)
    done = index(regional).resolve(conflict["id"], OFFICER, "merge", "birth date typo at B")
    assert (done["state"], done["decided_by"]) == ("resolved", "vigilance-officer")
    assert regional_of(regional, "A", "IPP-A") == regional_of(regional, "B", "B-9")
    with pytest.raises(IdentityError, match="already resolved"):
        index(regional).resolve(conflict["id"], OFFICER, "dismiss", "again")
    assert SYSTEM.name != OFFICER.name


@pytest.fixture
def stub_plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("IMAG_PLUGINS", "tests.plugins.identity_stub")
    plugins.reset()
    yield
    monkeypatch.delenv("IMAG_PLUGINS")
    plugins.reset()


def test_a_replacement_provider_chosen_by_config_changes_what_ingest_files(
    stub_plugin: None, make_config: Callable[..., Config], index_url: str
) -> None:
    config = make_config(index_url=index_url, settings={"plugins.identity": "stub-mpi"})
    with Archive(config) as archive:
        study = store(archive, instance("ipp-a", "CHU-A", ins=INS, in_other_ids=True), "A")
        settle(archive)
        patient = archive.db.query_one("SELECT site, issuer, patient_id FROM patients")
        assert patient == ("A", "STUB-MPI", "IPP-A")
        # the regional index is not the provider: it records nothing
        assert (
            archive.db.scalar("SELECT COUNT(*) FROM changes WHERE type = 'identity.observed'") == 0
        )
        assert archive.db.scalar("SELECT COUNT(*) FROM identity_links") == 0
        # and searches go through the replacement's patient_refs
        query = Query(
            "STUDY",
            {"PatientID": "ipp-a", "IssuerOfPatientID": "STUB-MPI"},
            ["StudyInstanceUID"],
            scope=Scope.of(["A"]),
            identity=archive.identity,
        )
        assert [r["StudyInstanceUID"] for r in search(archive.db, query)] == [study]
