"""The on-call rota of the default orientation provider, and the provider itself.

Three kinds of rule, in the index (component ``orientation``), all read in
the *requesting site's* local wall-clock time:

* **weekly** entries: a group covers a day of the week from a start to an end
  time, for every site or for a list of sites / regions.  An end not after the
  start crosses midnight (``18:30-08:30``; equal: a 24-hour shift) and the
  shift belongs to the day it starts: the Friday night shift answers on
  Saturday at 02:00.  The day ``holiday`` is the schedule of a holiday.
* **holidays**: dates of a site or a region (or every site) on which the
  ``holiday`` entries apply to the shifts that *start* that day -- or, when
  no ``holiday`` entry covers the site, Sunday's.
* **exceptions**: from a local date-time to another, another group -- or
  nobody -- is on call, for every site, a list of sites / regions, or only
  where a given group (``replaces``) would otherwise be.

Priority: an exception beats a holiday, which beats the weekly schedule.
Among rules of one kind that cover the same moment, the one naming the site
beats the one naming its region, which beats one for every site; then the
shift (or exception) that began last; then the rule entered last for
exceptions, first for weekly entries.  The answer is piecewise constant
between rule boundaries, which is how :meth:`Rules.timeline` shows a week.

Local times make daylight-saving changes right by construction: an instant is
converted to the site's wall clock (``zoneinfo``) and compared with wall-clock
rules, so "18:30-08:30" is 15 hours on the night clocks go back in Paris and
13 when they go forward; during the repeated hour both instants read the same
wall time and get the same answer.  The overseas zones (America/Martinique,
America/Guadeloupe, America/Cayenne) have no daylight saving.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from archive.index.db import Database, open_database, utcnow
from archive.orientation import Group, OrientationError, SiteInfo, UnknownSite
from archive.orientation.directory import Directory, site_directory, sites_json
from archive.topology import time_zone

if TYPE_CHECKING:
    from archive.config import Config

DAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
HOLIDAY = "holiday"
_DAY_NAMES = {
    **{d: d for d in DAYS},
    **dict(
        zip(
            ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
            DAYS,
            strict=True,
        )
    ),
    HOLIDAY: HOLIDAY,
}
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})$")
_WEEK = re.compile(r"^(\d{4})-W(\d{2})$")
#: exceptions longer than this are refused: a year-long "exception" is a rota change
MAX_EXCEPTION = timedelta(days=366)
_NOTE_MAX = 500
_DAY = timedelta(days=1)

# -- parsing what people type ------------------------------------------------------------------


def parse_day(text: object) -> str:
    """``mon`` .. ``sun`` (or the full English name) or ``holiday``."""
    key = text.strip().lower() if isinstance(text, str) else None
    if key not in _DAY_NAMES:
        raise OrientationError(f"unknown day {text!r}: use one of {', '.join(DAYS)} or {HOLIDAY}")
    return _DAY_NAMES[key]


def parse_clock(text: object, *, end: bool = False) -> str:
    """A wall-clock time ``HH:MM`` (``24:00`` allowed as an end), normalised."""
    match = _CLOCK.match(text.strip()) if isinstance(text, str) else None
    hours, minutes = (int(match[1]), int(match[2])) if match else (-1, -1)
    valid = 0 <= minutes < 60 and (0 <= hours < 24 or (end and hours == 24 and minutes == 0))
    if not valid:
        what = "end" if end else "start"
        allowed = "00:00-24:00" if end else "00:00-23:59"
        raise OrientationError(f"{what} time {text!r}: use HH:MM, {allowed}")
    return f"{hours:02d}:{minutes:02d}"


def parse_local(text: object, *, end: bool = False, what: str = "time") -> datetime:
    """A local date (``2026-12-05``) or date-time (``2026-12-05T08:30``), without
    offset: a site's wall clock.  A date as an ``end`` means the end of that day."""
    if not isinstance(text, str) or not text.strip():
        raise OrientationError(f"{what}: a local date (YYYY-MM-DD) or date-time (YYYY-MM-DDTHH:MM)")
    value = text.strip()
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime.combine(day + _DAY if end else day, time())
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise OrientationError(
            f"{what} {text!r}: a local date (YYYY-MM-DD) or date-time (YYYY-MM-DDTHH:MM)"
        ) from None
    if parsed.tzinfo is not None:
        raise OrientationError(
            f"{what} {text!r}: rota times are the site's local wall clock; leave the offset out"
        )
    return parsed.replace(second=0, microsecond=0)


