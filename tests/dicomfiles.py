"""Small helpers to make valid and deliberately broken DICOM objects for tests."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataset import FileDataset
from pydicom.uid import generate_uid

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def pydicom_test_folders() -> list[Path]:
    """pydicom's bundled test files plus those of the pydicom-data package
    (globbed directly: pydicom's own lookup would try to download more)."""
    folders = [PYDICOM_TEST_FILES]
    try:
        import data_store  # pydicom-data

        folders.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    return folders


def base_dataset() -> FileDataset:
    return pydicom.dcmread(PYDICOM_TEST_FILES / "CT_small.dcm")


def encode(ds: FileDataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def make_instance(
    edit: Callable[[FileDataset], None] | None = None,
    *,
    study: str | None = None,
    series: str | None = None,
) -> bytes:
    """A valid CT instance with fresh UIDs, optionally edited before encoding."""
    ds = base_dataset()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if edit is not None:
        edit(ds)
    return encode(ds)
