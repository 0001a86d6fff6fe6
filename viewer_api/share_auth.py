"""Share links as credentials (hook ``imag_authenticators``): the link's
secret as ``Authorization: Bearer <secret>`` (a DICOMweb viewer such as OHIF),
and the browser session a link was exchanged for (cookie ``imag_share``).

Both give the share's principal, whose scope is the shared study and series;
both check the share on every request, so a revocation, a lock or the expiry
takes effect at once.  A bearer is refused for a link that asks for a second
factor: using the secret directly would skip it; the browser session is the
way for such links.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from archive.security.principals import AuthError
from archive.security.roles import Principal
from viewer_api import shares

#: the session cookie's name
COOKIE = "imag_share"


@dataclass
class ShareBearerAuthenticator:
    """``Authorization: Bearer <share secret>``: 43 URL-safe characters, told
    apart from API tokens (``imag_...``) and JWTs (three dotted parts)."""

    archive: Any
    name: str = "share-link"

    def accepts(self, scheme: str, credential: str) -> bool:
        return scheme == "bearer" and shares.looks_like_secret(credential)

    def authenticate(self, credential: str) -> Principal:
        db = self.archive.db
        share = shares.by_secret(db, credential)
        if share is None:
            raise AuthError("unknown share link")
        refused = share.refusal(db.clock.now())
        if refused is not None:
            raise AuthError(refused.detail, share.name)
        if share.second_factor:
            raise AuthError(
                "this link asks for a second factor: open it in a browser, not as a bearer token",
                share.name,
            )
        shares.touch(db, share, opened=False)
        return share.principal(f"share-link:{share.id}")


@dataclass
class ShareSessionAuthenticator:
    """The ``imag_share`` cookie of a browser that opened a link: valid while
    the session is live (idle and maximum age), verified (second factor) and
    the share usable."""

    archive: Any
    name: str = "share-session"

    def accepts(self, scheme: str, credential: str) -> bool:
        return False  # never in an Authorization header

    def from_request(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> str | None:
        return cookies.get(COOKIE) or None

    def authenticate(self, credential: str) -> Principal:
        db = self.archive.db
        found = shares.session(db, credential, self.archive.config)
        if found is None:
            raise AuthError("this share session has ended: open the link again")
        share = found.share
        refused = share.refusal(db.clock.now())
        if refused is not None:
            raise AuthError(refused.detail, share.name)
        if not found.verified:
            raise AuthError("answer the second factor first (/share/verify)", share.name)
        shares.touch(db, share, opened=False)
        return share.principal(f"share-session:{share.id}")
