"""The directory of the default orientation provider: sites and reading groups.

Sites come from the configuration (``[[sites]]`` with their ``time_zone``,
``label`` and ``region``; a site that only a ``[[dicom.peers]]`` entry names is
in the directory too, in the default zone): they are the producers' identity,
set up with them, and validated at start-up -- an unknown time zone stops
``imag serve`` naming the site.  Reading groups and their members change
with the people, so they live in the index (tables ``orientation_groups`` and
``orientation_members``, component ``orientation``), edited through the HTTP
API and ``imag rota groups``.

Group membership here says who reads for a group (whom a worklist offers a
request to, whom a service notifies).  What studies a user may open is the
security layer's business (``imag user add --group``, the OIDC groups claim):
the two are kept apart so that changing the rota never widens anybody's access.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from archive.index.db import Database, utcnow
from archive.orientation import (
    Group,
    OrientationConflict,
    OrientationError,
    SiteInfo,
    UnknownGroup,
)
from archive.topology import time_zone

if TYPE_CHECKING:
    from archive.config import Config

#: the zone of sites that name none, when the setting orientation.time_zone is absent
DEFAULT_TIME_ZONE = "Europe/Paris"
#: group names: what an operator types and a URL carries, unescaped
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MEMBER_MAX = 256
_LABEL_MAX = 200


def check_name(name: str, what: str = "group name") -> str:
    """A group name: 1-64 letters, digits, ``.``, ``_`` or ``-``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise OrientationError(
            f"{what} {name!r}: use 1-64 letters, digits, '.', '_' or '-' (starting with a "
            "letter or digit)"
        )
    return name


