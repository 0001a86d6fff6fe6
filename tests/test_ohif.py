"""The OHIF Viewer, as published on the npm registry (``@ohif/app``, its
``dist/`` unchanged but for the app config IMAG generates), served by IMAG at
``/viewer/`` and driven in headless Chromium against IMAG's DICOMweb:
the study list, a CT series, a four-view mammogram, an ultrasound multi-frame
in JPEG baseline and a 12-lead ECG each display, with no failed request and
no console error.

Real parts only: the in-process IMAG server (the app ``imag serve`` runs),
Debian's Chromium through Playwright (tests/browser.py), the OHIF build that
``./scripts/test`` fetched into ``.cache/ohif/`` (``IMAG_TEST_OHIF_DIR``
to use another)."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from archive import synthetic
from tests.browser import PageWatch, Problem, launched_chromium, screenshot_variance
from tests.dicomfiles import pydicom_test_folders
from tests.inprocess import InProcessImag, serving_in_process

if TYPE_CHECKING:
    from playwright.sync_api import Browser

ROOT = Path(__file__).resolve().parent.parent
OHIF_VERSION = "3.13.2"  # scripts/common.sh OHIF_VERSION
OHIF_DIR = Path(os.environ.get("IMAG_TEST_OHIF_DIR", ROOT / ".cache/ohif" / OHIF_VERSION / "dist"))
ECG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.9.1.1"  # 12-Lead ECG Waveform Storage

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        not (OHIF_DIR / "index.html").is_file(),
        reason=f"no OHIF build in {OHIF_DIR} (./scripts/test fetches @ohif/app {OHIF_VERSION})",
    ),
]


# -- the studies ------------------------------------------------------------------


def synthetic_study(modality: str, name: str, **series: object) -> list[Dataset]:
    """One study of ``modality`` from archive.synthetic (a body-like pattern, not noise)."""
    study = synthetic.StudySpec(
        patient_id=f"OHIF-{modality}",
        patient_name=name,
        study_description=f"OHIF {modality}",
        accession_number=f"ACC{modality}",
        series=[synthetic.modality_preset(modality, **series)],
    )
    rng = np.random.default_rng(19)
    return [synthetic.make_instance(study, 0, i, rng=rng) for i in range(study.series[0].instances)]


def ultrasound_multiframe() -> Dataset:
    """A real ultrasound multi-frame in JPEG baseline (120 YBR_FULL_422 frames, from
    pydicom-data), under a patient and UIDs of its own."""
    path = next(
        folder / "color3d_jpeg_baseline.dcm"
        for folder in pydicom_test_folders()
        if (folder / "color3d_jpeg_baseline.dcm").is_file()
    )
    ds = pydicom.dcmread(path)
    ds.PatientName, ds.PatientID = "OHIF^Ultrasound", "OHIF-US"
    ds.StudyDescription, ds.AccessionNumber = "OHIF US", "ACCUS"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
# MDC codes of the twelve leads (PS3.16 CID 3001)
LEAD_CODES = ["5.6.3-9-1", "5.6.3-9-2", "5.6.3-9-61", "5.6.3-9-62", "5.6.3-9-63",
              "5.6.3-9-64", "5.6.3-9-3", "5.6.3-9-4", "5.6.3-9-5", "5.6.3-9-6", "5.6.3-9-7",
              "5.6.3-9-8"]  # fmt: skip


def _beats(seconds: float, rate: int, lead: int) -> np.ndarray:
    """An ECG-like trace in microvolts: P, QRS and T waves at 72 beats a minute,
    with an amplitude and polarity per lead."""
    t = np.arange(int(seconds * rate)) / rate
    phase = t % (60 / 72)
    gain = [1.0, 1.4, 0.5, -1.1, 0.3, 0.9, -0.6, 0.4, 1.1, 1.6, 1.5, 1.2][lead]

    def wave(centre: float, width: float, height: float) -> np.ndarray:
        return height * np.exp(-(((phase - centre) / width) ** 2))

    trace = wave(0.16, 0.025, 120) - wave(0.26, 0.008, 150) + wave(0.28, 0.012, 1100)
    trace += -wave(0.30, 0.008, 250) + wave(0.52, 0.05, 300)
    return gain * trace


def _multiplex_group(label: str, seconds: float, rate: int) -> Dataset:
    group = Dataset()
    group.MultiplexGroupTimeOffset = 0.0
    group.WaveformOriginality = "ORIGINAL" if label == "RHYTHM" else "DERIVED"
    group.NumberOfWaveformChannels = len(LEADS)
    group.NumberOfWaveformSamples = int(seconds * rate)
    group.SamplingFrequency = rate
    group.MultiplexGroupLabel = label
    channels = []
    for lead, (name, code) in enumerate(zip(LEADS, LEAD_CODES, strict=True)):
        source = Dataset()
        source.CodeValue, source.CodingSchemeDesignator = code, "MDC"
        source.CodeMeaning = f"Lead {name}"
        units = Dataset()
        units.CodeValue, units.CodingSchemeDesignator, units.CodeMeaning = "uV", "UCUM", "microvolt"
        channel = Dataset()
        channel.ChannelSourceSequence = [source]
        channel.ChannelSensitivity = 1
        channel.ChannelSensitivityUnitsSequence = [units]
        channel.ChannelSensitivityCorrectionFactor = 1
        channel.ChannelBaseline = 0
        channel.ChannelSampleSkew = 0
        channel.WaveformBitsStored = 16
        channel.ChannelLabel = name
        channels.append(channel)
        del lead
    group.ChannelDefinitionSequence = channels
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    samples = np.stack([_beats(seconds, rate, lead) for lead in range(len(LEADS))], axis=1)
    group.WaveformData = samples.round().astype("<i2").tobytes()  # interleaved by sample
    return group


def twelve_lead_ecg() -> Dataset:
    """A synthetic 12-lead ECG: two multiplex groups (10 s rhythm and a 1.2 s
    median beat at 500 Hz), twelve 16-bit channels each."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = ECG_SOP_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        "OHIF^Electrocardiogram", "OHIF-ECG", "19600101", "F"
    )  # fmt: skip
    ds.StudyDate = ds.ContentDate = ds.AcquisitionDateTime = "20240301"
    ds.StudyTime = ds.ContentTime = "101500"
    ds.StudyDescription, ds.AccessionNumber, ds.StudyID = "OHIF ECG", "ACCECG", "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "ECG", 1, 1
    ds.Manufacturer, ds.ReferringPhysicianName = "IMAG tests", ""
    ds.WaveformSequence = [
        _multiplex_group("RHYTHM", 10, 500),
        _multiplex_group("MEDIAN", 1.2, 500),
    ]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)  # a Part 10 file, as a device writes it
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


