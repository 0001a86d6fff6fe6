"""The orientation API (``/api/orientation``) and ``imag rota``: viewing and
editing the rota with its permissions, problem details and audit entries,
asking who is on call, and a replacement provider answering through the
same routes.

The HTTP application is the one ``imag serve`` runs, served in this process
(tests/inprocess.py) with a FakeClock, so that "now" is the test's choice;
users and tokens are real accounts of the archive.  ``imag rota`` runs in
process through ``archive.cli.main``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from archive import plugins
from archive.clock import FakeClock
from archive.hookspecs import hookimpl
from archive.orientation import Group, SiteInfo
from archive.security.principals import Principals
from tests.inprocess import InProcessImag, serving_in_process

SITES = [
    {"name": "MQ-CHU", "time_zone": "America/Martinique", "region": "martinique"},
    {"name": "GP-CHU", "time_zone": "America/Guadeloupe", "region": "guadeloupe"},
    {"name": "GF-CH", "time_zone": "America/Cayenne", "region": "guyane"},
]
SETTINGS = {"IMAG_SITES": json.dumps(SITES), "IMAG_LOG_LEVEL": "WARNING"}
API = "/api/orientation"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


class Api:
    """Requests as one user or another, and the audit rows they leave."""

    def __init__(self, server: InProcessImag) -> None:
        self.server = server
        assert server.archive is not None
        self.db = server.archive.db
        principals = Principals(self.db)
        self.tokens = {"admin": server.token}
        for user, role in (("coord", "coordinator"), ("dr.a", "radiologist")):
            principals.add(user, role, sites=["MQ-CHU"])
            self.tokens[user] = principals.create_token(user)[1]

    def call(self, user: str, method: str, path: str, **kwargs: object) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        return requests.request(
            method, self.server.url + API + path, headers=headers, timeout=30, **kwargs
        )

    def last_audit(self) -> int:
        return int(self.db.scalar("SELECT COALESCE(MAX(id), 0) FROM audit"))

    def audit_since(self, last: int) -> list[dict]:
        rows = self.db.query(
            "SELECT actor, action, outcome, status, detail FROM audit WHERE id > ? ORDER BY id",
            (last,),
        )
        return [
            {"actor": a, "action": b, "outcome": c, "status": d, "detail": json.loads(e or "{}")}
            for a, b, c, d, e in rows
        ]

    def rota(self) -> dict:
        """Everything stored, as the admin sees it."""
        groups = self.call("admin", "GET", "/groups").json()
        week = self.call("admin", "GET", "/rota", params={"week": "2026-W49"}).json()
        return {"groups": groups, "week": week}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(utc("2026-12-01T12:00"))


@pytest.fixture
def api(tmp_path: Path, clock: FakeClock) -> Iterator[Api]:
    with serving_in_process(tmp_path / "imag", settings=SETTINGS, clock=clock) as server:
        yield Api(server)


def edit(api: Api, method: str, path: str, body: object = None) -> tuple[requests.Response, dict]:
    """An edit by the coordinator and its one audit entry."""
    last = api.last_audit()
    answer = api.call("coord", method, path, json=body)
    entries = api.audit_since(last)
    assert len(entries) == 1, entries
    return answer, entries[0]


def build_rota(api: Api) -> None:
    for name in ("DAY", "NIGHT", "BACKUP"):
        answer, _ = edit(api, "POST", "/groups", {"name": name, "label": f"{name} readers"})
        assert answer.status_code == 201, answer.text
    for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun"):
        for group, start, end in (("DAY", "08:00", "18:30"), ("NIGHT", "18:30", "08:00")):
            body = {"group": group, "day": day, "start": start, "end": end}
            answer, _ = edit(api, "POST", "/rota/weekly", body)
            assert answer.status_code == 201, answer.text


def on_call(api: Api, user: str = "dr.a", **params: str) -> dict:
    answer = api.call(user, "GET", "/on-call", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_coordinator_builds_the_rota_and_each_change_leaves_one_audit_entry(api: Api) -> None:
    build_rota(api)
    answer, entry = edit(api, "POST", "/groups/NIGHT/members", {"members": ["dr.nuit", "dr.b"]})
    assert answer.status_code == 200
    assert entry["action"] == "orientation.members.add" and entry["actor"] == "coord"
    assert entry["detail"]["changed"] == {
        "members.added": {"group": "NIGHT", "members": ["dr.nuit", "dr.b"]}
    }
    exception = {"from": "2026-12-03", "group": "BACKUP", "replaces": "DAY", "sites": ["MQ-CHU"]}
    answer, entry = edit(api, "POST", "/rota/exceptions", exception)
    assert answer.status_code == 201, answer.text
    assert answer.json()["from"] == "2026-12-03T00:00" and answer.json()["to"] == "2026-12-04T00:00"
    assert entry["action"] == "orientation.rota.except"
    assert entry["detail"]["changed"]["exception.added"]["group"] == "BACKUP"
    answer, entry = edit(api, "POST", "/rota/holidays", {"date": "2026-12-04", "sites": ["guyane"]})
    assert answer.status_code == 201
    assert entry["detail"]["changed"]["holiday.added"]["date"] == "2026-12-04"

    # requests at chosen instants in the three zones
    at = "2026-12-03T11:30Z"  # Thursday 07:30 in Martinique and Guadeloupe, 08:30 in Cayenne
    assert on_call(api, site="MQ-CHU", at=at)["group"]["name"] == "NIGHT"
    assert on_call(api, site="GP-CHU", at=at)["group"]["name"] == "NIGHT"
    assert on_call(api, site="GF-CH", at=at)["group"]["name"] == "DAY"
    thursday = on_call(api, site="MQ-CHU", at="2026-12-03T10:00")  # local time: the exception
    assert thursday["group"]["name"] == "BACKUP" and thursday["rule"].startswith("exception#")
    assert thursday["at"] == "2026-12-03T14:00:00Z" and thursday["local"] == "2026-12-03T10:00"
    night = on_call(api, site="GF-CH", at="2026-12-05T02:00")  # Friday's night shift
    assert night["group"] == {
        "name": "NIGHT",
        "label": "NIGHT readers",
        "members": ["dr.b", "dr.nuit"],
        "address": "",
    }

    week = api.call("dr.a", "GET", "/rota", params={"week": "2026-W49", "site": "MQ-CHU"})
    assert week.status_code == 200
    view = week.json()
    days = ["11-30", "12-01", "12-02", "12-03", "12-04", "12-05", "12-06"]
    assert [d["date"] for d in view["days"]] == [f"2026-{d}" for d in days]
    assert len(view["weekly"]) == 14 and view["exceptions"][0]["replaces"] == "DAY"
    assert {"from": "2026-12-03T08:00", "to": "2026-12-03T18:30", "group": "BACKUP"}.items() <= (
        next(s for s in view["timeline"] if s["group"] == "BACKUP").items()
    )

    # removing a rule is an edit like any other
    rule = view["exceptions"][0]["id"].split("#")[1]
    answer, entry = edit(api, "DELETE", f"/rota/exceptions/{rule}")
    assert answer.status_code == 200 and entry["action"] == "orientation.rota.remove"
    assert entry["detail"]["changed"]["exception.removed"]["group"] == "BACKUP"
    assert on_call(api, site="MQ-CHU", at="2026-12-03T10:00")["group"]["name"] == "DAY"


def test_nobody_on_call_is_answered_null_and_said(api: Api) -> None:
    build_rota(api)
    body = {"from": "2026-12-02T12:00", "to": "2026-12-02T14:00", "nobody": True}
    answer, entry = edit(api, "POST", "/rota/exceptions", body)
    assert answer.status_code == 201 and answer.json()["nobody"] is True
    gap = on_call(api, site="GF-CH", at="2026-12-02T13:00")
    assert gap["on_call"] is False and gap["group"] is None
    assert gap["reason"].startswith("nobody is on call: exception#")


def test_on_call_without_a_time_answers_for_now_on_the_archive_clock(
    api: Api, clock: FakeClock
) -> None:
    build_rota(api)
    clock.set(utc("2026-12-05T13:00"))  # Saturday 09:00 in Martinique
    assert on_call(api, site="MQ-CHU")["group"]["name"] == "DAY"
    clock.set(utc("2026-12-05T23:00"))  # Saturday 19:00
    now = on_call(api, site="MQ-CHU")
    assert now["group"]["name"] == "NIGHT" and now["local"] == "2026-12-05T19:00"
    # a time read in another zone: 23:00 in Paris is 18:00 in Martinique, 23:45 is 18:45
    paris = {"site": "MQ-CHU", "tz": "Europe/Paris"}
    assert on_call(api, at="2026-12-05T23:00", **paris)["group"]["name"] == "DAY"
    assert on_call(api, at="2026-12-05T23:45", **paris)["group"]["name"] == "NIGHT"


def test_a_user_without_orientation_edit_gets_403_and_nothing_changes(api: Api) -> None:
    build_rota(api)
    before = api.rota()
    assert api.call("dr.a", "GET", "/sites").json()[0] == {
        "name": "GF-CH",
        "time_zone": "America/Cayenne",
        "label": "GF-CH",
        "region": "guyane",
    }
    attempts = [
        ("POST", "/rota/weekly", {"group": "DAY", "day": "mon", "start": "01:00", "end": "02:00"}),
        ("POST", "/rota/exceptions", {"from": "2026-12-01", "nobody": True}),
        ("POST", "/groups", {"name": "MINE"}),
        ("POST", "/groups/NIGHT/members", {"members": ["dr.a"]}),
        ("DELETE", "/rota/weekly/1", None),
    ]
    for method, path, body in attempts:
        last = api.last_audit()
        answer = api.call("dr.a", method, path, json=body)
        assert answer.status_code == 403, (path, answer.text)
        assert answer.headers["Content-Type"].startswith("application/problem+json")
        [entry] = api.audit_since(last)
        assert (entry["actor"], entry["outcome"], entry["status"]) == ("dr.a", "denied", 403)
    assert api.rota() == before


def weekly(**changes: object) -> dict:
    """A valid weekly entry, with some fields changed."""
    return {"group": "DAY", "day": "mon", "start": "08:00", "end": "09:00", **changes}


@pytest.mark.parametrize(
    ("method", "path", "body", "detail"),
    [
        ("POST", "/rota/weekly", weekly(day="caturday"), "unknown day 'caturday'"),
        ("POST", "/rota/weekly", weekly(end="24:30"), "end time '24:30'"),
        ("POST", "/rota/weekly", weekly(group="GHOSTS"), "unknown reading group 'GHOSTS'"),
        ("POST", "/rota/weekly", weekly(sites=["ATLANTIS"]), "'ATLANTIS'"),
        ("POST", "/rota/exceptions", {"from": "2026-12-01", "group": "GHOSTS"}, "'GHOSTS'"),
        ("POST", "/rota/exceptions", {"from": "2026-12-01"}, "'nobody': true"),
        ("POST", "/rota/exceptions", {"from": "2026-13-01", "nobody": True}, "'2026-13-01'"),
        ("POST", "/rota/holidays", {"date": "le 14 juillet"}, "a date YYYY-MM-DD"),
        ("POST", "/groups", {"name": "bad name/../x"}, "group name"),
        ("POST", "/groups/GHOSTS/members", {"members": ["x"]}, "'GHOSTS'"),
        ("POST", "/rota/weekly", "not an object", "JSON object"),
        ("GET", "/on-call?site=MQ-CHU&at=2026-12-01T10:00&tz=Mars/Olympus", None, "Mars/Olympus"),
        ("GET", "/on-call?site=MQ-CHU&at=tomorrow", None, "at 'tomorrow'"),
        ("GET", "/on-call?site=ATLANTIS", None, "unknown site 'ATLANTIS'"),
        ("GET", "/rota?week=2026-W99", None, "2026-W49"),
    ],
)
def test_malformed_input_is_a_400_problem_and_changes_nothing(
    api: Api, method: str, path: str, body: object, detail: str
) -> None:
    build_rota(api)
    before = api.rota()
    last = api.last_audit()
    answer = api.call("coord", method, path, json=body)
    problem = answer.json()
    expected = 404 if path.startswith("/groups/GHOSTS") else 400
    assert answer.status_code == expected, problem
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert problem["status"] == expected and detail in problem["detail"]
    [entry] = api.audit_since(last)
    assert entry["status"] == expected and detail in entry["detail"]["error"]
    assert api.rota() == before


class FixedOrientation:
    """A region's own provider: one site, one group, always on call."""

    def site(self, name: str) -> SiteInfo | None:
        return self.sites()[0] if name == "REMOTE" else None

    def sites(self) -> list[SiteInfo]:
        return [SiteInfo("REMOTE", "America/Cayenne", "remote site")]

    def groups(self) -> list[Group]:
        return [Group("REGIONAL", "regional readers", ("dr.x",))]

    def members(self, group: str) -> list[str]:
        return ["dr.x"] if group == "REGIONAL" else []

    def groups_of(self, user: str) -> list[Group]:
        return self.groups() if user == "dr.x" else []

    def on_call(self, site: str, at: datetime) -> Group | None:
        return self.groups()[0] if at.tzinfo is not None else None


