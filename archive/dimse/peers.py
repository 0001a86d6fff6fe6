"""Known DICOM peers: who may associate, from where, and which site they speak for."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from archive.topology import Peer

__all__ = ["Decision", "Peer", "PeerTable", "addresses"]


def addresses(host: str) -> set[str] | None:
    """The IP addresses a peer's ``host`` stands for (resolved once, when the
    listener starts); None for any address."""
    if host in ("*", ""):
        return None
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return set()
    return {str(info[4][0]) for info in infos}


@dataclass(frozen=True)
class Decision:
    """Whether an association may proceed, and why not."""

    peer: Peer | None
    allowed: bool
    reason: str = ""


class PeerTable:
    """Lookup of the configured peers by AE title, with the address check."""

    def __init__(self, peers: Iterable[Peer], accept_unknown: bool = False) -> None:
        self.accept_unknown = accept_unknown
        self._by_aet: dict[str, Peer] = {}
        self._addresses: dict[str, set[str] | None] = {}
        for peer in peers:
            self._by_aet[peer.aet] = peer
            self._addresses[peer.aet] = addresses(peer.host)

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
