"""The OpenAPI 3.1 document of ``/api/worklist``, served at
``GET /api/worklist/openapi.json``.

The document is assembled from *fragments*: each module that mounts routes
under ``/api/worklist`` describes them in a :class:`Fragment` (its paths,
and the schemas they name) and hands it to :func:`contribute` from its
``add_routes``.  :func:`document` merges the fragments with the shared
components (problem details, the read request); a path and method described
twice, or a schema defined twice differently, is an error at start-up rather
than a document that lies.  The served document is therefore exactly what
this server mounted.

It is public: it describes the API, and holds no patient data.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from archive.security.http import public
from worklist.requests import FIELDS, MANDATORY, MAX_FIELD
from worklist.ups import PRIORITIES, STATES

TITLE = "IMAG teleradiology worklist"
VERSION = "1.0.0"


@dataclass(frozen=True)
class Fragment:
    """A module's part of the document: ``paths`` as in OpenAPI (relative to
    the server root: ``/api/worklist/...``) and the ``schemas`` they refer to
    (``#/components/schemas/<name>``)."""

    paths: Mapping[str, Mapping[str, Any]]
    schemas: Mapping[str, Any] = field(default_factory=dict)


FRAGMENTS = web.AppKey("worklist_openapi_fragments", list)


def ref(name: str) -> dict[str, str]:
    """A reference to a schema of the document's components."""
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(schema: Mapping[str, Any], description: str = "") -> dict[str, Any]:
    """A response (or request body) of JSON ``schema``."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def problems(*statuses: int) -> dict[str, Any]:
    """The problem-details responses (RFC 9457) for ``statuses``, and those
    of the security middleware any authenticated route may answer (401, 429)."""
    statuses = tuple(sorted({*statuses, 401, 429}))
    meaning = {
        400: "invalid input: invalid-params lists each field at fault",
        401: "no or invalid credentials",
        403: "the caller's role or site does not allow this",
        404: "no such item that the caller may see (UPS C307)",
        409: "the item's state refuses the change (UPS C300, C301, C302, C310, C311)",
        413: "the body is too large",
        429: "too many failed authentications from this address or token",
    }
    return {
        str(status): {
            "description": meaning.get(status, "refused"),
            "content": {"application/problem+json": {"schema": ref("Problem")}},
        }
        for status in statuses
    }


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "type": [schema["type"], "null"]}


_TIME = {"type": "string", "format": "date-time"}
_TEXT = {"type": "string", "maxLength": MAX_FIELD}

SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "ups_status": {
                "type": "string",
                "description": "the UPS status of a refused change (C302...)",
            },
            "invalid-params": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "reason"],
                    "properties": {"name": {"type": "string"}, "reason": {"type": "string"}},
                },
            },
        },
    },
    "Fields": {
        "type": "object",
        "description": "the clinical content of a request; mandatory: " + ", ".join(MANDATORY),
        "additionalProperties": False,
        "properties": {
            name: (
                {"type": "boolean", "const": True, "description": meaning}
                if name == "patient_consent"
                else {**_TEXT, "description": meaning}
            )
            for name, meaning in FIELDS.items()
        },
    },
    "ReadRequest": {
        "type": "object",
        "required": ["uid", "study_uid", "site", "state", "priority", "due_at", "fields"],
        "properties": {
            "uid": {"type": "string"},
            "study_uid": {"type": "string"},
            "site": {"type": "string"},
            "group": {"type": ["string", "null"]},
            "kind": {"type": "string", "enum": ["read", "expertise", "screening"]},
            "origin": {"type": "string"},
            "created_by": {"type": "string"},
            "state": {"type": "string", "enum": list(STATES)},
            "priority": {"type": "string", "enum": list(PRIORITIES)},
            "ups_priority": {"type": "string", "enum": list(PRIORITIES.values())},
            "due_at": _TIME,
            "overdue": {"type": "boolean"},
            "created_at": _TIME,
            "updated_at": _TIME,
            "fields": {"type": "object"},
            "missing": {"type": "array", "items": {"type": "string"}},
            "reply_to": {"type": "string"},
            "performer": {"type": ["string", "null"]},
            "claimed_at": _nullable(_TIME),
            "lease_until": _nullable(_TIME),
            "first_claimed_at": _nullable(_TIME),
            "claims": {"type": "integer", "minimum": 0},
            "completed_at": _nullable(_TIME),
            "completed_by": {"type": ["string", "null"]},
            "canceled_at": _nullable(_TIME),
            "canceled_by": {"type": ["string", "null"]},
            "cancel_requested_at": _nullable(_TIME),
            "cancel_requested_by": {"type": ["string", "null"]},
            "cancel_reason": {"type": "string"},
            "transaction_uid": {
                "type": ["string", "null"],
                "description": "to the holder of the claim only",
            },
            "priors": {
                "type": "array",
                "description": "the patient's other studies, every site (readers only)",
                "items": {"type": "object"},
            },
        },
    },
    "RequestList": {
        "type": "object",
        "required": ["total", "requests"],
        "properties": {
            "total": {"type": "integer", "minimum": 0},
            "requests": {"type": "array", "items": ref("ReadRequest")},
        },
    },
    "NewRequest": {
        "type": "object",
        "required": ["study_uid", "fields"],
        "additionalProperties": False,
        "properties": {
            "study_uid": {"type": "string", "maxLength": 64},
            "priority": {"type": "string", "enum": list(PRIORITIES), "default": "ROUTINE"},
            "due_at": {**_TIME, "description": "with its offset; default: by priority"},
            "reply_to": {"type": "string", "format": "email"},
            "site": {"type": "string", "description": "the asking site, among the caller's"},
            "fields": ref("Fields"),
        },
    },
    "FieldsChange": {
        "type": "object",
        "required": ["fields"],
        "additionalProperties": False,
        "properties": {"fields": ref("Fields")},
    },
    "Transaction": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"transaction_uid": {"type": "string"}},
    },
    "CancelRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"reason": {"type": "string", "maxLength": MAX_FIELD}},
    },
}

_UID = {
    "name": "uid",
    "in": "path",
    "required": True,
    "description": "the request's UID (its UPS SOP Instance UID)",
    "schema": {"type": "string", "maxLength": 64},
}
_TRANSACTION = {
    "name": "X-Transaction-UID",
    "in": "header",
    "required": False,
    "description": "the claim's Transaction UID (or transaction_uid in the body)",
    "schema": {"type": "string"},
}
#: the parameters other modules' fragments share (worklist.reports_http)
UID_PARAMETER = _UID
TRANSACTION_PARAMETER = _TRANSACTION
_WARNED = {
    "description": "done (or had already happened: Warning header with B304/B306)",
    "headers": {"Warning": {"schema": {"type": "string"}}},
    "content": {"application/json": {"schema": ref("ReadRequest")}},
}


def _holder(summary: str, operation: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation,
            "summary": summary,
            "security": [{"bearer": []}],
            "parameters": [_UID, _TRANSACTION],
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": ref("Transaction")}},
            },
            "responses": {"200": _WARNED, **problems(400, 401, 403, 404, 409, 413)},
        }
    }


_QUERY = [
    {
        "name": "state",
        "in": "query",
        "schema": {"type": "string", "enum": list(STATES)},
        "description": "repeatable, or comma-separated",
    },
    {"name": "group", "in": "query", "schema": {"type": "string"}},
    {"name": "site", "in": "query", "schema": {"type": "string"}},
    {"name": "study_uid", "in": "query", "schema": {"type": "string"}},
    {"name": "overdue", "in": "query", "schema": {"type": "boolean"}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
]

BASE = "/api/worklist"

REQUESTS_API = Fragment(
    paths={
        f"{BASE}/requests": {
            "get": {
                "operationId": "listRequests",
                "summary": "the caller's worklist, in reading order (worklist.read or "
                "worklist.request)",
                "security": [{"bearer": []}],
                "parameters": _QUERY,
                "responses": {
                    "200": json_body(ref("RequestList"), "the requests and their total"),
                    **problems(400, 401, 403),
                },
            },
            "post": {
                "operationId": "createRequest",
                "summary": "a site asks for a reading (worklist.request)",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref("NewRequest")}},
                },
                "responses": {
                    "201": {
                        **json_body(ref("ReadRequest"), "created"),
                        "headers": {"Location": {"schema": {"type": "string"}}},
                    },
                    **problems(400, 401, 403, 404, 413),
                },
            },
        },
        f"{BASE}/requests/{{uid}}": {
            "get": {
                "operationId": "getRequest",
                "summary": "one request (readers also get the patient's priors)",
                "security": [{"bearer": []}],
                "parameters": [_UID],
                "responses": {
                    "200": json_body(ref("ReadRequest"), "the request"),
                    **problems(401, 403, 404),
                },
            },
            "patch": {
                "operationId": "completeRequest",
                "summary": "the requesting site completes its request (worklist.request)",
                "security": [{"bearer": []}],
                "parameters": [_UID],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref("FieldsChange")}},
                },
                "responses": {
                    "200": json_body(ref("ReadRequest"), "the request"),
                    **problems(400, 401, 403, 404, 409, 413),
                },
            },
        },
        f"{BASE}/requests/{{uid}}/claim": {
            "post": {
                "operationId": "claimRequest",
                "summary": "take the request (worklist.write): its transaction_uid",
                "security": [{"bearer": []}],
                "parameters": [_UID],
                "responses": {
                    "200": json_body(ref("ReadRequest"), "claimed"),
                    **problems(401, 403, 404, 409),
                },
            },
        },
        f"{BASE}/requests/{{uid}}/heartbeat": _holder("extend the claim's lease", "heartbeat"),
        f"{BASE}/requests/{{uid}}/release": _holder("give the request back", "releaseRequest"),
        f"{BASE}/requests/{{uid}}/cancel": _holder("the holder cancels", "cancelClaimed"),
        f"{BASE}/requests/{{uid}}/cancel-request": {
            "post": {
                "operationId": "withdrawRequest",
                "summary": "the requester withdraws (worklist.request)",
                "security": [{"bearer": []}],
                "parameters": [_UID],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": ref("CancelRequest")}},
                },
                "responses": {"200": _WARNED, **problems(400, 401, 403, 404, 409, 413)},
            },
        },
        f"{BASE}/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "this document (public)",
                "security": [],
                "responses": {"200": json_body({"type": "object"}, "the OpenAPI document")},
            }
        },
    },
    schemas=SCHEMAS,
)


def document(*fragments: Fragment) -> dict[str, Any]:
    """The OpenAPI document of ``fragments``.  ValueError when two describe
    the same operation or define one schema differently."""
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {}
    for fragment in fragments:
        for path, operations in fragment.paths.items():
            described = paths.setdefault(path, {})
            for method, operation in operations.items():
                if method in described:
                    raise ValueError(f"OpenAPI: {method.upper()} {path} is described twice")
                described[method] = copy.deepcopy(operation)
        for name, schema in fragment.schemas.items():
            if name in schemas and schemas[name] != schema:
                raise ValueError(f"OpenAPI: the schema {name!r} is defined twice differently")
            schemas[name] = copy.deepcopy(schema)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "Reading requests (UPS states), claims with a Transaction UID, "
            "and what refuses them (RFC 9457 problem details with the UPS status).",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API token (imag token create) or an OIDC access token",
                }
            },
        },
    }


def contribute(app: web.Application, fragment: Fragment) -> None:
    """Add ``fragment`` to the document ``app`` serves (call it from the
    ``add_routes`` that mounts the routes it describes)."""
    if FRAGMENTS not in app:
        app[FRAGMENTS] = []
    app[FRAGMENTS].append(fragment)
    document(*app[FRAGMENTS])  # a clash stops start-up, not the first reader


@public
async def serve(request: web.Request) -> web.Response:
    """``GET /api/worklist/openapi.json``: the document of what is mounted."""
    return web.json_response(document(*request.config_dict.get(FRAGMENTS, [])))
