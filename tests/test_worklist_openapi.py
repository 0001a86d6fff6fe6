"""The worklist API against its own OpenAPI document: the document ``imag
serve`` publishes at ``/api/worklist/openapi.json`` is loaded by schemathesis,
which generates requests for every operation (valid and invalid ones) and
checks that none is answered 500 and that every answer matches the document
(status codes and bodies).

The server is the in-process one (tests/inprocess.py) with a few real
requests stored, so that the generated calls meet data as well as 404s.
Generated UIDs never name a stored request, so a report's whole life (draft,
validation, addendum, refusals) and the figures of a period are also played
with explicit calls, each answer checked against the document the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.transport import Response as Answer
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from archive.identity import Source
from tests.bodies import send_in_two_pieces
from tests.dicomfiles import make_instance
from tests.inprocess import InProcessImag, serving_in_process
from worklist.documents import MAX_TEXT_CHARS
from worklist.openapi import REQUESTS_API, Fragment, document
from worklist.screening import Rule
from worklist.screening_service import screening_of

EXAMPLES = 50  # per operation and mode: the whole test stays well under a minute
SITES = [{"name": "MQ-CHU", "time_zone": "America/Martinique"}]
SETTINGS = {
    "IMAG_SITES": json.dumps(SITES),
    "IMAG_LOG_LEVEL": "WARNING",
    # negative cases send broken credentials on purpose: not a brute force to stop
    "IMAG_AUTH_MAX_FAILURES": "100000",
}
FIELDS = {
    "requesting_physician": "Dr A",
    "clinical_context": "context",
    "question": "question",
    "anatomical_region": "head",
    "contraindications": "none",
    "exam_type": "CT head",
    "patient_consent": True,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessImag]:
    workdir: Path = tmp_path_factory.mktemp("worklist-openapi")
    with serving_in_process(workdir / "imag", settings=SETTINGS) as imag:
        assert imag.archive is not None
        for _ in range(3):
            study = make_instance()
            result = imag.archive.pipeline.ingest(study, Source("import", site="MQ-CHU"))
            body = {"study_uid": result.study_uid, "site": "MQ-CHU", "fields": FIELDS}
            made = imag.http.post(imag.url + "/api/worklist/requests", json=body, timeout=30)
            assert made.status_code == 201, made.text
        # a screening exam read at L1, so that the generated screening calls meet one too
        recognise(imag, result.study_uid)
        l1 = {"right": {"acr": 1, "density": "A"}, "left": {"acr": 2, "density": "B"}}
        path = f"/api/screening/exams/{result.study_uid}/first-reading"
        assert imag.http.post(imag.url + path, json=l1, timeout=30).status_code == 201
        yield imag


def recognise(server: InProcessImag, study_uid: str) -> None:
    """``study_uid`` as a screening exam (as the study.stable subscriber makes them)."""
    assert server.archive is not None
    screening_of(server.archive).recognise(
        study_uid=study_uid, site="MQ-CHU", patient_ref=None, study_date=None, rule=Rule("test")
    )


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_call_gets_a_server_error_or_an_undocumented_answer(
    server: InProcessImag, mode: GenerationMode
) -> None:
    # schemathesis' own pytest integration (schema.parametrize) does not run
    # under pytest 9: each operation's strategy is driven with @given instead
    schema = schemathesis.openapi.from_url(server.url + "/api/worklist/openapi.json", timeout=30)
    auth = {"Authorization": f"Bearer {server.token}"}
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /api/worklist/requests/{uid}/claim",
        "POST /api/screening/exams/{study}/first-reading",
    }

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def call(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=server.url, headers=auth, checks=checks)

        call()


def test_the_document_is_public_and_describes_every_mounted_route(server: InProcessImag) -> None:
    answer = requests.get(server.url + "/api/worklist/openapi.json", timeout=30)
    assert answer.status_code == 200
    served = answer.json()
    assert served["openapi"].startswith("3.1")
    mounted = {
        (route.method.lower(), route.resource.canonical)
        for route in server_routes(server)
        if route.resource is not None
        and route.resource.canonical.startswith(("/api/worklist/", "/api/screening/"))
        and route.method != "HEAD"
    }
    described = {(m, p) for p, ops in served["paths"].items() for m in ops}
    # each module that mounts routes hands its Fragment to worklist.openapi.contribute
    assert mounted - described == set(), "mounted, not described"
    assert described - mounted == set(), "described, not mounted"
    assert {
        ("post", "/api/worklist/requests/{uid}/claim"),
        ("get", "/api/worklist/stats"),
        ("post", "/api/worklist/requests/{uid}/report/addenda/{number}/validate"),
        ("get", "/api/screening/exams/{study}"),
        ("post", "/api/screening/exams/{study}/verdict"),
        ("put", "/api/screening/readers/{name}"),
    } <= described


def server_routes(server: InProcessImag) -> list:
    runner = server._runner
    assert runner is not None
    return list(runner.app.router.routes())


def test_two_fragments_describing_one_operation_are_refused() -> None:
    clash = Fragment(paths={"/api/worklist/requests": {"get": {"responses": {}}}})
    with pytest.raises(ValueError, match="GET /api/worklist/requests is described twice"):
        document(REQUESTS_API, clash)
    other = Fragment(paths={"/api/worklist/other": {"get": {"responses": {}}}})
    merged = document(REQUESTS_API, other)
    assert "/api/worklist/other" in merged["paths"]
    assert "ReadRequest" in merged["components"]["schemas"]


CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


def new_request(server: InProcessImag) -> str:
    """A request of a fresh study, as the fixture's."""
    assert server.archive is not None
    result = server.archive.pipeline.ingest(make_instance(), Source("import", site="MQ-CHU"))
    body = {"study_uid": result.study_uid, "site": "MQ-CHU", "fields": FIELDS}
    made = server.http.post(server.url + "/api/worklist/requests", json=body, timeout=30)
    assert made.status_code == 201, made.text
    return made.json()["uid"]