def parse_week(text: str) -> date:
    """The Monday of an ISO week ``2026-W49``."""
    match = _WEEK.match(text.strip()) if isinstance(text, str) else None
    try:
        if match is None:
            raise ValueError
        return date.fromisocalendar(int(match[1]), int(match[2]), 1)
    except ValueError:
        raise OrientationError(f"week {text!r}: an ISO week such as 2026-W49") from None


def instant(text: str | None, site: SiteInfo, zone_name: str | None, now: datetime) -> datetime:
    """The aware instant meant by ``text``: with an offset, that instant; without
    one, the wall clock of ``zone_name`` or else of the site; empty: ``now``."""
    if not text:
        return now
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise OrientationError(
            f"at {text!r}: an ISO date-time such as 2026-12-05T23:00 (site's local time) "
            "or 2026-12-06T03:00Z"
        ) from None
    if parsed.tzinfo is not None:
        return parsed
    zone = ZoneInfo(time_zone_name(zone_name) if zone_name else site.time_zone)
    return parsed.replace(tzinfo=zone)


def time_zone_name(text: str) -> str:
    try:
        return time_zone(text)
    except TypeError as exc:
        raise OrientationError(f"tz: {exc}") from None


def week_of(day: date) -> str:
    year, week, _ = day.isocalendar()
    return f"{year}-W{week:02d}"


def _clock_delta(text: str) -> timedelta:
    hours, minutes = text.split(":")
    return timedelta(hours=int(hours), minutes=int(minutes))


def _minute(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M")


# -- rules -------------------------------------------------------------------------------------


def specificity(sites: tuple[str, ...], site: SiteInfo) -> int | None:
    """How closely a rule's site list names ``site``: 2 by name, 1 by region,
    0 for every site; None when the rule does not cover it."""
    if not sites:
        return 0
    if site.name in sites:
        return 2
    if site.region and site.region in sites:
        return 1
    return None


@dataclass(frozen=True)
class WeeklyEntry:
    """A group on call on a day of the week, from ``start`` to ``end`` (local)."""

    id: int
    group: str
    day: str  # mon .. sun, holiday
    start: str  # HH:MM
    end: str  # HH:MM, 24:00
    sites: tuple[str, ...] = ()

    def interval(self, day: date) -> tuple[datetime, datetime]:
        """The shift when it starts on ``day``: (start, end) local."""
        begin = datetime.combine(day, time()) + _clock_delta(self.start)
        finish = datetime.combine(day, time()) + _clock_delta(self.end)
        if finish <= begin:
            finish += _DAY
        return begin, finish

    @property
    def key(self) -> str:
        return f"weekly#{self.id}"

    def as_dict(self) -> dict[str, Any]:
        crosses = self.end != "24:00" and self.end <= self.start
        return {
            "id": self.key,
            "group": self.group,
            "day": self.day,
            "start": self.start,
            "end": self.end,
            "crosses_midnight": crosses,
            "sites": list(self.sites),
        }

    def describe(self) -> str:
        where = ", ".join(self.sites) or "all sites"
        return f"{self.key}: {self.group} on {self.day} {self.start}-{self.end} ({where})"


@dataclass(frozen=True)
class RotaException:
    """From ``starts`` to ``ends`` (local), ``group`` is on call -- nobody when
    None -- where the rule applies."""

    id: int
    starts: datetime
    ends: datetime
    group: str | None
    replaces: str | None = None
    sites: tuple[str, ...] = ()
    note: str = ""

    @property
    def key(self) -> str:
        return f"exception#{self.id}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.key,
            "from": _minute(self.starts),
            "to": _minute(self.ends),
            "group": self.group,
            "nobody": self.group is None,
            "replaces": self.replaces,
            "sites": list(self.sites),
            "note": self.note,
        }

    def describe(self) -> str:
        who = self.group or "nobody on call"
        where = ", ".join(self.sites) or "all sites"
        instead = f" instead of {self.replaces}" if self.replaces else ""
        note = f" -- {self.note}" if self.note else ""
        return (
            f"{self.key}: {who}{instead} from {_minute(self.starts)} to {_minute(self.ends)} "
            f"({where}){note}"
        )


