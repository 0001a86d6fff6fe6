"""The security building blocks on their own: the loopback rule for turning
authentication off, deny-by-default routes, the failed-auth limiter, client
addresses behind proxies, tokens at rest, and migrations with trigger bodies."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydicom.uid import generate_uid

from archive.clock import FakeClock
from archive.config import Config, ConfigError, load_config
from archive.identity import Source
from archive.index.migrate import _split
from archive.runtime import Archive
from archive.security.audit import AuditEntry
from archive.security.commands import ensure_admin_token
from archive.security.http import client_address, require
from archive.security.principals import PrincipalError, Principals, hash_token
from archive.security.ratelimit import FailureLimiter
from archive.server import make_app
from tests.dicomfiles import make_instance
from tests.statements import statements_run


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "imag.example.org", "::"])
def test_authentication_cannot_be_turned_off_on_a_public_address(host: str) -> None:
    with pytest.raises(ConfigError, match="loopback"):
        load_config(env={"IMAG_AUTH_ENABLED": "false", "IMAG_HTTP_HOST": host})


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_authentication_can_be_turned_off_on_loopback_for_development(host: str) -> None:
    config = load_config(env={"IMAG_AUTH_ENABLED": "false", "IMAG_HTTP_HOST": host})
    assert config["auth.enabled"] is False


def test_an_unknown_role_in_the_oidc_roles_map_stops_start_up() -> None:
    with pytest.raises(ConfigError, match="superuser"):
        load_config(env={"IMAG_AUTH_OIDC_ROLES": '{"Admins": "superuser"}'})


def _call(app: web.Application, requests: list[tuple[str, dict]]) -> list[tuple[int, dict]]:
    async def run() -> list[tuple[int, dict]]:
        async with TestClient(TestServer(app)) as client:
            out = []
            for path, headers in requests:
                response = await client.get(path, headers=headers)
                out.append((response.status, await response.json()))
            return out

    return asyncio.run(run())


def test_a_route_that_declares_no_permission_is_refused_even_to_admins(
    make_config: Callable[..., Config], index_url: str
) -> None:
    """A service mounted later cannot be open by accident: no declaration, no access."""

    async def undeclared(request: web.Request) -> web.Response:
        return web.json_response({"leak": True})

    @require("worklist.read", "worklist.list")
    async def declared(request: web.Request) -> web.Response:
        return web.json_response({"requests": []})

    with Archive(make_config(index_url=index_url)) as archive:
        principals = Principals(archive.db)
        principals.add("admin", "admin")
        principals.add("rad", "radiologist", sites=["A"])
        principals.add("tech", "technician", sites=["A"])
        bearer = {
            name: {"Authorization": f"Bearer {principals.create_token(name)[1]}"}
            for name in ("admin", "rad", "tech")
        }
        app = make_app(archive)
        app.router.add_get("/worklist/open", undeclared)
        app.router.add_get("/worklist/requests", declared)
        answers = _call(
            app,
            [
                ("/worklist/open", bearer["admin"]),
                ("/worklist/requests", bearer["rad"]),
                ("/worklist/requests", bearer["tech"]),
                ("/worklist/requests", {}),
            ],
        )
        assert [status for status, _ in answers] == [403, 200, 403, 401]
        assert "declares no permission" in answers[0][1]["detail"]
        assert "worklist.read" in answers[2][1]["detail"]
        outcomes = archive.db.query("SELECT actor, action, outcome, status FROM audit ORDER BY id")
        assert outcomes == [
            ("admin", "GET /worklist/open", "denied", 403),
            ("rad", "worklist.list", "allowed", 200),
            ("tech", "worklist.list", "denied", 403),
            ("unknown", "worklist.list", "denied", 401),
        ]


def test_with_authentication_off_requests_are_still_audited_as_anonymous(
    make_config: Callable[..., Config], index_url: str
) -> None:
    config = make_config(index_url=index_url, settings={"auth.enabled": False})
    with Archive(config) as archive:
        [(status, who)] = _call(make_app(archive), [("/whoami", {})])
        assert status == 200 and (who["name"], who["via"]) == ("anonymous", "auth disabled")
        assert archive.db.query("SELECT actor, actor_kind, outcome FROM audit") == [
            ("anonymous", "anonymous", "allowed")
        ]


def test_the_first_start_writes_an_admin_token_only_once(
    make_config: Callable[..., Config], index_url: str
) -> None:
    config = make_config(index_url=index_url)
    with Archive(config) as archive:
        principals = Principals(archive.db)
        path = ensure_admin_token(config, principals)
        assert path == Path(config["auth.admin_token_file"])
        assert path.stat().st_mode & 0o777 == 0o600
        secret = path.read_text().strip()
        assert principals.authenticate(secret).role == "admin"
        assert ensure_admin_token(config, principals) is None  # accounts exist: nothing to do
        assert path.read_text().strip() == secret


def test_tokens_are_kept_only_as_their_sha256(archive: Archive) -> None:
    principals = Principals(archive.db)
    principals.add("svc", "technician", kind="service", sites=["A"])
    info, secret = principals.create_token("svc", "ris")
    assert secret.startswith("imag_") and len(secret) > 40
    stored = archive.db.query("SELECT token_hash FROM tokens")
    assert stored == [(hash_token(secret),)]
    assert principals.authenticate(secret).kind == "service"
    with pytest.raises(PrincipalError, match="already exists"):
        principals.add("svc", "technician")
    with pytest.raises(PrincipalError, match="unknown role"):
        principals.add("other", "superuser")
    assert info.owner == "svc" and info.revoked_at is None


def test_a_token_is_authenticated_with_one_read_of_the_index(archive: Archive) -> None:
    """Every request with an API token pays its look-up: one round trip to
    the index (the token and its account together), not one each."""
    principals = Principals(archive.db)
    principals.add("reader", "radiologist", sites=["A"], groups=["NIGHT"])
    _, secret = principals.create_token("reader", "viewer")
    principals.authenticate(secret)  # the first use is written down (last_used_at)
    with statements_run(archive.db) as statements:
        principal = principals.authenticate(secret)
    assert (principal.name, principal.role, principal.sites) == ("reader", "radiologist", ("A",))
    assert principal.groups == ("NIGHT",)
    assert len(statements) == 1, statements


def test_an_audit_entry_naming_a_study_names_its_patient_in_one_statement(
    archive: Archive,
) -> None:
    """A UID look-up (WADO, a C-FIND or QIDO by study) is audited naming
    the study; the patient is read by the entry's own INSERT, so the entry
    is one round trip to the index, not a look-up and then a write.  A study
    the index does not hold is audited all the same, naming no patient."""
    data = make_instance(lambda ds: setattr(ds, "PatientID", "AUDIT-PAT"))
    study = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)).StudyInstanceUID
    assert archive.pipeline.ingest(data, Source(kind="import", site="A")).ok
    unknown = generate_uid()
    for study_uid in (study, unknown):
        entry = AuditEntry("reader", "user", "wado.retrieve", "allowed", study_uid=study_uid)
        with statements_run(archive.db) as statements:
            archive.audit.write(entry)
        assert len(statements) == 1, statements
    rows = archive.db.query(
        "SELECT study_uid, patient_id FROM audit WHERE action = 'wado.retrieve' ORDER BY id"
    )
    assert rows == [(study, "AUDIT-PAT"), (unknown, None)]
    assert entry.patient_id is None


def test_the_limiter_blocks_after_max_failures_and_forgets_after_the_window() -> None:
    clock = FakeClock()
    limiter = FailureLimiter(max_failures=3, window_seconds=0.5, clock=clock)
    for _ in range(2):
        limiter.failed("address:10.0.0.1", "token:x")
    assert limiter.retry_after("address:10.0.0.1") == 0
    limiter.failed("address:10.0.0.1")
    assert limiter.retry_after("address:10.0.0.1") >= 1
    assert limiter.retry_after("address:10.0.0.2", "token:y") == 0  # others are not affected
    clock.advance(0.4)
    assert limiter.retry_after("address:10.0.0.1") >= 1  # still within the window
    clock.advance(0.2)
    assert limiter.retry_after("address:10.0.0.1") == 0


def test_a_limited_client_is_answered_429_until_the_window_has_passed_on_the_archive_clock(
    make_config: Callable[..., Config], index_url: str
) -> None:
    clock = FakeClock()
    settings = {"auth.max_failures": 2, "auth.failure_window_seconds": 30}
    bad = {"Authorization": "Bearer imag_not-a-real-token"}
    with Archive(make_config(index_url=index_url, settings=settings), clock=clock) as archive:
        app = make_app(archive)

        async def run() -> list[tuple[int, str | None]]:
            async with TestClient(TestServer(app)) as client:

                async def attempt() -> tuple[int, str | None]:
                    response = await client.get("/whoami", headers=bad)
                    return response.status, response.headers.get("Retry-After")

                answers = [await attempt(), await attempt(), await attempt()]
                clock.advance(29)
                answers.append(await attempt())
                clock.advance(1)
                answers.append(await attempt())
                return answers

        assert asyncio.run(run()) == [
            (401, None),
            (401, None),
            (429, "30"),
            (429, "1"),
            (401, None),  # the window has passed: authentication is tried again
        ]


class _Request:
    def __init__(self, remote: str, forwarded: str = "") -> None:
        self.remote = remote
        self.headers = {"X-Forwarded-For": forwarded} if forwarded else {}


@pytest.mark.parametrize(
    ("remote", "forwarded", "expected"),
    [
        ("203.0.113.9", "", "203.0.113.9"),
        ("203.0.113.9", "10.0.0.5", "203.0.113.9"),  # not a trusted proxy: header ignored
        ("127.0.0.1", "198.51.100.7", "198.51.100.7"),
        ("127.0.0.1", "6.6.6.6, 198.51.100.7", "198.51.100.7"),  # a forged first hop
        ("127.0.0.1", "198.51.100.7, 10.0.0.2", "198.51.100.7"),  # two trusted proxies
        ("127.0.0.1", "", "127.0.0.1"),
    ],
)
def test_the_client_address_is_taken_from_trusted_proxies_only(
    remote: str, forwarded: str, expected: str
) -> None:
    trusted = frozenset({"127.0.0.1", "10.0.0.2"})
    assert client_address(_Request(remote, forwarded), trusted) == expected  # type: ignore[arg-type]


def test_migrations_split_statements_around_trigger_and_function_bodies() -> None:
    sqlite = (
        "CREATE TABLE t (a INTEGER); CREATE TRIGGER x BEFORE DELETE ON t\nBEGIN\n"
        "    SELECT RAISE(ABORT, 'no');\nEND;\nCREATE INDEX i ON t (a)"
    )
    assert [s.split()[1] for s in _split(sqlite)] == ["TABLE", "TRIGGER", "INDEX"]
    postgres = (
        "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$\nBEGIN\n"
        "    RAISE EXCEPTION 'no';\nEND\n$$;\nCREATE TRIGGER x BEFORE DELETE ON t "
        "FOR EACH ROW EXECUTE FUNCTION f()"
    )
    assert [s.split()[1] for s in _split(postgres)] == ["FUNCTION", "TRIGGER"]
