"""Messaging: the outbox transport, the message rows and their job, the
``/api/messages`` API with its permissions and refusals, and replacing the
transport by a plugin through configuration alone."""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Callable, Iterator
from email import message_from_bytes, policy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from archive import plugins
from archive.config import Config
from archive.hookspecs import hookimpl
from archive.jobs import JobQueue, Worker
from archive.messaging import (
    Attachment,
    InvalidMessage,
    Message,
    MessageTooLarge,
    Outgoing,
    get,
    send,
)
from archive.messaging.outbox import OutboxTransport
from archive.runtime import Archive
from archive.security.principals import Principals
from tests.inprocess import InProcessImag, serving_in_process

PDF = b"%PDF-1.7\n" + os.urandom(3000)
BINARY = bytes(range(256)) * 64


def _message(**changes: Any) -> Message:
    fields: dict[str, Any] = {
        "to": ["dr.martin@cabinet.mssante.fr", "secretariat@hopital-b.mssante.fr"],
        "subject": "Compte rendu échographie — Mme Durand",
        "text": "Bonjour,\nLe compte rendu est joint.\n",
        "html": "<p>Bonjour,</p><p>Le compte rendu est joint.</p>",
        "attachments": [
            Attachment("CR échographie.pdf", "application/pdf", PDF),
            Attachment("image.bin", "application/octet-stream", BINARY),
        ],
        "headers": {"X-MSS-MES": "FIN"},
        "purpose": "report",
    }
    fields.update(changes)
    return Message(**fields)


def _run_jobs(archive: Archive) -> None:
    worker = Worker(archive, "test", queue=JobQueue(archive.db), poll_interval=0.05)
    with worker:
        assert worker.wait_idle(timeout=60)


@pytest.fixture
def mail_archive(make_config: Callable[..., Config], index_url: str) -> Iterator[Archive]:
    with Archive(make_config(index_url=index_url)) as archive:
        yield archive


# -- the outbox ---------------------------------------------------------------------------------


def test_a_message_becomes_one_eml_file_in_the_outbox_parseable_with_attachments_intact(
    mail_archive: Archive,
) -> None:
    ref = send(mail_archive, _message(), by="dr.report")
    outbox = mail_archive.config.data_dir / "outbox"
    assert not outbox.exists() or not list(outbox.iterdir())  # queued, not yet sent
    _run_jobs(mail_archive)
    record = get(mail_archive.db, ref)
    assert record is not None and record.state == "sent" and record.transport == "outbox"
    [eml] = list(outbox.iterdir())  # no temporary file left behind
    assert eml.suffix == ".eml" and not eml.name.startswith(".")
    mail = message_from_bytes(eml.read_bytes(), policy=policy.default)
    assert mail["Message-ID"] == record.message_id
    assert mail["Subject"] == "Compte rendu échographie — Mme Durand"
    assert mail["From"] == "imag@localhost" and mail["X-MSS-MES"] == "FIN"
    assert [a.addr_spec for a in mail["To"].addresses] == record.recipients
    # the file keeps SMTP's CRLF line ends, as sent
    text = mail.get_body(("plain",)).get_content()
    assert text.replace("\r\n", "\n") == "Bonjour,\nLe compte rendu est joint.\n"
    assert "<p>Bonjour,</p>" in mail.get_body(("html",)).get_content()
    attachments = {a.get_filename(): a.get_content() for a in mail.iter_attachments()}
    assert attachments == {"CR échographie.pdf": PDF, "image.bin": BINARY}
    [queued] = mail_archive.audit.query(action="message.queue")
    assert queued.actor == "dr.report" and queued.detail["message"] == ref
    assert len(mail_archive.audit.query(action="message.sent")) == 1


def test_a_delivery_job_run_twice_sends_once(mail_archive: Archive) -> None:
    ref = send(mail_archive, _message(), by="dr.report")
    _run_jobs(mail_archive)
    record = get(mail_archive.db, ref)
    eml = next((mail_archive.config.data_dir / "outbox").iterdir())
    first = eml.stat().st_mtime_ns
    # at least once: the same job's payload handled again finds the message sent
    from archive.messaging.message import deliver

    deliver(mail_archive, {"message": ref})
    assert eml.stat().st_mtime_ns == first
    assert len(list(eml.parent.iterdir())) == 1
    assert get(mail_archive.db, ref).attempts == record.attempts == 1
    assert len(mail_archive.audit.query(action="message.sent")) == 1


