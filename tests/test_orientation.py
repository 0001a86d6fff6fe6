"""Orientation: which group handles a request from site X at time T.

A scripted week (ISO week 2026-W49, Monday 30 November to Sunday 6 December)
over four sites in the three overseas zones and Paris, on each index backend:
weekly day shifts per region, a night shift crossing midnight for everyone,
a weekend shift, a Guadeloupe holiday on the Friday, an exception day where a
backup group replaces the Martinique day group, and a lunch gap in Guyane
with nobody on call.  Requests are UTC instants; the rota is read in each
site's wall clock.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest

from archive import plugins
from archive.clock import FakeClock
from archive.config import Config, ConfigError
from archive.hookspecs import hookimpl
from archive.orientation import (
    Group,
    OrientationConflict,
    OrientationError,
    OrientationProvider,
    SiteInfo,
    UnknownGroup,
    UnknownSite,
)
from archive.orientation.rota import DefaultOrientation
from archive.runtime import Archive
from tests.statements import statements_run

SITES = [
    {"name": "MQ-CHU", "time_zone": "America/Martinique", "region": "martinique"},
    {"name": "GP-CHU", "time_zone": "America/Guadeloupe", "region": "guadeloupe"},
    {"name": "GF-CH", "time_zone": "America/Cayenne", "region": "guyane", "label": "CH Cayenne"},
    {"name": "PARIS-X", "time_zone": "Europe/Paris"},
]


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(utc("2026-12-01T12:00"))


@pytest.fixture
def arch(make_config: Callable[..., Config], index_url: str, clock: FakeClock) -> Iterator[Archive]:
    config = make_config(index_url=index_url, settings={"sites": SITES})
    with Archive(config, clock=clock) as archive:
        yield archive


@pytest.fixture
def week(arch: Archive) -> DefaultOrientation:
    """The scripted week's rota."""
    o = arch.orientation
    for name in ("DAY-MQ", "DAY-GP", "GF", "NIGHT", "WEEKEND", "BACKUP", "DAY-P", "NIGHT-P"):
        o.directory.add_group(name, f"group {name}")
    o.directory.add_members("NIGHT", ["dr.nuit", "dr.garde"])
    o.directory.add_members("BACKUP", ["dr.nuit"])
    for day in ("mon", "tue", "wed", "thu", "fri"):
        o.rota.add_weekly("DAY-MQ", day, "08:00", "18:30", ["martinique"])
        o.rota.add_weekly("DAY-GP", day, "08:00", "18:30", ["guadeloupe"])
    for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun"):
        o.rota.add_weekly("GF", day, "08:00", "18:30", ["GF-CH"])
        o.rota.add_weekly("NIGHT", day, "18:30", "08:00", ["martinique", "guadeloupe", "guyane"])
        o.rota.add_weekly("NIGHT-P", day, "18:30", "08:30", ["PARIS-X"])
        o.rota.add_weekly("DAY-P", day, "08:30", "18:30", ["PARIS-X"])
    for day in ("sat", "sun"):
        o.rota.add_weekly("WEEKEND", day, "08:00", "18:30", ["martinique", "guadeloupe"])
    o.rota.add_exception("2026-12-03", None, "BACKUP", replaces="DAY-MQ", note="staff day")
    o.rota.add_exception("2026-12-02T12:00", "2026-12-02T14:00", None, sites=["guyane"])
    o.rota.add_holiday("2026-12-04", "fête locale", ["guadeloupe"])
    return o


def snapshot(o: DefaultOrientation) -> tuple:
    """Everything the rota and the directory hold."""
    return (o.rota.weekly(), o.rota.exceptions(), o.rota.holidays(), o.groups())


def on_call_name(o: OrientationProvider, site: str, at: str) -> str | None:
    group = o.on_call(site, utc(at))
    return group.name if group else None