class Documented:
    """Calls by operationId, each answer checked against the served document
    as the generated ones are (no 500, a documented status, a conforming body)."""

    def __init__(self, server: InProcessImag) -> None:
        self.server = server
        self.schema = schemathesis.openapi.from_url(
            server.url + "/api/worklist/openapi.json", timeout=30
        )

    def __call__(self, operation_id: str, status: int, **parts: Any) -> Answer:
        operation = self.schema.find_operation_by_id(operation_id)
        if "body" in parts:
            parts.setdefault("media_type", "application/json")
        case = operation.Case(**parts)
        auth = {"Authorization": f"Bearer {self.server.token}"}
        answer = case.call_and_validate(base_url=self.server.url, headers=auth, checks=CHECKS)
        assert answer.status_code == status, answer.text
        return answer


def invalid_params(answer: Answer) -> set[str]:
    return {param["name"] for param in answer.json()["invalid-params"]}


def test_a_reports_life_is_answered_as_documented(server: InProcessImag) -> None:
    call = Documented(server)
    uid = new_request(server)
    at = {"uid": uid}
    tx = call("claimRequest", 200, path_parameters=at).json()["transaction_uid"]
    holder = {"X-Transaction-UID": tx}
    chapters = {
        "indications": "Chute, douleur de hanche.",
        "technique": "Bassin de face.",
        "results": "Pas de fracture.",
        "conclusion": "Examen normal.",
    }

    # the adversary's oversized chapter is refused before anything is stored
    oversized = {**chapters, "results": "x" * (MAX_TEXT_CHARS + 1)}
    refused = call("saveReportDraft", 400, path_parameters=at, headers=holder, body=oversized)
    assert invalid_params(refused) == {"results"}
    call("showReport", 404, path_parameters=at)

    draft = call(
        "saveReportDraft",
        200,
        path_parameters=at,
        headers=holder,
        body={**chapters, "reader_name": "Dr Martin"},
    ).json()
    assert (draft["state"], draft["reader_name"], draft["versions"]) == ("draft", "Dr Martin", [])
    assert call("showReport", 200, path_parameters=at).json()["results"] == "Pas de fracture."

    signed = call("validateReport", 200, path_parameters=at, body={"transaction_uid": tx}).json()
    assert signed["state"] == "validated"
    assert [(v["version"], v["delivery"]) for v in signed["versions"]] == [(0, "pending")]
    late = call("saveReportDraft", 409, path_parameters=at, headers=holder, body=chapters)
    assert "validated" in late.json()["detail"]

    # a misspelt member is refused, not signed with the account name unnoticed
    misspelt = {"text": "Précision.", "author_nam": "Dr Durand"}
    assert invalid_params(call("addAddendum", 400, path_parameters=at, body=misspelt)) == {
        "author_nam"
    }
    assert call("showReport", 200, path_parameters=at).json()["addenda"] == []

    added = call("addAddendum", 201, path_parameters=at, body={"text": "Précision."}).json()
    assert [(a["number"], a["state"]) for a in added["addenda"]] == [(1, "draft")]
    first = {**at, "number": 1}
    versions = call("validateAddendum", 200, path_parameters=first).json()["versions"]
    assert [v["version"] for v in versions] == [0, 1]
    call("validateAddendum", 409, path_parameters=first)
    call("validateAddendum", 404, path_parameters={**at, "number": 2})


