"""QIDO-RS answers are written straight from index rows as JSON text
(dicomweb.qido_json), without a pydicom Dataset per row: they must say
exactly what pydicom's DICOM JSON of the same values says."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from archive.query import ATTRIBUTES
from dicomweb.qido import answer_body


def to_json(rows: list[dict[str, Any]], fields: list[str], base: str, level: str) -> list[dict]:
    """The answer's body as the client reads it (keys in the order written)."""
    return orjson.loads(answer_body(rows, fields, base, level))


def _pydicom_answers(rows: list[dict[str, Any]], fields: list[str], base: str, level: str):
    """What QIDO answered before: a Dataset per row, serialised by pydicom."""
    out = []
    for row in rows:
        ds = Dataset()
        for keyword in dict.fromkeys(fields):
            if keyword not in ATTRIBUTES and keyword not in row:
                tag = tag_for_keyword(keyword)
                if tag is not None:
                    ds.add_new(tag, dictionary_VR(tag), None)
                continue
            value = row.get(keyword)
            tag = tag_for_keyword(keyword)
            if value is not None and keyword == "ModalitiesInStudy":
                value = [m for m in str(value).split("\\") if m]
            ds.add_new(tag, dictionary_VR(tag), value if value not in ("",) else None)
        ds.InstanceAvailability = "ONLINE"
        url = f"{base}/studies/{row.get('StudyInstanceUID')}"
        if level in ("SERIES", "IMAGE") and row.get("SeriesInstanceUID"):
            url += f"/series/{row['SeriesInstanceUID']}"
        if level == "IMAGE":
            url += f"/instances/{row['SOPInstanceUID']}"
        ds.RetrieveURL = url
        out.append(ds.to_json_dict())
    return out


_TEXT = st.text(alphabet=st.sampled_from("ABCÉÔÜ^ =-.0123456789 abcéz'"), min_size=0, max_size=12)
_UID = st.from_regex(r"\A[1-9][0-9]{0,3}(\.[1-9][0-9]{0,3}){1,4}\Z")


def _value(keyword: str):
    vr = ATTRIBUTES[keyword].vr
    if vr == "IS":
        return st.none() | st.integers(-(2**31), 2**31 - 1)
    if vr == "UI":
        return st.none() | st.just("") | _UID
    if keyword == "ModalitiesInStudy":
        return st.none() | st.lists(st.sampled_from(["CT", "MR", "SR", "PT"])).map("\\".join)
    if vr == "PN":
        # (pydicom cannot write a PN list with an empty value: the old path answered 500)
        names = _TEXT.filter(lambda t: t.rstrip("=") != "")
        return st.none() | _TEXT | st.lists(names, min_size=2, max_size=3).map("\\".join)
    return st.none() | _TEXT


_KEYWORDS = [k for k, a in ATTRIBUTES.items() if a.level != "PATIENT" or a.column]
_ROWS = st.fixed_dictionaries({k: _value(k) for k in _KEYWORDS})


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(_ROWS, min_size=1, max_size=3),
    level=st.sampled_from(["STUDY", "SERIES", "IMAGE"]),
    extra_fields=st.lists(
        st.sampled_from(["Laterality", "PatientComments", "ReferencedStudySequence", "Rows"]),
        max_size=3,
    ),
)
def test_answers_built_from_rows_say_what_pydicoms_json_of_the_same_values_says(
    rows: list[dict[str, Any]], level: str, extra_fields: list[str]
) -> None:
    fields = [*_KEYWORDS, *extra_fields]
    base = "http://archive.example/dicom-web"
    got = to_json(rows, fields, base, level)
    assert got == _pydicom_answers(rows, fields, base, level)
    assert [list(a) for a in got] == [sorted(a) for a in got]  # keys in tag order
    # and byte for byte what orjson writes of pydicom's (the text, not only its meaning)
    assert answer_body(rows, fields, base, level) == orjson.dumps(got)


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    pool=st.lists(_ROWS, min_size=1, max_size=3),
    level=st.sampled_from(["STUDY", "SERIES", "IMAGE"]),
)
def test_answers_whose_rows_share_values_say_what_pydicom_says(
    data: st.DataObject, pool: list[dict[str, Any]], level: str
) -> None:
    """A field whose rows share few values encodes each once and shares the
    element (AnswerBuilder): the answers are still each row's own."""
    rows = data.draw(st.lists(st.sampled_from(pool), min_size=2, max_size=12))
    rows = [dict(row) for row in rows]
    base = "http://archive.example/dicom-web"
    got = to_json(rows, _KEYWORDS, base, level)
    assert got == _pydicom_answers(rows, _KEYWORDS, base, level)


def test_a_french_name_with_accents_and_groups_becomes_pn_components() -> None:
    row = {"StudyInstanceUID": "1.2.3", "PatientName": "CÔTÉ^Zoé=コテ^ゾエ"}
    (answer,) = to_json([row], ["PatientName"], "http://x", "STUDY")
    assert answer["00100010"] == {
        "vr": "PN",
        "Value": [{"Alphabetic": "CÔTÉ^Zoé", "Ideographic": "コテ^ゾエ"}],
    }
    assert answer["00081190"]["Value"] == ["http://x/studies/1.2.3"]