# (site, UTC instant, local time it is there, group expected)
SCRIPT = [
    ("MQ-CHU", "2026-11-30T14:00", "Mon 10:00 UTC-4", "DAY-MQ"),
    ("MQ-CHU", "2026-12-01T11:30", "Tue 07:30: Monday's night shift", "NIGHT"),
    ("GF-CH", "2026-12-01T11:30", "Tue 08:30 UTC-3: same instant, day shift", "GF"),
    ("GP-CHU", "2026-12-01T11:59", "Tue 07:59", "NIGHT"),
    ("GP-CHU", "2026-12-01T12:00", "Tue 08:00: the shift changes", "DAY-GP"),
    ("GF-CH", "2026-12-02T14:59", "Wed 11:59", "GF"),
    ("GF-CH", "2026-12-02T15:00", "Wed 12:00: the gap with nobody", None),
    ("GF-CH", "2026-12-02T16:59", "Wed 13:59", None),
    ("GF-CH", "2026-12-02T17:00", "Wed 14:00: the gap is over", "GF"),
    ("MQ-CHU", "2026-12-03T14:00", "Thu 10:00: exception day", "BACKUP"),
    ("GP-CHU", "2026-12-03T14:00", "Thu 10:00: not DAY-MQ's shift", "DAY-GP"),
    ("MQ-CHU", "2026-12-04T00:00", "Thu 20:00: night is not replaced", "NIGHT"),
    ("GP-CHU", "2026-12-04T14:00", "Fri 10:00 Guadeloupe holiday: Sunday's", "WEEKEND"),
    ("MQ-CHU", "2026-12-04T14:00", "Fri 10:00 no holiday in Martinique", "DAY-MQ"),
    ("GF-CH", "2026-12-05T05:00", "Sat 02:00: Friday's night crossing midnight", "NIGHT"),
    ("MQ-CHU", "2026-12-05T13:00", "Sat 09:00", "WEEKEND"),
    ("GF-CH", "2026-12-06T12:00", "Sun 09:00", "GF"),
    ("PARIS-X", "2026-12-02T07:15", "Wed 08:15 UTC+1", "NIGHT-P"),
    ("PARIS-X", "2026-12-02T07:45", "Wed 08:45", "DAY-P"),
]


def test_the_scripted_week_answers_the_right_group_in_each_time_zone(
    week: DefaultOrientation,
) -> None:
    answers = [(site, at, why, on_call_name(week, site, at)) for site, at, why, _ in SCRIPT]
    assert answers == [(site, at, why, expected) for site, at, why, expected in SCRIPT]


def test_the_same_instant_is_day_in_cayenne_and_night_in_martinique_and_guadeloupe(
    week: DefaultOrientation,
) -> None:
    at = "2026-12-01T11:30"  # 07:30 in Fort-de-France and Pointe-à-Pitre, 08:30 in Cayenne
    assert [on_call_name(week, s, at) for s in ("MQ-CHU", "GP-CHU", "GF-CH")] == [
        "NIGHT",
        "NIGHT",
        "GF",
    ]


def test_a_gap_with_nobody_on_call_is_answered_none_and_explained(week: DefaultOrientation) -> None:
    group, decision = week.answer("GF-CH", utc("2026-12-02T15:30"))
    assert group is None
    assert decision.rule and decision.rule.startswith("exception#")
    assert "nobody on call" in decision.reason
    # outside every rule: nobody either, and the reason says where and when
    week.rota.remove(decision.rule)
    week.rota.remove(
        next(e.key for e in week.rota.weekly("GF") if e.day == "wed" and e.start == "08:00")
    )
    group, decision = week.answer("GF-CH", utc("2026-12-02T15:30"))
    assert group is None and decision.rule is None
    assert "no rota entry covers GF-CH on wed 2026-12-02 12:30 (America/Cayenne)" in decision.reason


def test_the_on_call_group_carries_its_members(week: DefaultOrientation, clock: FakeClock) -> None:
    clock.set(utc("2026-12-05T05:00"))  # Saturday 01:00 in Martinique
    group = week.on_call("MQ-CHU", clock.now())
    assert group == Group("NIGHT", "group NIGHT", ("dr.garde", "dr.nuit"))
    assert [g.name for g in week.groups_of("dr.nuit")] == ["BACKUP", "NIGHT"]
    assert week.members("BACKUP") == ["dr.nuit"]
    with pytest.raises(UnknownGroup, match="'NOPE'"):
        week.members("NOPE")


def test_a_users_groups_come_with_their_members_in_one_read_of_the_index(
    week: DefaultOrientation,
) -> None:
    """Every HTTP request of a radiologist asks for its groups (the studies
    they see): one round trip to the index, whatever the number of groups."""
    with statements_run(week.directory.db) as statements:
        groups = week.groups_of("dr.nuit")
        assert groups == [
            Group("BACKUP", "group BACKUP", ("dr.nuit",)),
            Group("NIGHT", "group NIGHT", ("dr.garde", "dr.nuit")),
        ]
        assert week.groups_of("nobody") == []
    assert len(statements) == 2, statements  # one per user asked


def test_a_night_shift_across_the_autumn_dst_change_keeps_its_wall_clock_end(
    week: DefaultOrientation,
) -> None:
    # Paris, Sunday 25 October 2026: 03:00 CEST becomes 02:00 CET
    assert on_call_name(week, "PARIS-X", "2026-10-24T16:45") == "NIGHT-P"  # Sat 18:45 CEST
    assert on_call_name(week, "PARIS-X", "2026-10-24T16:15") == "DAY-P"  # Sat 18:15 CEST
    assert on_call_name(week, "PARIS-X", "2026-10-25T00:30") == "NIGHT-P"  # 02:30 CEST
    assert on_call_name(week, "PARIS-X", "2026-10-25T01:30") == "NIGHT-P"  # 02:30 CET again
    assert on_call_name(week, "PARIS-X", "2026-10-25T07:15") == "NIGHT-P"  # 08:15 CET
    assert on_call_name(week, "PARIS-X", "2026-10-25T07:45") == "DAY-P"  # 08:45 CET


