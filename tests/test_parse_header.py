"""The ingest's header parse reads what pydicom reads.

``archive.parse.parse_header`` reads an object's data set from where its file
meta ended (the file meta read once, not again by ``dcmread``) and converts
the elements the pipeline needs in one pass rather than one pydicom access at
a time.  Both are shortcuts of pydicom's own reading; these tests hold them
to it, on every Part 10 file pydicom and pydicom-data ship (implicit and
explicit VR, big endian, deflated, private transfer syntaxes, ISO 2022
character sets, files with group 0000 elements, broken files).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from archive.parse import Header, Rejected, dataset_offset, parse_header
from tests.dicomfiles import make_instance, pydicom_test_folders

#: files pydicom reads as Part 10 objects (a 'DICM' prefix after the preamble), small
#: enough to read whole; pydicom-data holds a few of several hundred MB
_MAX_BYTES = 64 * 1024 * 1024


def _part10_files() -> list[Path]:
    files = []
    for folder in pydicom_test_folders():
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.stat().st_size > _MAX_BYTES:
                continue
            with open(path, "rb") as fp:
                head = fp.read(132)
            if head[128:132] == b"DICM":
                files.append(path)
    return files


PART10 = _part10_files()


def _dcmread(data: bytes) -> Dataset | None:
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - pydicom cannot read it: parse_header must refuse it
        return None


def _value(ds: Dataset, tag: int) -> object:
    try:
        return ds[tag].value
    except Exception as exc:  # noqa: BLE001 - an unconvertible value: both must fail alike
        return type(exc)


def test_the_corpus_holds_the_encodings_the_shortcut_must_match() -> None:
    """Guard for the test below: it proves nothing on a corpus without them."""
    syntaxes = set()
    for path in PART10:
        ds = _dcmread(path.read_bytes())
        if ds is not None:
            syntaxes.add(str(ds.file_meta.get("TransferSyntaxUID", "")))
    assert len(PART10) > 100
    assert {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
    } <= syntaxes


@pytest.mark.parametrize("path", PART10, ids=lambda p: p.name)
def test_every_header_parsed_holds_the_data_set_pydicom_reads(path: Path) -> None:
    data = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            header: Header | None = parse_header(data)
        except Rejected:
            header = None
        reference = _dcmread(data)
    if header is None:
        return  # refused: a refusal is the pipeline's own decision, checked elsewhere
    assert reference is not None, "parse_header accepted what pydicom cannot read"
    ds = header.dataset
    assert ds.file_meta == reference.file_meta
    assert ds.preamble == reference.preamble
    assert (ds.is_little_endian, ds.is_implicit_VR) == (
        reference.is_little_endian,
        reference.is_implicit_VR,
    )
    assert ds.original_character_set == reference.original_character_set
    assert list(ds.keys()) == list(reference.keys())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tag in sorted(reference.keys()):
            ours, theirs = _value(ds, tag), _value(reference, tag)
            assert ours == theirs, f"{tag}: {ours!r} != {theirs!r}"
            assert type(ours) is type(theirs), f"{tag}: {type(ours)} != {type(theirs)}"


def test_values_in_another_character_set_are_decoded_in_it() -> None:
    """The one-pass conversion uses the data set's Specific Character Set,
    as pydicom's access does: a Greek name reads as Greek."""

    def greek(ds: Dataset) -> None:
        ds.SpecificCharacterSet = "ISO_IR 126"
        ds.PatientName = "Διονυσιος"
        ds.StudyDescription = "Αξονική"

    header = parse_header(make_instance(greek))
    assert str(header.dataset.PatientName) == "Διονυσιος"
    assert header.dataset.StudyDescription == "Αξονική"


def test_a_value_that_cannot_be_converted_is_refused_as_before() -> None:
    """An element the one-pass conversion cannot convert is left for its
    reader, which refuses the object naming it, as pydicom's access did:
    Rows (US) three bytes long."""
    data = make_instance()
    at = data.index(b"\x28\x00\x10\x00US\x02\x00")
    rows = b"\x28\x00\x10\x00US\x03\x00" + data[at + 8 : at + 10] + b"\x00"
    data = data[:at] + rows + data[at + 10 :]
    with pytest.raises(Rejected) as refused:
        parse_header(data)
    assert refused.value.code == "inconsistent-pixel-data"
    assert "Rows" in refused.value.reason


def test_elements_before_the_data_set_in_group_0000_are_read_as_pydicom_reads_them() -> None:
    """A file with command elements after its file meta: the shortcut leaves
    it to dcmread, which keeps them in the data set."""
    data = make_instance()
    dataset_start = dataset_offset(io.BytesIO(data))
    command = b"\x00\x00\x00\x00\x04\x00\x00\x00\x0c\x00\x00\x00"  # (0000,0000) UL 12
    command += b"\x00\x00\x00\x01\x02\x00\x00\x00\x30\x00"  # (0000,0100) US 0x0030
    patched = data[:dataset_start] + command + data[dataset_start:]
    reference = _dcmread(patched)
    try:
        header = parse_header(patched)
    except Rejected:
        return
    assert reference is not None
    assert list(header.dataset.keys()) == list(reference.keys())