@dataclass(frozen=True)
class Holiday:
    """A holiday of some sites or regions (every site when none is named)."""

    id: int
    day: date
    name: str = ""
    sites: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"holiday#{self.id}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.key,
            "date": self.day.isoformat(),
            "name": self.name,
            "sites": list(self.sites),
        }

    def describe(self) -> str:
        where = ", ".join(self.sites) or "all sites"
        return f"{self.key}: {self.day.isoformat()} {self.name or '(holiday)'} ({where})"


@dataclass(frozen=True)
class Decision:
    """Who is on call for ``site`` at ``local`` (its wall clock), and why:
    ``rule`` is the deciding rule's key (``weekly#3``, ``exception#2``) or
    None when nothing covers the moment."""

    site: SiteInfo
    local: datetime
    group: str | None
    rule: str | None
    reason: str


@dataclass
class Rules:
    """The rota's rules in force over some span: what a decision reads."""

    weekly: list[WeeklyEntry] = field(default_factory=list)
    exceptions: list[RotaException] = field(default_factory=list)
    holidays: list[Holiday] = field(default_factory=list)

    def holiday(self, site: SiteInfo, day: date) -> Holiday | None:
        """The holiday of ``site`` on ``day``, the most specific one."""
        found = [
            (s, h)
            for h in self.holidays
            if h.day == day and (s := specificity(h.sites, site)) is not None
        ]
        return max(found, key=lambda item: (item[0], -item[1].id))[1] if found else None

    def schedule_day(self, site: SiteInfo, day: date) -> tuple[str, Holiday | None]:
        """Which weekly schedule the shifts starting on ``day`` follow at ``site``."""
        holiday = self.holiday(site, day)
        if holiday is None:
            return DAYS[day.weekday()], None
        own = any(e.day == HOLIDAY and specificity(e.sites, site) is not None for e in self.weekly)
        return (HOLIDAY if own else "sun"), holiday

    def shift(self, site: SiteInfo, local: datetime) -> tuple[WeeklyEntry, Holiday | None] | None:
        """The weekly entry (holiday schedules included) covering ``local``."""
        candidates = []
        for day in (local.date(), local.date() - _DAY):
            key, holiday = self.schedule_day(site, day)
            for entry in self.weekly:
                if entry.day != key:
                    continue
                rank = specificity(entry.sites, site)
                if rank is None:
                    continue
                begin, finish = entry.interval(day)
                if begin <= local < finish:
                    candidates.append(((rank, begin, -entry.id), entry, holiday))
        if not candidates:
            return None
        _, entry, holiday = max(candidates, key=lambda c: c[0])
        return entry, holiday

    def decide(self, site: SiteInfo, local: datetime) -> Decision:
        """The group on call at ``site`` at the local wall-clock time ``local``."""
        shift = self.shift(site, local)
        base = shift[0].group if shift else None
        overriding = [
            ((rank, x.starts, x.id), x)
            for x in self.exceptions
            if x.starts <= local < x.ends
            and (rank := specificity(x.sites, site)) is not None
            and (x.replaces is None or x.replaces == base)
        ]
        if overriding:
            exception = max(overriding, key=lambda c: c[0])[1]
            return Decision(site, local, exception.group, exception.key, exception.describe())
        if shift is None:
            return Decision(
                site,
                local,
                None,
                None,
                f"no rota entry covers {site.name} on {DAYS[local.weekday()]} "
                f"{local:%Y-%m-%d %H:%M} ({site.time_zone})",
            )
        entry, holiday = shift
        reason = entry.describe()
        if holiday is not None:
            reason += f"; {holiday.describe()}"
        return Decision(site, local, entry.group, entry.key, reason)

    def timeline(self, site: SiteInfo, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Who is on call at ``site`` from ``start`` to ``end`` (local), as
        consecutive segments: the answer changes only at a rule's boundary,
        so deciding at each boundary is exact."""
        points = {start}
        day = start.date() - _DAY
        while day <= end.date():
            points.add(datetime.combine(day, time()))
            for entry in self.weekly:
                points.update(entry.interval(day))
            day += _DAY
        for x in self.exceptions:
            points.update((x.starts, x.ends))
        segments: list[dict[str, Any]] = []
        for point in sorted(p for p in points if start <= p < end):
            decision = self.decide(site, point)
            if segments and (segments[-1]["group"], segments[-1]["rule"]) == (
                decision.group,
                decision.rule,
            ):
                continue
            if segments:
                segments[-1]["to"] = _minute(point)
            segments.append(
                {
                    "from": _minute(point),
                    "to": _minute(end),
                    "group": decision.group,
                    "rule": decision.rule,
                    "reason": decision.reason,
                }
            )
        return segments


# -- the store ---------------------------------------------------------------------------------


def _sites_of(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text or "[]"))


class Rota:
    """The rota's rules in the index, checked against the directory."""

    def __init__(
        self, db: Database, directory: Directory, sites: Callable[[], dict[str, SiteInfo]]
    ) -> None:
        self.db = db
        self.directory = directory
        self._sites = sites

    # -- reads ----------------------------------------------------------------------------

    def weekly(self, group: str | None = None) -> list[WeeklyEntry]:
        sql = "SELECT id, group_name, day, start_time, end_time, sites FROM orientation_weekly"
        rows = self.db.query(
            sql + (" WHERE group_name = ?" if group else "") + " ORDER BY id",
            (group,) if group else (),
        )
        entries = [WeeklyEntry(r[0], r[1], r[2], r[3], r[4], _sites_of(r[5])) for r in rows]
        order = {d: i for i, d in enumerate((*DAYS, HOLIDAY))}
        return sorted(entries, key=lambda e: (order[e.day], e.start, e.id))

    def exceptions(
        self, start: datetime | None = None, end: datetime | None = None
    ) -> list[RotaException]:
        """Exceptions overlapping [start, end) (every one without bounds)."""
        sql = (
            "SELECT id, starts, ends, group_name, replaces, sites, note FROM orientation_exceptions"
        )
        params: tuple = ()
        if start is not None and end is not None:
            sql += " WHERE starts < ? AND ends > ?"
            params = (_minute(end), _minute(start))
        rows = self.db.query(sql + " ORDER BY starts, id", params)
        return [
            RotaException(
                r[0],
                datetime.fromisoformat(r[1]),
                datetime.fromisoformat(r[2]),
                r[3],
                r[4],
                _sites_of(r[5]),
                r[6] or "",
            )
            for r in rows
        ]

    def holidays(self, first: date | None = None, last: date | None = None) -> list[Holiday]:
        """Holidays from ``first`` to ``last`` included (every one without bounds)."""
        sql = "SELECT id, day, name, sites FROM orientation_holidays"
        params: tuple = ()
        if first is not None and last is not None:
            sql += " WHERE day >= ? AND day <= ?"
            params = (first.isoformat(), last.isoformat())
        rows = self.db.query(sql + " ORDER BY day, id", params)
        return [Holiday(r[0], date.fromisoformat(r[1]), r[2] or "", _sites_of(r[3])) for r in rows]

    def rules(self, start: datetime, end: datetime) -> Rules:
        """The rules that can decide a moment from ``start`` to ``end`` (local):
        the weekly schedule, the holidays of the days shifts start on, the
        exceptions overlapping the span."""
        return Rules(
            self.weekly(),
            self.exceptions(start, end),
            self.holidays(start.date() - _DAY, end.date()),
        )

    def week(
        self, monday: date, group: str | None = None, site: SiteInfo | None = None
    ) -> dict[str, Any]:
        """A week of the rota as people read it: each day with its holidays,
        the weekly entries, the exceptions overlapping it, and for a site the
        resolved on-call timeline."""
        start = datetime.combine(monday, time())
        end = start + 7 * _DAY
        holidays = self.holidays(monday, monday + 6 * _DAY)
        exceptions = [
            x
            for x in self.exceptions(start, end)
            if group is None or group in (x.group, x.replaces)
        ]
        view: dict[str, Any] = {
            "week": week_of(monday),
            "days": [
                {
                    "date": (monday + i * _DAY).isoformat(),
                    "day": DAYS[i],
                    "holidays": [h.as_dict() for h in holidays if h.day == monday + i * _DAY],
                }
                for i in range(7)
            ],
            "weekly": [e.as_dict() for e in self.weekly(group)],
            "exceptions": [x.as_dict() for x in exceptions],
            "holidays": [h.as_dict() for h in holidays],
        }
        if site is not None:
            view["site"] = site.as_dict()
            view["timeline"] = self.rules(start, end).timeline(site, start, end)
        return view

    # -- edits (each returns what changed, for the audit entry) ---------------------------

    def check_sites(self, names: Iterable[str] | None) -> tuple[str, ...]:
        """A rule's site list: each a known site or region; empty: every site."""
        if names is None:
            return ()
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise OrientationError("sites: a list of site or region names")
        known = self._sites()
        regions = {s.region for s in known.values() if s.region}
        wanted = tuple(sorted({n.strip() for n in names if n.strip()}))
        unknown = [n for n in wanted if n not in known and n not in regions]
        if unknown:
            raise OrientationError(
                f"unknown site or region {', '.join(map(repr, unknown))} "
                f"(sites: {', '.join(known) or 'none'}; regions: "
                f"{', '.join(sorted(regions)) or 'none'})"
            )
        return wanted

    def add_weekly(
        self,
        group: str,
        day: str,
        start: str,
        end: str,
        sites: Iterable[str] | None = None,
    ) -> tuple[WeeklyEntry, dict[str, Any]]:
        """Add a weekly entry; the day and times are checked, the group must exist."""
        day = parse_day(day)
        start = parse_clock(start)
        end = parse_clock(end, end=True)
        covered = self.check_sites(sites)
        with self.db.transaction():
            self.directory.require(group)
            new_id = self.db.scalar(
                "INSERT INTO orientation_weekly "
                "(group_name, day, start_time, end_time, sites, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                (group, day, start, end, sites_json(covered), utcnow()),
            )
        entry = WeeklyEntry(int(new_id), group, day, start, end, covered)
        return entry, {"weekly.added": entry.as_dict()}

    def add_exception(
        self,
        starts: str,
        ends: str | None,
        group: str | None,
        *,
        replaces: str | None = None,
        sites: Iterable[str] | None = None,
        note: str = "",
    ) -> tuple[RotaException, dict[str, Any]]:
        """Add an exception from ``starts`` to ``ends`` (local dates or
        date-times; ``ends`` None: the end of the ``starts`` day); ``group``
        None: nobody is on call."""
        begin = parse_local(starts, what="from")
        finish = parse_local(ends if ends else starts[:10], end=True, what="to")
        if finish <= begin:
            raise OrientationError(f"to ({_minute(finish)}) must be after from ({_minute(begin)})")
        if finish - begin > MAX_EXCEPTION:
            raise OrientationError(
                "an exception of more than a year is a change of the weekly rota: edit that"
            )
        if not isinstance(note, str) or len(note) > _NOTE_MAX:
            raise OrientationError(f"note: at most {_NOTE_MAX} characters")
        covered = self.check_sites(sites)
        with self.db.transaction():
            for name in (group, replaces):
                if name is not None:
                    self.directory.require(name)
            new_id = self.db.scalar(
                "INSERT INTO orientation_exceptions "
                "(starts, ends, group_name, replaces, sites, note, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    _minute(begin),
                    _minute(finish),
                    group,
                    replaces,
                    sites_json(covered),
                    note.strip(),
                    utcnow(),
                ),
            )
        exception = RotaException(
            int(new_id), begin, finish, group, replaces, covered, note.strip()
        )
        return exception, {"exception.added": exception.as_dict()}

    def add_holiday(
        self, day: str, name: str = "", sites: Iterable[str] | None = None
    ) -> tuple[Holiday, dict[str, Any]]:
        """Add a holiday of some sites or regions (every site without a list)."""
        try:
            when = date.fromisoformat(day) if isinstance(day, str) and len(day) == 10 else None
        except ValueError:
            when = None
        if when is None:
            raise OrientationError(f"date {day!r}: a date YYYY-MM-DD")
        if not isinstance(name, str) or len(name) > 200:
            raise OrientationError("name: at most 200 characters")
        covered = self.check_sites(sites)
        with self.db.transaction():
            new_id = self.db.scalar(
                "INSERT INTO orientation_holidays (day, name, sites, created_at) "
                "VALUES (?, ?, ?, ?) RETURNING id",
                (when.isoformat(), name.strip(), sites_json(covered), utcnow()),
            )
        holiday = Holiday(int(new_id), when, name.strip(), covered)
        return holiday, {"holiday.added": holiday.as_dict()}

    _KINDS = {
        "weekly": ("orientation_weekly", "weekly"),
        "exception": ("orientation_exceptions", "exceptions"),
        "holiday": ("orientation_holidays", "holidays"),
    }

    def remove(self, key: str) -> dict[str, Any]:
        """Remove the rule ``weekly#12``, ``exception#3`` or ``holiday#5`` (a
        bare number is a weekly entry)."""
        kind, _, number = key.strip().rpartition("#") if isinstance(key, str) else ("", "", "")
        kind = kind or "weekly"
        if kind not in self._KINDS or not number.isdigit():
            raise OrientationError(
                f"rule {key!r}: weekly#N, exception#N or holiday#N (as 'imag rota show' lists)"
            )
        table, reader = self._KINDS[kind]
        with self.db.transaction():
            found = [r for r in getattr(self, reader)() if r.id == int(number)]
            if not found:
                raise OrientationError(f"no rota rule {kind}#{number}")
            self.db.execute(f"DELETE FROM {table} WHERE id = ?", (int(number),))
        return {f"{kind}.removed": found[0].as_dict()}


