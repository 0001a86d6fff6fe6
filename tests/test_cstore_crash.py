"""kill -9 during a C-STORE push loses nothing that was acknowledged.

``imag serve`` (SQLite) receives four concurrent associations (pynetdicom
SCUs in threads), and is killed with SIGKILL once a good part of the push was
acknowledged.  Every instance answered 0x0000 must then have its index row,
its object, and an audit entry naming it: the entry commits in the
transaction of the index row, not at association release.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from archive.index import open_database
from tests.dicomfiles import make_instance
from tests.dicomnet import CLIENT_HANDLERS
from tests.httpserver import HttpImag
from tests.processes import HOST
from tests.s3server import StoreUnderTest, s3_store_under_test

ASSOCIATIONS = 4
PER_ASSOCIATION = 120
KILL_AFTER = 150  # acknowledged instances, of 480


@pytest.fixture(params=["filesystem", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest) -> Iterator[StoreUnderTest]:
    """The server's data dir folder, or a fresh S3 bucket: an object must be
    whole in either before its row commits."""
    if request.param == "filesystem":
        yield StoreUnderTest("filesystem")
        return
    with s3_store_under_test(request.getfixturevalue("s3_server")) as bucket:
        yield bucket


@pytest.mark.slow
@pytest.mark.serial
def test_every_acknowledged_c_store_survives_kill_9_with_its_row_object_and_audit_entry(
    tmp_path: Path, store: StoreUnderTest
) -> None:
    server = HttpImag(tmp_path / "imag", dicom=True, settings=store.settings()).start()
    acknowledged: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()
    errors: list[BaseException] = []
    datasets = [
        [
            pydicom.dcmread(pydicom.filebase.DicomBytesIO(make_instance(study=study)))
            for _ in range(PER_ASSOCIATION)
        ]
        for study in (generate_uid() for _ in range(ASSOCIATIONS))
    ]

    def push(n: int) -> None:
        ae = AE(ae_title=f"MODALITY_{n}")
        ae.add_requested_context(CTImageStorage, str(datasets[n][0].file_meta.TransferSyntaxUID))
        assoc = ae.associate(
            HOST, server.dicom_port, ae_title=server.aet, evt_handlers=CLIENT_HANDLERS
        )
        if not assoc.is_established:
            errors.append(AssertionError(f"association {n} not established"))
            return
        try:
            for ds in datasets[n]:
                status = assoc.send_c_store(ds)
                if getattr(status, "Status", None) != 0x0000:
                    return  # the server is gone: nothing more is acknowledged
                with lock:
                    acknowledged.append(str(ds.SOPInstanceUID))
                    if len(acknowledged) >= KILL_AFTER:
                        enough.set()
        finally:
            if assoc.is_established:
                assoc.abort()

    threads = [threading.Thread(target=push, args=(n,)) for n in range(ASSOCIATIONS)]
    try:
        for t in threads:
            t.start()
        assert enough.wait(60), f"only {len(acknowledged)} acknowledged:\n{server.log()}"
        server.kill()  # SIGKILL, mid-push
        for t in threads:
            t.join(30)
    finally:
        server.kill()
    assert not errors, errors
    with lock:
        acked = set(acknowledged)
    assert len(acked) >= KILL_AFTER
    assert len(acked) < ASSOCIATIONS * PER_ASSOCIATION, "the kill came after the push ended"

    db = open_database(f"sqlite:///{tmp_path / 'imag' / 'data' / 'index.db'}")
    objects = store.open(tmp_path / "imag" / "data")
    try:
        rows = dict(db.query("SELECT sop_instance_uid, object_key FROM instances"))
        assert acked <= set(rows), f"{len(acked - set(rows))} acknowledged instances not indexed"
        for key in rows.values():  # and no index row without its object
            assert objects.exists(key), key
        audited: set[str] = set()
        for detail, outcome, status in db.query(
            "SELECT detail, outcome, status FROM audit WHERE action = 'dicom.c-store'"
        ):
            if outcome == "allowed" and status == 0:
                audited.update(json.loads(detail)["instances"])
        missing = acked - audited
        assert not missing, f"{len(missing)} acknowledged instances have no audit entry"
        assert audited <= set(rows)  # nothing audited as stored that is not
    finally:
        objects.close()
        db.close()
