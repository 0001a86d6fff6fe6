"""Authentication, authorization and audit for every HTTP route.

Each handler declares what it needs with :func:`require` (or :func:`public`
for ``/health``).  The middleware authenticates the bearer credential (an API
token or an OIDC JWT), refuses a principal whose role lacks the permission,
and writes exactly one audit entry per request.  A handler that declares
nothing is refused for everyone: a route added later cannot be open by
accident.  What data a permitted request reaches is the principal's scope,
applied by the handler in its query (:func:`scope_of`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.web_urldispatcher import MatchInfoError
from prometheus_client import Counter

from archive.index.db import Database
from archive.query import QueryError
from archive.retrieve import outside_scope
from archive.runtime import Archive
from archive.security.audit import AuditEntry
from archive.security.oidc import OidcVerifier, looks_like_jwt
from archive.security.principals import AuthError, Principals
from archive.security.ratelimit import FailureLimiter
from archive.security.roles import Principal
from archive.security.scope import Scope

log = logging.getLogger(__name__)

AUTH = Counter("imag_auth_total", "HTTP authentication outcomes", ["outcome"])

H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])

#: a permission every authenticated principal has
AUTHENTICATED = "authenticated"


def require(permission: str, action: str) -> Callable[[H], H]:
    """Declare the permission a handler needs and the action it audits as."""

    def mark(handler: H) -> H:
        handler.imag_permission = permission  # type: ignore[attr-defined]
        handler.imag_action = action  # type: ignore[attr-defined]
        return handler

    return mark


def public(handler: H) -> H:
    """A route anyone may call, unaudited (``/health``)."""
    handler.imag_public = True  # type: ignore[attr-defined]
    return handler


@dataclass
class AuditContext:
    """What a handler adds to its request's audit entry."""

    action: str
    #: set when the handler knows better than the status (a 404 that hides a
    #: study outside the caller's scope is "denied")
    outcome: str | None = None
    study_uid: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


PRINCIPAL = web.RequestKey("principal", Principal)
PENDING = web.RequestKey("audit_pending", object)
AUDIT = web.RequestKey("audit", AuditContext)
SECURITY = web.AppKey("security", object)


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def scope_of(request: web.Request) -> Scope | None:
    """The studies the caller may see (None: everything)."""
    return request[PRINCIPAL].scope


def audit_of(request: web.Request) -> AuditContext:
    return request[AUDIT]


async def deny_if_hidden(
    request: web.Request, db: Database, level: str, keys: dict[str, str]
) -> None:
    """After a lookup in the caller's scope found nothing: if what ``keys`` name
    exists outside it, the request is audited as denied (it is still answered
    as absent, giving no hint that the study exists)."""
    try:
        hidden = await asyncio.to_thread(outside_scope, db, level, keys, scope_of(request))
    except QueryError:
        return
    if hidden:
        request[AUDIT].outcome = "denied"


class HttpSecurity:
    """The state the middleware needs: accounts, OIDC keys, limits, audit."""

    def __init__(self, archive: Archive) -> None:
        config = archive.config
        self.enabled: bool = config["auth.enabled"]
        self.principals = Principals(archive.db)
        self.audit = archive.audit
        self.oidc = OidcVerifier.from_config(config)
        self.trusted_proxies = frozenset(config["http.trusted_proxies"])
        self.limiter = FailureLimiter(
            config["auth.max_failures"], config["auth.failure_window_seconds"]
        )

    async def authenticate(self, header: str) -> Principal:
        scheme, _, credential = header.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthError("expected 'Authorization: Bearer <token>'")
        if looks_like_jwt(credential):
            if self.oidc is None:
                raise AuthError("OIDC tokens are not accepted here (auth.oidc.issuer is not set)")
            return await asyncio.to_thread(self.oidc.verify, credential)
        return await asyncio.to_thread(self.principals.authenticate, credential)


def client_address(request: web.Request, trusted: frozenset[str]) -> str:
    """The client's address: the peer, or behind trusted reverse proxies the
    right-most X-Forwarded-For entry that is not one of them."""
    address = request.remote or ""
    if address not in trusted:
        return address
    forwarded = [a.strip() for a in request.headers.get("X-Forwarded-For", "").split(",")]
    for hop in reversed([a for a in forwarded if a]):
        if hop not in trusted:
            return hop
    return address


