"""The hostile-input corpus (:mod:`tests.hostile`) sent over every ingest
path - STOW-RS, C-STORE and ``imag import`` - to one real ``imag serve`` per
index backend (SQLite and PostgreSQL), with the DICOM listener on.

Issue 11, classes 4 and 6 at ingest: decompression bombs, declared decoded
sizes past the limits, pixel data that disagrees with the image attributes,
sequences nested 10,000 deep, and what the fuzzer found.  Each case asserts:

* the precise refusal: STOW-RS 409 with the case's FailureReason, C-STORE
  the same DIMSE status with the reason in ErrorComment, ``imag import`` the
  rejection code and the reason naming the setting;
* nothing stored: QIDO-RS does not find the study, the index has no row for
  the instance, the object store has no new object;
* exactly one audit row for the request;
* the server still answers /health and stores a normal instance afterwards;
* the server's peak memory (VmHWM) stays under 500 MB through every bomb,
  three of them in parallel over STOW-RS included.

Both parse paths (in memory, and streamed from a file for objects past
``ingest.stream_threshold``) are run on every case directly, and through
``imag import`` with the threshold at one byte.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config

from archive.config import load_config
from archive.index import open_database
from archive.index.db import Database
from archive.parse import Rejected, parse_header, parse_header_file
from archive.validate import Limits, inflate
from tests.dicomfiles import make_instance
from tests.dicomnet import CLIENT_HANDLERS
from tests.hostile import BY_NAME, CASES, Case, valid_objects, write_corpus
from tests.httpserver import HttpImag, running_imag
from tests.processes import HOST
from tests.s3server import StoreUnderTest, index_for_store
from tests.test_dicomweb import DICOM, multipart

#: the shared server runs on a folder and on an S3 bucket (S3 on the SQLite index)
pytestmark = pytest.mark.s3_on_sqlite

#: the status each rejection code is answered with, over C-STORE and in STOW's FailureReason
#: (PS3.4 B.2.3 / PS3.18 Table 10.5.3-2)
STATUS = {
    "inflated-too-large": 0xA700,  # Refused: Out of Resources (a limit of ours)
    "decoded-too-large": 0xA700,
    "too-deep": 0xA700,
    "inconsistent-pixel-data": 0xA900,  # Error: Data Set does not match SOP Class
    "truncated": 0xC000,  # Error: Cannot understand
    "malformed": 0xC000,
}
#: the status a code not (yet) in the services' tables is answered with
PEAK_RSS_LIMIT_MB = 500
BOMBS = ["deflate-bomb"]
CASE_NAMES = [case.name for case in CASES]
AET = "HOSTILE"


@pytest.fixture(scope="module")
def index_url(module_index_url: str, module_store: StoreUnderTest) -> str:
    """One index per backend and object store (S3 on the SQLite index)."""
    return index_for_store(module_index_url, module_store)


@dataclass
class World:
    server: HttpImag
    db: Database
    corpus: dict[str, Path]  # case name → its file
    store: StoreUnderTest  # a folder or an S3 bucket

    def stored_objects(self) -> set[str]:
        """The keys of every stored object, in the folder or the bucket."""
        return set(self.store.keys(self.server.workdir / "data"))

    def last_audit_id(self) -> int:
        return int(self.db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))

    def audit_since(self, last: int) -> list[dict]:
        rows = self.db.query(
            "SELECT actor, action, outcome, status, study_uid, detail FROM audit "
            "WHERE id > ? ORDER BY id",
            (last,),
        )
        keys = ["actor", "action", "outcome", "status", "study", "detail"]
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def peak_rss_mb(self) -> float:
        """The highest resident memory (VmHWM) of the server and its children."""
        assert self.server.proc is not None
        process = psutil.Process(self.server.proc.pid)
        peaks = []
        for p in [process, *process.children(recursive=True)]:
            try:
                status = Path(f"/proc/{p.pid}/status").read_text()
            except OSError:
                continue
            kb = next(
                int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")
            )
            peaks.append(kb / 1024)
        return max(peaks)


@pytest.fixture(scope="module")
def world(
    index_url: str, module_store: StoreUnderTest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    corpus = write_corpus(tmp_path_factory.mktemp("hostile"))
    settings = {
        "IMAG_AUTH_MAX_FAILURES": "100000",
        **module_store.settings(),
        **module_store.env,
    }
    with running_imag(
        tmp_path_factory.mktemp("imag"), index_url=index_url, dicom=True, settings=settings
    ) as server:
        db = open_database(index_url)
        try:
            yield World(server, db, corpus, module_store)
        finally:
            db.close()
        peak = World(server, db, corpus, module_store).peak_rss_mb()
        print(f"\nimag serve peak RSS (VmHWM) through the corpus: {peak:.0f} MB")
        assert peak < PEAK_RSS_LIMIT_MB
    assert "Traceback" not in server.log(), server.log()[-5000:]


def assert_status(actual: int, code: str) -> None:
    """``actual`` is the status the refusal ``code`` maps to (dicomweb/stow.py
    FAILURE, archive/ingest.py DIMSE_STATUS), never the 0xC000 fallback."""
    assert actual == STATUS[code], f"{code}: 0x{actual:04X}, expected 0x{STATUS[code]:04X}"


def stow(server: HttpImag, *datas: bytes) -> requests.Response:
    boundary = "imag-test-3f2a"
    return requests.post(
        server.dicomweb + "/studies",
        data=multipart([(DICOM, data) for data in datas], boundary),
        headers={
            "Content-Type": f'multipart/related; type="{DICOM}"; boundary={boundary}',
            "Authorization": f"Bearer {server.token}",
        },
        timeout=120,
    )


def assert_nothing_stored(world: World, case: Case, before: set[Path]) -> None:
    found = world.server.http.get(
        world.server.dicomweb + "/studies",
        params={"StudyInstanceUID": case.study_uid},
        timeout=30,
    )
    assert found.status_code in (200, 204), found.text
    assert found.status_code == 204 or found.json() == []
    assert not world.db.scalar(
        "SELECT COUNT(*) FROM instances WHERE sop_instance_uid = ?", (case.sop_instance_uid,)
    )
    assert world.stored_objects() == before


def assert_still_serving(world: World) -> None:
    """/health answers and a normal instance is stored."""
    assert requests.get(world.server.url + "/health", timeout=10).json()["status"] == "ok"
    answer = stow(world.server, make_instance())
    assert answer.status_code == 200, answer.text


# -- both parse paths, directly --------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_each_hostile_object_is_refused_by_both_parse_paths(name: str) -> None:
    case = BY_NAME[name]
    data = case.data()
    for parse in (
        lambda: parse_header(data, Limits()),
        lambda: parse_header_file(io.BytesIO(data), len(data), Limits()),
    ):
        with pytest.raises(Rejected) as refused:
            parse()
        assert refused.value.code == case.code
        assert case.reason in refused.value.reason


def test_the_limits_are_the_settings_defaults_and_follow_the_settings() -> None:
    assert Limits.from_config(load_config(env={})) == Limits()
    config = load_config(env={"IMAG_INGEST_MAX_SEQUENCE_DEPTH": "4"})
    assert Limits.from_config(config).max_sequence_depth == 4


def test_valid_objects_at_the_edges_of_the_limits_are_accepted() -> None:
    """Sequences exactly as deep as allowed, native pixel data padded by less
    than a frame, RLE frames with an offset table, deflated data: accepted."""
    for name, data in valid_objects().items():
        for header in (
            parse_header(data),
            parse_header_file(io.BytesIO(data), len(data)),
        ):
            assert header.sop_instance_uid, name


def test_each_limit_is_configurable_and_refuses_just_past_it() -> None:
    valid = valid_objects()
    with pytest.raises(Rejected, match="ingest.max_sequence_depth"):
        parse_header(valid["nested-32"], Limits(max_sequence_depth=31))
    with pytest.raises(Rejected, match="ingest.max_inflated_bytes"):
        parse_header(valid["deflated"], Limits(max_inflated_bytes=1024))
    with pytest.raises(Rejected, match="ingest.max_frame_bytes"):
        parse_header(valid["explicit"], Limits(max_frame_bytes=64 * 64 * 2 - 1))
    with pytest.raises(Rejected, match="ingest.max_decoded_bytes"):
        parse_header(valid["rle-frames"], Limits(max_decoded_bytes=3 * 64 * 64 * 2 - 1))
    assert parse_header(valid["rle-frames"], Limits(max_decoded_bytes=3 * 64 * 64 * 2))


def test_inflate_gives_back_exactly_the_deflated_bytes_however_they_are_chunked() -> None:
    """Both passes of the bounded inflate (count, then keep) agree on streams
    whose output runs past a chunk with no input left (long runs of zeros)."""
    rng = random.Random(11)
    for level in (1, 6, 9):
        raw = b"".join(
            rng.randbytes(rng.randint(0, 50_000)) + bytes(rng.randint(0, 3_000_000))
            for _ in range(4)
        )
        deflater = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        stream = deflater.compress(raw) + deflater.flush()
        for size in (777, 1 << 16, len(stream)):
            chunks = [stream[at : at + size] for at in range(0, len(stream), size)]
            assert inflate(chunks, len(raw)) == raw
        with pytest.raises(Rejected, match="ingest.max_inflated_bytes"):
            inflate([stream], len(raw) - 1)


# -- STOW-RS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
def test_stow_refuses_each_hostile_object_precisely_and_stores_nothing(
    world: World, name: str
) -> None:
    case = BY_NAME[name]
    before, last = world.stored_objects(), world.last_audit_id()
    answer = stow(world.server, case.data())
    assert answer.status_code == 409, answer.text
    [failed] = answer.json()["00081198"]["Value"]  # FailedSOPSequence
    [reason] = failed["00081197"]["Value"]
    assert_status(reason, case.code)
    [entry] = world.audit_since(last)
    assert (entry["actor"], entry["action"], entry["outcome"], entry["status"]) == (
        "admin",
        "stow.store",
        "failed",
        409,
    )
    assert_nothing_stored(world, case, before)
    assert_still_serving(world)


def test_three_deflate_bombs_at_once_over_stow_keep_the_server_under_500_mb(
    world: World,
) -> None:
    bomb = BY_NAME["deflate-bomb"]
    before, last = world.stored_objects(), world.last_audit_id()
    started = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: stow(world.server, bomb.data()), range(3)))
    elapsed = time.monotonic() - started
    for answer in answers:
        assert answer.status_code == 409, answer.text
        [failed] = answer.json()["00081198"]["Value"]
        [reason] = failed["00081197"]["Value"]
        assert_status(reason, bomb.code)
    assert len(world.audit_since(last)) == 3
    assert_nothing_stored(world, bomb, before)
    peak = world.peak_rss_mb()
    print(f"\nthree bombs over STOW-RS in {elapsed:.1f} s; server peak RSS {peak:.0f} MB")
    assert peak < PEAK_RSS_LIMIT_MB
    assert_still_serving(world)


# -- C-STORE ---------------------------------------------------------------------------------


def c_store(world: World, path: Path) -> Dataset:
    """Send the file as it is (pynetdicom streams it without decoding)."""
    meta = read_file_meta_info(path)  # without reading (or inflating) the data set
    ae = AE(ae_title=AET)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate(
        HOST, world.server.dicom_port, ae_title=world.server.aet, evt_handlers=CLIENT_HANDLERS
    )
    assert assoc.is_established
    try:
        return assoc.send_c_store(path)
    finally:
        assoc.release()
        ae.shutdown()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_c_store_refuses_each_hostile_object_precisely_and_stores_nothing(
    world: World, name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    case = BY_NAME[name]
    before, last = world.stored_objects(), world.last_audit_id()
    status = c_store(world, world.corpus[name])
    assert_status(status.Status, case.code)
    assert status.ErrorComment and status.ErrorComment in _reason_of(case)
    if case.reason.startswith("ingest."):  # a limit: the comment names its setting
        assert case.reason in status.ErrorComment
    rows = world.audit_since(last)  # written before the answer; taken before the checks add more
    assert_nothing_stored(world, case, before)
    normal = tmp_path / "normal.dcm"
    normal.write_bytes(make_instance())
    assert c_store(world, normal).Status == 0x0000
    assert_still_serving(world)
    [entry] = rows
    assert (entry["actor"], entry["action"], entry["outcome"]) == (AET, "dicom.c-store", "failed")


def _reason_of(case: Case) -> str:
    try:
        parse_header(case.data())
    except Rejected as exc:
        return exc.reason
    raise AssertionError(f"{case.name} is accepted")


# -- imag import -----------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", ["64MiB", "1"], ids=["in-memory", "streamed"])
@pytest.mark.slow
def test_imag_import_refuses_each_hostile_file_with_its_reason(
    world: World, threshold: str
) -> None:
    before, last = world.stored_objects(), world.last_audit_id()
    folder = next(iter(world.corpus.values())).parent
    done = subprocess.run(
        [sys.executable, "-m", "archive.cli", "import", "--json", "--quiet", str(folder)],
        env=world.server.env | {"IMAG_INGEST_STREAM_THRESHOLD": threshold},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr  # 2: some files were rejected
    # an operator's command on the server's own data: not an access the audit trail records
    assert world.audit_since(last) == []
    summary = json.loads(done.stdout)
    assert summary["stored"] == 0 and summary["rejected"] == len(CASES)
    refusals = {Path(r["path"]).stem: r for r in summary["rejections"]}
    for case in CASES:
        assert refusals[case.name]["code"] == case.code, refusals[case.name]
        assert case.reason in refusals[case.name]["reason"]
    for case in CASES:
        assert_nothing_stored(world, case, before)
    assert_still_serving(world)