def test_the_outbox_never_shows_a_partial_file(tmp_path: Path) -> None:
    """Readers polling the folder while large messages are written only ever
    see complete files under their final name."""
    transport = OutboxTransport(tmp_path / "outbox")
    data = b"Subject: big\r\n\r\n" + os.urandom(4 * 2**20)
    stop = threading.Event()
    seen: list[tuple[str, int]] = []

    def watch() -> None:
        while not stop.is_set():
            for entry in os.scandir(transport.folder) if transport.folder.exists() else []:
                if entry.name.endswith(".eml") and not entry.name.startswith("."):
                    seen.append((entry.name, Path(entry.path).stat().st_size))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(5):
            transport.send(Outgoing(f"<m{i}@test>", "a@b.fr", ("c@d.fr",), data))
    finally:
        stop.set()
        watcher.join()
    assert {size for _name, size in seen} <= {len(data)}
    assert sorted(p.name for p in transport.folder.iterdir()) == [
        f"m{i}_test.eml" for i in range(5)
    ]
    assert all(p.read_bytes() == data for p in transport.folder.iterdir())


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"to": []}, "at least one recipient"),
        ({"to": ["not-an-address"]}, "not an e-mail address"),
        ({"to": ["a@b.fr\r\nBcc: spy@evil.example"]}, "not an e-mail address"),
        ({"to": ["Dr X <x@b.fr>"]}, "not an e-mail address"),
        ({"subject": "hello\r\nBcc: spy@evil.example"}, "line breaks"),
        ({"headers": {"Bcc": "spy@evil.example"}}, "only X-"),
        ({"attachments": [Attachment("../../etc/passwd", "text/plain", b"x")]}, "without folders"),
        ({"attachments": [Attachment("a.pdf", "pdf", b"x")]}, "type/subtype"),
    ],
)
def test_a_malformed_message_is_refused_and_nothing_is_queued(
    mail_archive: Archive, changes: dict, error: str
) -> None:
    with pytest.raises(InvalidMessage, match=error):
        send(mail_archive, _message(**changes), by="dr.report")
    assert mail_archive.db.scalar("SELECT COUNT(*) FROM messages") == 0
    assert mail_archive.db.scalar("SELECT COUNT(*) FROM jobs") == 0


def test_an_oversized_message_is_refused_before_anything_is_stored(
    make_config: Callable[..., Config], index_url: str
) -> None:
    config = make_config(index_url=index_url, settings={"messaging.max_message_bytes": "64KiB"})
    with Archive(config) as archive:
        big = _message(
            attachments=[Attachment("big.bin", "application/octet-stream", b"x" * 70000)]
        )
        with pytest.raises(MessageTooLarge, match="messaging.max_message_bytes"):
            send(archive, big, by="dr.report")
        assert archive.db.scalar("SELECT COUNT(*) FROM messages") == 0


def test_a_message_sent_inside_the_callers_transaction_rolls_back_with_it(
    mail_archive: Archive,
) -> None:
    with pytest.raises(RuntimeError), mail_archive.db.transaction():
        send(mail_archive, _message(), by="worklist")
        raise RuntimeError("the report could not be stored")
    assert mail_archive.db.scalar("SELECT COUNT(*) FROM messages") == 0
    assert mail_archive.db.scalar("SELECT COUNT(*) FROM jobs") == 0
    assert mail_archive.audit.query(action="message.queue") == []


# -- a replacement transport, through configuration only ---------------------------------------


class Recorder:
    """A test transport plugin: keeps what it is given, can be told to fail."""

    def __init__(self) -> None:
        self.sent: list[Outgoing] = []
        self.fail_with: Exception | None = None

    @property
    def name(self) -> str:
        return "recorder"

    def send(self, outgoing: Outgoing) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.append(outgoing)


@pytest.fixture
def recorder_plugin() -> Iterator[Recorder]:
    recorder = Recorder()

    @hookimpl
    def imag_messaging_provider(name: str) -> Any:
        return recorder if name == "recorder" else None

    plugin = SimpleNamespace(imag_messaging_provider=imag_messaging_provider)
    plugins.plugin_manager().register(plugin, name="test-recorder")
    try:
        yield recorder
    finally:
        plugins.plugin_manager().unregister(plugin)


def test_a_plugin_replaces_the_default_transport_through_configuration_alone(
    make_config: Callable[..., Config], index_url: str, recorder_plugin: Recorder
) -> None:
    config = make_config(
        index_url=index_url,
        settings={"plugins.messaging": "recorder", "messaging.max_attempts": 2},
    )
    with Archive(config) as archive:
        assert archive.messaging is recorder_plugin
        ref = send(archive, _message(), by="dr.report")
        _run_jobs(archive)
        [outgoing] = recorder_plugin.sent
        assert outgoing.recipients == tuple(_message().to)
        assert outgoing.message_id == get(archive.db, ref).message_id
        assert get(archive.db, ref).transport == "recorder"
        assert not (config.data_dir / "outbox").exists()
        # a transport's unexpected error counts as temporary: retried, then failed
        recorder_plugin.fail_with = RuntimeError("directory unreachable")
        failing = send(archive, _message(), by="dr.report")
        # no back-off: the retry is due at once, so an idle worker has finished both
        queue = JobQueue(archive.db, backoff_base=0)
        worker = Worker(archive, "t", queue=queue, poll_interval=0.05)
        with worker:
            for _ in range(50):
                if get(archive.db, failing).state == "failed":
                    break
                assert worker.wait_idle(timeout=30)
        record = get(archive.db, failing)
        assert record.state == "failed" and record.attempts == 2
        assert "directory unreachable" in record.last_error


