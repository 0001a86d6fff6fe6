"""Finding plugins and asking them: the plugin manager of IMAG.

One pluggy manager per process, built on first use.  It registers, in order:

1. the core's own features (:data:`DEFAULT_PLUGINS`), which use the same hooks
   as any other service;
2. every plugin of the ``imag`` entry point group (an installed package
   declares ``[project.entry-points.imag] name = "module"``); uninstalling the
   package removes it;
3. the modules named in ``IMAG_PLUGINS`` (comma-separated), for development
   and tests without installing a package.

The collecting helpers below merge what the plugins return and refuse a name
defined twice, naming both plugins: two services quietly overriding each
other's permission or job kind is the kind of error that must stop start-up.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import pluggy

from archive import hookspecs

log = logging.getLogger(__name__)

#: the core's features, registered through the same hooks as any plugin
DEFAULT_PLUGINS = (
    "archive.events",
    "archive.stability",
    "archive.routing",
    "archive.identity.plugin",
    "archive.orientation.plugin",
    "archive.messaging.plugin",
    "archive.security.plugin",
    "archive.dimse.services",
    "dicomweb.plugin",
    "viewer_api.ohif",
    "viewer_api.sharing_plugin",
    "viewer_api.viewer_plugin",
    "worklist.plugin",
)
ENTRY_POINT_GROUP = "imag"

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None


class PluginError(RuntimeError):
    """Plugins that cannot be used together (a name defined twice, ...)."""


def plugin_manager() -> pluggy.PluginManager:
    """The process's plugin manager, with every plugin registered."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = _build()
        return _manager


def reset() -> None:
    """Forget the manager, so the next call finds plugins again (tests that
    install or remove a plugin within one process)."""
    global _manager
    with _lock:
        _manager = None


def _build() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("imag")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for name in os.environ.get("IMAG_PLUGINS", "").split(","):
        name = name.strip()
        if name and pm.get_plugin(name) is None:
            pm.register(importlib.import_module(name), name=name)
    return pm


def hook() -> Any:
    """The hook caller: ``hook().imag_routes(app=..., archive=...)``."""
    return plugin_manager().hook


def plugin_names() -> list[str]:
    """Names of the registered plugins, core first (for ``imag plugins``)."""
    return [name for name, plugin in plugin_manager().list_name_plugin() if plugin is not None]


def provider(kind: str, name: str, config: Any = None) -> Any:
    """The ``kind`` provider (identity, orientation, messaging) named ``name``:
    the first plugin whose ``imag_<kind>_provider`` answers, plugins registered
    later asked first, so an installed plugin replaces a default."""
    caller = getattr(hook(), f"imag_{kind}_provider")
    found = caller(name=name, config=config)
    if found is None:
        raise ValueError(
            f"{kind} plugin {name!r} not found (setting plugins.{kind}); "
            f"installed plugins: {', '.join(plugin_names())}"
        )
    return found


def collect(hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
    """(plugin name, result) of every plugin implementing ``hook_name`` that
    returned something, in registration order (core first)."""
    pm = plugin_manager()
    caller = getattr(pm.hook, hook_name)
    found = []
    for impl in caller.get_hookimpls():  # registration order (pluggy calls the reverse)
        wanted = {k: v for k, v in kwargs.items() if k in impl.argnames}
        result = impl.function(**wanted)
        if result is not None:
            found.append((impl.plugin_name, result))
    return found


def merged(hook_name: str, what: str, **kwargs: Any) -> dict[str, Any]:
    """The mappings returned by every plugin, merged; a key defined by two
    plugins raises :class:`PluginError`."""
    out: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for plugin, mapping in collect(hook_name, **kwargs):
        for key, value in dict(mapping).items():
            if key in out:
                raise PluginError(
                    f"{what} {key!r} is defined by two plugins: {owner[key]} and {plugin}"
                )
            out[key], owner[key] = value, plugin
    return out


def listed(hook_name: str, **kwargs: Any) -> list[Any]:
    """The items of the iterables returned by every plugin, in order."""
    items: list[Any] = []
    for _plugin, values in collect(hook_name, **kwargs):
        items.extend(values if isinstance(values, Iterable) else [values])
    return items


def grants() -> Mapping[str, set[str]]:
    """role -> permissions granted by plugins (``imag_role_grants``)."""
    out: dict[str, set[str]] = {}
    for _plugin, mapping in collect("imag_role_grants"):
        for role, permissions in dict(mapping).items():
            out.setdefault(role, set()).update(permissions)
    return out


def describe() -> dict[str, list[str]]:
    """Plugin name -> the hooks it implements (``imag plugins``), core first."""
    pm = plugin_manager()
    shown: dict[str, list[str]] = {}
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        shown[name] = sorted(
            caller.name for caller in pm.get_hookcallers(plugin) or [] if caller.name
        )
    return shown