@pytest.fixture(scope="module")
def studies() -> dict[str, list[Dataset]]:
    return {
        "CT": synthetic_study("CT", "OHIF^Computed", rows=256, columns=256, instances=12),
        "MG": synthetic_study("MG", "OHIF^Mammography"),
        "US": [ultrasound_multiframe()],
        "ECG": [twelve_lead_ecg()],
    }


@pytest.fixture(scope="module")
def imag(tmp_path_factory, studies) -> Iterator[InProcessImag]:
    """IMAG serving the OHIF build at /viewer/, with the four studies stored
    over STOW-RS."""
    settings = {"IMAG_VIEWER_OHIF_DIR": str(OHIF_DIR)}
    with serving_in_process(tmp_path_factory.mktemp("ohif") / "imag", settings=settings) as imag:
        client = imag.client()
        for datasets in studies.values():
            client.store_instances(datasets)
        yield imag


# -- the browser ------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with launched_chromium() as browser:
        yield browser


# Every console error fails a test unless it is one of these, each of which
# the browser says about itself, never about an answer of the server.
CLIENT_ONLY = [
    re.compile(r"^WebGL: "),  # SwiftShader's software GL notices
]


def server_problems(watch: PageWatch, origin: str) -> list[Problem]:
    """What went wrong that the server answered or caused: any answer >= 400
    from this origin, a request to it that failed (other than one the viewer
    itself cancelled), every page error and console error (but the browser's
    own notices above)."""
    found = []
    for problem in watch.problems:
        if problem.kind == "status" and problem.url.startswith(origin):
            found.append(problem)
        elif problem.kind == "requestfailed" and problem.url.startswith(origin):
            if "ERR_ABORTED" not in problem.text:  # the viewer cancelled a prefetch
                found.append(problem)
        elif problem.kind in ("console", "pageerror") and not any(
            pattern.search(problem.text) for pattern in CLIENT_ONLY
        ):
            found.append(problem)
    return found


def with_token(context, token: str) -> None:
    """The viewer's DICOMweb requests carry the token (what OHIF's OIDC sign-in
    does for the study list); the viewer's own files get no credential."""

    def add(route) -> None:
        route.continue_(headers={**route.request.headers, "authorization": f"Bearer {token}"})

    context.route(re.compile(r"/dicom-web/"), add)


def viewport_variance(page) -> tuple[float, bytes]:
    """The grey-level variance of the largest canvas (the viewport) alone: every
    other element is made invisible for the shot, so that overlays (OHIF's
    first-use tour and notice), text and panels cannot pass for a rendered
    image."""
    box = page.evaluate(
        """() => {
            let best = null, area = 0;
            for (const c of document.querySelectorAll('canvas')) {
                const r = c.getBoundingClientRect();
                if (r.width * r.height > area) { area = r.width * r.height; best = r; }
            }
            return best && {x: best.x, y: best.y, width: best.width, height: best.height};
        }"""
    )
    if not box or box["width"] < 50 or box["height"] < 50:
        return 0.0, b""
    style = page.add_style_tag(
        content="* { visibility: hidden !important } canvas { visibility: visible !important }"
        " .shepherd-element, .shepherd-modal-overlay-container { display: none !important }"
    )
    try:
        png = page.screenshot(clip=box)
    finally:
        style.evaluate("node => node.remove()")
    return screenshot_variance(png), png


