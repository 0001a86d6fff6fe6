"""Load Orthanc with the same synthetic studies as the bulk-loaded IMAG index.

Orthanc has no bulk loader: each instance of :mod:`benchmarks.scale_data`
becomes a small DICOM object (the attributes the query mix reads, no pixel
data) posted to its REST API (``POST /instances``) over keep-alive
connections, a few in parallel.  The values are the same pure functions of
(seed, row number), so a query drawn from the data finds the same studies in
both archives.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from urllib.parse import urlsplit

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from benchmarks import scale_data


def instance_bytes(patient: scale_data.Patient, study: scale_data.Study,
                   series: scale_data.Series, i: int) -> bytes:  # fmt: skip
    """One instance of ``series`` as a Part 10 file: what QIDO and C-FIND read."""
    sop = scale_data.instance_uid(series, i)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = series.sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = series.sop_class
    ds.SOPInstanceUID = sop
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.site
    ds.PatientName = patient.name
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study.uid
    ds.StudyDate = study.date
    ds.StudyTime = study.time
    ds.AccessionNumber = study.accession
    ds.StudyDescription = study.description
    ds.StudyID = str(study.id)
    ds.InstitutionName = study.site
    ds.SeriesInstanceUID = series.uid
    ds.Modality = series.modality
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    ds.InstanceNumber = i + 1
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def instances(shape: scale_data.Shape, seed: int) -> Iterator[bytes]:
    """Every instance of the synthetic index, study by study."""
    for number in range(1, shape.studies + 1):
        study = scale_data.study(seed, number, shape)
        patient = scale_data.patient(seed, study.patient)
        for series in study.series:
            for i in range(series.instances):
                yield instance_bytes(patient, study, series, i)


def load(
    base_url: str,
    shape: scale_data.Shape,
    seed: int,
    progress: Callable[[str], None],
    connections: int = 4,
) -> float:
    """Post every instance to Orthanc at ``base_url``; the seconds it took."""
    url = urlsplit(base_url)
    local = threading.local()
    lock = threading.Lock()
    done = [0]
    started = time.monotonic()
    last = [started]

    def post(body: bytes) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
        conn.request("POST", "/instances", body, {"Content-Type": "application/dicom"})
        response = conn.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"Orthanc refused an instance: HTTP {response.status} {answer!r}")
        with lock:
            done[0] += 1
            now = time.monotonic()
            if now - last[0] > 10:
                last[0] = now
                rate = done[0] / (now - started)
                progress(f"Orthanc: {done[0]:,}/{shape.instances:,} instances ({rate:,.0f}/s)")

    with ThreadPoolExecutor(connections) as pool:
        # bounded: never more than a few thousand encoded objects waiting
        pending = []
        for body in instances(shape, seed):
            pending.append(pool.submit(post, body))
            if len(pending) >= 2000:
                for future in pending:
                    future.result()
                pending.clear()
        for future in pending:
            future.result()
    seconds = time.monotonic() - started
    progress(f"Orthanc: {done[0]:,} instances loaded in {seconds:.0f} s")
    return seconds


if __name__ == "__main__":  # a quick look at one object
    sys.stdout.buffer.write(next(instances(scale_data.Shape(10), 1)))
