"""Orientation: the directory of sites, the reading groups and the on-call rota,
answering "which group handles a request from site X at time T?".

This module is the contract the services call (the teleradiology worklist,
the screening queue): :class:`OrientationProvider` and its records.  A region
replaces the default (sites from the configuration, groups and rota in the
index: :class:`archive.orientation.rota.DefaultOrientation`) by registering
``imag_orientation_provider`` in a plugin and naming it in the setting
``plugins.orientation``; :attr:`archive.runtime.Archive.orientation` then
returns that provider and the HTTP API answers from it.

**Time.** ``on_call`` takes an aware instant (UTC or any offset) and reads the
rota in the *requesting site's* local time zone: "group G covers site X on
Mondays 18:30-08:30" means 18:30 on the clock in X.  A coordinator writes the
rota the way the sites see their day; holidays are the site's dates; and a
shift across a daylight-saving change keeps its wall-clock meaning.  A group
that works from another time zone (Paris covering Cayenne's nights) has its
entries written in the site's time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    from archive.config import Config


@dataclass(frozen=True)
class SiteInfo:
    """A site of the directory: its name (as ingest records it), its IANA time
    zone, a label for people and the region it belongs to (may be empty)."""

    name: str
    time_zone: str
    label: str = ""
    region: str = ""

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    def as_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "time_zone": self.time_zone,
            "label": self.label or self.name,
            "region": self.region,
        }


@dataclass(frozen=True)
class Group:
    """A reading group: its name, a label, its members (user names as they
    authenticate: API-token users or OIDC subjects) and an optional address
    (the group's secure-mail box) where a service may notify it."""

    name: str
    label: str = ""
    members: tuple[str, ...] = ()
    address: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "label": self.label or self.name,
            "members": list(self.members),
            "address": self.address,
        }


class OrientationError(ValueError):
    """A request the directory or rota cannot answer or apply (unknown site
    or group, malformed time, ...); the message says what to do."""


class OrientationConflict(OrientationError):
    """An edit that contradicts what is stored (a group that exists already,
    a group the rota still names)."""


class UnknownSite(OrientationError):
    """A site the directory does not know."""


class UnknownGroup(OrientationError):
    """A reading group the directory does not know."""


@runtime_checkable
class OrientationProvider(Protocol):
    """Who handles what: the small interface the services call.

    Every method is a read and may be called from any thread; a provider must
    be cheap to ask (a worklist asks once per incoming request)."""

    def site(self, name: str) -> SiteInfo | None:
        """The site named ``name``, or None when the directory has none."""
        ...

    def sites(self) -> list[SiteInfo]:
        """Every site, by name."""
        ...

    def groups(self) -> list[Group]:
        """Every reading group with its members, by name."""
        ...

    def members(self, group: str) -> list[str]:
        """The members of ``group``; :class:`UnknownGroup` if there is none."""
        ...

    def groups_of(self, user: str) -> list[Group]:
        """The groups ``user`` is a member of."""
        ...

    def on_call(self, site: str, at: datetime) -> Group | None:
        """The group on call for a request from ``site`` at the aware instant
        ``at`` (read in the site's local time), or None when nobody is
        (a gap in the rota, or an exception saying so).  Raises
        :class:`UnknownSite` for a site the directory does not know and
        :class:`OrientationError` for a naive ``at``."""
        ...


def load_orientation_provider(name: str, config: Config | None = None) -> OrientationProvider:
    """The orientation provider named ``name`` (setting ``plugins.orientation``),
    from the plugins' ``imag_orientation_provider``."""
    from archive import plugins

    return plugins.provider("orientation", name, config)
