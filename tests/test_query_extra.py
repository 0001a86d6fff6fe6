"""QIDO-RS and C-FIND beyond the index's columns: the extra attributes of
``index.extra_attributes`` (ImageLaterality, ViewPosition, Laterality,
ProtocolName, AcquisitionDate...) matched and returned, on SQLite and
PostgreSQL.

One real ``imag serve`` per backend holds two screening mammography studies
(the four views R/L x CC/MLO, one series per side), one of site A and one of
site B, and a CT instance of site A that carries none of the attributes.
QIDO-RS is asked through dicomweb-client and raw requests (where a header is
the point); C-FIND through pynetdicom from each site's AE.  The ingest
transaction, the reindex command and the setting's checks are tested on an
archive opened in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from archive.config import Config, ConfigError, load_config
from archive.identity import Source
from archive.index import Catalog, open_database
from archive.index import upgrade as upgrade_index
from archive.index.extra import ExtraValue
from archive.query import Query, QueryError, extra_attributes, search
from archive.runtime import Archive
from tests.dicomfiles import make_instance
from tests.httpserver import HttpImag, running_imag
from tests.processes import HOST, free_port
from tests.test_index import record

MG = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation
EXTRA = {
    "series": ["Laterality", "ProtocolName", "BodyPartExamined"],
    "instance": ["ImageLaterality", "ViewPosition", "AcquisitionDate"],
}
VIEWS = [("R", "CC"), ("R", "MLO"), ("L", "CC"), ("L", "MLO")]


def mammogram(study: str, series: str, side: str, view: str, day: str) -> bytes:
    """One screening view: MG, its side and view, acquired on ``day``."""

    def edit(ds: pydicom.Dataset) -> None:
        ds.SOPClassUID = MG
        ds.file_meta.MediaStorageSOPClassUID = MG
        ds.Modality = "MG"
        ds.PatientID = f"P-{study[-6:]}"
        ds.Laterality = side
        ds.ImageLaterality = side
        ds.ViewPosition = view
        ds.ProtocolName = "DEPISTAGE"
        ds.BodyPartExamined = "BREAST"
        ds.AcquisitionDate = day

    return make_instance(edit, study=study, series=series)


def sop_of(data: bytes) -> str:
    return str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).SOPInstanceUID)


def stow_body(items: list[bytes], boundary: str = "extra-test") -> tuple[bytes, dict[str, str]]:
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
        for data in items
    )
    body += f"--{boundary}--\r\n".encode()
    return body, {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
    }


@dataclass
class World:
    server: HttpImag
    site_token: str  # a radiologist of site A
    studies: dict[str, str]  # site -> Study Instance UID
    views: dict[tuple[str, str, str], str]  # (site, side, view) -> SOP Instance UID
    ct: str  # the CT instance of site A (no extra attribute)

    def qido(self, path: str, token: str | None = None, **params: str) -> requests.Response:
        headers = {"Authorization": f"Bearer {token or self.server.token}"}
        return requests.get(self.server.dicomweb + path, params=params, headers=headers, timeout=30)

    def find(self, aet: str, identifier: Dataset) -> list[Dataset]:
        """A Study Root C-FIND from ``aet``; the pending answers."""
        ae = AE(ae_title=aet)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate(HOST, self.server.dicom_port, ae_title=self.server.aet)
        assert assoc.is_established
        try:
            answers = []
            for status, found in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind
            ):
                assert status is not None and status.Status in (0x0000, 0xFF00), status
                if status.Status == 0xFF00:
                    answers.append(found)
            return answers
        finally:
            assoc.release()


@pytest.fixture(scope="module")
def index_url(module_index_url: str) -> str:
    return module_index_url


@pytest.fixture(scope="module")
def world(index_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    port = free_port()
    peers = [
        {"aet": "SITE_A", "host": HOST, "port": port, "site": "A"},
        {"aet": "SITE_B", "host": HOST, "port": port, "site": "B"},
    ]
    settings = {
        "IMAG_DICOM_PEERS": json.dumps(peers),
        "IMAG_DICOM_ACCEPT_UNKNOWN": "false",
        "IMAG_INDEX_EXTRA_ATTRIBUTES": json.dumps(EXTRA),
    }
    with running_imag(
        tmp_path_factory.mktemp("imag"), index_url=index_url, dicom=True, settings=settings
    ) as server:
        env = server.env
        done = subprocess.run(
            [sys.executable, "-m", "archive.cli", "user", "add", "rad-a", "--role", "radiologist"]
            + ["--site", "A"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        done = subprocess.run(
            [sys.executable, "-m", "archive.cli", "token", "create", "rad-a"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        site_token = done.stdout.strip()
        studies, views = {}, {}
        ct = b""
        for site, day in (("A", "20260310"), ("B", "20260311")):
            studies[site] = generate_uid()
            series = {"R": generate_uid(), "L": generate_uid()}
            items = []
            for side, view in VIEWS:
                data = mammogram(studies[site], series[side], side, view, day)
                views[(site, side, view)] = sop_of(data)
                items.append(data)
            if site == "A":  # a CT image of the same patient and study: none of the attributes
                pid = f"P-{studies[site][-6:]}"
                ct = make_instance(
                    lambda ds, p=pid: setattr(ds, "PatientID", p), study=studies[site]
                )
                items.append(ct)
            body, headers = stow_body(items)
            answer = server.http.post(
                server.dicomweb + "/studies",
                data=body,
                headers=headers | {"X-IMAG-Site": site},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
        yield World(server, site_token, studies, views, sop_of(ct))


def sops(answers: list[dict]) -> set[str]:
    return {a["00080018"]["Value"][0] for a in answers}


def value(answer: dict, tag: str) -> list | None:
    return answer.get(tag, {}).get("Value")


# -- QIDO-RS -----------------------------------------------------------------------------------


def test_qido_finds_the_one_left_craniocaudal_view_of_each_study_and_returns_its_keys(
    world: World,
) -> None:
    found = world.server.client().search_for_instances(
        search_filters={"ImageLaterality": "L", "ViewPosition": "CC"}
    )
    assert sops(found) == {world.views[("A", "L", "CC")], world.views[("B", "L", "CC")]}
    for answer in found:  # matching keys are returned, with the values stored
        assert value(answer, "00200062") == ["L"]
        assert value(answer, "00185101") == ["CC"]
    # within one study, as a viewer's hanging protocol asks
    found = world.server.client().search_for_instances(
        study_instance_uid=world.studies["A"], search_filters={"ViewPosition": "MLO"}
    )
    assert sops(found) == {world.views[("A", "R", "MLO")], world.views[("A", "L", "MLO")]}


def test_qido_wildcards_lists_and_repeated_keys_match_any_value(world: World) -> None:
    base = {"StudyInstanceUID": world.studies["A"]}
    assert sops(world.qido("/instances", **base, ViewPosition="M*").json()) == {
        world.views[("A", "R", "MLO")],
        world.views[("A", "L", "MLO")],
    }
    assert sops(world.qido("/instances", **base, ViewPosition="?C").json()) == {
        world.views[("A", "R", "CC")],
        world.views[("A", "L", "CC")],
    }
    listed = world.qido("/instances", **base, ImageLaterality="L,R", ViewPosition="CC").json()
    assert sops(listed) == {world.views[("A", "R", "CC")], world.views[("A", "L", "CC")]}
    repeated = requests.get(
        world.server.dicomweb
        + f"/instances?StudyInstanceUID={world.studies['A']}&ImageLaterality=L&ImageLaterality=R",
        headers={"Authorization": f"Bearer {world.server.token}"},
        timeout=30,
    ).json()
    assert len(repeated) == 4  # the CT carries no ImageLaterality: not a match
    # a DA extra: single date and range; the CT instance, with no value, never matches
    assert len(world.qido("/instances", AcquisitionDate="20260310").json()) == 4
    assert len(world.qido("/instances", AcquisitionDate="20260311-").json()) == 4
    assert len(world.qido("/instances", AcquisitionDate="20260301-20260331").json()) == 8
    # universal matching: asked for, returned, nothing filtered
    every = world.qido("/instances", StudyInstanceUID=world.studies["A"], ViewPosition="").json()
    assert len(every) == 5
    ct = next(a for a in every if a["00080018"]["Value"][0] == world.ct)
    assert "00185101" in ct and value(ct, "00185101") is None


def test_qido_series_level_matches_laterality_and_protocol_name(world: World) -> None:
    found = world.qido("/series", Laterality="R", ProtocolName="DEPIST*").json()
    assert len(found) == 2  # the right side series of A and of B
    assert {value(a, "00200060")[0] for a in found} == {"R"}
    assert {value(a, "00181030")[0] for a in found} == {"DEPISTAGE"}
    # an instance-level extra key cannot be matched at the series level: 400, problem details
    refused = world.qido("/series", ImageLaterality="L")
    assert refused.status_code == 400
    assert "ImageLaterality" in refused.json()["detail"]
    # includefield=all returns the configured attributes of the level
    listed = world.qido(f"/studies/{world.studies['B']}/series", includefield="all").json()
    assert {value(a, "00200060")[0] for a in listed} == {"R", "L"}


def test_a_site_user_sees_only_its_sites_views_through_the_extra_keys(world: World) -> None:
    found = world.qido("/instances", token=world.site_token, ImageLaterality="L").json()
    assert sops(found) == {world.views[("A", "L", "CC")], world.views[("A", "L", "MLO")]}
    # another site's study asked by UID: nothing, not even through an extra key
    other = world.qido(
        f"/studies/{world.studies['B']}/instances", token=world.site_token, ViewPosition="CC"
    )
    assert other.status_code == 200 and other.json() == []


def test_a_key_that_is_not_configured_is_ignored_with_a_warning_naming_it(world: World) -> None:
    answer = world.qido(
        "/instances", StudyInstanceUID=world.studies["A"], PatientOrientation="A\\R"
    )
    assert answer.status_code == 200
    assert len(answer.json()) == 5  # ignored: not a filter
    warnings = answer.headers.get("Warning", "")
    assert "299" in warnings and "PatientOrientation" in warnings
    assert "ImageLaterality" not in warnings


def test_a_malformed_value_of_an_extra_key_gets_400_and_says_why(world: World) -> None:
    answer = world.qido("/instances", AcquisitionDate="2026-03-10")
    assert answer.status_code == 400
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert "AcquisitionDate" in answer.json()["detail"]


# -- C-FIND ------------------------------------------------------------------------------------


def identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, text in keys.items():
        setattr(ds, keyword, text)
    return ds


def test_cfind_at_image_level_matches_the_views_of_the_callers_site_only(world: World) -> None:
    for site in ("A", "B"):
        found = world.find(
            f"SITE_{site}",
            identifier(
                "IMAGE",
                StudyInstanceUID="",
                SOPInstanceUID="",
                ImageLaterality="R",
                ViewPosition="MLO",
                AcquisitionDate="",
            ),
        )
        assert [str(f.SOPInstanceUID) for f in found] == [world.views[(site, "R", "MLO")]]
        assert found[0].ImageLaterality == "R" and found[0].ViewPosition == "MLO"
        assert found[0].AcquisitionDate == ("20260310" if site == "A" else "20260311")
    # a wildcard and a list, within site A's study
    found = world.find(
        "SITE_A",
        identifier(
            "IMAGE",
            StudyInstanceUID=world.studies["A"],
            SOPInstanceUID="",
            ViewPosition="*O",
            ImageLaterality="L\\R",
        ),
    )
    assert {str(f.SOPInstanceUID) for f in found} == {
        world.views[("A", "R", "MLO")],
        world.views[("A", "L", "MLO")],
    }


def test_cfind_at_series_level_matches_laterality_and_answers_unknown_keys_empty(
    world: World,
) -> None:
    found = world.find(
        "SITE_B",
        identifier(
            "SERIES",
            StudyInstanceUID=world.studies["B"],
            SeriesInstanceUID="",
            Laterality="L",
            ProtocolName="",
            PatientOrientation="",  # neither a column nor configured: answered empty
        ),
    )
    assert len(found) == 1
    assert found[0].Laterality == "L" and found[0].ProtocolName == "DEPISTAGE"
    assert "PatientOrientation" in found[0] and found[0].PatientOrientation in ("", None)
    # site A asking for site B's series: no match
    assert (
        world.find(
            "SITE_A",
            identifier(
                "SERIES", StudyInstanceUID=world.studies["B"], SeriesInstanceUID="", Laterality="L"
            ),
        )
        == []
    )


# -- the index: ingest transaction, replace, reindex, the setting -------------------------------


@pytest.fixture
def db(index_url_each: str):
    db = open_database(index_url_each)
    upgrade_index(db)
    yield db
    db.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def index_url_each(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh index per test on each backend (the module's ``index_url`` is shared)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return request.getfixturevalue("pg_url")


def side_rows(db) -> tuple[list[tuple], list[tuple]]:
    return (
        sorted(db.query("SELECT tag, n, value FROM series_attributes")),
        sorted(db.query("SELECT tag, n, value FROM instance_attributes")),
    )


IMAGE_LATERALITY, VIEW_POSITION, LATERALITY = 0x00200062, 0x00185101, 0x00200060


def test_side_rows_commit_with_the_instance_row_or_not_at_all(db) -> None:
    cat = Catalog(db)
    values = (
        ExtraValue("SERIES", LATERALITY, 0, "L"),
        ExtraValue("IMAGE", IMAGE_LATERALITY, 0, "L"),
        ExtraValue("IMAGE", VIEW_POSITION, 0, "CC"),
    )
    first = replace(record("1.9.1", study="1.9", series="1.9.9"), extra=values)

    def crash(_db, _done) -> None:
        raise RuntimeError("the process dies before COMMIT")

    with pytest.raises(RuntimeError):
        cat.commit([first], hooks=[crash])
    assert int(db.scalar("SELECT COUNT(*) FROM instances")) == 0
    assert side_rows(db) == ([], [])
    # the same batch committed: rows and instance together; a second instance of
    # the series adds its own values, not the series' again
    second = replace(
        record("1.9.2", study="1.9", series="1.9.9"),
        extra=(
            ExtraValue("SERIES", LATERALITY, 0, "R"),
            ExtraValue("IMAGE", VIEW_POSITION, 0, "MLO"),
        ),
    )
    plain = record("1.9.3", study="1.9", series="1.9.9")  # carries none: no row
    cat.commit([first, second, plain])
    assert side_rows(db) == (
        [(LATERALITY, 0, "L")],
        [(VIEW_POSITION, 0, "CC"), (VIEW_POSITION, 0, "MLO"), (IMAGE_LATERALITY, 0, "L")],
    )


def test_a_replaced_instance_is_found_by_its_new_values_only(db) -> None:
    cat = Catalog(db)
    old = replace(
        record("1.8.1", study="1.8", series="1.8.8"),
        extra=(ExtraValue("IMAGE", VIEW_POSITION, 0, "CC"),),
    )
    cat.commit([old])
    new = replace(
        record("1.8.1", study="1.8", series="1.8.8", content=b"other bytes"),
        object_key="other-key",
        extra=(ExtraValue("IMAGE", VIEW_POSITION, 0, "MLO"),),
    )
    cat.commit([new], on_conflict="replace")
    config = load_config(
        env={}, overrides={"index.extra_attributes": {"instance": ["ViewPosition"]}}
    )
    extra = extra_attributes(config)
    assert search(db, Query("IMAGE", {"ViewPosition": "CC"}, extra=extra)) == []
    found = search(db, Query("IMAGE", {"ViewPosition": "MLO"}, extra=extra))
    assert [(r["SOPInstanceUID"], r["ViewPosition"]) for r in found] == [("1.8.1", "MLO")]


def test_reindex_attributes_indexes_objects_stored_before_the_setting(
    make_config: Callable[..., Config], index_url_each: str, tmp_path: Path
) -> None:
    before = make_config(index_url=index_url_each, settings={"index.extra_attributes": {}})
    study, right, left = generate_uid(), generate_uid(), generate_uid()
    with Archive(before) as archive:
        for side, view in VIEWS:
            series = right if side == "R" else left
            data = mammogram(study, series, side, view, "20260401")
            result = archive.pipeline.ingest(data, Source(kind="import", site="A"))
            assert result.ok, result
        assert side_rows(archive.db) == ([], [])
    env = {
        "PATH": "/usr/bin:/bin",
        "IMAG_DATA_DIR": before["data_dir"],
        "IMAG_INDEX_URL": index_url_each,
        "IMAG_INDEX_EXTRA_ATTRIBUTES": json.dumps(EXTRA),
        "IMAG_LOG_FORMAT": "text",
    }
    after = make_config(index_url=index_url_each, settings={"index.extra_attributes": EXTRA})
    with Archive(after) as archive:
        query = Query("IMAGE", {"ImageLaterality": "L"}, extra=extra_attributes(after))
        assert search(archive.db, query) == []  # stored before: not yet indexed
    for _ in range(2):  # idempotent: a second run rewrites the same rows
        done = subprocess.run(
            [sys.executable, "-m", "archive.cli", "db", "reindex-attributes", "--quiet"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "2 series, 4 objects read" in done.stdout
    with Archive(after) as archive:
        extra = extra_attributes(after)
        found = search(
            archive.db, Query("IMAGE", {"ImageLaterality": "L"}, ["ViewPosition"], extra=extra)
        )
        assert sorted(r["ViewPosition"] for r in found) == ["CC", "MLO"]
        series = search(
            archive.db, Query("SERIES", {"Laterality": "R", "ProtocolName": ""}, extra=extra)
        )
        assert [(r["SeriesInstanceUID"], r["ProtocolName"]) for r in series] == [
            (right, "DEPISTAGE")
        ]
        assert len(side_rows(archive.db)[1]) == 12  # 4 instances x 3 attributes, no duplicate


def test_the_search_refuses_bad_extra_values_and_deeper_levels(db) -> None:
    config = load_config(env={}, overrides={"index.extra_attributes": EXTRA})
    extra = extra_attributes(config)
    with pytest.raises(QueryError, match="AcquisitionDate"):
        search(db, Query("IMAGE", {"AcquisitionDate": "20261340"}, extra=extra))
    with pytest.raises(QueryError, match="IMAGE-level"):
        search(db, Query("SERIES", {"ViewPosition": "CC"}, extra=extra))
    with pytest.raises(QueryError, match="not an attribute"):
        search(db, Query("IMAGE", {"ViewPosition": "CC"}))  # not configured: unknown


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"instance": ["NotAKeyword"]}, "not a DICOM keyword"),
        ({"instance": ["ViewCodeSequence"]}, "VR SQ"),
        ({"instance": ["PixelData"]}, "only AE"),
        ({"study": ["StudyComments"]}, "level 'study'"),
        ('{"instance": ', "JSON object"),
    ],
)
def test_a_bad_extra_attributes_setting_is_refused_naming_what_is_wrong(
    setting: object, message: str
) -> None:
    env = {
        "IMAG_INDEX_EXTRA_ATTRIBUTES": setting if isinstance(setting, str) else json.dumps(setting)
    }
    with pytest.raises(ConfigError, match=message):
        load_config(env=env)


def test_an_attribute_the_index_holds_as_a_column_is_served_from_its_column(db) -> None:
    config = load_config(env={}, overrides={"index.extra_attributes": EXTRA})
    extra = extra_attributes(config)
    assert extra.get("BodyPartExamined") is None  # a series column already
    assert {e.keyword for e in extra} == {
        "Laterality",
        "ProtocolName",
        "ImageLaterality",
        "ViewPosition",
        "AcquisitionDate",
    }
