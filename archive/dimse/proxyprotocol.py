"""The PROXY protocol (v1 text and v2 binary) on the DICOM port.

Behind a TCP load balancer every association would come from the balancer's
address: the peer check (an AE title bound to its address) would refuse the
modalities or, worse, accept anything that reaches the balancer, and the audit
trail would name the balancer.  HAProxy's ``send-proxy`` / ``send-proxy-v2``
put a header before the first byte of the connection naming the client's
address; this module reads it -- only on connections *from a configured
balancer* (``dicom.proxy_protocol``), since anyone else could forge one.  A
connection from such a balancer without a valid header is refused: a
misconfigured balancer must not silently put its own address everywhere.

Specification: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Generator

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the longest v1 line, CRLF included
#: logged (a warning) when a connection from a balancer is closed for want of a header
NO_HEADER = (
    "DICOM connection from a load balancer (dicom.proxy_protocol) closed: no valid PROXY "
    "protocol header; configure it with send-proxy or send-proxy-v2"
)


class ProxyHeaderError(ValueError):
    """The connection did not start with a valid PROXY protocol header."""


#: what the parser asks for (how many bytes) and is sent (exactly that many)
_Parser = Generator[int, bytes, "tuple[str, int] | None"]


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ProxyHeaderError("the connection closed inside the PROXY header")
        data += chunk
    return bytes(data)


def read_header(sock: socket.socket) -> tuple[str, int] | None:
    """Read the PROXY header at the start of ``sock`` and nothing more; return
    the client's (address, port), or None for a connection the balancer made
    on its own behalf (v2 LOCAL, v1 UNKNOWN: a health check) -- then the
    socket's own address stands.  Reads are bounded by the socket's timeout."""
    parser = _header()
    try:
        wanted = next(parser)
        while True:
            wanted = parser.send(_exactly(sock, wanted))
    except StopIteration as done:
        return done.value


async def read_header_async(
    sock: socket.socket, loop: asyncio.AbstractEventLoop
) -> tuple[str, int] | None:
    """:func:`read_header` for a non-blocking socket on an event loop (the
    lean receive path): the same parser, the socket read with
    ``loop.sock_recv`` exactly as far as the header goes.  The caller bounds
    the time it takes (``asyncio.wait_for``)."""

    async def exactly(n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = await loop.sock_recv(sock, n - len(data))
            if not chunk:
                raise ProxyHeaderError("the connection closed inside the PROXY header")
            data += chunk
        return bytes(data)

    parser = _header()
    try:
        wanted = next(parser)
        while True:
            wanted = parser.send(await exactly(wanted))
    except StopIteration as done:
        return done.value


def _header() -> _Parser:
    """The header parser, whatever reads the bytes: it yields how many it
    needs next and is sent exactly that many (so nothing past the header is
    ever read); returns what :func:`read_header` returns."""
    start = yield 12  # both versions' shortest header is longer
    if start == V2_SIGNATURE:
        return (yield from _v2())
    if start.startswith(b"PROXY "):
        return (yield from _v1(start))
    raise ProxyHeaderError("no PROXY protocol header (v1 or v2) at the start of the connection")


def _v1(start: bytes) -> _Parser:
    line = bytearray(start)
    while not line.endswith(b"\r\n"):
        if len(line) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 header longer than 107 bytes")
        line += yield 1
    try:
        fields = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 header is not ASCII") from None
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return None
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"malformed PROXY v1 header {bytes(line)!r}")
    _, family, source, _dest, sport, _dport = fields
    try:
        address = ipaddress.ip_address(source)
        port = int(sport)
    except ValueError:
        raise ProxyHeaderError(f"malformed PROXY v1 address in {bytes(line)!r}") from None
    if (address.version == 4) != (family == "TCP4") or not 0 <= port <= 65535:
        raise ProxyHeaderError(f"malformed PROXY v1 address in {bytes(line)!r}")
    return str(address), port


def _v2() -> _Parser:
    version_command, family, length = struct.unpack("!BBH", (yield 4))
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"unsupported PROXY v2 version {version_command >> 4}")
    body = yield length  # addresses, then TLVs we do not need
    command = version_command & 0x0F
    if command == 0x0:  # LOCAL: the balancer's own connection
        return None
    if command != 0x1:
        raise ProxyHeaderError(f"unknown PROXY v2 command {command}")
    if family == 0x11 and length >= 12:  # TCP over IPv4
        source, _dest, sport, _dport = struct.unpack("!4s4sHH", body[:12])
        return str(ipaddress.IPv4Address(source)), sport
    if family == 0x21 and length >= 36:  # TCP over IPv6
        source, _dest, sport, _dport = struct.unpack("!16s16sHH", body[:36])
        return str(ipaddress.IPv6Address(source)), sport
    if family == 0x00:  # UNSPEC
        return None
    raise ProxyHeaderError(f"unsupported PROXY v2 address family 0x{family:02x}")


def header_v1(source: str, sport: int, dest: str, dport: int) -> bytes:
    """A v1 header, as a balancer sends it (for tests and tools)."""
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {dest} {sport} {dport}\r\n".encode()


def header_v2(source: str, sport: int, dest: str, dport: int) -> bytes:
    """A v2 PROXY header for a TCP connection (for tests and tools)."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(dest)
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body
