"""The public pages of a share link: ``GET /share/<secret>`` exchanges the
secret for a browser session, ``/share/verify`` asks the second factor, and
the pages that say why a link does not open (unknown, expired, revoked,
locked, too many requests) and whom to ask.

The secret is in the address only for that first request: the answer sets the
session cookie (HttpOnly, Secure, SameSite=Strict) and redirects (303) to an
address without it, so it stays neither in the history nor in a Referer.
Every ``/share/*`` answer carries ``Referrer-Policy: no-referrer``, a strict
Content-Security-Policy, ``nosniff`` and ``no-store`` (:func:`security_headers`).

These routes are public (no credential yet); each writes its own audit entry
(``share.open``, ``share.verify``), and requests are counted per client
address in the index, for every process at once (``sharing.rate_per_minute``).
No JavaScript: the forms work without it.
"""

from __future__ import annotations

import asyncio
import html
from typing import Any

from aiohttp import web

from archive.messaging import Message, send
from archive.messaging.message import Actor
from archive.security.audit import AuditEntry, AuditUnavailable
from archive.security.http import SECURITY, client_address, public
from archive.web import ARCHIVE
from viewer_api import shares
from viewer_api.share_auth import COOKIE

VIEW = "/share/view"
VERIFY = "/share/verify"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_MAX_FORM = 4096


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the headers of every ``/share/*`` answer (a
    page of another module may bring its own, stricter, CSP: it is kept)."""
    if request.path == "/share" or request.path.startswith("/share/"):
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"


def page(
    status: int, title: tuple[str, str], text: tuple[str, str], form: str = ""
) -> web.Response:
    """A small bilingual page (French first, then English)."""
    fr, en = (html.escape(t) for t in title)
    body = (
        '<!doctype html><html lang="fr"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{fr} / {en}</title></head><body>"
        f"<h1>{fr}</h1><p>{html.escape(text[0])}</p>"
        f'<h1 lang="en">{en}</h1><p lang="en">{html.escape(text[1])}</p>'
        f"{form}</body></html>"
    )
    return web.Response(status=status, text=body, content_type="text/html", charset="utf-8")


_FR_REASONS = {
    "revoked": "Ce lien a été révoqué",
    "expired": "Ce lien a expiré",
    "locked": "Ce lien est verrouillé",
    "not-yet-valid": "Ce lien n'est pas encore ouvert",
}
_EN_REASONS = {
    "revoked": "This link was revoked",
    "expired": "This link has expired",
    "locked": "This link is locked",
    "not-yet-valid": "This link is not open yet",
}


def refused_page(share: shares.Share, refused: shares.LinkRefused) -> web.Response:
    fr_text = {
        "revoked": f"Demandez un nouveau lien à {share.ask}.",
        "expired": f"Demandez un nouveau lien à {share.ask}.",
        "locked": (
            f"Ce lien est verrouillé après {share.failures} réponses erronées ; "
            f"demandez un nouveau lien à {share.ask}."
        ),
        "not-yet-valid": refused.detail,
    }[refused.reason]
    return page(
        refused.status,
        (_FR_REASONS[refused.reason], _EN_REASONS[refused.reason]),
        (fr_text, refused.detail),
    )


def unknown_page() -> web.Response:
    return page(
        404,
        ("Lien inconnu", "Unknown link"),
        (
            "Ce lien n'existe pas ; vérifiez l'adresse ou demandez un nouveau lien à qui vous "
            "l'a envoyé.",
            "This link does not exist; check the address or ask whoever sent it for a new one.",
        ),
    )


def session_ended_page() -> web.Response:
    return page(
        403,
        ("Session terminée", "Session ended"),
        ("Ouvrez à nouveau le lien reçu.", "Open the link you received again."),
    )


def too_many(wait: int) -> web.Response:
    response = page(
        429,
        ("Trop de requêtes", "Too many requests"),
        (
            f"Réessayez dans {wait} secondes.",
            f"Try again in {wait} seconds.",
        ),
    )
    response.headers["Retry-After"] = str(wait)
    return response


def _form(share: shares.Share, remaining: int | None) -> str:
    if share.second_factor == "birth_date":
        label = "Date de naissance du patient (JJ/MM/AAAA) / Patient's birth date (DD/MM/YYYY)"
    else:
        label = "Code reçu par message / Code received by mail"
    tries = (
        f"<p>Essais restants : {remaining} / Tries left: {remaining}</p>"
        if remaining is not None
        else ""
    )
    return (
        f'{tries}<form method="post" action="{VERIFY}">'
        f'<label for="answer">{html.escape(label)}</label> '
        '<input id="answer" name="answer" autocomplete="off" required> '
        '<button type="submit">Valider / Submit</button></form>'
    )


def verify_page(share: shares.Share, remaining: int | None, wrong: bool) -> web.Response:
    if wrong:
        title = ("Réponse incorrecte", "Wrong answer")
        text = (
            f"Il vous reste {remaining} essai(s) avant que le lien soit verrouillé.",
            f"{remaining} try (tries) left before the link locks.",
        )
    elif share.second_factor == "code":
        title = ("Code de vérification", "Verification code")
        text = (
            "Un code vous a été envoyé par message ; saisissez-le ci-dessous.",
            "A code was sent to you by mail; type it below.",
        )
    else:
        title = ("Vérification", "Verification")
        text = (
            "Pour ouvrir ces images, saisissez la date de naissance du patient.",
            "To open these images, type the patient's birth date.",
        )
    return page(403 if wrong else 200, title, text, _form(share, remaining))


class _Context:
    """The archive, the client's address, and audit writing for one request."""

    def __init__(self, request: web.Request) -> None:
        self.archive = request.config_dict[ARCHIVE]
        self.db = self.archive.db
        security: Any = request.config_dict[SECURITY]
        self.address = client_address(request, security.trusted_proxies)

    async def audit(
        self, action: str, outcome: str, status: int, share: shares.Share | None, **detail: Any
    ) -> None:
        entry = AuditEntry(
            share.name if share else "unknown",
            "share",
            action,
            outcome,
            role=share.role if share else None,
            status=status,
            study_uid=share.study_uid if share else None,
            source=self.address,
            detail=detail,
        )
        await asyncio.to_thread(self.archive.audit.write, entry)

    async def log(self, share: shares.Share, what: str, outcome: str) -> None:
        await asyncio.to_thread(shares.log_access, self.db, share, self.address, what, outcome)

    async def rate(self) -> int:
        limit = self.archive.config["sharing.rate_per_minute"]
        return await asyncio.to_thread(shares.hit, self.db, self.address, limit)


def _see(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _audit_unavailable() -> web.Response:
    return page(
        503,
        ("Service indisponible", "Service unavailable"),
        ("Réessayez plus tard.", "Try again later."),
    )


@public
async def open_link(request: web.Request) -> web.StreamResponse:
    """``GET /share/<secret>``: the secret for a session cookie, then 303 away."""
    try:
        return await _open_link(request)
    except AuditUnavailable:
        return _audit_unavailable()


async def _open_link(request: web.Request) -> web.StreamResponse:
    ctx = _Context(request)
    wait = await ctx.rate()
    if wait:
        await ctx.audit("share.open", "denied", 429, None, reason="rate limit")
        return too_many(wait)
    share = await asyncio.to_thread(shares.by_secret, ctx.db, request.match_info["secret"])
    if share is None:
        await ctx.audit("share.open", "denied", 404, None, reason="unknown link")
        return unknown_page()
    refused = share.refusal(ctx.db.clock.now())
    if refused is not None:
        await ctx.log(share, "open", refused.reason)
        await ctx.audit("share.open", "denied", refused.status, share, reason=refused.reason)
        return refused_page(share, refused)
    session = await asyncio.to_thread(shares.open_session, ctx.db, share)
    if share.second_factor == "code":
        await asyncio.to_thread(_mail_code, ctx.archive, share)
    pending = bool(share.second_factor)
    if not pending:
        await asyncio.to_thread(shares.touch, ctx.db, share, opened=True)
    await ctx.log(share, "open", "pending" if pending else "allowed")
    await ctx.audit(
        "share.open", "allowed", 303, share, second_factor=share.second_factor or "none"
    )
    response = web.Response(status=303, headers={"Location": VERIFY if pending else VIEW})
    response.set_cookie(COOKIE, session, httponly=True, secure=True, samesite="Strict", path="/")
    return response


def _mail_code(archive: Any, share: shares.Share) -> None:
    code = shares.new_code(archive.db, share, archive.config)
    minutes = archive.config["sharing.code_minutes"]
    assert share.recipient
    send(
        archive,
        Message(
            to=[share.recipient],
            subject="Code d'accès aux images / Access code for the images",
            text=(
                f"Votre code d'accès : {code}\n"
                f"Il est valable {minutes} minutes, une seule fois.\n\n"
                f"Your access code: {code}\nIt is valid for {minutes} minutes, once.\n"
            ),
            purpose="share-code",
            study_uid=share.study_uid,
        ),
        by=Actor("imag-sharing", "system", site=share.created_site),
    )


async def _pending(request: web.Request, ctx: _Context) -> shares.Session | web.Response:
    """The request's session, or the page to answer instead."""
    cookie = request.cookies.get(COOKIE, "")
    found = await asyncio.to_thread(shares.session, ctx.db, cookie, ctx.archive.config)
    if found is None:
        return session_ended_page()
    refused = found.share.refusal(ctx.db.clock.now())
    if refused is not None:
        return refused_page(found.share, refused)
    return found


@public
async def verify_form(request: web.Request) -> web.StreamResponse:
    """``GET /share/verify``: the second-factor form of a pending session."""
    ctx = _Context(request)
    found = await _pending(request, ctx)
    if isinstance(found, web.Response):
        return found
    if found.verified:
        return _see(VIEW)
    limit = ctx.archive.config["sharing.max_attempts"]
    return verify_page(found.share, limit - found.share.failures, wrong=False)


@public
async def verify_answer(request: web.Request) -> web.StreamResponse:
    """``POST /share/verify``: check the answer; right -> 303 to the viewer,
    wrong -> the form with the tries left, the last wrong one -> locked."""
    try:
        return await _verify_answer(request)
    except AuditUnavailable:
        return _audit_unavailable()


async def _verify_answer(request: web.Request) -> web.StreamResponse:
    ctx = _Context(request)
    wait = await ctx.rate()
    if wait:
        await ctx.audit("share.verify", "denied", 429, None, reason="rate limit")
        return too_many(wait)
    found = await _pending(request, ctx)
    if isinstance(found, web.Response):
        return found
    if found.verified:
        return _see(VIEW)
    if (request.content_length or 0) > _MAX_FORM:
        return page(
            413,
            ("Réponse trop longue", "Answer too long"),
            ("Saisissez seulement la réponse.", "Type the answer only."),
        )
    form = await request.post()
    given = str(form.get("answer", ""))[:100]
    verdict = await asyncio.to_thread(shares.answer, ctx.db, found, given, ctx.archive.config)
    share = found.share
    if verdict.ok:
        await asyncio.to_thread(shares.touch, ctx.db, share, opened=True)
        await ctx.log(share, "verify", "allowed")
        await ctx.audit("share.verify", "allowed", 303, share, factor=share.second_factor)
        return _see(VIEW)
    await ctx.log(share, "verify", "locked" if verdict.locked else "wrong")
    await ctx.audit(
        "share.verify",
        "denied",
        423 if verdict.locked else 403,
        share,
        factor=share.second_factor,
        remaining=verdict.remaining,
        locked=verdict.locked,
    )
    if verdict.locked:
        locked = shares.get(ctx.db, share.id)
        assert locked is not None
        refused = locked.refusal(ctx.db.clock.now())
        assert refused is not None
        return refused_page(locked, refused)
    return verify_page(share, verdict.remaining, wrong=True)


def add_routes(app: web.Application) -> None:
    app.router.add_get(VERIFY, verify_form)
    app.router.add_post(VERIFY, verify_answer)
    app.router.add_get("/share/{secret:[A-Za-z0-9_-]{43}}", open_link)
    app.on_response_prepare.append(security_headers)
