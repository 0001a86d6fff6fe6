"""Roles, permissions and the principal a request or association acts as.

A route declares the permission it needs (``studies.read``, ...); a role is a
set of permissions; a principal has one role, sites and reading groups.  What
data a permission reaches is the principal's :class:`Scope`: everything for
``admin``, the studies of its sites and groups for everyone else.
"""

from __future__ import annotations

from dataclasses import dataclass

from archive.security.scope import Scope

#: permission → what it allows
PERMISSIONS = {
    "studies.read": "search and retrieve studies in scope (QIDO-RS, WADO-RS, WADO-URI)",
    "studies.write": "store instances into studies in scope (STOW-RS)",
    "changes.read": "follow the change feed of every site (GET /changes)",
    "metrics.read": "scrape Prometheus metrics (GET /metrics)",
    "audit.read": "read the audit trail (GET /admin/audit)",
    "worklist.read": "see the reading worklist",
    "worklist.write": "claim and report reading requests",
    "screening.read": "see the screening second-read queue",
    "screening.write": "record screening second reads",
}

#: role → permissions.  ``monitor`` is for service accounts of monitoring
#: systems: metrics and nothing else.
ROLES: dict[str, frozenset[str]] = {
    "admin": frozenset(PERMISSIONS),
    "site_admin": frozenset({"studies.read", "studies.write", "metrics.read"}),
    "radiologist": frozenset({"studies.read", "worklist.read", "worklist.write"}),
    "screening_reader": frozenset({"studies.read", "screening.read", "screening.write"}),
    "technician": frozenset({"studies.read", "studies.write"}),
    "monitor": frozenset({"metrics.read"}),
}

KINDS = ("user", "service")


def permissions() -> dict[str, str]:
    """Every permission: the core's and those plugins define (``imag_permissions``)."""
    from archive import plugins

    return plugins.merged("imag_permissions", "permission")


def role_names() -> list[str]:
    """Every role: the core's, then those plugins grant permissions to
    (``imag_role_grants`` naming a role the core does not have, such as the
    identity plugin's ``identity-vigilance``)."""
    from archive import plugins

    return list(ROLES) + sorted(set(plugins.grants()) - set(ROLES))


def role_permissions(role: str) -> frozenset[str]:
    """What ``role`` may do: the core's grants plus plugins' (``imag_role_grants``);
    ``admin`` may do everything any plugin defines."""
    from archive import plugins

    key = tuple(plugins.plugin_names())  # a plugin registered or removed: compute again
    cached = _GRANTED.get(key)
    if cached is None:
        everything = frozenset(permissions())
        extra = plugins.grants()
        cached = {
            name: (everything if name == "admin" else base | frozenset(extra.get(name, ())))
            for name, base in ROLES.items()
        }
        for name, granted in extra.items():  # roles that plugins define
            cached.setdefault(name, frozenset(granted))
        _GRANTED.clear()
        _GRANTED[key] = cached
    return cached.get(role, frozenset())


_GRANTED: dict[tuple[str, ...], dict[str, frozenset[str]]] = {}


@dataclass(frozen=True)
class Principal:
    """Who is acting: a user, a service account, an OIDC subject or a DICOM peer."""

    name: str
    role: str
    kind: str = "user"  # user, service, oidc, peer, anonymous
    sites: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    #: how the principal proved who it is (token name, "oidc", "auth disabled")
    via: str = ""
    #: narrowing of the scope to these studies, and within them these series
    #: (a capability such as a share link); empty: no narrowing
    studies: tuple[str, ...] = ()
    series: tuple[str, ...] = ()

    def can(self, permission: str) -> bool:
        return permission in role_permissions(self.role)

    @property
    def scope(self) -> Scope | None:
        """The studies this principal may see; None = everything."""
        if self.role == "admin" and not (self.studies or self.series):
            return None
        return Scope.of(self.sites, self.groups, self.studies, self.series)

    def write_site(self, asked: str = "") -> str | None:
        """The producing site recorded for what this principal stores.

        ``asked`` (a client's choice) must be one of its sites; without it a
        principal with exactly one site writes to that site.  None when it
        cannot be decided (several sites and no choice, or a site not its own).
        Admins may name any site; without one they get the default site ("").
        """
        if self.role == "admin":
            return asked
        if asked:
            return asked if asked in self.sites else None
        return self.sites[0] if len(self.sites) == 1 else None
