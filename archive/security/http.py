"""Authentication, authorization and audit for every HTTP route.

Each handler declares what it needs with :func:`require` (or :func:`public`
for ``/health``).  The middleware authenticates the bearer credential (an API
token, an OIDC JWT, or what a plugin's authenticator recognises) or, without
an ``Authorization`` header, a credential an authenticator finds elsewhere in
the request (``from_request``: a share link's session cookie), refuses a
principal whose role lacks the permission, and writes exactly one audit
entry per request.  A handler that declares nothing is refused for
everyone: a route added later cannot be open by accident.  What data a
permitted request reaches is the principal's scope, applied by the handler
in its query (:func:`scope_of`).

The audit entry is written before any byte of the answer leaves, with the
status the client gets; when it cannot be written the request is answered
503 with a problem body instead (fail closed), never with the data.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from aiohttp import web
from aiohttp.web_urldispatcher import MatchInfoError
from prometheus_client import Counter

from archive import plugins
from archive.index.db import Database
from archive.retrieve import hidden_studies
from archive.runtime import Archive
from archive.security.audit import UNAVAILABLE_DETAIL, AuditEntry, AuditLog, AuditUnavailable
from archive.security.oidc import OidcVerifier, looks_like_jwt
from archive.security.principals import AuthError, Principals
from archive.security.ratelimit import FailureLimiter
from archive.security.roles import Principal
from archive.security.scope import Scope
from archive.web import problem

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
    request: web.Request, db: Database, level: str | None, keys: dict[str, str]
) -> None:
    """After a lookup in the caller's scope found nothing: if what ``keys`` name
    exists outside it, the request is audited as denied, with that study in
    the study column (so that ``imag audit --study`` finds the attempt); it
    is still answered as absent, giving no hint that the study exists.
    ``level`` None: the lowest level whose UID ``keys`` name (QIDO-RS keys)."""
    await asyncio.to_thread(mark_if_hidden, request[AUDIT], db, level, keys, scope_of(request))


def mark_if_hidden(
    context: AuditContext,
    db: Database,
    level: str | None,
    keys: dict[str, str],
    scope: Scope | None,
) -> None:
    """:func:`deny_if_hidden` for a handler already in a worker thread."""
    hidden = hidden_studies(db, keys, scope, level)
    if hidden:
        context.outcome = "denied"
        context.study_uid = hidden[0] if len(hidden) == 1 else None
        if len(hidden) > 1:
            context.detail["studies"] = hidden


class PendingAudit:
    """A permitted request's audit entry, written once, with the status the
    client gets, before the first byte of the answer.

    The middleware writes it when the handler returns its answer (or in the
    ``on_response_prepare`` hook when the handler streams).  A handler whose
    work runs in a worker thread may write it there, when its answer is
    ready and its status known (:meth:`write`), or have its search's own
    statement write it (:meth:`written`): the work and the entry then cost
    one thread hop instead of two, and on PostgreSQL one round trip.  The
    middleware then writes nothing more -- unless the client gets another
    status after all (the answer failed after its entry was written): a
    second entry then records that status, naming the one written first
    (``detail.written_as``), so that the trail never says less than what
    the client got."""

    def __init__(
        self,
        make: Callable[[str, int], AuditEntry],
        log: AuditLog,
        context: AuditContext,
    ) -> None:
        self._make = make
        self._log = log
        #: what the handler adds to the entry (outcome, study, detail)
        self.context = context
        #: the status the entry was written with (None: not yet)
        self.status: int | None = None

    def entry(self, status: int) -> AuditEntry:
        """The entry as it would be written now, for an answer with ``status``."""
        return self._make(self.context.outcome or _outcome(status), status)

    def write(self, status: int) -> None:
        """Write the entry now (blocking: from a worker thread); raises
        :class:`AuditUnavailable`, which the middleware answers with 503."""
        self._log.write(self.entry(status))
        self.status = status

    def written(self, status: int) -> None:
        """The entry was written by other means (a search carrying it)."""
        self.status = status

    async def flush(self, status: int) -> None:
        """Write the entry for an answer with ``status``, unless it was."""
        if self.status == status:
            return
        entry = self.entry(status)
        if self.status is not None:
            entry.outcome = _outcome(status)
            entry.detail["written_as"] = self.status
        await asyncio.to_thread(self._log.write, entry)
        self.status = status


PENDING = web.RequestKey("audit_pending", PendingAudit)


def pending_audit(request: web.Request) -> PendingAudit:
    """The request's audit entry, for a handler that writes it itself."""
    return request[PENDING]