def _check_text(value: object, what: str, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit or any(ord(c) < 32 for c in value):
        raise OrientationError(f"{what}: a single line of at most {limit} characters")
    return value.strip()


def site_directory(config: Config) -> dict[str, SiteInfo]:
    """The sites of the configuration, by name: each ``[[sites]]`` entry in
    its own ``time_zone`` (or the setting ``orientation.time_zone``), then the
    sites only peers name, in the default zone."""
    try:
        default = config["orientation.time_zone"]
    except KeyError:  # the orientation plugin's setting is not registered
        default = DEFAULT_TIME_ZONE
    default = time_zone(default or DEFAULT_TIME_ZONE)
    found: dict[str, SiteInfo] = {}
    for site in config.sites:
        found[site.name] = SiteInfo(
            site.name, site.time_zone or default, site.label or site.name, site.region
        )
    for peer in config.peers:
        if peer.site and peer.site not in found:
            found[peer.site] = SiteInfo(peer.site, default, peer.site, "")
    return dict(sorted(found.items()))


class Directory:
    """The reading groups and their members, in the index."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- reads ----------------------------------------------------------------------------

    def groups(self) -> list[Group]:
        """Every group with its members, by name."""
        members: dict[str, list[str]] = {}
        for group, member in self.db.query(
            "SELECT group_name, member FROM orientation_members ORDER BY group_name, member"
        ):
            members.setdefault(group, []).append(member)
        return [
            Group(name, label or "", tuple(members.get(name, ())), address or "")
            for name, label, address in self.db.query(
                "SELECT name, label, address FROM orientation_groups ORDER BY name"
            )
        ]

    def group(self, name: str) -> Group | None:
        row = self.db.query_one(
            "SELECT name, label, address FROM orientation_groups WHERE name = ?", (name,)
        )
        if row is None:
            return None
        return Group(row[0], row[1] or "", tuple(self._members(name)), row[2] or "")

    def require(self, name: str) -> Group:
        """The group named ``name``; :class:`UnknownGroup` naming the known ones."""
        found = self.group(name) if isinstance(name, str) else None
        if found is None:
            known = ", ".join(g.name for g in self.groups()) or "none yet"
            raise UnknownGroup(f"unknown reading group {name!r} (known: {known})")
        return found

    def members(self, group: str) -> list[str]:
        return list(self.require(group).members)

    def _members(self, group: str) -> list[str]:
        return [
            r[0]
            for r in self.db.query(
                "SELECT member FROM orientation_members WHERE group_name = ? ORDER BY member",
                (group,),
            )
        ]

    def groups_of(self, user: str) -> list[Group]:
        """One statement (every HTTP request of a user who is not an admin
        asks it, for the studies its groups see): the groups with every
        member, where one read per group and per group's members cost
        1 + 2 round trips per group."""
        rows = self.db.query(
            "SELECT g.name, g.label, g.address, everyone.member FROM orientation_members mine "
            "JOIN orientation_groups g ON g.name = mine.group_name "
            "JOIN orientation_members everyone ON everyone.group_name = g.name "
            "WHERE mine.member = ? ORDER BY g.name, everyone.member",
            (user,),
        )
        found: dict[str, tuple[str, str, list[str]]] = {}
        for name, label, address, member in rows:
            found.setdefault(name, (label or "", address or "", []))[2].append(member)
        return [
            Group(name, label, tuple(members), address)
            for name, (label, address, members) in found.items()
        ]

    # -- edits (each returns what changed, for the audit entry) ---------------------------

    def add_group(self, name: str, label: str = "", address: str = "") -> dict[str, object]:
        """Create a group; refused when one has that name already."""
        check_name(name)
        label = _check_text(label, "label", _LABEL_MAX)
        address = _check_text(address, "address", _LABEL_MAX)
        with self.db.transaction():
            if self.group(name) is not None:
                raise OrientationConflict(f"reading group {name!r} exists already")
            self.db.execute(
                "INSERT INTO orientation_groups (name, label, address, created_at) "
                "VALUES (?, ?, ?, ?)",
                (name, label, address, utcnow()),
            )
        return {"group.added": {"name": name, "label": label, "address": address}}

    def remove_group(self, name: str) -> dict[str, object]:
        """Remove a group and its memberships; refused while the rota names it
        (remove its entries first, so that no shift silently loses its group)."""
        with self.db.transaction():
            group = self.require(name)
            used = self.db.scalar(
                "SELECT COUNT(*) FROM orientation_weekly WHERE group_name = ?", (name,)
            ) + self.db.scalar(
                "SELECT COUNT(*) FROM orientation_exceptions WHERE group_name = ? OR replaces = ?",
                (name, name),
            )
            if used:
                raise OrientationConflict(
                    f"reading group {name!r} is named by {used} rota rule(s): remove them first "
                    "(imag rota show --group " + name + ")"
                )
            self.db.execute("DELETE FROM orientation_members WHERE group_name = ?", (name,))
            self.db.execute("DELETE FROM orientation_groups WHERE name = ?", (name,))
        return {"group.removed": group.as_dict()}

    def add_members(self, group: str, users: Iterable[str]) -> dict[str, object]:
        """Add members (those already in are left as they are)."""
        wanted = [self._check_member(u) for u in users]
        added = []
        with self.db.transaction():
            present = set(self.require(group).members)
            for user in dict.fromkeys(wanted):
                if user not in present:
                    self.db.execute(
                        "INSERT INTO orientation_members (group_name, member, added_at) "
                        "VALUES (?, ?, ?)",
                        (group, user, utcnow()),
                    )
                    added.append(user)
        return {"members.added": {"group": group, "members": added}}

    def remove_members(self, group: str, users: Iterable[str]) -> dict[str, object]:
        """Remove members; naming one who is not a member is an error (a typo
        must not look like a success)."""
        wanted = list(dict.fromkeys(users))
        with self.db.transaction():
            present = set(self.require(group).members)
            missing = [u for u in wanted if u not in present]
            if missing:
                raise OrientationError(
                    f"not members of {group!r}: {', '.join(map(str, missing))} "
                    f"(members: {', '.join(sorted(present)) or 'none'})"
                )
            for user in wanted:
                self.db.execute(
                    "DELETE FROM orientation_members WHERE group_name = ? AND member = ?",
                    (group, user),
                )
        return {"members.removed": {"group": group, "members": wanted}}

    @staticmethod
    def _check_member(user: object) -> str:
        if (
            not isinstance(user, str)
            or not user.strip()
            or len(user) > _MEMBER_MAX
            or any(ord(c) < 32 for c in user)
        ):
            raise OrientationError(
                f"member {user!r}: a user name (as the user authenticates), "
                f"at most {_MEMBER_MAX} characters"
            )
        return user.strip()


def sites_json(sites: Iterable[str]) -> str:
    """How a rule's site list is stored: a JSON array ('[]': every site)."""
    return json.dumps(sorted(set(sites)))
