"""Single sign-on with OIDC bearer tokens: a JWT signed by the identity
provider's key (a JWKS file or URL), for our issuer and audience, not expired,
becomes a principal with the mapped subject, role, sites and groups; anything
else is a 401 with the reason, and exactly one "denied" audit entry."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from archive.security.roles import role_permissions
from tests.httpserver import HttpImag
from tests.inprocess import serving_in_process

ISSUER = "https://idp.example.org/realms/region"
AUDIENCE = "imag-archive"
RSA_KID = "rsa-1"
EC_KID = "ec-1"
ROLES_MAP = {"PACS-Readers": "radiologist", "Mammo-Screeners": "screening_reader"}
#: many negative tests come from one address: keep the failure limiter out of the way
NO_RATE_LIMIT = {"IMAG_AUTH_MAX_FAILURES": "1000"}


@dataclass(frozen=True)
class Keys:
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    other_rsa: rsa.RSAPrivateKey  # not in the JWKS

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = json.loads(RSAAlgorithm.to_jwk(self.rsa.public_key()))
        ec_jwk = json.loads(ECAlgorithm.to_jwk(self.ec.public_key()))
        return {
            "keys": [
                rsa_jwk | {"kid": RSA_KID, "use": "sig", "alg": "RS256"},
                ec_jwk | {"kid": EC_KID, "use": "sig", "alg": "ES256"},
            ]
        }

    def rsa_public_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
        other_rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def claims(**overrides: Any) -> dict[str, Any]:
    """Claims of a valid token (a radiologist of sites A and B), with overrides;
    an override of None removes the claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "sub": "0f4c2a9e-subject-id",
        "preferred_username": "dr.hansen",
        "imag_role": "radiologist",
        "imag_sites": ["A", "B"],
        "groups": ["mammo", "thorax"],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def rs256(keys: Keys, kid: str = RSA_KID, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), keys.rsa, "RS256", headers={"kid": kid})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    """header.payload, base64url-encoded, without the signature part."""
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"