def test_an_unknown_transport_name_is_an_error_naming_the_setting(
    make_config: Callable[..., Config], index_url: str
) -> None:
    config = make_config(index_url=index_url, settings={"plugins.messaging": "pigeon"})
    with Archive(config) as archive, pytest.raises(ValueError, match="plugins.messaging"):
        _ = archive.messaging


# -- the HTTP API -------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path, index_url: str) -> Iterator[tuple[InProcessImag, dict[str, str]]]:
    settings = {"IMAG_MESSAGING_MAX_MESSAGE_BYTES": str(256 * 1024)}
    with serving_in_process(tmp_path / "imag", index_url=index_url, settings=settings) as server:
        assert server.archive is not None
        principals = Principals(server.archive.db)
        tokens = {"admin": server.token}
        for name, role, sites in (
            ("rad-a", "radiologist", ["A"]),
            ("rad-b", "radiologist", ["B"]),
            ("tech-a", "technician", ["A"]),
            ("multi", "site_admin", ["A", "B"]),
        ):
            principals.add(name, role, sites=sites)
            tokens[name] = principals.create_token(name)[1]
        yield server, tokens


def _call(
    server: InProcessImag, token: str, method: str, path: str, **kwargs: Any
) -> requests.Response:
    return requests.request(
        method,
        server.url + path,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        **kwargs,
    )


def _body(**changes: Any) -> dict:
    body = {
        "to": ["dr.martin@cabinet.mssante.fr"],
        "subject": "Compte rendu",
        "text": "Bonjour",
        "purpose": "report",
        "attachments": [
            {
                "filename": "CR.pdf",
                "content_type": "application/pdf",
                "data": base64.b64encode(PDF).decode(),
            }
        ],
    }
    body.update(changes)
    return body


def _counts(server: InProcessImag) -> tuple[int, int]:
    db = server.archive.db
    return db.scalar("SELECT COUNT(*) FROM messages"), db.scalar(
        "SELECT COUNT(*) FROM jobs WHERE kind = 'message.deliver'"
    )