def test_an_addendum_number_in_other_digits_is_not_found_rather_than_a_server_error(
    server: InProcessImag,
) -> None:
    """A superscript two is a digit to str.isdigit but not to int(): it was a 500."""
    uid = new_request(server)
    for number in ("%C2%B2", "%D9%A3", "1%E2%80%8B"):  # ², Arabic-Indic 3, 1 + zero width space
        path = f"/api/worklist/requests/{uid}/report/addenda/{number}/validate"
        answer = server.http.post(server.url + path, timeout=30)
        assert answer.status_code == 404, (number, answer.text)
        assert answer.json()["status"] == 404


def test_the_figures_of_a_period_count_its_requests_whatever_offset_its_bounds_are_in(
    server: InProcessImag,
) -> None:
    """SQLite compares the stored times as text: bounds written at +05:00 and
    -05:00 must still be the instants they name (they were compared as written)."""
    call = Documented(server)
    new_request(server)
    listed = call("listRequests", 200, query={"limit": 500}).json()
    first = min(datetime.fromisoformat(r["created_at"]) for r in listed["requests"])
    start = (first - timedelta(minutes=1)).astimezone(timezone(timedelta(hours=5)))
    end = (datetime.now(UTC) + timedelta(minutes=1)).astimezone(timezone(timedelta(hours=-5)))
    query = {"start": start.isoformat(), "end": end.isoformat()}

    figures = call("worklistStats", 200, query=query).json()

    assert figures["created"] == listed["total"] >= 4
    assert sum(figures["states"].values()) == listed["total"]
    assert datetime.fromisoformat(figures["period"]["start"]) == start
    assert figures["period"]["start"].endswith("+00:00")  # answered in UTC


@pytest.mark.parametrize(
    "query",
    [
        {"end": "0001-01-01T00:00:00Z"},  # the default start would be before year 1: was a 500
        {"start": "0001-01-01T00:00:00+01:00", "end": "0001-01-02T00:00:00Z"},
        {"start": "9999-12-31T00:00:00Z", "end": "9999-12-31T23:00:00-05:00"},
        {"start": "2026-12-05T00:00:00"},  # no offset: no instant
        {"start": "2026-12-05T00:00:00Z", "end": "2026-12-04T00:00:00Z"},
        {"start": "2025-01-01T00:00:00Z", "end": "2026-12-05T00:00:00Z"},  # over 366 days
    ],
)
def test_a_period_that_names_no_instants_or_too_long_a_time_is_refused(
    server: InProcessImag, query: dict[str, str]
) -> None:
    refused = Documented(server)("worklistStats", 400, query=query)
    assert refused.json()["title"] == "Bad Request"


def test_a_body_arriving_in_several_pieces_is_read_whole(
    server: InProcessImag, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report sent in two pieces (a slow phone link, chunked), the second
    sent only once the server has read the first, is read to its end: the
    first piece alone is not JSON, and it was refused 400 "not a JSON
    object" (CI saw it with a 64 KB chapter)."""
    call = Documented(server)
    uid = new_request(server)
    tx = call("claimRequest", 200, path_parameters={"uid": uid}).json()["transaction_uid"]
    body = json.dumps(
        {
            "indications": "Chute.",
            "technique": "Bassin.",
            "results": "Normal.",
            "conclusion": "RAS.",
        }
    ).encode()
    answer = send_in_two_pieces(
        monkeypatch,
        "PUT",
        f"{server.url}/api/worklist/requests/{uid}/report",
        body,
        {
            "Authorization": f"Bearer {server.token}",
            "Content-Type": "application/json",
            "X-Transaction-UID": tx,
        },
    )
    assert answer.status_code == 200, answer.text
    assert "Normal." in answer.text