@hookimpl
def imag_orientation_provider(name: str) -> FixedOrientation | None:
    """This module is a plugin too, when IMAG_PLUGINS names it."""
    return FixedOrientation() if name == "fixed" else None


@pytest.fixture
def this_module_as_plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("IMAG_PLUGINS", __name__)
    plugins.reset()
    yield
    monkeypatch.delenv("IMAG_PLUGINS")
    plugins.reset()


def test_a_provider_chosen_in_config_is_what_the_api_answers(
    this_module_as_plugin: None, tmp_path: Path
) -> None:
    settings = {**SETTINGS, "IMAG_PLUGINS_ORIENTATION": "fixed"}
    with serving_in_process(tmp_path / "imag", settings=settings) as server:
        api = Api(server)
        assert isinstance(server.archive.orientation, FixedOrientation)
        assert [s["name"] for s in api.call("dr.a", "GET", "/sites").json()] == ["REMOTE"]
        assert api.call("dr.a", "GET", "/groups").json()[0]["members"] == ["dr.x"]
        answer = on_call(api, site="REMOTE", at="2026-12-05T23:00")
        assert answer["group"]["name"] == "REGIONAL" and answer["local"] == "2026-12-05T23:00"
        refused = api.call("coord", "POST", "/groups", json={"name": "X"})
        assert refused.status_code == 501 and "'fixed'" in refused.json()["detail"]


