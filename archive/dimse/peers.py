"""Known DICOM peers: who may associate, from where, and which site they speak for."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from archive.security.scope import Scope


@dataclass(frozen=True)
class Peer:
    """A configured remote AE (``[[dicom.peers]]``)."""

    aet: str
    host: str  # address or host name; "*" = any address
    port: int
    site: str = ""
    regional: bool = False

    def addresses(self) -> set[str] | None:
        """The IP addresses ``host`` stands for; None for any."""
        if self.host in ("*", ""):
            return None
        try:
            return {str(ipaddress.ip_address(self.host))}
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(self.host, None)
        except socket.gaierror:
            return set()
        return {str(info[4][0]) for info in infos}

    @property
    def scope(self) -> Scope | None:
        """The studies this peer may find and retrieve: its site's; None = all."""
        return None if self.regional else Scope(frozenset([self.site]))


@dataclass(frozen=True)
class Decision:
    """Whether an association may proceed, and why not."""

    peer: Peer | None
    allowed: bool
    reason: str = ""


class PeerTable:
    """Lookup of the configured peers by AE title, with the address check."""

    def __init__(self, peers: Iterable[dict | Peer], accept_unknown: bool = False) -> None:
        self.accept_unknown = accept_unknown
        self._by_aet: dict[str, Peer] = {}
        self._addresses: dict[str, set[str] | None] = {}
        for p in peers:
            peer = p if isinstance(p, Peer) else Peer(**p)
            self._by_aet[peer.aet] = peer
            self._addresses[peer.aet] = peer.addresses()

    def get(self, aet: str) -> Peer | None:
        return self._by_aet.get(aet.strip())

    def check(self, calling_aet: str, address: str) -> Decision:
        """Decide on an association from ``calling_aet`` at ``address``."""
        aet = calling_aet.strip()
        peer = self._by_aet.get(aet)
        if peer is None:
            if self.accept_unknown:
                return Decision(None, True)
            return Decision(
                None,
                False,
                f"calling AE title {aet!r} is not a configured peer "
                "(add it to [[dicom.peers]] or set "
                "dicom.accept_unknown)",
            )
        allowed = self._addresses[aet]
        if allowed is not None and _normal(address) not in allowed:
            if self.accept_unknown:
                return Decision(None, True)
            return Decision(
                peer,
                False,
                f"calling AE title {aet!r} connected from {address}, "
                f"not from its configured host {peer.host}",
            )
        return Decision(peer, True)


def _normal(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)
