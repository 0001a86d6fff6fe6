"""Single sign-on: OIDC bearer tokens (JWTs) from a regional identity provider.

The signature is checked against the provider's keys (a JWKS file, or the
JWKS URL, cached), then issuer, audience and expiry.  Claims become a
:class:`Principal` through the configured mapping: which claim holds the role
(and how the provider's role names map onto ours), the sites and the groups.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import jwt

from archive.config import Config
from archive.security.principals import AuthError
from archive.security.roles import Principal, role_names


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and not token.startswith("imag_")


class OidcVerifier:
    """Verifies JWTs and maps their claims, as configured under ``[auth.oidc]``."""

    def __init__(self, config: Config) -> None:
        self.issuer: str = config["auth.oidc.issuer"]
        self.audience: str = config["auth.oidc.audience"]
        self.algorithms: list[str] = list(config["auth.oidc.algorithms"])
        self.subject_claim: str = config["auth.oidc.subject_claim"]
        self.role_claim: str = config["auth.oidc.role_claim"]
        self.sites_claim: str = config["auth.oidc.sites_claim"]
        self.groups_claim: str = config["auth.oidc.groups_claim"]
        self.role_map: Mapping[str, str] = config["auth.oidc.roles"]
        self.leeway = config["auth.oidc.leeway_seconds"]
        jwks_file, jwks_url = config["auth.oidc.jwks_file"], config["auth.oidc.jwks_url"]
        self._keys: jwt.PyJWKSet | None = None
        self._client: jwt.PyJWKClient | None = None
        if jwks_file:
            with open(jwks_file, encoding="utf-8") as fh:
                self._keys = jwt.PyJWKSet.from_dict(json.load(fh))
        elif jwks_url:
            self._client = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=300)
        else:
            raise ValueError("auth.oidc needs jwks_file or jwks_url")

    @classmethod
    def from_config(cls, config: Config) -> OidcVerifier | None:
        return cls(config) if config["auth.oidc.issuer"] else None

    def _key(self, token: str) -> jwt.PyJWK:
        """The JWK the token names.  Verifying with the PyJWK (not its bare key)
        binds the algorithm to the key: a token whose ``alg`` does not fit its
        key (ES256 naming an RSA key, HS256 keyed with an RSA public key) is an
        InvalidAlgorithmError, not a TypeError (a 500) from the wrong key type.
        A JWK without ``alg`` gets pyjwt's default for its type (RS256, ES256, ...)."""
        if self._client is not None:
            return self._client.get_signing_key_from_jwt(token)
        kid = jwt.get_unverified_header(token).get("kid")
        assert self._keys is not None
        keys = self._keys.keys
        if kid is not None:
            keys = [k for k in keys if k.key_id == kid]
        if len(keys) != 1:
            raise jwt.InvalidTokenError(f"no single key in the JWKS for kid {kid!r}")
        return keys[0]

    def verify(self, token: str) -> Principal:
        """The principal a JWT stands for; AuthError (with the reason) otherwise."""
        try:
            claims = jwt.decode(
                token,
                self._key(token),
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:  # InvalidTokenError, InvalidKeyError, PyJWKClientError
            raise AuthError(f"OIDC token rejected: {exc}") from None
        subject = str(claims.get(self.subject_claim) or claims.get("sub") or "")
        if not subject:
            raise AuthError("OIDC token has no subject")
        role = self._role(claims.get(self.role_claim))
        if role is None:
            raise AuthError(
                f"OIDC token of {subject!r} carries no role this archive knows "
                f"(claim {self.role_claim!r})",
                subject,
            )
        return Principal(
            subject,
            role,
            kind="oidc",
            sites=_names(claims.get(self.sites_claim)),
            groups=_names(claims.get(self.groups_claim)),
            via="oidc",
        )

    def _role(self, value: object) -> str | None:
        """Our role for the claim's value(s), mapped through ``auth.oidc.roles``;
        values already named like our roles count as such, so the role claim
        must be one the provider fills for this archive (default ``imag_role``),
        not a general-purpose groups claim.  With several, the first in ROLES
        order."""
        mapped = {self.role_map.get(v, v) for v in _names(value)}
        return next((role for role in role_names() if role in mapped), None)


def _names(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.replace(",", " ").split() if v)
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value if v)
    return ()