def test_a_night_shift_across_the_spring_dst_change_keeps_its_wall_clock_end(
    week: DefaultOrientation,
) -> None:
    # Paris, Sunday 29 March 2026: 02:00 CET becomes 03:00 CEST
    assert on_call_name(week, "PARIS-X", "2026-03-29T06:15") == "NIGHT-P"  # 08:15 CEST
    assert on_call_name(week, "PARIS-X", "2026-03-29T06:45") == "DAY-P"  # 08:45 CEST
    assert on_call_name(week, "PARIS-X", "2026-03-29T00:59") == "NIGHT-P"  # 01:59 CET


def test_the_week_timeline_of_a_site_shows_each_change_of_group(week: DefaultOrientation) -> None:
    from archive.orientation.rota import parse_week

    view = week.rota.week(parse_week("2026-W49"), site=week.site("GF-CH"))
    wednesday = [s for s in view["timeline"] if s["from"].startswith("2026-12-02")]
    assert [(s["from"][11:], s["to"][11:], s["group"]) for s in wednesday] == [
        ("08:00", "12:00", "GF"),
        ("12:00", "14:00", None),
        ("14:00", "18:30", "GF"),
        ("18:30", "08:00", "NIGHT"),
    ]
    assert [d["date"] for d in view["days"]][0] == "2026-11-30"
    assert view["days"][4]["holidays"][0]["name"] == "fête locale"


def test_a_holiday_entry_replaces_the_sunday_schedule_where_it_exists(
    week: DefaultOrientation,
) -> None:
    week.directory.add_group("FERIE-GP", "holiday team")
    week.rota.add_weekly("FERIE-GP", "holiday", "07:00", "19:00", ["GP-CHU"])
    assert on_call_name(week, "GP-CHU", "2026-12-04T14:00") == "FERIE-GP"  # Fri 10:00 holiday
    assert on_call_name(week, "GP-CHU", "2026-12-04T11:30") == "FERIE-GP"  # Fri 07:30
    assert on_call_name(week, "GP-CHU", "2026-12-11T14:00") == "DAY-GP"  # next Friday
    # the site-specific holiday entry does not change Martinique's Friday
    assert on_call_name(week, "MQ-CHU", "2026-12-04T14:00") == "DAY-MQ"


def test_an_exception_without_replaces_overrides_every_group_of_its_sites(
    week: DefaultOrientation,
) -> None:
    week.rota.add_exception("2026-12-05T20:00", "2026-12-06T06:00", "BACKUP", sites=["MQ-CHU"])
    assert on_call_name(week, "MQ-CHU", "2026-12-06T01:00") == "BACKUP"  # Sat 21:00
    assert on_call_name(week, "GP-CHU", "2026-12-06T01:00") == "NIGHT"
    assert on_call_name(week, "MQ-CHU", "2026-12-06T10:30") == "NIGHT"  # Sun 06:30


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.add_weekly("NIGHT", "funday", "08:00", "10:00"), "unknown day 'funday'"),
        (lambda r: r.add_weekly("NIGHT", "mon", "08:00", "25:00"), "end time '25:00'"),
        (lambda r: r.add_weekly("NIGHT", "mon", "8h", "10:00"), "start time '8h'"),
        (lambda r: r.add_weekly("NIGHT", "mon", "24:00", "10:00"), "start time '24:00'"),
        (lambda r: r.add_weekly("NOPE", "mon", "08:00", "10:00"), "unknown reading group 'NOPE'"),
        (lambda r: r.add_weekly("NIGHT", "mon", "08:00", "10:00", ["ATLANTIS"]), "'ATLANTIS'"),
        (lambda r: r.add_exception("2026-12-05", "2026-12-04", "NIGHT"), "must be after"),
        (lambda r: r.add_exception("2026-12-05T08:00+01:00", None, "NIGHT"), "leave the offset"),
        (lambda r: r.add_exception("2026-12-05", None, "NIGHT", replaces="NOPE"), "'NOPE'"),
        (lambda r: r.add_holiday("2026-02-30", "x"), "date '2026-02-30'"),
        (lambda r: r.remove("weekly#999999"), "no rota rule weekly#999999"),
        (lambda r: r.remove("shift#1"), "weekly#N, exception#N or holiday#N"),
    ],
)
def test_malformed_rota_edits_are_refused_and_change_nothing(
    week: DefaultOrientation, call: Callable, message: str
) -> None:
    before = snapshot(week)
    with pytest.raises(OrientationError, match=re.escape(message)):
        call(week.rota)
    assert snapshot(week) == before


