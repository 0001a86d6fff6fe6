"""The audit trail reaches a SIEM: every entry is also sent as an RFC 5424
syslog message, over UDP or TCP (octet counting, RFC 6587)."""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path

import requests

from tests.inprocess import serving_in_process
from tests.processes import HOST

# RFC 5424: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD SP MSG
SYSLOG = re.compile(
    r"<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<proc>\d+) (?P<msgid>\S+) "
    r"(?P<sd>\[imag@32473(?: [a-z]+=\"(?:[^\"\\\]]|\\.)*\")*\]) \ufeff(?P<msg>.*)",
    re.S,
)


def parse(message: bytes) -> tuple[re.Match, dict]:
    match = SYSLOG.fullmatch(message.decode("utf-8"))
    assert match, message
    return match, json.loads(match["msg"])


def test_each_audit_entry_is_forwarded_as_an_rfc5424_message_over_udp(tmp_path: Path) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((HOST, 0))
    receiver.settimeout(10)
    settings = {"IMAG_AUDIT_SYSLOG": f"udp://{HOST}:{receiver.getsockname()[1]}"}
    try:
        with serving_in_process(tmp_path / "imag", settings=settings) as server:
            assert server.http.get(server.url + "/whoami", timeout=10).status_code == 200
            allowed, _ = receiver.recvfrom(65536)
            assert requests.get(server.url + "/changes", timeout=10).status_code == 401
            denied, _ = receiver.recvfrom(65536)
    finally:
        receiver.close()
    match, entry = parse(allowed)
    assert int(match["pri"]) == 10 * 8 + 6  # authpriv.info
    assert match["app"] == "imag" and match["msgid"] == "audit"
    assert 'actor="admin"' in match["sd"] and 'outcome="allowed"' in match["sd"]
    assert (entry["actor"], entry["action"], entry["outcome"]) == (
        "admin",
        "auth.whoami",
        "allowed",
    )
    match, entry = parse(denied)
    assert int(match["pri"]) == 10 * 8 + 4  # authpriv.warning
    assert (entry["action"], entry["outcome"], entry["status"]) == ("changes.read", "denied", 401)


def test_audit_entries_are_forwarded_over_tcp_with_octet_counting(tmp_path: Path) -> None:
    listener = socket.create_server((HOST, 0))
    received = bytearray()
    done = threading.Event()

    def accept() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        with conn:
            while not done.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    return
                if not chunk:
                    return
                received.extend(chunk)
                if received.count(b"<") >= 2:
                    return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    settings = {"IMAG_AUDIT_SYSLOG": f"tcp://{HOST}:{listener.getsockname()[1]}"}
    try:
        with serving_in_process(tmp_path / "imag", settings=settings) as server:
            for _ in range(2):
                server.http.get(server.url + "/whoami", timeout=10)
            thread.join(10)
    finally:
        done.set()
        listener.close()
    messages, rest = [], bytes(received)
    while rest:
        length, _, rest = rest.partition(b" ")
        messages.append(rest[: int(length)])
        rest = rest[int(length) :]
    assert len(messages) == 2
    assert all(parse(m)[1]["action"] == "auth.whoami" for m in messages)