# -- imag rota ---------------------------------------------------------------------------------


@pytest.fixture
def imag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator:
    """``imag ARGS`` in this process: (exit status, stdout, stderr)."""
    from archive.cli import main

    for key in [k for k in os.environ if k.startswith("IMAG_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("IMAG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IMAG_SITES", json.dumps(SITES))
    monkeypatch.setenv("IMAG_LOG_LEVEL", "WARNING")

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    yield run


def test_imag_rota_edits_and_answers_who_is_on_call(imag, tmp_path: Path) -> None:  # noqa: ANN001
    assert imag("rota", "groups", "add", "NIGHT", "--label", "night readers")[0] == 0
    assert imag("rota", "groups", "join", "NIGHT", "dr.nuit")[0] == 0
    code, out, err = imag(
        "rota", "add", "--group", "NIGHT", "--day", "fri", "--start", "18:30", "--end", "08:00"
    )
    assert code == 0, err
    assert "NIGHT on fri 18:30-08:00 (all sites)" in out
    code, out, _ = imag("rota", "who", "--site", "GF-CH", "--at", "2026-12-05T02:00")
    assert code == 0
    assert out.splitlines()[0] == (
        "GF-CH at Sat 2026-12-05 02:00 America/Cayenne (05:00 UTC): NIGHT (night readers: dr.nuit)"
    )
    code, out, _ = imag("rota", "who", "--site", "GF-CH", "--at", "2026-12-05T09:00")
    assert "nobody is on call" in out and "no rota entry covers GF-CH on sat" in out
    code, out, _ = imag("rota", "show", "--week", "2026-W49", "--site", "MQ-CHU")
    assert code == 0 and "2026-12-04T18:30 -> 2026-12-05T08:00  NIGHT" in out

    # refusals say what to do and change nothing
    code, _, err = imag(
        "rota", "add", "--group", "NIGHT", "--day", "vendredi", "--start", "1:00", "--end", "2:00"
    )
    assert code == 2 and "unknown day 'vendredi': use one of mon, tue" in err
    code, _, err = imag("rota", "who", "--site", "ATLANTIS")
    assert code == 2 and "unknown site 'ATLANTIS'" in err
    code, out, _ = imag("rota", "show", "--week", "2026-W49", "--json")
    assert len(json.loads(out)["weekly"]) == 1

    # each CLI edit is audited, naming the operator
    from archive.index import open_database

    db = open_database(f"sqlite:///{tmp_path / 'data' / 'index.db'}")
    try:
        actions = [
            r[0]
            for r in db.query(
                "SELECT action FROM audit WHERE action LIKE 'orientation.%' ORDER BY id"
            )
        ]
    finally:
        db.close()
    assert actions == ["orientation.group.add", "orientation.members.add", "orientation.rota.add"]