def _token_key(header: str) -> str:
    return "token:" + hashlib.sha256(header.encode()).hexdigest()[:32]


def _unauthorized(detail: str) -> web.Response:
    from archive.server import problem

    response = problem(401, "Unauthorized", detail)
    response.headers["WWW-Authenticate"] = 'Bearer realm="imag"'
    return response


@web.middleware
async def security_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Authenticate, authorize and audit one request."""
    from archive.server import problem

    target = request.match_info.handler
    if getattr(target, "imag_public", False):
        return await handler(request)
    security: HttpSecurity = request.config_dict[SECURITY]  # type: ignore[assignment]
    address = client_address(request, security.trusted_proxies)
    header = request.headers.get("Authorization", "")
    keys = ["address:" + address] + ([_token_key(header)] if header else [])
    action = getattr(target, "imag_action", f"{request.method} {request.path}")

    def audit(entry: AuditEntry) -> Awaitable[None]:
        entry.source = entry.source or address
        entry.detail.setdefault("method", request.method)
        entry.detail.setdefault("path", request.path_qs[:1000])
        return asyncio.to_thread(security.audit.write, entry)

    if not security.enabled:
        principal = Principal("anonymous", "admin", kind="anonymous", via="auth disabled")
    else:
        wait = security.limiter.retry_after(*keys)
        if wait:
            AUTH.labels("rate-limited").inc()
            await audit(AuditEntry("unknown", "unknown", "auth.rate-limited", "denied", status=429))
            response = problem(
                429,
                "Too Many Requests",
                f"too many failed authentications from this address or with this token; "
                f"retry in {wait} s",
            )
            response.headers["Retry-After"] = str(wait)
            return response
        if not header:
            AUTH.labels("missing").inc()
            security.limiter.failed(*keys)
            await audit(
                AuditEntry(
                    "unknown",
                    "unknown",
                    action,
                    "denied",
                    status=401,
                    detail={"reason": "no credentials"},
                )
            )
            return _unauthorized(
                "this route needs 'Authorization: Bearer <token>' (an API token from "
                "'imag token create', or an OIDC access token)"
            )
        try:
            principal = await security.authenticate(header)
        except AuthError as exc:
            AUTH.labels("rejected").inc()
            security.limiter.failed(*keys)
            await audit(
                AuditEntry(
                    exc.subject or "unknown",
                    "unknown",
                    action,
                    "denied",
                    status=401,
                    detail={"reason": exc.reason},
                )
            )
            return _unauthorized(exc.reason)
        AUTH.labels("accepted").inc()

    if isinstance(request.match_info, MatchInfoError):
        return await handler(request)  # 404 / 405: nothing to authorize or audit
    permission = getattr(target, "imag_permission", None)
    context = AuditContext(action)
    context.study_uid = request.match_info.get("study") or request.query.get("studyUID")

    def entry(outcome: str, status: int, **detail: Any) -> AuditEntry:
        return AuditEntry(
            principal.name,
            principal.kind,
            context.action,
            outcome,
            role=principal.role,
            status=status,
            study_uid=context.study_uid,
            detail={"via": principal.via, **context.detail, **detail},
        )

    if permission is None or not (permission == AUTHENTICATED or principal.can(permission)):
        reason = (
            "this route declares no permission, so it is refused to everyone"
            if permission is None
            else f"role {principal.role!r} does not have the permission {permission!r}"
        )
        await audit(entry("denied", 403, reason=reason))
        return problem(403, "Forbidden", reason)

    request[PRINCIPAL] = principal
    request[AUDIT] = context

    async def write_pending(status: int) -> None:
        await audit(entry(context.outcome or _outcome(status), status))

    # Written when the response is prepared, before its first byte leaves (a
    # streamed retrieval too), with the status the client gets.
    request[PENDING] = write_pending
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            await _flush(request, exc.status)
        raise  # turned into a problem response outside; audited as it is prepared
    if response.prepared:
        await _flush(request, response.status)  # a stream with no prepare hook run
    return response


async def _flush(request: web.Request, status: int) -> None:
    pending = request.pop(PENDING, None)
    if pending is not None:
        await pending(status)


async def audit_on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` signal: write the request's audit entry now."""
    await _flush(request, response.status)


def _outcome(status: int) -> str:
    return "allowed" if status < 400 else ("denied" if status in (401, 403) else "failed")