def test_the_api_sends_lists_shows_and_retries_within_the_callers_site(api) -> None:
    server, tokens = api
    xdm_spec = {"patient": {"ins": "279035121518989", "local_id": "IPP1", "local_issuer": "A"}}
    answer = _call(server, tokens["rad-a"], "POST", "/api/messages", json=_body(xdm=xdm_spec))
    assert answer.status_code == 202, answer.text
    ref = answer.json()["id"]
    assert answer.json()["state"] == "queued"
    detail = _call(server, tokens["rad-a"], "GET", f"/api/messages/{ref}").json()
    assert detail["site"] == "A" and detail["created_by"] == "rad-a"
    assert [a["filename"] for a in detail["attachments"]] == ["IHE_XDM.ZIP", "CR.pdf"]
    assert "body" not in detail and "data" not in json.dumps(detail["attachments"])
    # another site's radiologist neither lists nor opens it (404, audited denied)
    assert _call(server, tokens["rad-b"], "GET", "/api/messages").json()["total"] == 0
    hidden = _call(server, tokens["rad-b"], "GET", f"/api/messages/{ref}")
    assert hidden.status_code == 404
    [denied] = server.archive.audit.query(actor="rad-b", action="message.show")
    assert denied.outcome == "denied" and denied.status == 404
    assert _call(server, tokens["rad-b"], "POST", f"/api/messages/{ref}/retry").status_code == 404
    # a role without messaging permissions: 403
    for method, path in (("GET", "/api/messages"), ("POST", "/api/messages")):
        refused = _call(server, tokens["tech-a"], method, path, json=_body())
        assert refused.status_code == 403
        assert refused.headers["Content-Type"].startswith("application/problem+json")
    # listing with a state filter and paging
    second = _call(server, tokens["rad-a"], "POST", "/api/messages", json=_body()).json()["id"]
    page = _call(server, tokens["rad-a"], "GET", "/api/messages?state=queued&limit=1").json()
    assert page["total"] == 2 and [m["id"] for m in page["messages"]] == [second]
    page2 = _call(server, tokens["rad-a"], "GET", "/api/messages?limit=1&offset=1").json()
    assert [m["id"] for m in page2["messages"]] == [ref]
    everyone = _call(server, tokens["admin"], "GET", "/api/messages").json()
    assert everyone["total"] == 2
    # a sent message is not retried; a failed one is, by its site
    _run_jobs(server.archive)
    assert _call(server, tokens["rad-a"], "GET", "/api/messages?state=sent").json()["total"] == 2
    conflict = _call(server, tokens["rad-a"], "POST", f"/api/messages/{ref}/retry")
    assert conflict.status_code == 409 and "only failed" in conflict.json()["detail"]
    server.archive.db.execute("UPDATE messages SET state = 'failed' WHERE id = ?", (ref,))
    again = _call(server, tokens["rad-a"], "POST", f"/api/messages/{ref}/retry")
    assert again.status_code == 202 and again.json()["state"] == "queued"
    assert again.json()["job_state"] == "pending"
    [retried] = server.archive.audit.query(action="message.requeue")
    assert retried.actor == "rad-a" and retried.detail["message"] == ref


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (_body(to=[]), 400, "at least one recipient"),
        (_body(to=["dr.martin"]), 400, "not an e-mail address"),
        (_body(to="dr.martin@cabinet.mssante.fr"), 400, "list of text"),
        (
            _body(
                attachments=[
                    {"filename": "a.pdf", "content_type": "application/pdf", "data": "***"}
                ]
            ),
            400,
            "not base64",
        ),
        (_body(xdm={"patient": {}}), 400, "INS or a local identifier"),
        (_body(xdm={"patient": {"ins": "279035121518989", "evil": "x"}}), 400, "unknown: evil"),
        (
            _body(
                attachments=[
                    {
                        "filename": "big.bin",
                        "content_type": "application/octet-stream",
                        "data": base64.b64encode(b"x" * 300_000).decode(),
                    }
                ]
            ),
            413,
            "max_message_bytes",
        ),
        (
            _body(
                attachments=[
                    {
                        "filename": "huge.bin",
                        "content_type": "application/octet-stream",
                        "data": base64.b64encode(b"x" * 600_000).decode(),
                    }
                ]
            ),
            413,
            "max_message_bytes",
        ),
    ],
)
def test_malformed_or_oversized_input_is_a_problem_and_nothing_is_queued(
    api, body: dict, status: int, detail: str
) -> None:
    server, tokens = api
    answer = _call(server, tokens["rad-a"], "POST", "/api/messages", json=body)
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert detail in answer.json()["detail"]
    assert _counts(server) == (0, 0)
    [entry] = server.archive.audit.query(action="message.send")
    assert entry.status == status and entry.outcome == "failed"


def test_a_sender_of_several_sites_names_one_of_them(api) -> None:
    server, tokens = api
    unnamed = _call(server, tokens["multi"], "POST", "/api/messages", json=_body())
    assert unnamed.status_code == 400 and "site" in unnamed.json()["detail"]
    foreign = _call(server, tokens["multi"], "POST", "/api/messages", json=_body(site="C"))
    assert foreign.status_code == 403
    assert _counts(server) == (0, 0)
    named = _call(server, tokens["multi"], "POST", "/api/messages", json=_body(site="B"))
    assert named.status_code == 202
    ref = named.json()["id"]
    assert _call(server, tokens["rad-b"], "GET", f"/api/messages/{ref}").json()["site"] == "B"
    assert _call(server, tokens["rad-a"], "GET", f"/api/messages/{ref}").status_code == 404


# -- imag messages ------------------------------------------------------------------------------


def test_an_operator_sends_an_xdm_package_lists_shows_and_retries_from_the_command_line(
    tmp_path: Path,
    index_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from archive.cli import main

    for key in [k for k in os.environ if k.startswith("IMAG_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("IMAG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IMAG_INDEX_URL", index_url)
    monkeypatch.setenv("IMAG_LOG_LEVEL", "WARNING")
    report = tmp_path / "cr.pdf"
    report.write_bytes(PDF)

    def imag(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = imag(
        "messages", "send", "--to", "dr.martin@cabinet.mssante.fr", "--subject", "CR",
        "--text", "Bonjour", "--attach", str(report), "--xdm", "--ins", "279035121518989",
    )  # fmt: skip
    assert code == 0, err
    ref = int(out.strip())
    code, out, _ = imag("messages", "show", str(ref))
    shown = json.loads(out)
    assert shown["state"] == "queued" and shown["created_by"].startswith("cli:")
    assert [a["filename"] for a in shown["attachments"]] == ["IHE_XDM.ZIP", "cr.pdf"]
    assert imag("messages", "list", "--state", "queued")[1].startswith(f"{ref}\tqueued\t")
    code, _, err = imag("messages", "retry", str(ref))
    assert code == 1 and "only failed messages" in err
    code, _, err = imag("messages", "send", "--to", "nobody", "--subject", "x", "--text", "y")
    assert code == 2 and "not an e-mail address" in err
    code, _, err = imag("messages", "show", "999")
    assert code == 1 and "no message 999" in err