def wait_for_rendering(page, timeout: float = 60.0) -> tuple[float, bytes]:
    """Wait until the viewport shows an image (a variance a blank or uniform
    canvas cannot have); the last measure when it never does."""
    variance, png = 0.0, b""
    deadline = timeout * 1000
    waited = 0
    while waited < deadline:
        variance, png = viewport_variance(page)
        if variance > RENDERED:
            break
        page.wait_for_timeout(500)
        waited += 500
    return variance, png


#: grey-level variance above which a viewport shows an image: a blank canvas
#: has 0, one with a single uniform tone 0, an image with structure thousands
RENDERED = 150.0
SHOTS = Path(os.environ.get("IMAG_TEST_SHOTS", "")) if os.environ.get("IMAG_TEST_SHOTS") else None


@pytest.mark.slow
def test_the_study_list_shows_every_stored_study(imag, studies, chromium) -> None:
    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    watch = PageWatch().attach(context)
    with_token(context, imag.token)
    page = context.new_page()
    try:
        page.goto(imag.url + "/viewer/")
        for name in ("Computed", "Mammography", "Ultrasound", "Electrocardiogram"):
            page.get_by_text(re.compile(f"OHIF, {name}|OHIF\\^{name}")).first.wait_for(
                timeout=60_000
            )
        page.wait_for_load_state("networkidle")
        assert page.get_by_text("4 of 4").count() or page.get_by_text("1-4 of 4").count()
        qido = [url for url, status in watch.responses if "/dicom-web/studies" in url]
        assert qido, "the study list did not query IMAG"
        assert server_problems(watch, imag.url) == []
    finally:
        context.close()


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["CT", "MG", "US", "ECG"])
def test_each_study_displays_in_the_viewer_without_a_server_error(
    imag, studies, chromium, modality
) -> None:
    """Opened the way a shared link opens it: OHIF's own ``?token=``, which it
    sends as a Bearer credential on every DICOMweb request and removes from the
    address bar."""
    study_uid = studies[modality][0].StudyInstanceUID
    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    watch = PageWatch().attach(context)
    page = context.new_page()
    try:
        page.goto(f"{imag.url}/viewer/viewer?StudyInstanceUIDs={study_uid}&token={imag.token}")
        variance, png = wait_for_rendering(page)
        if SHOTS is not None:
            SHOTS.mkdir(parents=True, exist_ok=True)
            (SHOTS / f"ohif-{modality}.png").write_bytes(png)
        page.wait_for_load_state("networkidle")
        assert "token=" not in page.url, "OHIF keeps the credential in the address bar"
        assert variance > RENDERED, f"the {modality} viewport stayed blank ({variance:.0f})"
        data = [(url, status) for url, status in watch.responses if "/dicom-web/" in url]
        assert any(study_uid in url and status == 200 for url, status in data)
        assert server_problems(watch, imag.url) == []
    finally:
        context.close()


@pytest.mark.slow
def test_a_forged_token_opens_the_viewer_but_no_data(imag, studies, chromium) -> None:
    """The adversary: the viewer's files are public, the data is not.  A
    made-up token gets the application and 401s on every DICOMweb request,
    and the viewport shows no image."""
    study_uid = studies["CT"][0].StudyInstanceUID
    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    watch = PageWatch().attach(context)
    page = context.new_page()
    try:
        forged = "imag_" + "A" * 40
        with page.expect_response(lambda response: "/dicom-web/" in response.url):
            page.goto(f"{imag.url}/viewer/viewer?StudyInstanceUIDs={study_uid}&token={forged}")
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(2000)
        data = [(url, status) for url, status in watch.responses if "/dicom-web/" in url]
        assert data and all(status == 401 for _, status in data), data
        variance, _ = viewport_variance(page)
        assert variance <= RENDERED
    finally:
        context.close()


# -- the routes, without a browser -----------------------------------------------


