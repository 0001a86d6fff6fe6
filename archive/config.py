"""Configuration: one TOML file, every setting overridable from the environment.

A setting ``section.key`` is read from the TOML table ``[section]`` and
overridden by the environment variable ``IMAG_SECTION_KEY`` (top-level keys:
``IMAG_KEY``).  The names of the documented variables (``IMAG_DATA_DIR``,
``IMAG_INDEX_URL``, ``IMAG_STORAGE_URL``, ...) are a public contract.

Every value is validated at load time: a bad value stops start-up with a
:class:`ConfigError` that names the key, the variable and what was expected.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from archive.index import extra as extra_attributes
from archive.security.roles import role_names
from archive.topology import STORE_AS, Peer, Route, Site, flag


class ConfigError(ValueError):
    """A configuration value is missing or invalid."""


# -- validators ---------------------------------------------------------------


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a string")
    return value


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool):
            raise TypeError(f"an integer between {lo} and {hi}")
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise TypeError(f"an integer between {lo} and {hi}") from None
        if not lo <= n <= hi:
            raise TypeError(f"an integer between {lo} and {hi}")
        return n

    return check


_bool = flag  # one reading of true / false for settings and records


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise TypeError("one of " + ", ".join(repr(o) for o in options))
        return value

    return check


def _fraction(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError("a number between 0 and 1") from None
    if not 0 <= number <= 1:
        raise TypeError("a number between 0 and 1")
    return number


def _aet(value: Any) -> str:
    text = _str(value)
    if not 1 <= len(text) <= 16 or not text.isascii() or "\\" in text or text != text.strip():
        raise TypeError("an AE title of 1-16 ASCII characters without backslash or edge spaces")
    return text


def _index_url(value: Any) -> str:
    text = _str(value)
    scheme = urlsplit(text).scheme
    if scheme == "sqlite" and text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
        return text
    if scheme in ("postgresql", "postgres") and urlsplit(text).hostname is not None:
        return text
    raise TypeError("sqlite:///path/to/index.db or postgresql://user@host:port/db")


def _storage_url(value: Any) -> str:
    text = _str(value)
    parts = urlsplit(text)
    if parts.scheme == "file" and parts.path.startswith("/"):
        return text
    if parts.scheme == "s3" and parts.netloc:
        return text
    raise TypeError("file:///absolute/path or s3://bucket/prefix")


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _size(value: Any) -> int:
    """Sizes accept plain bytes or a binary suffix: 1073741824, 512MB, 4GiB, 100k."""
    match = _SIZE.fullmatch(str(value).strip().upper())
    if isinstance(value, bool) or not match:
        raise TypeError("a size in bytes, e.g. 1073741824 or 1GiB")
    n = int(float(match[1]) * _UNIT[match[2]])
    if n <= 0:
        raise TypeError("a positive size in bytes, e.g. 1073741824 or 1GiB")
    return n


def _tables(value: Any, json_form: str, toml_form: str) -> list:
    """A list of tables: from the TOML file, or a JSON array in an ``IMAG_*``
    variable (records given in code are kept as they are)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise TypeError(json_form) from None
    if not isinstance(value, list | tuple):
        raise TypeError(toml_form)
    return list(value)


def _distinct(names: list[str], expected: str) -> None:
    if len(set(names)) != len(names):
        raise TypeError(expected)


def _peers(value: Any) -> list[Peer]:
    """[[dicom.peers]] tables (or a JSON array in IMAG_DICOM_PEERS)."""
    tables = _tables(
        value,
        "a JSON array of {aet, host, port, site} objects",
        "a list of [[dicom.peers]] tables with aet, host, port and site",
    )
    peers = [Peer.from_toml(table, i + 1) for i, table in enumerate(tables)]
    _distinct([p.aet for p in peers], "peers with distinct AE titles")
    return peers