class HttpSecurity:
    """The state the middleware needs: accounts, OIDC keys, limits, audit."""

    def __init__(self, archive: Archive) -> None:
        config = archive.config
        self.enabled: bool = config["auth.enabled"]
        self.audit = archive.audit
        #: every plugin's authenticators in registration order (the core's
        #: first), except those marked ``fallback`` (API tokens: any bearer
        #: that is not a JWT), asked last so that a plugin's more specific
        #: form of bearer credential (a share link's secret) is recognised
        listed = plugins.listed("imag_authenticators", archive=archive)
        self.authenticators: list[Authenticator] = [
            a for a in listed if not getattr(a, "fallback", False)
        ] + [a for a in listed if getattr(a, "fallback", False)]
        self.trusted_proxies = frozenset(config["http.trusted_proxies"])
        self.limiter = FailureLimiter(
            config["auth.max_failures"], config["auth.failure_window_seconds"], clock=archive.clock
        )
        self._archive = archive

    async def authenticate(self, header: str) -> Principal:
        """The principal of an ``Authorization`` header: the first authenticator
        that recognises the credentials decides (AuthError when refused)."""
        scheme, _, credential = header.partition(" ")
        credential = credential.strip()
        if credential:
            for authenticator in self.authenticators:
                if authenticator.accepts(scheme.lower(), credential):
                    return await asyncio.to_thread(self._principal, authenticator, credential)
        raise AuthError("expected 'Authorization: Bearer <token>'")

    def carried(self, request: web.Request) -> tuple[Authenticator, str] | None:
        """A credential carried otherwise than in ``Authorization`` (a cookie),
        and the authenticator that found it: authenticators may implement
        ``from_request(headers, cookies) -> credential | None``."""
        for authenticator in self.authenticators:
            find = getattr(authenticator, "from_request", None)
            if find is None:
                continue
            credential = find(request.headers, request.cookies)
            if credential:
                return authenticator, credential
        return None

    async def authenticate_with(self, authenticator: Authenticator, credential: str) -> Principal:
        """The principal of a credential :meth:`carried` found (AuthError when refused)."""
        return await asyncio.to_thread(self._principal, authenticator, credential)

    def _principal(self, authenticator: Authenticator, credential: str) -> Principal:
        """The authenticated principal, with the reading groups the orientation
        directory makes it a member of: a radiologist put on a group's roster
        sees the studies routed to that group, as its account's own groups do.
        A directory that cannot answer adds nothing (less access, never more)."""
        principal = authenticator.authenticate(credential)
        if principal.role == "admin":
            return principal
        try:
            rostered = {g.name for g in self._archive.orientation.groups_of(principal.name)}
        except Exception:  # noqa: BLE001 - the account's own groups still apply
            log.warning("reading groups of %s unavailable", principal.name, exc_info=True)
            return principal
        if rostered <= set(principal.groups):
            return principal
        return dataclasses.replace(principal, groups=tuple(sorted({*principal.groups, *rostered})))


class Authenticator(Protocol):
    """A way to prove who one is (hook ``imag_authenticators``).

    ``accepts`` looks at the credentials' form only (scheme lower-cased, e.g.
    ``bearer``): the first authenticator that accepts them decides.
    Optionally, ``from_request(headers, cookies)`` returns a credential the
    request carries elsewhere (a session cookie), used when it has no
    ``Authorization`` header; and ``fallback = True`` asks it after the others.
    ``authenticate`` (run in a thread: it may query the index or fetch keys)
    returns the principal or raises :class:`AuthError` with a reason the client
    may read; every refusal is audited and counted by the failure limiter."""

    name: str

    def accepts(self, scheme: str, credential: str) -> bool: ...

    def authenticate(self, credential: str) -> Principal: ...


@dataclass
class ApiTokenAuthenticator:
    """``Authorization: Bearer imag_...``: API tokens of users and service accounts."""

    principals: Principals
    name: str = "api-token"
    #: accepts any non-JWT bearer: asked after every more specific authenticator
    fallback: bool = True

    def accepts(self, scheme: str, credential: str) -> bool:
        return scheme == "bearer" and not looks_like_jwt(credential)

    def authenticate(self, credential: str) -> Principal:
        return self.principals.authenticate(credential)