# -- the default provider ----------------------------------------------------------------------


class DefaultOrientation:
    """The default :class:`~archive.orientation.OrientationProvider`: sites from
    the configuration, groups and rota in the index.

    Providers are built from the configuration alone (``imag_orientation_provider``),
    so this one opens its own handle on the index, when first asked (the
    archive has migrated it by then); a caller holding the archive's handle
    passes it as ``db``."""

    def __init__(self, config: Config, db: Database | None = None) -> None:
        self.config = config
        self._site_map = site_directory(config)
        self._db = db
        self._own_db = db is None
        self._lock = threading.Lock()

    @property
    def db(self) -> Database:
        with self._lock:
            if self._db is None:
                self._db = open_database(self.config.index_url)
            return self._db

    @property
    def directory(self) -> Directory:
        """The editable groups and members."""
        return Directory(self.db)

    @property
    def rota(self) -> Rota:
        """The editable rota."""
        return Rota(self.db, self.directory, lambda: self._site_map)

    def close(self) -> None:
        with self._lock:
            if self._own_db and self._db is not None:
                self._db.close()
                self._db = None

    # -- OrientationProvider -------------------------------------------------------------

    def site(self, name: str) -> SiteInfo | None:
        return self._site_map.get(name)

    def sites(self) -> list[SiteInfo]:
        return list(self._site_map.values())

    def require_site(self, name: str) -> SiteInfo:
        found = self.site(name)
        if found is None:
            raise UnknownSite(
                f"unknown site {name!r} (sites: {', '.join(self._site_map) or 'none'}; "
                "sites are configured in [[sites]])"
            )
        return found

    def groups(self) -> list[Group]:
        return self.directory.groups()

    def members(self, group: str) -> list[str]:
        return self.directory.members(group)

    def groups_of(self, user: str) -> list[Group]:
        return self.directory.groups_of(user)

    def on_call(self, site: str, at: datetime) -> Group | None:
        return self.answer(site, at)[0]

    def answer(self, site: str, at: datetime) -> tuple[Group | None, Decision]:
        """:meth:`on_call` with the rule that decided (for the API and ``imag rota who``)."""
        decision = self.explain(site, at)
        group = None if decision.group is None else self.directory.group(decision.group)
        return group, decision

    def explain(self, site: str, at: datetime) -> Decision:
        """The rota's decision for a request from ``site`` at ``at``."""
        info = self.require_site(site)
        if not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
            raise OrientationError("on_call needs an aware instant (UTC or with an offset)")
        local = at.astimezone(info.zone).replace(tzinfo=None)
        return self.rota.rules(local, local + timedelta(minutes=1)).decide(info, local)
