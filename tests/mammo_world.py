"""A screened woman's mammograms at two sites, for the viewer's mammography tests.

One woman, three screening rounds, two sites, two local identities linked
by her INS into one regional identity (the identity subscriber runs on a
real job worker, as in tests/test_identity_index.py):

* 2026 at site X (local ID ``IPP-X-1``): the current round; its views are
  stored shuffled, with InstanceNumbers and SeriesDescriptions that lie, a
  FOR PROCESSING twin of the RCC acquired later, an LMLO taken twice (the
  later one counts), and an ML view (no cell in the layout);
* 2024 at site Y (local ID ``Y-77``): the RMLO names its breast only in the
  series' Laterality, the LCC its projection only in the View Code Sequence;
* 2022 at site X: no LMLO.

Besides: a CT study of the same woman (not a mammography round) and another
woman's mammogram at site X (never anyone's prior).

Every image is built here with pydicom, 160 rows x 120 columns: a breast
against the chest wall where the image's own Patient Orientation puts it
(so that a mirrored image is far from the original, and a browser test can
see which way the chest walls face), and two marked squares of a 4 x 4 grid
chosen by the view and the round, so that every image differs from every
other one.
Which view an image is, and whether the page mirrors it, is in
:data:`EXPECTED`: the tests compare what the API and the browser show with
it, never with the order the images were stored in.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
import requests
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from archive.identity import Source
from archive.identity.ins import INS_ISSUER, OID_NIR
from archive.jobs import Worker
from archive.security.principals import Principals
from tests.dicomfiles import make_instance
from tests.inprocess import InProcessImag

X, Y = "CHU-X", "CLINIQUE-Y"
SETTINGS = {"IMAG_SITES": json.dumps([{"name": X}, {"name": Y}]), "IMAG_LOG_LEVEL": "WARNING"}
INS = "279035121518989"  # the ANS test INS (a valid NIR), as in tests/test_identity_index.py
ROWS, COLUMNS = 160, 120
CENTER, WIDTH = 2048.0, 4096.0
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
VIEWS = ("RCC", "LCC", "RMLO", "LMLO")
GROUP = "L2-REGION"


@dataclass(frozen=True)
class Image:
    """One mammogram as stored: what it says of itself, what it should be."""

    key: str  # the test's name for it
    round: str  # "2026", "2024", "2022"
    mark: tuple[int, int]  # (view row, round column) of its marked squares
    laterality: str = ""  # ImageLaterality
    series_laterality: str = ""  # Laterality (0020,0060)
    position: str = ""  # ViewPosition
    view_code: str = ""  # View Code Sequence code value (SCT)
    orientation: tuple[str, str] = ("", "")
    intent: str = "FOR PRESENTATION"
    acquired: str = "093000"
    number: int = 1  # InstanceNumber: deliberately meaningless
    series: str = "A"  # which series of its study
    description: str = ""  # SeriesDescription: deliberately misleading


IMAGES = [
    # 2026, site X: the four views, shuffled, with decoys
    Image("2026-RCC", "2026", (0, 0), "R", "", "CC", "", ("A", "L"), number=4, description="LMLO"),
    Image(
        "2026-RCC-processing",
        "2026",
        (0, 3),
        "R",
        "",
        "CC",
        "",
        ("P", "L"),
        intent="FOR PROCESSING",
        acquired="094500",
        number=9,
        series="B",
        description="RCC",
    ),
    Image("2026-LCC", "2026", (1, 0), "L", "", "CC", "", ("A", "R"), number=1, series="B"),
    Image("2026-RMLO", "2026", (2, 0), "R", "", "MLO", "", ("P", "FL"), number=2, series="B"),
    Image(
        "2026-LMLO-first",
        "2026",
        (3, 3),
        "L",
        "",
        "MLO",
        "",
        ("P", "FR"),
        acquired="092000",
        number=8,
        series="B",
    ),
    Image(
        "2026-LMLO", "2026", (3, 0), "L", "", "MLO", "", ("P", "FR"), acquired="095000", number=3
    ),
    Image("2026-RML", "2026", (1, 3), "R", "", "ML", "", ("P", "F"), number=5, description="RMLO"),
    # 2024, site Y: attributes in their other places
    Image("2024-RCC", "2024", (0, 1), "R", "", "CC", "", ("P", "L"), number=3),
    Image("2024-LCC", "2024", (1, 1), "L", "", "", "399162004", ("P", "R"), number=4),
    Image("2024-RMLO", "2024", (2, 1), "", "R", "MLO", "", ("A", "FL"), number=1, series="B"),
    Image("2024-LMLO", "2024", (3, 1), "L", "", "MLO", "", ("A", "FR"), number=2),
    # 2022, site X: no LMLO
    Image("2022-RCC", "2022", (0, 2), "R", "", "CC", "", ("P", "L"), number=1),
    Image("2022-LCC", "2022", (1, 2), "L", "", "CC", "", ("A", "R"), number=2),
    Image("2022-RMLO", "2022", (2, 2), "R", "", "MLO", "", ("P", "FL"), number=3),
]
#: round -> view -> (the image shown, mirrored?); None: no such view
EXPECTED: dict[str, dict[str, tuple[str, bool] | None]] = {
    "2026": {
        "RCC": ("2026-RCC", True),
        "LCC": ("2026-LCC", False),
        "RMLO": ("2026-RMLO", False),
        "LMLO": ("2026-LMLO", True),
    },
    "2024": {
        "RCC": ("2024-RCC", False),
        "LCC": ("2024-LCC", True),
        "RMLO": ("2024-RMLO", True),
        "LMLO": ("2024-LMLO", False),
    },
    "2022": {
        "RCC": ("2022-RCC", False),
        "LCC": ("2022-LCC", False),
        "RMLO": ("2022-RMLO", False),
        "LMLO": None,
    },
}
#: round -> (site, local PatientID, issuer, study date, description)
ROUNDS = {
    "2026": (X, "IPP-X-1", "CHU-X", "20260310", "MAMMOGRAPHIE DE DEPISTAGE"),
    "2024": (Y, "Y-77", "CLINIQUE-Y", "20240305", "DEPISTAGE ORGANISE"),
    "2022": (X, "IPP-X-1", "CHU-X", "20220301", "MAMMOGRAPHIE DE DEPISTAGE"),
}


def chest_wall_right(image: Image) -> bool:
    """Where the image's chest wall is, by its own Patient Orientation: rows
    toward P (posterior) put it at the right edge of the stored image."""
    return image.orientation[0].startswith("P")


def pixels(image: Image) -> np.ndarray:
    """A breast drawn as it lies in the stored image: a half ellipse of tissue
    against the chest wall (brighter toward it), air elsewhere; and two marks
    on a 4 x 4 grid, (view row, round column) and its opposite, bright on air
    and dark on tissue, so that the views of a round differ from each other
    however each is mirrored."""
    y, x = np.mgrid[0:ROWS, 0:COLUMNS].astype(np.float64)
    depth = (COLUMNS - 1 - x) if chest_wall_right(image) else x  # from the chest wall
    tissue = (depth / (COLUMNS * 0.95)) ** 2 + ((y - ROWS / 2) / (ROWS * 0.48)) ** 2 <= 1
    values = np.where(tissue, 3300 - 1500 * depth / COLUMNS, 200.0)
    row, column = image.mark
    for r, c in ((row, column), ((row + 2) % 4, (column + 1) % 4)):
        # columns 3-14 of each 30: a mirrored mark lands on columns 15-26,
        # never on another mark's place; the outer three columns stay unmarked
        top, left = r * 40 + 2, c * 30 + 3
        square = values[top : top + 36, left : left + 12]
        square[:] = np.where(square > 1000, 0, 4095)
    return values.round().astype(np.uint16)


def rendered(
    image: Image, *, flip: bool = False, center: float = CENTER, width: float = WIDTH
) -> np.ndarray:
    """The image as 8-bit grey by the DICOM linear window (PS3.3 C.11.2.1.2;
    the stored one unless another is given), mirrored left-right if asked:
    what the page should show, made without the archive."""
    values = pixels(image).astype(np.float64)
    grey = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255
    grey = np.clip(grey, 0, 255).round().astype(np.uint8)
    return grey[:, ::-1] if flip else grey


def _patient(ds: Dataset, round_: str) -> None:
    site, patient_id, issuer, _, _ = ROUNDS[round_]
    ds.PatientName = "DE VINCI^RUTH"
    ds.PatientBirthDate = "19790315"
    ds.PatientSex = "F"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = issuer
    item = Dataset()
    item.PatientID = INS
    item.IssuerOfPatientID = INS_ISSUER
    item.TypeOfPatientID = "TEXT"
    qualifier = Dataset()
    qualifier.UniversalEntityID = OID_NIR
    qualifier.UniversalEntityIDType = "ISO"
    item.IssuerOfPatientIDQualifiersSequence = [qualifier]
    ds.OtherPatientIDsSequence = [item]


def mammogram(image: Image, study: str, series: str, sop: str) -> bytes:
    """The image as a Part 10 Digital Mammography X-Ray Image."""
    _, _, _, date, description = ROUNDS[image.round]
    sop_class = MG_FOR_PRESENTATION if image.intent == "FOR PRESENTATION" else MG_FOR_PROCESSING
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    _patient(ds, image.round)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.StudyDate, ds.StudyTime, ds.StudyDescription = date, "090000", description
    ds.AccessionNumber, ds.StudyID = "", "1"
    ds.Modality = "MG"
    ds.SeriesNumber = 1 if image.series == "A" else 2
    ds.SeriesDescription = image.description
    ds.InstanceNumber = image.number
    ds.AcquisitionDate, ds.AcquisitionTime = date, image.acquired
    ds.ContentDate, ds.ContentTime = date, image.acquired
    ds.PresentationIntentType = image.intent
    if image.laterality:
        ds.ImageLaterality = image.laterality
    if image.series_laterality:
        ds.Laterality = image.series_laterality
    if image.position:
        ds.ViewPosition = image.position
    if image.view_code:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = image.view_code, "SCT"
        code.CodeMeaning = "cranio-caudal"
        ds.ViewCodeSequence = [code]
    ds.PatientOrientation = list(image.orientation)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = CENTER, WIDTH
    ds.PixelData = pixels(image).tobytes()
    ds["PixelData"].VR = "OW"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass
class World:
    server: InProcessImag
    studies: dict[str, str]  # round -> StudyInstanceUID
    sops: dict[str, str]  # image key -> SOPInstanceUID
    ct_study: str = ""
    stranger_study: str = ""
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def archive(self) -> Any:
        return self.server.archive

    @property
    def url(self) -> str:
        return self.server.url

    def get(self, user: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        headers.update(kwargs.pop("headers", {}))
        return requests.get(self.url + path, headers=headers, timeout=60, **kwargs)

    def layout(self, user: str, round_: str = "2026") -> requests.Response:
        return self.get(user, f"/api/view/mammography?study={self.studies[round_]}")

    def key_of(self, sop: str) -> str:
        return next(k for k, v in self.sops.items() if v == sop)

    def last_audit(self) -> int:
        return int(self.archive.db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))

    def audit_since(self, last: int) -> list[tuple]:
        return self.archive.db.query(
            "SELECT actor, action, outcome, status, study_uid, detail FROM audit WHERE id > ? "
            "ORDER BY id",
            (last,),
        )


def _ingest(server: InProcessImag, data: bytes, site: str) -> None:
    result = server.archive.pipeline.ingest(data, Source("import", site=site))
    assert result.ok, result.reason


def _settle(server: InProcessImag) -> None:
    """Run every due job (the identity subscriber's) to the end."""
    worker = Worker(server.archive, "mammo-test", poll_interval=0.02).start()
    try:
        assert worker.wait_idle(60)
    finally:
        worker.stop()


def build(server: InProcessImag) -> World:
    """Store the rounds (shuffled), the CT and the stranger, link the woman's
    identities, and make the users: technicians of X and of Y, a screening
    reader whose group the three rounds are routed to."""
    studies = {round_: generate_uid() for round_ in ROUNDS}
    series = {(r, s): generate_uid() for r in ROUNDS for s in "AB"}
    sops = {image.key: generate_uid() for image in IMAGES}
    order = list(IMAGES)
    random.Random(16).shuffle(order)
    for image in order:
        data = mammogram(
            image, studies[image.round], series[(image.round, image.series)], sops[image.key]
        )
        _ingest(server, data, ROUNDS[image.round][0])
    world = World(server, studies, sops)

    def same_woman_ct(ds: pydicom.FileDataset) -> None:
        _patient(ds, "2026")
        ds.StudyDate = "20250101"

    def stranger(ds: pydicom.FileDataset) -> None:
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "AUTRE^ANNE", "IPP-X-2", "19600101"
        ds.IssuerOfPatientID, ds.Modality, ds.StudyDate = "CHU-X", "MG", "20250601"

    world.ct_study, world.stranger_study = generate_uid(), generate_uid()
    _ingest(server, make_instance(same_woman_ct, study=world.ct_study), X)
    _ingest(server, make_instance(stranger, study=world.stranger_study), X)
    _settle(server)
    linked = server.archive.db.query(
        "SELECT DISTINCT l.regional_ref FROM identity_links l JOIN patients p "
        "ON p.id = l.patient_ref WHERE p.patient_id IN ('IPP-X-1', 'Y-77')"
    )
    assert len(linked) == 1, "the two local identities are one regional identity"

    principals = Principals(server.archive.db)
    world.tokens["admin"] = server.token
    for user, role, sites, groups in (
        ("manip.x", "technician", [X], []),
        ("manip.y", "technician", [Y], []),
        ("l2", "screening_reader", [], [GROUP]),
        ("l2.other", "screening_reader", [], ["L2-OTHER"]),
    ):
        principals.add(user, role, sites=sites, groups=groups)
        world.tokens[user] = principals.create_token(user)[1]
    principals.grant_group(GROUP, list(studies.values()))
    return world