@dataclass
class OidcAuthenticator:
    """``Authorization: Bearer <JWT>``: OIDC access tokens (refused with a reason
    when no provider is configured)."""

    verifier: OidcVerifier | None
    name: str = "oidc"

    def accepts(self, scheme: str, credential: str) -> bool:
        return scheme == "bearer" and looks_like_jwt(credential)

    def authenticate(self, credential: str) -> Principal:
        if self.verifier is None:
            raise AuthError("OIDC tokens are not accepted here (auth.oidc.issuer is not set)")
        return self.verifier.verify(credential)


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
    response = problem(401, "Unauthorized", detail)
    response.headers["WWW-Authenticate"] = 'Bearer realm="imag"'
    return response


class StreamRefused(BaseException):
    """Raised out of a handler's ``response.prepare()`` when the request's audit
    entry cannot be written, before anything was sent.

    A BaseException, as a cancellation is: a streaming handler's own error
    handling (``except Exception``: cut the connection, answer 500) must not
    turn the refusal into something else.  The handler stops; the middleware
    answers 503 in its place."""


def _audit_unavailable() -> web.Response:
    return problem(503, "Service Unavailable", UNAVAILABLE_DETAIL)


@web.middleware
async def security_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Authenticate, authorize and audit one request; refuse it (503) when its
    audit entry cannot be written."""
    if getattr(request.match_info.handler, "imag_public", False):
        return await handler(request)
    try:
        return await _secured(request, handler)
    except (AuditUnavailable, StreamRefused):
        return _audit_unavailable()


async def _secured(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    target = request.match_info.handler
    security: HttpSecurity = request.config_dict[SECURITY]  # type: ignore[assignment]
    address = client_address(request, security.trusted_proxies)
    header = request.headers.get("Authorization", "")
    carried = None if header or not security.enabled else security.carried(request)
    keys = ["address:" + address] + ([_token_key(header)] if header else [])
    if carried is not None:
        keys.append(_token_key(carried[1]))
    action = getattr(target, "imag_action", f"{request.method} {request.path}")

    def finish(entry: AuditEntry) -> AuditEntry:
        entry.source = entry.source or address
        entry.detail.setdefault("method", request.method)
        entry.detail.setdefault("path", request.path_qs[:1000])
        return entry

    def audit(entry: AuditEntry) -> Awaitable[None]:
        return asyncio.to_thread(security.audit.write, finish(entry))

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
        if not header and carried is None:
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
            if carried is not None:
                principal = await security.authenticate_with(*carried)
            else:
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
    # Written once, with the status the client gets, before the first byte of
    # the answer leaves: here for an answer the handler returns (or raises),
    # in the prepare hook for one the handler streams itself, or by the
    # handler in its worker thread (PendingAudit).
    request[PENDING] = PendingAudit(
        lambda outcome, status: finish(entry(outcome, status)), security.audit, context
    )
    try:
        response = await handler(request)
    except (web.HTTPException, AuditUnavailable) as exc:
        if isinstance(exc, web.HTTPException):
            await _flush(request, exc.status)
        else:  # the handler's own write was refused: its 503 is not written either
            request.pop(PENDING, None)
        raise  # an HTTP error becomes a problem response outside
    except Exception:
        try:
            await _flush(request, 500)  # the status errors_and_metrics answers
        except AuditUnavailable:
            pass  # the client gets a 500 without data either way
        raise
    await _flush(request, response.status)
    return response


async def _flush(request: web.Request, status: int) -> None:
    pending = request.pop(PENDING, None)
    if pending is not None:
        await pending.flush(status)


async def audit_on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` signal: write the request's audit entry now, if
    the handler prepares (streams) its response itself.

    aiohttp runs this hook after it set the connection's writer up for the
    response and before it writes the headers.  When the entry cannot be
    written, nothing has been sent yet: the writer is put back as it was, and
    :class:`StreamRefused` propagates out of the handler's ``prepare`` to the
    middleware, which answers 503 in place of the stream."""
    try:
        await _flush(request, response.status)
    except AuditUnavailable as exc:
        writer = request.writer
        if writer.output_size:  # never the case before the headers; do not answer twice
            raise ConnectionError("audit trail unwritable after the answer started") from exc
        writer.chunked = False
        writer.length = None
        if getattr(writer, "_compress", None) is not None:
            writer._compress = None  # type: ignore[attr-defined]
        raise StreamRefused() from exc


def _outcome(status: int) -> str:
    return "allowed" if status < 400 else ("denied" if status in (401, 403) else "failed")
