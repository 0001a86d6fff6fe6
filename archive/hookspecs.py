"""The one extension contract of IMAG: every hook a service or plugin implements.

In the manner of Datasette's ``hookspecs.py``: a plugin is a module (or any
object) with functions decorated ``@hookimpl`` whose names are the hooks
below.  Plugins are found through the ``imag`` entry point group (see
:mod:`archive.plugins`); the core's own features -- DICOMweb, routing, study
stability, the default identity -- register through these same hooks, so a
service plugs in without editing the core.

Hooks that *collect* (settings, permissions, job kinds, subscribers...) return
a value from every plugin and the core merges them; a name defined twice is an
error at start-up, never a silent override.  Hooks marked ``firstresult``
(providers) take the first plugin that answers, plugins registered later
being asked first, so an installed plugin replaces a default.

Handler contracts are documented on each hook; arguments are passed by name,
and an implementation may accept only those it needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable, Mapping

    from aiohttp import web

    from archive.config import Config, Setting
    from archive.events import Subscriber
    from archive.index.migrate import Migrations
    from archive.jobs import Handler
    from archive.runtime import Archive

hookspec = pluggy.HookspecMarker("imag")
hookimpl = pluggy.HookimplMarker("imag")


@hookspec
def imag_settings() -> Iterable[Setting]:
    """Settings this plugin adds: :class:`archive.config.Setting` records whose
    path starts with the plugin's own section (``worklist.lease_seconds``).
    They are read from the same TOML file, overridden by ``IMAG_*`` variables,
    validated at start-up and shown by ``imag config show``."""


@hookspec
def imag_migrations() -> Migrations | None:
    """The index migrations of this plugin's component
    (:class:`archive.index.migrate.Migrations`): numbered ``NNNN_name.sql``
    files versioned independently of the core's, applied by ``imag db upgrade``
    and on start, after the core's."""


@hookspec
def imag_permissions() -> Mapping[str, str]:
    """Permissions this plugin defines: name -> what it allows.  A route
    requires one with :func:`archive.security.http.require`."""


@hookspec
def imag_role_grants() -> Mapping[str, Iterable[str]]:
    """Permissions granted to roles: role -> permission names (added to what the
    role has; ``admin`` has every permission anyway)."""


@hookspec
def imag_routes(app: web.Application, archive: Archive) -> None:
    """Add HTTP routes (or a sub-application) to the archive's aiohttp app.
    Every handler must declare its permission (``@require(...)``): a handler
    that declares none is refused to everyone."""


@hookspec
def imag_job_kinds() -> Mapping[str, Handler]:
    """Job kinds this plugin runs: kind -> handler ``(archive, payload) -> None``
    (see :mod:`archive.jobs` for the contract: at least once, idempotent)."""


@hookspec
def imag_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``imag`` sub-commands: ``p = subparsers.add_parser(...)`` then
    ``p.set_defaults(func=handler)`` with ``handler(args) -> int`` (the exit
    status).  ``args.config`` is the ``--config`` path."""


@hookspec
def imag_authenticators(archive: Archive) -> Iterable[Any]:
    """Authenticators (:class:`archive.security.http.Authenticator`) tried in
    order for a request's credentials; the first that recognises them decides."""


@hookspec
def imag_ingest_commit_hooks(config: Config) -> Iterable[Any]:
    """Functions ``(db, done) -> None`` run inside the transaction that commits
    new instances' index rows (``done``: (InstanceRecord, CommitResult) pairs):
    whatever they write commits or rolls back with the instances.  Keep them
    short: they run once per batch on the ingest path."""


@hookspec
def imag_event_types() -> Iterable[str]:
    """Event types this plugin records with :func:`archive.events.record`
    (``report.validated``); the core's are in :data:`archive.events.CORE_TYPES`."""


@hookspec
def imag_event_subscribers() -> Iterable[Subscriber]:
    """Durable subscribers (:class:`archive.events.Subscriber`): each event of a
    type they name becomes one job for each of them, enqueued in the event's
    own transaction, run exactly once across every process."""


@hookspec
def imag_dicom_services(config: Config) -> Iterable[Any]:
    """DICOM services (:class:`archive.dimse.services.DicomService`): the
    presentation contexts a service accepts and the pynetdicom event handlers
    that serve it, added to the archive's Application Entity."""


@hookspec(firstresult=True)
def imag_identity_provider(name: str, config: Config) -> Any:
    """The identity provider named ``name`` (setting ``plugins.identity``;
    :class:`archive.identity.IdentityPlugin`), or None when this plugin does
    not provide it."""


@hookspec(firstresult=True)
def imag_orientation_provider(name: str, config: Config) -> Any:
    """The orientation provider named ``name`` (setting ``plugins.orientation``;
    :class:`archive.orientation.OrientationProvider`): the directory of sites,
    reading groups and which group is on call; None when not provided here."""


@hookspec(firstresult=True)
def imag_messaging_provider(name: str, config: Config) -> Any:
    """The messaging transport named ``name`` (setting ``plugins.messaging``;
    :class:`archive.messaging.Transport`): how a queued message leaves the
    archive (secure mail, an outbox folder); None when not provided here."""