def test_the_viewer_files_are_public_typed_and_cached_by_their_hash(imag) -> None:
    anonymous = requests.Session()
    page = anonymous.get(imag.url + "/viewer/")
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert page.headers["Cache-Control"] == "no-cache"
    assert page.content == (OHIF_DIR / "index.html").read_bytes()
    # the build names its files from the root: each is served there, unchanged
    bundle = re.search(r'src="/(app\.bundle\.[0-9a-f]+\.js)"', page.text).group(1)
    script = anonymous.get(f"{imag.url}/{bundle}")
    assert script.status_code == 200 and script.content == (OHIF_DIR / bundle).read_bytes()
    assert script.headers["Content-Type"].startswith("text/javascript")
    assert script.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    wasm = sorted(OHIF_DIR.glob("*.wasm"))[0].name
    codec = anonymous.get(f"{imag.url}/{wasm}")
    assert codec.status_code == 200 and codec.headers["Content-Type"] == "application/wasm"
    # revalidation of what is not hashed: 304 on a matching ETag
    again = anonymous.get(imag.url + "/viewer/", headers={"If-None-Match": page.headers["ETag"]})
    assert again.status_code == 304
    # the SPA: a viewer link, or a reload on any of its pages, is the application
    link = anonymous.get(imag.url + "/viewer/viewer?StudyInstanceUIDs=1.2.3")
    assert link.status_code == 200 and link.content == page.content
    redirect = anonymous.get(imag.url + "/viewer?x=1", allow_redirects=False)
    assert redirect.status_code == 308 and redirect.headers["Location"] == "/viewer/?x=1"
    # the data is not public
    assert anonymous.get(imag.dicomweb + "/studies").status_code == 401


def test_the_app_config_is_generated_for_this_archive_not_read_from_the_build(imag) -> None:
    served = requests.get(imag.url + "/app-config.js")
    assert served.status_code == 200
    assert served.headers["Content-Type"].startswith("text/javascript")
    assert served.headers["Cache-Control"] == "no-cache"
    text = served.text
    assert served.content != (OHIF_DIR / "app-config.js").read_bytes()
    assert "cloudfront" not in text  # the build's default demo server is gone
    for root in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
        assert f"source.{root} = origin + '/dicom-web';" in text
    assert '"routerBasename": "/viewer"' in text
    assert '"supportsFuzzyMatching": true' in text
    assert '"omitQuotationForMultipartRequest": true' in text
    assert '"bulkDataURI": {\n' in text and '"enabled": true' in text
    assert "oidc" not in text.split("window.config = ", 1)[1].split(";\n", 1)[0]
    assert requests.get(imag.url + "/viewer/app-config.js").text == text


@pytest.mark.parametrize(
    "path",
    [
        "/viewer/missing.js",  # a missing script is a 404, never the HTML page
        "/assets/../../pyproject.toml",
        "/assets/%2e%2e/%2e%2e/pyproject.toml",
        "/assets/..%2f..%2fpyproject.toml",
        "/_redirects",  # Netlify's rules are not the viewer's files
        "/serve.json",
        "/not-a-viewer-file.js",  # nothing else of the root is taken
    ],
)
def test_no_path_reaches_outside_the_build_or_past_its_file_list(imag, path) -> None:
    """Asked with a valid token: IMAG answers a path it does not serve 401
    to an anonymous caller, whatever the path."""
    answer = imag.http.get(imag.url + path, allow_redirects=False)
    assert answer.status_code == 404, (path, answer.status_code, answer.text[:200])
    assert b"[project]" not in answer.content


def test_the_imag_routes_keep_their_paths_next_to_the_viewer(imag) -> None:
    """The viewer's root entries are added beside IMAG's routes, never over them."""
    assert requests.get(imag.url + "/health").status_code == 200
    whoami = imag.http.get(imag.url + "/whoami")
    assert whoami.status_code == 200 and whoami.headers["Content-Type"].startswith(
        "application/json"
    )


def test_a_folder_without_an_ohif_build_is_refused_at_start(tmp_path) -> None:
    from archive.config import ConfigError, load_config

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="viewer.ohif_dir"):
        load_config(env={"IMAG_VIEWER_OHIF_DIR": str(tmp_path / "empty")})


def test_without_the_setting_there_is_no_viewer(tmp_path) -> None:
    with serving_in_process(tmp_path / "imag") as plain:
        assert plain.http.get(plain.url + "/viewer/").status_code == 404
        assert plain.http.get(plain.url + "/app-config.js").status_code == 404
        assert requests.get(plain.url + "/viewer/").status_code == 401


def test_the_ecg_is_a_valid_twelve_lead_waveform(studies) -> None:
    """The synthetic ECG is what the acceptance asks for, read back by pydicom."""
    buffer = io.BytesIO()
    studies["ECG"][0].save_as(buffer, enforce_file_format=True)
    ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert ds.SOPClassUID == ECG_SOP_CLASS and len(ds.WaveformSequence) == 2
    for index, group in enumerate(ds.WaveformSequence):
        assert group.NumberOfWaveformChannels == 12 and group.WaveformBitsAllocated == 16
        samples = ds.waveform_array(index)
        assert samples.shape == (group.NumberOfWaveformSamples, 12)
        assert np.ptp(samples[:, 1]) > 1000  # lead II shows its QRS complexes
