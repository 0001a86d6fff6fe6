"""A series' metadata converts each distinct header value once: the JSON of a
top-level element is kept, by its bytes, for the series' other instances
(``archive.metadata.to_json``'s memo).  These tests hold the series'
metadata to what converting every instance on its own gives, for the values
whose conversion depends on more than their bytes: the data set's character
set, an implicit VR that PixelRepresentation resolves (``US or SS``), and
binary values, whose bulk data URI names their own instance."""

from __future__ import annotations

import json
from collections.abc import Callable

import pydicom
from pydicom.dataset import FileDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from archive.identity import Source
from archive.metadata import instance_metadata, series_metadata
from archive.retrieve import locate
from archive.runtime import Archive
from tests.dicomfiles import make_instance


def store_series(archive: Archive, edits: list[Callable[[FileDataset], None]]) -> tuple[str, str]:
    """One series of ``len(edits)`` CT instances, each edited before encoding."""
    study, series = generate_uid(), generate_uid()
    for edit in edits:
        data = make_instance(edit, study=study, series=series)
        result = archive.pipeline.ingest(data, Source(kind="import", site=""))
        assert result.ok, result.reason
    return study, series


def each_on_its_own(archive: Archive, study: str, series: str) -> dict[str, dict]:
    """Every instance's metadata converted alone (no memo), by SOP Instance UID."""
    items = locate(archive.db, "SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series})
    alone = {}
    for item in items:
        body, _ = instance_metadata(archive.store, item)
        alone[item.sop_instance_uid] = body
    return alone


def series_by_instance(archive: Archive, study: str, series: str) -> dict[str, dict]:
    found = series_metadata(archive.db, archive.store, study, series)
    assert found is not None
    return {i["00080018"]["Value"][0]: i for i in json.loads(found.text)}


def implicit(ds: FileDataset) -> None:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def test_a_series_metadata_is_what_each_instance_converted_alone_gives(
    archive: Archive,
) -> None:
    def numbered(n: int, syntax: str) -> Callable[[FileDataset], None]:
        def edit(ds: FileDataset) -> None:
            ds.file_meta.TransferSyntaxUID = syntax
            ds.InstanceNumber = n
            ds.ImagePositionPatient = [0.0, 0.0, -1.25 * n]
            ds.SliceLocation = -1.25 * n

        return edit

    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        study, series = store_series(archive, [numbered(n, syntax) for n in range(1, 6)])
        together = series_by_instance(archive, study, series)
        assert together == each_on_its_own(archive, study, series)
        assert sorted(i["00200013"]["Value"][0] for i in together.values()) == [1, 2, 3, 4, 5]


def test_the_same_name_bytes_in_two_character_sets_are_two_names(archive: Archive) -> None:
    """The adversary: a sender whose instances of one series disagree on
    their character set; the same bytes are another name in each."""

    utf8 = "CÔTÉ^ZOÉ".encode()

    def named(charset: str) -> Callable[[FileDataset], None]:
        def edit(ds: FileDataset) -> None:
            ds.SpecificCharacterSet = charset
            ds.add_new(0x00100010, "PN", utf8)  # these bytes, whatever the set

        return edit

    study, series = store_series(archive, [named("ISO_IR 192"), named("ISO_IR 100")])
    together = series_by_instance(archive, study, series)
    assert together == each_on_its_own(archive, study, series)
    names = {i["00100010"]["Value"][0]["Alphabetic"] for i in together.values()}
    assert names == {utf8.decode("utf-8"), utf8.decode("latin-1")}


def test_a_value_whose_implicit_vr_depends_on_pixel_representation_is_converted_per_instance(
    archive: Archive,
) -> None:
    """SmallestImagePixelValue is ``US or SS``: in Implicit VR its two bytes
    are 65535 unsigned and -1 signed; the memo must not give one instance
    the other's value."""

    def pixels(representation: int) -> Callable[[FileDataset], None]:
        def edit(ds: FileDataset) -> None:
            implicit(ds)
            ds.PixelRepresentation = representation
            ds.SmallestImagePixelValue = 65535 if representation == 0 else -1
            ds["SmallestImagePixelValue"].VR = "US" if representation == 0 else "SS"

        return edit

    study, series = store_series(archive, [pixels(0), pixels(1), pixels(0)])
    together = series_by_instance(archive, study, series)
    assert together == each_on_its_own(archive, study, series)
    assert sorted(i["00280106"]["Value"][0] for i in together.values()) == [-1, 65535, 65535]


def test_binary_values_keep_their_own_instances_bulk_data_uri(archive: Archive) -> None:
    def with_blob(ds: FileDataset) -> None:
        ds.add_new(0x00091010, "OB", b"\x01" * 4096)  # a private blob over the threshold

    study, series = store_series(archive, [with_blob, with_blob])
    together = series_by_instance(archive, study, series)
    assert together == each_on_its_own(archive, study, series)
    for sop, instance in together.items():
        assert f"/instances/{sop}/bulk/" in instance["00091010"]["BulkDataURI"]


def test_converting_a_series_converts_each_distinct_value_once(archive: Archive) -> None:
    """What the memo is for: the later instances of a series convert only
    what differs (their UIDs, their numbers) and their sequences' items."""

    def numbered(n: int) -> Callable[[FileDataset], None]:
        def edit(ds: FileDataset) -> None:
            ds.InstanceNumber = n

        return edit

    def conversions(count: int) -> int:
        study, series = store_series(archive, [numbered(n) for n in range(1, count + 1)])
        calls = []
        original = pydicom.dataelem.DataElement.to_json_dict

        def counting(self: pydicom.dataelem.DataElement, *args: object) -> dict:
            calls.append(self.tag)
            return original(self, *args)

        pydicom.dataelem.DataElement.to_json_dict = counting  # type: ignore[method-assign]
        try:
            series_by_instance(archive, study, series)
        finally:
            pydicom.dataelem.DataElement.to_json_dict = original  # type: ignore[method-assign]
        return len(calls)

    one, ten = conversions(1), conversions(10)
    assert one > 50  # a CT header
    assert ten < one + 9 * 10, (one, ten)  # converted alone, it would be 10 * one


def test_a_number_no_64_bit_integer_holds_is_still_described(archive: Archive) -> None:
    """The adversary: a broken sender's InstanceNumber of 21 digits (an IS
    holds 12 characters).  It is stored (it failed the index write, "retry
    later", for ever), indexed without it, and the series' metadata is
    still answered, with it."""

    def huge(ds: FileDataset) -> None:
        ds.add_new(0x00200013, "IS", b"123456789012345678901")

    study, series = store_series(archive, [huge])
    together = series_by_instance(archive, study, series)
    assert together == each_on_its_own(archive, study, series)
    [instance] = together.values()
    [number] = instance["00200013"]["Value"]  # as pydicom reads it (through a float)
    assert number > 2**64 and abs(number - 123456789012345678901) < 10**6
    # the index holds no number its integer column cannot hold
    rows = archive.db.query("SELECT instance_number FROM instances")
    assert rows == [(None,)]