def whoami(server: HttpImag, token: str, case: str = "") -> requests.Response:
    """GET /whoami with the bearer token; ``case`` tags the request path so its
    audit entries can be found afterwards."""
    return requests.get(
        f"{server.url}/whoami",
        params={"case": case} if case else None,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def audit_entries(server: HttpImag, case: str) -> list[dict[str, Any]]:
    """The audit entries written for requests tagged with ``case``."""
    answer = server.http.get(
        f"{server.url}/admin/audit", params={"action": "auth.whoami", "limit": 100000}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    rows = [json.loads(line) for line in answer.text.splitlines() if line]
    return [r for r in rows if r["detail"].get("path") == f"/whoami?case={case}"]


def assert_rejected(server: HttpImag, token: str, cause: str) -> dict[str, Any]:
    """The token is refused with 401 naming ``cause``, and audited exactly once
    as denied; returns that audit entry."""
    case = uuid.uuid4().hex
    answer = whoami(server, token, case)
    assert answer.status_code == 401, answer.text
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert cause.lower() in answer.json()["detail"].lower()
    entries = audit_entries(server, case)
    assert len(entries) == 1, entries
    (entry,) = entries
    assert entry["outcome"] == "denied"
    assert entry["status"] == 401
    assert cause.lower() in entry["detail"]["reason"].lower()
    return entry


@pytest.fixture(scope="module")
def jwks_file(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("idp") / "jwks.json"
    path.write_text(json.dumps(keys.jwks()), encoding="utf-8")
    return path


def oidc_settings(**extra: str) -> dict[str, str]:
    return {
        "IMAG_AUTH_OIDC_ISSUER": ISSUER,
        "IMAG_AUTH_OIDC_AUDIENCE": AUDIENCE,
        "IMAG_AUTH_OIDC_ROLES": json.dumps(ROLES_MAP),
        **NO_RATE_LIMIT,
        **extra,
    }


@pytest.fixture(scope="module")
def imag(jwks_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpImag]:
    """An imag serve trusting the keys of a JWKS file."""
    settings = oidc_settings(IMAG_AUTH_OIDC_JWKS_FILE=str(jwks_file))
    with serving_in_process(tmp_path_factory.mktemp("oidc"), settings=settings) as server:
        yield server


# -- accepted tokens -------------------------------------------------------------------


def test_a_valid_token_is_the_mapped_oidc_principal(imag: HttpImag, keys: Keys) -> None:
    answer = whoami(imag, rs256(keys))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "name": "dr.hansen",
        "kind": "oidc",
        "role": "radiologist",
        # the core's grants and those plugins add to the role (orientation, messaging...)
        "permissions": sorted(role_permissions("radiologist")),
        "sites": ["A", "B"],
        "groups": ["mammo", "thorax"],
        "via": "oidc",
    }
    assert {"studies.read", "worklist.read", "worklist.write"} <= set(answer.json()["permissions"])


def test_an_accepted_token_is_audited_as_allowed_under_its_subject(
    imag: HttpImag, keys: Keys
) -> None:
    case = uuid.uuid4().hex
    assert whoami(imag, rs256(keys, preferred_username="dr.audited"), case).status_code == 200
    (entry,) = audit_entries(imag, case)
    assert (entry["actor"], entry["actor_kind"], entry["role"]) == (
        "dr.audited",
        "oidc",
        "radiologist",
    )
    assert (entry["outcome"], entry["status"]) == ("allowed", 200)


def test_an_es256_token_signed_with_the_ec_key_is_accepted(imag: HttpImag, keys: Keys) -> None:
    token = jwt.encode(claims(), keys.ec, "ES256", headers={"kid": EC_KID})
    answer = whoami(imag, token)
    assert answer.status_code == 200, answer.text
    assert answer.json()["name"] == "dr.hansen"


def test_a_provider_role_name_is_mapped_through_the_roles_table(imag: HttpImag, keys: Keys) -> None:
    answer = whoami(imag, rs256(keys, imag_role="PACS-Readers"))
    assert answer.status_code == 200, answer.text
    assert answer.json()["role"] == "radiologist"


def test_a_role_list_gives_the_most_powerful_known_role_and_ignores_unknown_ones(
    imag: HttpImag, keys: Keys
) -> None:
    token = rs256(keys, imag_role=["offline_access", "Mammo-Screeners", "technician"])
    answer = whoami(imag, token)
    assert answer.status_code == 200, answer.text
    assert answer.json()["role"] == "screening_reader"


def test_the_subject_falls_back_to_sub_without_preferred_username(
    imag: HttpImag, keys: Keys
) -> None:
    answer = whoami(imag, rs256(keys, preferred_username=None))
    assert answer.status_code == 200, answer.text
    assert answer.json()["name"] == "0f4c2a9e-subject-id"


def test_sites_and_groups_may_be_space_or_comma_separated_strings(
    imag: HttpImag, keys: Keys
) -> None:
    answer = whoami(imag, rs256(keys, imag_sites="A, C", groups="neuro"))
    assert answer.status_code == 200, answer.text
    assert (answer.json()["sites"], answer.json()["groups"]) == (["A", "C"], ["neuro"])


def test_a_token_expired_within_the_leeway_is_still_accepted(imag: HttpImag, keys: Keys) -> None:
    answer = whoami(imag, rs256(keys, exp=int(time.time()) - 10))  # leeway is 30 s
    assert answer.status_code == 200, answer.text


def test_an_oidc_radiologist_is_refused_admin_routes_with_403(imag: HttpImag, keys: Keys) -> None:
    answer = requests.get(
        f"{imag.url}/admin/audit",
        headers={"Authorization": f"Bearer {rs256(keys)}"},
        timeout=30,
    )
    assert answer.status_code == 403
    assert "audit.read" in answer.json()["detail"]


# -- rejected tokens -------------------------------------------------------------------


def test_a_token_from_another_issuer_is_rejected(imag: HttpImag, keys: Keys) -> None:
    assert_rejected(imag, rs256(keys, iss="https://evil.example.org"), "issuer")


def test_a_token_for_another_audience_is_rejected(imag: HttpImag, keys: Keys) -> None:
    assert_rejected(imag, rs256(keys, aud="some-other-app"), "audience")


def test_a_token_expired_beyond_the_leeway_is_rejected(imag: HttpImag, keys: Keys) -> None:
    assert_rejected(imag, rs256(keys, exp=int(time.time()) - 120), "expired")


def test_a_token_without_exp_is_rejected(imag: HttpImag, keys: Keys) -> None:
    assert_rejected(imag, rs256(keys, exp=None), '"exp"')


def test_a_token_not_yet_valid_is_rejected(imag: HttpImag, keys: Keys) -> None:
    assert_rejected(imag, rs256(keys, nbf=int(time.time()) + 600), "not yet valid")


def test_a_token_signed_by_another_key_under_a_trusted_kid_is_rejected(
    imag: HttpImag, keys: Keys
) -> None:
    token = jwt.encode(claims(), keys.other_rsa, "RS256", headers={"kid": RSA_KID})
    assert_rejected(imag, token, "signature verification failed")


def test_a_token_with_an_unknown_kid_is_rejected(imag: HttpImag, keys: Keys) -> None:
    token = jwt.encode(claims(), keys.other_rsa, "RS256", headers={"kid": "rotated-away"})
    assert_rejected(imag, token, "rotated-away")


def test_a_tampered_payload_with_the_original_signature_is_rejected(
    imag: HttpImag, keys: Keys
) -> None:
    header, _, signature = rs256(keys).split(".")
    forged = b64url(json.dumps(claims(imag_role="admin")).encode())
    assert_rejected(imag, f"{header}.{forged}.{signature}", "signature verification failed")


def test_an_unsigned_alg_none_token_is_rejected(imag: HttpImag) -> None:
    token = unsigned({"alg": "none", "typ": "JWT", "kid": RSA_KID}, claims(imag_role="admin"))
    assert_rejected(imag, token + ".", "alg")


def test_an_hs256_token_keyed_with_the_public_key_is_rejected(imag: HttpImag, keys: Keys) -> None:
    """Algorithm confusion: the RSA public key (which anyone has) as HMAC secret."""
    signing_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": RSA_KID}, claims())
    mac = hmac.new(keys.rsa_public_pem(), signing_input.encode(), hashlib.sha256).digest()
    assert_rejected(imag, f"{signing_input}.{b64url(mac)}", "alg")


def test_a_token_whose_alg_does_not_fit_the_key_of_its_kid_is_a_401_not_a_500(
    imag: HttpImag, keys: Keys
) -> None:
    """ES256 is an accepted algorithm, but the kid names the RSA key."""
    token = jwt.encode(claims(), keys.ec, "ES256", headers={"kid": RSA_KID})
    assert_rejected(imag, token, "algorithm")


def test_a_token_without_a_role_claim_is_rejected_and_audited_under_its_subject(
    imag: HttpImag, keys: Keys
) -> None:
    entry = assert_rejected(imag, rs256(keys, imag_role=None), "no role")
    assert entry["actor"] == "dr.hansen"


def test_a_token_with_only_unknown_roles_is_rejected(imag: HttpImag, keys: Keys) -> None:
    assert_rejected(imag, rs256(keys, imag_role=["Janitor", "offline_access"]), "no role")


def test_a_malformed_token_with_two_dots_is_rejected(imag: HttpImag) -> None:
    assert_rejected(imag, "not.a.jwt", "oidc token rejected")


def test_a_jwt_is_rejected_by_a_server_without_oidc(
    keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with serving_in_process(tmp_path_factory.mktemp("plain"), settings=NO_RATE_LIMIT) as plain:
        assert_rejected(plain, rs256(keys), "not accepted")


# -- JWKS from a URL -------------------------------------------------------------------


@dataclass
class JwksServer:
    url: str
    fetches: list[str]


@pytest.fixture(scope="module")
def jwks_server(keys: Keys) -> Iterator[JwksServer]:
    """The identity provider's JWKS endpoint: a small HTTP server in a thread."""
    body = json.dumps(keys.jwks()).encode()
    fetches: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            fetches.append(self.path)
            if self.path != "/certs":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield JwksServer(f"http://127.0.0.1:{httpd.server_address[1]}/certs", fetches)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def imag_jwks_url(
    jwks_server: JwksServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpImag]:
    """An imag serve fetching the provider's keys from its JWKS URL."""
    settings = oidc_settings(IMAG_AUTH_OIDC_JWKS_URL=jwks_server.url)
    with serving_in_process(tmp_path_factory.mktemp("oidc-url"), settings=settings) as server:
        yield server


def test_keys_from_the_jwks_url_verify_rs256_and_es256_tokens(
    imag_jwks_url: HttpImag, jwks_server: JwksServer, keys: Keys
) -> None:
    answer = whoami(imag_jwks_url, rs256(keys, imag_role="PACS-Readers"))
    assert answer.status_code == 200, answer.text
    assert (answer.json()["name"], answer.json()["role"]) == ("dr.hansen", "radiologist")
    es = jwt.encode(claims(), keys.ec, "ES256", headers={"kid": EC_KID})
    assert whoami(imag_jwks_url, es).status_code == 200
    assert jwks_server.fetches and set(jwks_server.fetches) == {"/certs"}


def test_the_jwks_from_the_url_is_cached_between_tokens(
    imag_jwks_url: HttpImag, jwks_server: JwksServer, keys: Keys
) -> None:
    assert whoami(imag_jwks_url, rs256(keys)).status_code == 200
    fetched = len(jwks_server.fetches)
    for _ in range(3):
        assert whoami(imag_jwks_url, rs256(keys)).status_code == 200
    assert len(jwks_server.fetches) == fetched


def test_a_token_signed_by_another_key_is_rejected_with_the_jwks_url(
    imag_jwks_url: HttpImag, keys: Keys
) -> None:
    token = jwt.encode(claims(), keys.other_rsa, "RS256", headers={"kid": RSA_KID})
    assert_rejected(imag_jwks_url, token, "signature verification failed")


def test_a_kid_the_jwks_url_does_not_know_is_rejected(imag_jwks_url: HttpImag, keys: Keys) -> None:
    token = jwt.encode(claims(), keys.other_rsa, "RS256", headers={"kid": "rotated-away"})
    assert_rejected(imag_jwks_url, token, "rotated-away")
