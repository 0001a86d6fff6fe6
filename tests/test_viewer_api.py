"""The sharing portal's viewer API (``/api/view``) and study ZIP, as a site
user and an admin: a site's technician sees its own study (200) and not
another site's (404, audited as denied, nothing said about it); the images
follow the viewport asked; the report is there as PDF and SR text; the ZIP
opens with zipfile, its DICOMDIR lists every instance, its JPEGs open with
Pillow; nobody without ``shares.download`` gets it.

The application is the one ``imag serve`` runs, in this process
(tests/inprocess.py); studies are synthetic (archive.synthetic) and the
report documents are the worklist's own (an SR and an Encapsulated PDF)."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
import requests
from PIL import Image
from pydicom.fileset import FileSet
from pydicom.uid import JPEG2000Lossless, generate_uid

from archive.identity import Source
from archive.security.principals import Principals
from archive.synthetic import StudySpec, modality_preset, write_study
from tests.inprocess import InProcessImag, serving_in_process
from worklist.documents import ReportContent, Signed, encapsulated_pdf, structured_report, to_bytes
from worklist.pdf import report_pdf

X, Y = "SITE-X", "SITE-Y"
SETTINGS = {"IMAG_SITES": json.dumps([{"name": X}, {"name": Y}]), "IMAG_LOG_LEVEL": "WARNING"}
SIGNED = Signed("Dr Marie Curie", "mcurie", datetime(2024, 3, 30, 22, 15, tzinfo=UTC))
CONCLUSION = "Examen sans anomalie décelable."


class Viewer:
    """Calls as one user or another; studies stored at a site; audit rows."""

    def __init__(self, server: InProcessImag) -> None:
        assert server.archive is not None
        self.server, self.archive, self.db = server, server.archive, server.archive.db
        principals = Principals(self.db)
        self.tokens = {"admin": server.token}
        for user, role, sites in (("manip.x", "technician", [X]), ("manip.y", "technician", [Y])):
            principals.add(user, role, sites=sites)
            self.tokens[user] = principals.create_token(user)[1]

    def get(self, user: str, path: str, **kwargs: object) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        return requests.get(self.server.url + path, headers=headers, timeout=60, **kwargs)

    def store(self, spec: StudySpec, site: str, folder: Path, *, report: bool = False) -> str:
        paths = write_study(spec, folder)
        for path in paths:
            assert self.archive.pipeline.ingest(path.read_bytes(), Source("import", site=site)).ok
        if report:
            evidence = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths[:2]]
            for ds in _report_documents(evidence):
                assert self.archive.pipeline.ingest(to_bytes(ds), Source("import", site=site)).ok
        return str(spec.study_uid)

    def last_audit(self) -> int:
        return int(self.db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))

    def audit_since(self, last: int) -> list[tuple]:
        return self.db.query(
            "SELECT actor, action, outcome, status, study_uid FROM audit WHERE id > ? ORDER BY id",
            (last,),
        )


def _report_documents(evidence: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    content = ReportContent(
        indications="Douleur thoracique.",
        technique="Scanner thoracique sans injection.",
        results="Pas d'anomalie.",
        conclusion=CONCLUSION,
        signed=SIGNED,
        request={},
    )
    common = {"series_number": 900, "instance_number": 1}
    sr = structured_report(
        evidence, content, series_uid=generate_uid(), sop_instance_uid=generate_uid(), **common
    )
    pdf = encapsulated_pdf(
        evidence,
        report_pdf(content, {"name": "TEST^Viewer"}),
        series_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        title="Compte rendu",
        signed=SIGNED,
        **common,
    )
    return [sr, pdf]


def ct_and_us(patient: str) -> StudySpec:
    return StudySpec(
        patient_id=patient,
        patient_name="DUPONT^Hélène",
        birth_date="19580214",
        study_description="SCANNER THORAX",
        study_date="20240301",
        series=[
            modality_preset("CT", rows=96, columns=128, instances=3, series_number=1),
            modality_preset("US", rows=48, columns=64, frames=4, series_number=2),
        ],
    )


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Viewer]:
    with serving_in_process(tmp_path_factory.mktemp("imag"), settings=SETTINGS) as server:
        yield Viewer(server)


@pytest.fixture(scope="module")
def studies(viewer: Viewer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("studies")
    return {
        X: viewer.store(ct_and_us("PX"), X, folder / "x", report=True),
        Y: viewer.store(ct_and_us("PY"), Y, folder / "y"),
    }


def test_a_site_user_sees_its_own_study_patient_series_and_reports(viewer, studies) -> None:
    answer = viewer.get("manip.x", f"/api/view/study?study={studies[X]}")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["patient"]["name"] == "DUPONT Hélène"
    assert body["patient"]["birth_date"] == "19580214"
    assert body["study"]["date"] == "20240301"
    assert body["study"]["description"] == "SCANNER THORAX"
    assert [(s["modality"], s["instances"], s["frames"]) for s in body["series"]] == [
        ("CT", 3, 1),
        ("US", 1, 4),
    ]
    assert sorted(r["kind"] for r in body["reports"]) == ["pdf", "sr"]
    # a technician has studies.read but not shares.download
    assert body["download"] == {"allowed": False, "url": None}
    assert viewer.get("admin", f"/api/view/study?study={studies[X]}").json()["download"]["allowed"]


def test_another_sites_study_is_not_found_and_audited_as_denied(viewer, studies) -> None:
    last = viewer.last_audit()
    answer = viewer.get("manip.x", f"/api/view/study?study={studies[Y]}")
    assert answer.status_code == 404
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    entries = [e for e in viewer.audit_since(last) if e[0] == "manip.x"]
    assert entries == [("manip.x", "viewer.study", "denied", 404, studies[Y])]
    # the same answer as a study that does not exist at all
    missing = viewer.get("manip.x", f"/api/view/study?study={generate_uid()}")
    assert missing.status_code == 404 and missing.json()["title"] == answer.json()["title"]


def test_nothing_of_another_sites_study_is_reachable_through_any_viewer_route(
    viewer, studies
) -> None:
    admin = viewer.get("admin", f"/api/view/study?study={studies[Y]}").json()
    series = admin["series"][0]["uid"]
    instance = viewer.get("admin", admin["series"][0]["url"]).json()["instances"][0]["uid"]
    base = f"/api/view/studies/{studies[Y]}"
    routes = [
        f"/api/view/study?study={studies[Y]}",
        f"{base}/series/{series}",
        f"{base}/instances/{instance}/frames/1/image?viewport=64,64",
        f"{base}/reports/{instance}",
        # another site's instance named under one's own study
        f"/api/view/studies/{studies[X]}/instances/{instance}/frames/1/image?viewport=64,64",
    ]
    for route in routes:
        answer = viewer.get("manip.x", route)
        assert answer.status_code == 404, (route, answer.status_code)
        assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert viewer.get("manip.x", f"/api/view/download?study={studies[Y]}").status_code == 403


def test_instances_of_a_series_come_in_order_with_frames_size_and_window(viewer, studies) -> None:
    body = viewer.get("manip.x", f"/api/view/study?study={studies[X]}").json()
    ct, us = body["series"]
    instances = viewer.get("manip.x", ct["url"]).json()["instances"]
    assert [i["number"] for i in instances] == [1, 2, 3]
    assert all(i["rows"] == 96 and i["columns"] == 128 and i["frames"] == 1 for i in instances)
    assert instances[0]["window"] is not None and instances[0]["window"]["width"] >= 1
    cine = viewer.get("manip.x", us["url"]).json()["instances"]
    assert [(i["frames"], i["color"]) for i in cine] == [(4, True)]


def test_rendered_images_fit_the_viewport_asked_for(viewer, studies) -> None:
    body = viewer.get("manip.x", f"/api/view/study?study={studies[X]}").json()
    ct = viewer.get("manip.x", body["series"][0]["url"]).json()["instances"][0]
    url = body["image_url"].format(instance=ct["uid"], frame=1)
    sizes = {}
    for viewport in ("64,64", "100,30", "512,512"):
        answer = viewer.get("manip.x", f"{url}?viewport={viewport}")
        assert answer.status_code == 200 and answer.headers["Content-Type"] == "image/jpeg"
        sizes[viewport] = Image.open(io.BytesIO(answer.content)).size
    # 128 x 96 fitted, never enlarged
    assert sizes == {"64,64": (64, 48), "100,30": (40, 30), "512,512": (128, 96)}
    thumb = viewer.get("manip.x", body["series"][0]["thumbnail"])
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 128


def test_a_window_changes_the_image_and_the_cache_keeps_them_apart(viewer, studies) -> None:
    body = viewer.get("manip.x", f"/api/view/study?study={studies[X]}").json()
    ct = viewer.get("manip.x", body["series"][0]["url"]).json()["instances"][1]
    url = body["image_url"].format(instance=ct["uid"], frame=1) + "?viewport=128,128"
    lung = viewer.get("manip.x", url + "&window=-600,1500").content
    bone = viewer.get("manip.x", url + "&window=300,1500").content
    assert lung != bone
    assert viewer.get("manip.x", url + "&window=-600,1500").content == lung


@pytest.mark.parametrize(
    "query",
    ["", "?viewport=0,10", "?viewport=10", "?viewport=99999,10", "?viewport=10,10&window=1,0"],
)
def test_a_malformed_image_request_is_a_400_problem(viewer, studies, query) -> None:
    body = viewer.get("manip.x", f"/api/view/study?study={studies[X]}").json()
    ct = viewer.get("manip.x", body["series"][0]["url"]).json()["instances"][0]
    answer = viewer.get("manip.x", body["image_url"].format(instance=ct["uid"], frame=1) + query)
    assert answer.status_code == 400
    assert answer.headers["Content-Type"].startswith("application/problem+json")


def test_a_frame_beyond_the_instance_is_a_400(viewer, studies) -> None:
    body = viewer.get("manip.x", f"/api/view/study?study={studies[X]}").json()
    us = viewer.get("manip.x", body["series"][1]["url"]).json()["instances"][0]
    url = body["image_url"].format(instance=us["uid"], frame=5)
    assert viewer.get("manip.x", url + "?viewport=64,64").status_code == 400
    url = body["image_url"].format(instance=us["uid"], frame=4)
    assert viewer.get("manip.x", url + "?viewport=64,64").status_code == 200


def test_the_report_is_served_as_pdf_and_as_sr_text(viewer, studies) -> None:
    body = viewer.get("manip.x", f"/api/view/study?study={studies[X]}").json()
    reports = {r["kind"]: r for r in body["reports"]}
    pdf = viewer.get("manip.x", reports["pdf"]["url"])
    assert pdf.status_code == 200 and pdf.headers["Content-Type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF-") and pdf.content.rstrip().endswith(b"%%EOF")
    sr = viewer.get("manip.x", reports["sr"]["url"]).json()
    assert any(CONCLUSION in s["text"] for s in sr["sections"])


def test_the_zip_holds_a_dicomdir_listing_every_instance_and_jpegs(
    viewer, studies, tmp_path
) -> None:
    answer = viewer.get("admin", f"/api/view/download?study={studies[X]}")
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "application/zip"
    disposition = answer.headers["Content-Disposition"]
    assert disposition == 'attachment; filename="IMAG-20240301-SCANNER-THORAX.zip"'
    archive = zipfile.ZipFile(io.BytesIO(answer.content))
    assert archive.testzip() is None
    archive.extractall(tmp_path)
    fileset = FileSet(tmp_path / "DICOMDIR")
    stored = {
        row[0]
        for row in viewer.db.query(
            "SELECT i.sop_instance_uid FROM instances i JOIN series se ON se.id = i.series_ref "
            "JOIN studies st ON st.id = se.study_ref WHERE st.study_uid = ?",
            (studies[X],),
        )
    }
    assert len(stored) == 6  # 3 CT, 1 US, the SR and the PDF
    assert {instance.SOPInstanceUID for instance in fileset} == stored
    for instance in fileset:
        assert instance.load().SOPInstanceUID in stored  # each file is there and reads
    jpegs = sorted(n for n in archive.namelist() if n.startswith("JPEG/"))
    assert len(jpegs) == 3 + 4  # a JPEG per CT image, one per frame of the US cine
    for name in jpegs:
        with Image.open(io.BytesIO(archive.read(name))) as image:
            assert image.format == "JPEG" and image.size in ((128, 96), (64, 48))
    assert archive.read("REPORT/report-2.pdf").startswith(b"%PDF-") or archive.read(
        "REPORT/report-1.pdf"
    ).startswith(b"%PDF-")


def test_the_download_is_refused_without_the_download_permission(viewer, studies) -> None:
    last = viewer.last_audit()
    answer = viewer.get("manip.x", f"/api/view/download?study={studies[X]}")
    assert answer.status_code == 403
    assert viewer.audit_since(last) == [("manip.x", "viewer.download", "denied", 403, None)]


def test_a_jpeg_2000_study_renders_at_reduced_resolution_to_the_viewport(viewer, tmp_path) -> None:
    spec = StudySpec(
        patient_id="PMG",
        patient_name="MAMMO^Test",
        study_description="MG",
        series=[
            modality_preset(
                "MG", rows=1024, columns=800, instances=1, transfer_syntax=JPEG2000Lossless
            )
        ],
    )
    study = viewer.store(spec, X, tmp_path)
    body = viewer.get("manip.x", f"/api/view/study?study={study}").json()
    mg = viewer.get("manip.x", body["series"][0]["url"]).json()["instances"][0]
    url = body["image_url"].format(instance=mg["uid"], frame=1)
    small = viewer.get("manip.x", url + "?viewport=200,256")
    assert small.status_code == 200
    assert Image.open(io.BytesIO(small.content)).size == (200, 256)
    full = viewer.get("manip.x", url + "?viewport=800,1024")
    assert Image.open(io.BytesIO(full.content)).size == (800, 1024)