def test_a_group_named_by_the_rota_cannot_be_removed_until_its_rules_are(
    week: DefaultOrientation,
) -> None:
    with pytest.raises(OrientationConflict, match="named by 1 rota rule"):
        week.directory.remove_group("BACKUP")  # the exception day names it
    with pytest.raises(OrientationConflict, match="exists already"):
        week.directory.add_group("NIGHT")
    week.directory.add_group("SPARE")
    week.directory.add_members("SPARE", ["a", "b"])
    week.directory.remove_group("SPARE")
    assert "SPARE" not in [g.name for g in week.groups()]
    with pytest.raises(OrientationError, match="not members of 'NIGHT': dr.ghost"):
        week.directory.remove_members("NIGHT", ["dr.ghost"])


def test_on_call_refuses_an_unknown_site_and_a_naive_instant(week: DefaultOrientation) -> None:
    with pytest.raises(UnknownSite, match="unknown site 'ATLANTIS'.*MQ-CHU"):
        week.on_call("ATLANTIS", utc("2026-12-01T12:00"))
    with pytest.raises(OrientationError, match="aware instant"):
        week.on_call("MQ-CHU", datetime(2026, 12, 1, 12, 0))


def test_sites_get_their_configured_zone_or_the_default_one(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(
        settings={
            "sites": [{"name": "A", "time_zone": "America/Cayenne"}, {"name": "B"}],
            "dicom.peers": [{"aet": "PACS_C", "site": "C"}],
            "orientation.time_zone": "America/Martinique",
        }
    )
    o = DefaultOrientation(config)
    assert o.sites() == [
        SiteInfo("A", "America/Cayenne", "A"),
        SiteInfo("B", "America/Martinique", "B"),
        SiteInfo("C", "America/Martinique", "C"),
    ]
    assert isinstance(o, OrientationProvider)
    assert DefaultOrientation(make_config()).sites() == []


def test_an_unknown_time_zone_stops_start_up_naming_the_site(
    make_config: Callable[..., Config],
) -> None:
    with pytest.raises(ConfigError, match="site 'MQ'.*time_zone.*'America/Fort-de-France'"):
        make_config(settings={"sites": [{"name": "MQ", "time_zone": "America/Fort-de-France"}]})
    with pytest.raises(ConfigError, match="orientation.time_zone.*'Mars/Olympus'"):
        make_config(settings={"orientation.time_zone": "Mars/Olympus"})


class FixedOrientation:
    """A region's own provider (a directory server, say): one group always."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, datetime]] = []

    def site(self, name: str) -> SiteInfo | None:
        return SiteInfo(name, "America/Cayenne") if name == "REMOTE" else None

    def sites(self) -> list[SiteInfo]:
        return [SiteInfo("REMOTE", "America/Cayenne", "remote site")]

    def groups(self) -> list[Group]:
        return [Group("REGIONAL", "regional readers", ("dr.x",))]

    def members(self, group: str) -> list[str]:
        return ["dr.x"] if group == "REGIONAL" else []

    def groups_of(self, user: str) -> list[Group]:
        return self.groups() if user == "dr.x" else []

    def on_call(self, site: str, at: datetime) -> Group | None:
        self.asked.append((site, at))
        return self.groups()[0]


@pytest.fixture
def fixed_provider() -> Iterator[FixedOrientation]:
    """A test plugin registering the provider ``fixed`` (what an installed
    package's entry point does); gone after the test."""
    provider = FixedOrientation()

    class Plugin:
        @staticmethod
        @hookimpl
        def imag_orientation_provider(name: str) -> FixedOrientation | None:
            return provider if name == "fixed" else None

    plugins.plugin_manager().register(Plugin, name="fixed-orientation")
    yield provider
    plugins.plugin_manager().unregister(Plugin)


def test_a_provider_named_in_config_replaces_the_default(
    make_config: Callable[..., Config], fixed_provider: FixedOrientation
) -> None:
    with Archive(make_config(settings={"plugins.orientation": "fixed"})) as archive:
        assert archive.orientation is fixed_provider
        at = utc("2026-12-05T03:00")
        assert archive.orientation.on_call("REMOTE", at).name == "REGIONAL"
        assert fixed_provider.asked == [("REMOTE", at)]
    with Archive(make_config()) as archive:
        assert isinstance(archive.orientation, DefaultOrientation)
    with (
        Archive(make_config(settings={"plugins.orientation": "nope"})) as archive,
        pytest.raises(ValueError, match="orientation plugin 'nope' not found"),
    ):
        archive.orientation  # noqa: B018 - the property loads the provider