def _names_list(value: Any) -> list[str]:
    """A list of names (TOML array, or a comma-separated / JSON string)."""
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else [v for v in text.split(",")]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError('a list of names, e.g. ["RS256", "ES256"]')
    return [v.strip() for v in value if v.strip()]


def _networks(value: Any) -> list[str]:
    names = _names_list(value)
    for name in names:
        try:
            ipaddress.ip_network(name, strict=False)
        except ValueError:
            raise TypeError(
                f"IP addresses or networks (e.g. 10.0.0.5 or 10.0.0.0/24), not {name!r}"
            ) from None
    return names


def _role_map(value: Any) -> dict[str, str]:
    """[auth.oidc.roles]: identity-provider role name = our role (env: JSON object)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise TypeError('a JSON object such as {"PACS-Admins": "admin"}') from None
    if not isinstance(value, Mapping):
        raise TypeError('a table of provider role = our role, e.g. "PACS-Admins" = "admin"')
    for theirs, ours in value.items():
        if ours not in role_names():
            raise TypeError(
                f"roles: {theirs!r} maps to {ours!r}, not one of {', '.join(role_names())}"
            )
    return {str(k): str(v) for k, v in value.items()}


def _syslog_url(value: Any) -> str:
    text = _str(value)
    if text and (urlsplit(text).scheme not in ("udp", "tcp") or not urlsplit(text).hostname):
        raise TypeError("udp://host:port or tcp://host:port (empty: no forwarding)")
    return text


def _sites(value: Any) -> list[Site]:
    """[[sites]] tables: name, and optionally store_as (a per-producer policy)
    and stable_after_seconds."""
    tables = _tables(
        value,
        "a JSON array of {name, store_as} objects",
        "a list of [[sites]] tables with name and store_as",
    )
    sites = [Site.from_toml(table, i + 1) for i, table in enumerate(tables)]
    _distinct([s.name for s in sites], "sites with distinct names")
    return sites


def _routes(value: Any) -> list[Route]:
    """[[routes]]: send matching instances (when = "instance") or stable studies
    (when = "stable") to a DICOM peer (to_dicom = AE title of a [[dicom.peers]])
    or a STOW-RS endpoint (to_stow = base URL; stow_token_file = a file holding
    the destination's API token).  Match values are exact,
    wildcards (* ?) or regular expressions written "re:..."."""
    tables = _tables(value, "a JSON array of route objects", "a list of [[routes]] tables")
    routes = [Route.from_toml(table, i + 1) for i, table in enumerate(tables)]
    _distinct([r.name for r in routes], "routes with distinct names")
    return routes


#: the checks a plugin's settings use (``Setting("example.limit", 10, as_int(1, 100), ...)``):
#: each turns a TOML or ``IMAG_*`` value into the setting's value, or raises
#: TypeError saying what is expected
as_text = _str
as_int = _int
as_bool = _bool
as_choice = _choice
as_size = _size
as_fraction = _fraction


# -- the settings table ---------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One configurable value: where it lives, its default and its check."""

    path: str  # "section.key" or "key"
    default: Any
    check: Callable[[Any], Any]
    help: str
    secret: bool = False
    #: must be the same on every node of a cluster (checked at start-up, see
    #: :mod:`archive.cluster`); the core's such settings are in CLUSTER_WIDE
    cluster: bool = False

    @property
    def env(self) -> str:
        return "IMAG_" + self.path.replace(".", "_").upper()


#: the core settings every node of a cluster must agree on: who may send, what
#: is accepted, how it is stored, routed and secured.  Ports, paths, the node's
#: name, TLS files, log and worker settings are the node's own.
CLUSTER_WIDE = (
    "store_as",
    "sites",
    "stable_after_seconds",
    "routes",
    "storage.url",
    "transcode.",
    "dicom.aet",
    "dicom.peers",
    "dicom.accept_unknown",
    "dicom.check_called_aet",
    "ingest.on_conflict",
    "ingest.default_site",
    "ingest.max_",
    "index.extra_attributes",
    "auth.enabled",
    "auth.oidc.",
    "plugins.",
)


def _core_cluster_wide(path: str) -> bool:
    return any(path == k or (k.endswith(".") and path.startswith(k)) for k in CLUSTER_WIDE)


SETTINGS: list[Setting] = [
    Setting("data_dir", "./imag-data", _str, "folder for the embedded index and object store"),
    Setting(
        "store_as",
        "as-received",
        _choice(*STORE_AS),
        "stored transfer syntax policy, for sites without their own store_as",
    ),
    Setting(
        "sites",
        [],
        _sites,
        "producing sites: [[sites]] name, store_as, stable_after_seconds, time_zone, label, region",
    ),
    Setting(
        "stable_after_seconds",
        60,
        _int(1, 7 * 86400),
        "a study with no new instance for this long is stable (per site: [[sites]])",
    ),
    Setting(
        "transcode.verify",
        "always",
        _choice("always", "sample"),
        "verify lossless re-encoding bit-exact for every instance, or a sample",
    ),
    Setting(
        "transcode.verify_sample",
        0.1,
        _fraction,
        "fraction of instances verified when transcode.verify = sample",
    ),
    Setting(
        "index.url",
        None,
        _index_url,
        "index database (default: SQLite in the data folder)",
        secret=True,
    ),
    Setting(
        "index.extra_attributes",
        extra_attributes.DEFAULT,
        extra_attributes.check_setting,
        "series and instance attributes indexed beyond the core's, matched by QIDO-RS and "
        "C-FIND (a table: series = [keywords], instance = [keywords]; see docs/conformance.md)",
    ),
    Setting("storage.url", None, _storage_url, "object store (default: a folder in the data dir)"),
    Setting("s3.endpoint_url", None, _str, "S3 endpoint for s3:// storage (MinIO, Ceph, cloud)"),
    Setting("s3.region", None, _str, "S3 region"),
    Setting("s3.create_bucket", False, _bool, "create the bucket at start-up if missing"),
    Setting(
        "node.name",
        "",
        _str,
        "this node's name in logs, metrics, job worker names and audit rows "
        "(default: host name:HTTP port)",
    ),
    Setting(
        "cluster.check",
        "refuse",
        _choice("refuse", "warn"),
        "a node whose cluster-wide settings differ from the running nodes' refuses to start "
        "(refuse), or starts with a warning (warn: a node deliberately run differently)",
    ),
    Setting("http.host", "127.0.0.1", _str, "HTTP listen address"),
    Setting("http.port", 8080, _int(0, 65535), "HTTP listen port"),
    Setting(
        "http.public_url",
        "",
        _str,
        "base URL clients reach us at, for the links we "
        "return (default: from the request's Host / X-Forwarded-* headers)",
    ),
    Setting("dicom.host", "0.0.0.0", _str, "DICOM listen address"),
    Setting("dicom.port", 11112, _int(0, 65535), "DICOM listen port"),
    Setting("dicom.aet", "IMAG", _aet, "our AE title"),
    Setting("dicom.enabled", True, _bool, "run the DICOM listener in imag serve"),
    Setting(
        "dicom.peers",
        [],
        _peers,
        "known DICOM peers: [[dicom.peers]] aet, host, port, site, regional (env: JSON array)",
    ),
    Setting(
        "dicom.accept_unknown",
        False,
        _bool,
        "accept associations from AE titles / addresses not in dicom.peers",
    ),
    Setting("dicom.check_called_aet", True, _bool, "refuse associations not addressed to our AE"),
    Setting(
        "dicom.proxy_protocol",
        [],
        _networks,
        "TCP load balancers (addresses or networks) whose DICOM connections start with a "
        "PROXY protocol v1/v2 header naming the modality (HAProxy send-proxy[-v2])",
    ),
    Setting(
        "dicom.processes",
        1,
        _int(1, 64),
        "DICOM listener processes accepting from the port, each new association going "
        "to the least busy; more than one uses more cores for C-STORE ingest (one that "
        "exits is started again, and counted in imag_dicom_listener_restarts_total)",
    ),
    Setting(
        "dicom.max_associations",
        32,
        _int(1, 1000),
        "concurrent associations at most, for the node (every listener process together)",
    ),
    Setting(
        "dicom.associate_timeout",
        10,
        _int(1, 600),
        "seconds a new connection has to send its A-ASSOCIATE-RQ (TLS handshake included) "
        "before it is closed",
    ),
    Setting(
        "dicom.max_pending_connections",
        8,
        _int(1, 1000),
        "connections not yet associated at most (per process); beyond it new ones are closed "
        "at once and the longest-waiting one is cut; they never take a max_associations slot",
    ),
    Setting("dicom.max_pdu", 4 * 2**20, _size, "largest PDU we accept (bytes)"),
    Setting(
        "dicom.lean_store",
        True,
        _bool,
        "serve associations proposing only storage, verification and C-FIND on the lean asyncio "
        "receive path (archive.dimse.lean), TLS and PROXY-protocol ones included; others on "
        "pynetdicom",
    ),
    Setting(
        "dicom.network_timeout",
        60,
        _int(1, 3600),
        "seconds of silence before a connection is dropped",
    ),
    Setting(
        "ingest.max_object_bytes", 4 * 2**30, _size, "largest object accepted (bytes, or e.g. 2GiB)"
    ),
    Setting(
        "ingest.stream_threshold",
        64 * 2**20,
        _size,
        "objects larger than this are streamed through a file, never held in memory",
    ),
    Setting(
        "ingest.max_inflated_bytes",
        256 * 2**20,
        _size,
        "largest size a Deflated Explicit VR Little Endian object may inflate to (bytes); "
        "every reader inflates it whole in memory, so this bounds memory, not disk",
    ),
    Setting(
        "ingest.max_frame_bytes",
        256 * 2**20,
        _size,
        "largest decoded frame accepted (Rows x Columns x Samples x Bits Allocated / 8): "
        "what a viewer, a rendering or a thumbnail decodes at once",
    ),
    Setting(
        "ingest.max_decoded_bytes",
        4 * 2**30,
        _size,
        "largest decoded size of all frames of an object accepted (x Number of Frames): "
        "what a transcode or a conversion on retrieval decodes",
    ),
    Setting(
        "ingest.max_sequence_depth",
        32,
        _int(1, 128),
        "deepest nesting of sequences accepted (real objects need about 10; "
        "DICOM readers, ours included, recurse once per level)",
    ),
    Setting(
        "ingest.on_conflict",
        "keep",
        _choice("keep", "replace"),
        "a different object under a known SOP Instance UID: keep the stored one or replace it",
    ),
    Setting("ingest.default_site", "", _str, "producing site recorded when the source names none"),
    Setting(
        "ingest.batch_size", 64, _int(1, 10000), "index rows committed per transaction at most"
    ),
    Setting(
        "routes",
        [],
        _routes,
        "routing rules: [[routes]] name, when, match keys, to_dicom or to_stow (env: JSON array)",
    ),
    Setting(
        "jobs.workers",
        1,
        _int(0, 64),
        "job worker threads inside imag serve (0: only separate `imag worker` processes)",
    ),
    Setting(
        "jobs.lease_seconds",
        60,
        _int(5, 3600),
        "lease of a claimed job, renewed while its process lives: a job of a node or "
        "worker that died is taken by another this long after its last renewal",
    ),
    Setting(
        "worker.metrics_port",
        0,
        _int(0, 65535),
        "imag worker serves Prometheus /metrics on this port (0: none)",
    ),
    Setting("worker.metrics_host", "127.0.0.1", _str, "imag worker's /metrics listen address"),
    Setting("import.workers", 0, _int(0, 256), "parallel import workers (0: one per CPU)"),
    Setting(
        "plugins.identity",
        "default",
        _str,
        "identity provider (imag_identity_provider); default: the regional patient index",
    ),
    Setting(
        "plugins.orientation",
        "default",
        _str,
        "orientation provider (imag_orientation_provider): sites, reading groups, on-call rota",
    ),
    Setting(
        "plugins.messaging",
        "outbox",
        _str,
        "messaging transport (imag_messaging_provider): outbox (.eml files) or smtp",
    ),
    Setting(
        "auth.enabled",
        True,
        _bool,
        "require authentication on every HTTP route but /health "
        "(false is refused unless http.host is a loopback address)",
    ),
    Setting(
        "auth.admin_token_file",
        "",
        _str,
        "where the first start writes the admin token (default: admin-token in the data folder)",
    ),
    Setting(
        "auth.max_failures",
        10,
        _int(1, 100000),
        "failed authentications per address or token within auth.failure_window_seconds "
        "before further attempts get 429",
    ),
    Setting("auth.failure_window_seconds", 60, _int(1, 86400), "window of auth.max_failures"),
    Setting("auth.oidc.issuer", "", _str, "OIDC issuer (iss) accepted; empty: no OIDC"),
    Setting("auth.oidc.audience", "", _str, "OIDC audience (aud) our tokens must name"),
    Setting("auth.oidc.jwks_url", "", _str, "the identity provider's JWKS URL"),
    Setting("auth.oidc.jwks_file", "", _str, "a JWKS file with the provider's keys (instead)"),
    Setting("auth.oidc.algorithms", ["RS256", "ES256"], _names_list, "accepted JWT algorithms"),
    Setting("auth.oidc.leeway_seconds", 30, _int(0, 600), "clock skew allowed on exp/nbf"),
    Setting(
        "auth.oidc.subject_claim", "preferred_username", _str, "claim naming the user (else sub)"
    ),
    Setting("auth.oidc.role_claim", "imag_role", _str, "claim with the role (string or list)"),
    Setting("auth.oidc.sites_claim", "imag_sites", _str, "claim with the user's sites"),
    Setting("auth.oidc.groups_claim", "groups", _str, "claim with the user's reading groups"),
    Setting(
        "auth.oidc.roles",
        {},
        _role_map,
        "[auth.oidc.roles] provider role = our role, for providers with their own role names",
    ),
    Setting(
        "audit.syslog",
        "",
        _syslog_url,
        "forward audit entries to syslog (RFC 5424): udp://host:514 or tcp://host:601",
    ),
    Setting(
        "http.trusted_proxies",
        [],
        _names_list,
        "addresses of reverse proxies whose X-Forwarded-For names the client "
        "(for the audit trail and the failed-auth limits)",
    ),
    Setting("http.tls_cert", "", _str, "PEM certificate (chain) for HTTPS; empty: plain HTTP"),
    Setting("http.tls_key", "", _str, "PEM private key for http.tls_cert"),
    Setting(
        "http.max_body_bytes",
        2**20,
        _size,
        "largest request body outside STOW-RS (STOW-RS parts: ingest.max_object_bytes)",
    ),
    Setting(
        "http.body_timeout",
        60,
        _int(1, 3600),
        "seconds a client may leave a request body stalled before it gets 408",
    ),
    Setting(
        "dicomweb.max_frames_per_request",
        256,
        _int(1, 100000),
        "frame numbers one WADO-RS frames request may list (repeats count); more: 400",
    ),
    Setting(
        "dicomweb.max_built_bytes",
        256 * 2**20,
        _size,
        "largest thing built in memory for one response part: a frame's rendering "
        "working copy (Rows x Columns x Samples x 8), a decoded frame, an instance "
        "converted to another transfer syntax; larger: 422 (ask for it as stored)",
    ),
    Setting(
        "dicomweb.max_metadata_depth",
        64,
        _int(1, 128),
        "sequence nesting kept in WADO-RS metadata; deeper top-level elements are "
        "left out and named in a Warning header",
    ),
    Setting("dicom.tls_cert", "", _str, "PEM certificate: DICOM over TLS on dicom.port"),
    Setting("dicom.tls_key", "", _str, "PEM private key for dicom.tls_cert"),
    Setting(
        "dicom.tls_ca",
        "",
        _str,
        "PEM CA bundle: when set, DICOM peers must present a certificate it signed",
    ),
    Setting(
        "event_loop",
        "uvloop",
        _choice("uvloop", "asyncio"),
        "the servers' event loop (HTTP, lean DICOM): uvloop (faster requests; WADO-RS reads "
        "stored objects in a thread) or asyncio's own (WADO-RS sends files with sendfile(2))",
    ),
    Setting("log.level", "INFO", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "log level"),
    Setting("log.format", "json", _choice("json", "text"), "log line format"),
]
_BY_PATH = {s.path: s for s in SETTINGS}


def all_settings() -> list[Setting]:
    """The core's settings, then those plugins add (``imag_settings``): one
    table for the TOML file, the ``IMAG_*`` variables and ``imag config show``.
    A plugin setting whose path another setting already has is refused."""
    from archive import plugins

    found = list(SETTINGS)
    seen = dict(_BY_PATH)
    for plugin, settings in plugins.collect("imag_settings"):
        for setting in settings:
            if setting.path in seen:
                raise plugins.PluginError(
                    f"setting {setting.path!r} of plugin {plugin} is already defined"
                )
            seen[setting.path] = setting
            found.append(setting)
    return found


@dataclass(frozen=True)
class Config:
    """The effective configuration; build it with :func:`load_config`."""

    values: Mapping[str, Any]
    sources: Mapping[str, str] = field(default_factory=dict)  # path -> "default"|"file"|"env"

    def __getitem__(self, path: str) -> Any:
        return self.values[path]

    @property
    def data_dir(self) -> Path:
        return Path(self.values["data_dir"]).resolve()

    @property
    def node(self) -> str:
        """This node's name (``node.name``; default ``<host name>:<HTTP port>``):
        which of several nodes sharing one index wrote a log line, an audit row
        or ran a job."""
        return self.values["node.name"] or f"{socket.gethostname()}:{self.values['http.port']}"

    @property
    def index_url(self) -> str:
        return self.values["index.url"]

    @property
    def storage_url(self) -> str:
        return self.values["storage.url"]

    @property
    def peers(self) -> list[Peer]:
        """The known DICOM peers (``[[dicom.peers]]``)."""
        return self.values["dicom.peers"]

    @property
    def sites(self) -> list[Site]:
        """The producing sites with their own policies (``[[sites]]``)."""
        return self.values["sites"]

    @property
    def routes(self) -> list[Route]:
        """The routing rules (``[[routes]]``), in file order."""
        return self.values["routes"]

    def peer(self, aet: str) -> Peer | None:
        """The configured peer with this AE title, if any."""
        return next((p for p in self.peers if p.aet == aet), None)

    def site(self, name: str) -> Site | None:
        """The ``[[sites]]`` entry of this site, if it has one."""
        return next((s for s in self.sites if s.name == name), None)

    def route(self, name: str) -> Route | None:
        """The route of this name, if it is (still) configured."""
        return next((r for r in self.routes if r.name == name), None)

    def store_as_for(self, site: str) -> str:
        """The stored transfer syntax policy of a site: its own ``store_as``,
        else the archive-wide one."""
        found = self.site(site)
        if found is not None and found.store_as:
            return found.store_as
        return self.values["store_as"]

    def stable_after_for(self, site: str) -> int:
        """Seconds without a new instance after which a study of this site is
        stable: the site's own ``stable_after_seconds``, else the archive-wide one."""
        found = self.site(site)
        if found is not None and found.stable_after_seconds:
            return found.stable_after_seconds
        return int(self.values["stable_after_seconds"])

    def cluster_values(self) -> dict[str, Any]:
        """The settings every node of a cluster must agree on (``CLUSTER_WIDE``
        and plugins' settings marked ``cluster``), as plain data."""
        return {
            s.path: _shown(self.values[s.path])
            for s in all_settings()
            if s.path in self.values and (s.cluster or _core_cluster_wide(s.path))
        }

    def masked(self) -> dict[str, Any]:
        """Values for display: secrets (passwords in URLs, keys) replaced by ***."""
        out: dict[str, Any] = {}
        for s in all_settings():
            if s.path not in self.values:
                continue
            value = self.values[s.path]
            if s.secret and isinstance(value, str):
                value = _mask_url(value)
            out[s.path] = _shown(value)
        return out


def _shown(value: Any) -> Any:
    """A value as plain data for display and JSON: records (peers, sites,
    routes) as the TOML tables they were read from."""
    if isinstance(value, list | tuple):
        return [_shown(v) for v in value]
    if hasattr(value, "as_toml"):
        return value.as_toml()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}"
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _flatten(
    table: Mapping[str, Any], prefix: str = "", known: Mapping[str, Setting] = _BY_PATH
) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and path not in known:
            flat.update(_flatten(value, path + ".", known))
        else:
            flat[path] = value
    return flat


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read the TOML file (optional), apply ``IMAG_*`` environment variables and
    explicit overrides, fill defaults and validate everything.

    Raises ConfigError naming the key and the expected form of its value.
    """
    env = os.environ if env is None else env
    settings = all_settings()
    by_path = {s.path: s for s in settings}
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                file_values = _flatten(tomllib.load(fh), known=by_path)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        unknown = sorted(k for k in file_values if k not in by_path)
        if unknown:
            raise ConfigError(
                f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
                "run 'imag config show' to list the settings"
            )

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in settings:
        if overrides and s.path in overrides:
            raw, src, where = overrides[s.path], "override", s.path
        elif s.env in env and env[s.env] != "":
            raw, src, where = env[s.env], "env", f"environment variable {s.env}"
        elif s.path in file_values:
            raw, src, where = file_values[s.path], "file", f"'{s.path}' in {path}"
        else:
            values[s.path], sources[s.path] = s.default, "default"
            continue
        try:
            values[s.path] = s.check(raw)
        except TypeError as exc:
            raise ConfigError(
                f"invalid value {raw!r} for {s.path} ({where}): expected {exc}"
            ) from None
        sources[s.path] = src

    data_dir = Path(values["data_dir"]).expanduser().resolve()
    values["data_dir"] = str(data_dir)
    if values["index.url"] is None:
        values["index.url"] = f"sqlite:///{data_dir / 'index.db'}"
    if values["storage.url"] is None:
        values["storage.url"] = (data_dir / "objects").as_uri()
    if not values["auth.admin_token_file"]:
        values["auth.admin_token_file"] = str(data_dir / "admin-token")
    if not values["auth.enabled"] and not _is_loopback(values["http.host"]):
        raise ConfigError(
            f"auth.enabled = false is refused with http.host = {values['http.host']!r}: "
            "authentication may be turned off only on a loopback address (127.0.0.1, ::1, "
            "localhost), for local development"
        )
    for scope in ("http", "dicom"):
        if bool(values[f"{scope}.tls_cert"]) != bool(values[f"{scope}.tls_key"]):
            raise ConfigError(f"{scope}.tls_cert and {scope}.tls_key go together: set both")
    if values["auth.oidc.issuer"] and not (
        values["auth.oidc.jwks_url"] or values["auth.oidc.jwks_file"]
    ):
        raise ConfigError("auth.oidc.issuer is set: set auth.oidc.jwks_url or auth.oidc.jwks_file")
    if values["auth.oidc.issuer"] and not values["auth.oidc.audience"]:
        raise ConfigError("auth.oidc.issuer is set: set auth.oidc.audience too")
    return Config(values=values, sources=sources)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
