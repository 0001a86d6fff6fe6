"""Several nodes on one index: who is who, who is ready, who owns a port.

* Nodes started at the same moment on a fresh PostgreSQL index all come up and
  make exactly one admin account, whose token file is on the node that created it.
* A second ``imag serve`` on a port another process holds refuses to start,
  naming the setting to change, instead of silently sharing the DICOM port.
* ``/health/live`` says the process answers; ``/health/ready`` (and ``/health``)
  says whether this node can reach its index and store, naming what fails.
* The node's name is in its audit rows, its log lines and its job worker names.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import psycopg
import pytest
import requests
from pydicom import dcmread

from archive.config import load_config
from archive.index import open_database
from tests.dicomfiles import make_instance
from tests.httpserver import HttpImag
from tests.inprocess import serving_in_process
from tests.processes import HOST, eventually, free_port

ROUNDS = 10
NODES = 3


@pytest.mark.postgres
@pytest.mark.slow
def test_three_nodes_started_at_once_on_a_fresh_index_make_one_admin(
    tmp_path: Path, pg_admin_url: str
) -> None:
    from tests.pgserver import fresh_database

    for round_ in range(ROUNDS):
        with fresh_database(pg_admin_url, "imag_nodes") as url:
            shared = {"IMAG_STORAGE_URL": (tmp_path / f"objects-{round_}").as_uri()}
            nodes = [
                HttpImag(tmp_path / f"r{round_}-n{i}", index_url=url, settings=shared)
                for i in range(NODES)
            ]
            try:
                with ThreadPoolExecutor(NODES) as pool:
                    list(pool.map(lambda node: node.start(timeout=120), nodes))
                written = [n for n in nodes if n.token_file.exists()]
                assert len(written) == 1, f"round {round_}: token files on {len(written)} nodes"
                token = written[0].token
                for node in nodes:  # the one admin token works on every node
                    answer = requests.get(
                        node.url + "/whoami",
                        headers={"Authorization": f"Bearer {token}"},
                        timeout=30,
                    )
                    assert answer.status_code == 200, answer.text
                with psycopg.connect(url) as db:
                    assert db.execute("SELECT name, role FROM principals").fetchall() == [
                        ("admin", "admin")
                    ]
                    (names,) = zip(*db.execute("SELECT name FROM tokens").fetchall(), strict=True)
                creator = f"{socket.gethostname()}:{written[0].http_port}"
                assert names == (f"first-start on {creator}",)
                for node in nodes:  # a node that lost the race says who won
                    if node is not written[0] and "at the same moment" in node.log():
                        assert f"node {creator} created the admin account" in node.log()
            finally:
                for node in nodes:
                    if node.proc is not None and node.proc.poll() is None:
                        assert node.stop() == 0, node.log()


def _serve(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "archive.cli", "serve"],
        env=env,
        stdout=open(log, "wb"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
    )


def test_a_second_serve_on_a_dicom_port_in_use_refuses_to_start(tmp_path: Path) -> None:
    first = HttpImag(tmp_path / "first", dicom=True).start()
    try:
        second = HttpImag(tmp_path / "second", dicom=True, dicom_port=first.dicom_port)
        second.workdir.mkdir(parents=True)
        proc = _serve(second.env, second.log_path)
        assert proc.wait(timeout=60) == 1
        assert f"port {first.dicom_port}" in second.log()
        assert "dicom.port" in second.log() and "IMAG_DICOM_PORT" in second.log()
        # the first node still has the port to itself and answers
        assert requests.get(first.url + "/health/ready", timeout=10).json()["dicom"] == "ok"
    finally:
        assert first.stop() == 0


def test_a_second_serve_on_an_http_port_in_use_refuses_to_start(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        node = HttpImag(tmp_path / "node", http_port=holder.getsockname()[1])
        node.workdir.mkdir(parents=True)
        proc = _serve(node.env, node.log_path)
        assert proc.wait(timeout=60) == 1
    assert "is already in use" in node.log() and "IMAG_HTTP_PORT" in node.log()
    assert "Traceback" not in node.log()


def test_this_nodes_dicom_listener_processes_still_share_its_port(tmp_path: Path) -> None:
    node = HttpImag(tmp_path / "node", dicom=True, settings={"IMAG_DICOM_PROCESSES": "2"})
    node.start()
    try:
        assert requests.get(node.url + "/health/ready", timeout=10).status_code == 200
        assert "already in use" not in node.log()
    finally:
        assert node.stop() == 0


#: /proc/net/tcp's connection states
LISTEN, ESTABLISHED = "0A", "01"


def _socket_inodes(port: int, state: str) -> list[str]:
    """The inodes of this machine's IPv4 sockets with local ``port`` in
    ``state`` (the server's side of a connection: the client's has another
    local port)."""
    rows = (r.split() for r in Path("/proc/net/tcp").read_text().splitlines()[1:])
    # local address "0100007F:2B67", state "0A", inode in the tenth column
    return [r[9] for r in rows if r[3] == state and int(r[1].split(":")[1], 16) == port]


def _sockets_on(port: int, state: str) -> int:
    """How many of this machine's IPv4 sockets have local ``port`` in ``state``."""
    return len(_socket_inodes(port, state))


def test_every_dicom_listener_process_accepts_from_the_one_socket_before_imag_serve_answers(
    tmp_path: Path,
) -> None:
    """An association stays with the process that accepted it for the whole
    push: those a modality opened while a child listener was still starting
    all stayed in the parent, which then did all the work alone.  The
    processes accept from the parent's one listening socket."""
    node = HttpImag(tmp_path / "node", dicom=True, settings={"IMAG_DICOM_PROCESSES": "3"})
    node.start()
    assert node.proc is not None
    try:
        [listening] = _socket_inodes(node.dicom_port, LISTEN)
        children = _listener_children(node.proc.pid)
        assert len(children) == 2
        assert all(_holds(pid, listening) for pid in {node.proc.pid} | children)
        assert "DICOM listener processes started" in node.log()
    finally:
        assert node.stop() == 0
    assert _sockets_on(node.dicom_port, LISTEN) == 0


def test_associations_opened_one_after_another_are_spread_evenly_over_the_processes(
    tmp_path: Path,
) -> None:
    """Four modalities pushing at once to a node of two listener processes
    get two associations in each: a process holding more connections than
    another leaves a new one to it.  With SO_REUSEPORT the kernel placed
    them by a hash of their ports: 2+2 only 6 times in 16, one process
    then ingesting three or four pushes on its one core while the other idled."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    node = HttpImag(tmp_path / "node", dicom=True, settings={"IMAG_DICOM_PROCESSES": "2"})
    node.start()
    assert node.proc is not None
    ae = AE("MODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)  # a storage association: the lean path
    held = []
    try:
        [child] = _listener_children(node.proc.pid)
        for _ in range(4):
            held.append(ae.associate(HOST, node.dicom_port, ae_title=node.aet))
            assert held[-1].is_established
        assert _connections_of(node.proc.pid, node.dicom_port) == 2
        assert _connections_of(child, node.dicom_port) == 2
        for assoc in held[:2]:  # whoever they were with: the next two fill the gap
            assoc.release()
        eventually(lambda: _sockets_on(node.dicom_port, ESTABLISHED) == 2, timeout=10)
        for _ in range(2):
            held.append(ae.associate(HOST, node.dicom_port, ae_title=node.aet))
            assert held[-1].is_established
        assert _connections_of(node.proc.pid, node.dicom_port) == 2
        assert _connections_of(child, node.dicom_port) == 2
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        assert node.stop() == 0


def test_a_connection_left_to_a_stuck_process_is_taken_by_another_after_a_short_wait(
    tmp_path: Path,
) -> None:
    """Adversary: a sibling that stopped accepting while it looks quieter
    (stuck in a codec, stopped by a debugger) -- here, a child stopped
    (SIGSTOP) before any association.  A new connection waits at most
    ``ListenerServer.HOLD`` for it, then the parent takes it, saying so in
    its log: delayed, never refused."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from archive.dimse.server import ListenerServer

    node = HttpImag(tmp_path / "node", dicom=True, settings={"IMAG_DICOM_PROCESSES": "2"})
    node.start()
    assert node.proc is not None
    ae = AE("MODALITY")
    ae.add_requested_context(Verification)
    held = []
    [child] = _listener_children(node.proc.pid)
    os.kill(child, signal.SIGSTOP)
    try:
        for _ in range(3):
            held.append(ae.associate(HOST, node.dicom_port, ae_title=node.aet))
            assert held[-1].is_established
            assert held[-1].send_c_echo().Status == 0
        assert _connections_of(node.proc.pid, node.dicom_port) == 3
        assert "left to a quieter listener process" in node.log()
        assert ListenerServer.HOLD <= 1.0
    finally:
        os.kill(child, signal.SIGCONT)
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        assert node.stop() == 0


def test_a_process_not_accepting_is_never_left_a_connection() -> None:
    """A child still starting, or one that exited and waits to be started
    again, holds no connection: were it counted as the quietest, the
    others would leave every new connection to it, each waiting
    ``ListenerServer.HOLD`` in vain."""
    from archive.dimse.nodeslots import NodeAssociations

    node = NodeAssociations(3)
    parent, first, second = (node.for_process(i) for i in range(3))
    parent.publish(1)
    assert not parent.quieter_elsewhere()  # both children still starting
    first.publish_pending(0)  # listening
    assert parent.quieter_elsewhere()
    assert not first.quieter_elsewhere()
    first.publish_pending(1)  # a connection waiting for its A-ASSOCIATE-RQ counts
    assert not parent.quieter_elsewhere()
    assert first.quieter_elsewhere() is False  # 1 against the parent's 1
    first.publish_pending(0)
    first.absent()  # exited
    assert not parent.quieter_elsewhere()


def test_a_listener_process_that_cannot_listen_stops_the_start_naming_it(tmp_path: Path) -> None:
    """A child listener that fails (here: its TLS certificate cannot be
    loaded) is reported by name with its exit code, instead of ``imag
    serve`` running on with fewer processes than configured (or waiting
    for ever)."""
    from archive.dimse.nodeslots import NodeAssociations
    from archive.dimse.processes import ListenerFailed, Listeners
    from archive.runtime import Archive

    env = {
        "IMAG_DATA_DIR": str(tmp_path / "data"),
        "IMAG_DICOM_TLS_CERT": str(tmp_path / "missing.pem"),
        "IMAG_DICOM_TLS_KEY": str(tmp_path / "missing.key"),
    }
    config = load_config(env=env)
    Archive(config).close()  # the index the child opens, migrated
    with (
        socket.create_server((HOST, 0)) as sock,
        pytest.raises(ListenerFailed, match=r"imag-dicom-1 exited with code 1"),
    ):
        Listeners(config, sock, 1, NodeAssociations(2)).start()


def test_the_association_limit_bounds_the_node_whatever_process_takes_an_association(
    tmp_path: Path,
) -> None:
    """``dicom.max_associations`` is the node's: with two listener processes
    and a limit of 2, six modalities associating at once get two
    associations between them, on the lean path (storage, echo) and on
    pynetdicom's (C-GET) alike, wherever the kernel sends each connection;
    counted per process, up to four got in (and, with N processes, N times
    the limit).  A slot an association releases is free again."""
    from pynetdicom import AE
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelGet, Verification

    node = HttpImag(
        tmp_path / "node",
        dicom=True,
        settings={"IMAG_DICOM_PROCESSES": "2", "IMAG_DICOM_MAX_ASSOCIATIONS": "2"},
    )
    node.start()
    held = []
    try:
        lean, pyn = AE("MODALITY_L"), AE("MODALITY_P")
        lean.add_requested_context(Verification)
        pyn.add_requested_context(PatientRootQueryRetrieveInformationModelGet)
        for ae in (lean, pyn, lean, pyn, lean, pyn):
            held.append(ae.associate(HOST, node.dicom_port, ae_title=node.aet))
        accepted = [a for a in held if a.is_established]
        assert len(accepted) == 2
        assert all(a.is_rejected for a in held if not a.is_established)
        assert "DICOM listener processes started" in node.log()
        for assoc in accepted:
            assoc.release()
        eventually(lambda: _sockets_on(node.dicom_port, ESTABLISHED) == 0, timeout=10)
        again = [lean.associate(HOST, node.dicom_port, ae_title=node.aet) for _ in range(2)]
        held += again
        assert all(a.is_established for a in again)
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        assert node.stop() == 0


def _listener_children(pid: int) -> set[int]:
    """The DICOM listener processes ``imag serve`` (``pid``) has spawned now
    (its other child, multiprocessing's resource tracker, left out)."""
    found = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"spawn_main" in cmdline:
                found.add(int(child))
    return found


def _connections_of(pid: int, port: int) -> int:
    """How many established connections to local ``port`` process ``pid`` holds."""
    inodes = set(_socket_inodes(port, ESTABLISHED))
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            held += 1
    return held


def _holds(pid: int, inode: str) -> bool:
    """Whether process ``pid`` has the socket ``inode`` open."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == f"socket:[{inode}]":
                return True
        except FileNotFoundError:
            continue
    return False


def _samples(page: str) -> dict[str, float]:
    """A Prometheus text page's samples, ``name{labels}`` -> value."""
    return {
        line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
        for line in page.splitlines()
        if line and not line.startswith("#")
    }


def test_a_listener_process_killed_mid_association_is_started_again_and_frees_its_slots(
    tmp_path: Path,
) -> None:
    """A child listener killed (the OOM killer, a crash in a codec) while it
    holds an association is started again, and the association it held no
    longer counts against ``dicom.max_associations``: before, the node ran
    on with one process fewer for good, and the dead child's associations
    kept their slots for ever (with a limit of 2, one association left)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = HttpImag(
        tmp_path / "node",
        dicom=True,
        settings={"IMAG_DICOM_PROCESSES": "2", "IMAG_DICOM_MAX_ASSOCIATIONS": "2"},
    )
    node.start()
    assert node.proc is not None
    ae = AE("MODALITY")
    ae.add_requested_context(Verification)
    opened = []
    try:
        [child] = _listener_children(node.proc.pid)
        for _ in range(60):  # either process may take it: until the child has one
            assoc = ae.associate(HOST, node.dicom_port, ae_title=node.aet)
            opened.append(assoc)
            assert assoc.is_established
            if _connections_of(child, node.dicom_port) == 1:
                break
            assoc.release()
            eventually(lambda: _sockets_on(node.dicom_port, ESTABLISHED) == 0, timeout=10)
        assert _connections_of(child, node.dicom_port) == 1, "no association reached the child"

        os.kill(child, signal.SIGKILL)
        [listening] = _socket_inodes(node.dicom_port, LISTEN)
        eventually(
            lambda: "DICOM listener process started again" in node.log(),
            timeout=60,
            what="a new listener process listening",
        )
        [new] = _listener_children(node.proc.pid) - {child}
        assert _holds(new, listening)
        eventually(lambda: _sockets_on(node.dicom_port, ESTABLISHED) == 0, timeout=10)
        again = [ae.associate(HOST, node.dicom_port, ae_title=node.aet) for _ in range(2)]
        opened += again
        assert [a.is_established for a in again] == [True, True]
        assert "DICOM listener process exited; starting it again" in node.log()
        ready = requests.get(node.url + "/health/ready", timeout=10)
        assert ready.status_code == 200
        assert ready.json()["dicom_processes"] == "2 of 2 accepting"
        for assoc in again:
            assoc.release()
        eventually(lambda: _sockets_on(node.dicom_port, ESTABLISHED) == 0, timeout=10)
        scrape = {"Authorization": f"Bearer {node.token}"}
        requests.get(node.url + "/metrics", headers=scrape, timeout=10)
        metrics = _samples(requests.get(node.url + "/metrics", headers=scrape, timeout=10).text)
        assert metrics["imag_dicom_listener_restarts_total"] == 1
        # the parent's own metrics are on the page too, added to its children's
        assert metrics['imag_dicom_associations_total{outcome="accepted"}'] == len(opened)
        assert metrics['imag_http_requests_total{method="GET",status="200"}'] >= 1
        assert metrics["imag_dicom_associations_active"] == 0
    finally:
        for assoc in opened:
            if assoc.is_established:
                assoc.release()
        assert node.stop() == 0
    assert _sockets_on(node.dicom_port, LISTEN) == 0


def test_a_process_killed_while_it_held_the_admission_lock_does_not_stop_admissions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The processes' shared lock is a semaphore nobody gives back when its
    holder is killed: the others then decide alone, after a short wait,
    rather than refuse every association from then on (or hang)."""
    from archive.dimse import nodeslots

    monkeypatch.setattr(nodeslots, "LOCK_WAIT", 0.05)
    node = nodeslots.NodeAssociations(2)
    parent, child = node.for_process(0), node.for_process(1)
    assert child._lock.acquire()  # the child's admission, cut off by SIGKILL
    child.publish(1)
    assert parent.admit(lambda: 0, limit=2)
    assert not parent.admit(lambda: 1, limit=2)  # the node's count still holds
    assert parent.others() == 1


def test_the_metrics_of_a_node_with_listener_processes_add_up_as_each_metric_says(
    tmp_path: Path,
) -> None:
    """With listener processes, /metrics reads the children's values from
    the folder they share and adds the parent's own: a counter and a
    ``livesum`` gauge (like associations in progress) add up, while a
    ``max`` gauge (like the node's info line, 1 in every process) stays 1,
    not the number of processes.  (Metrics of this test's own, so that what
    other tests counted in this process does not matter.)"""
    from prometheus_client import REGISTRY, Counter, Gauge

    from archive.metrics import node_metrics

    folder = tmp_path / "metrics"
    folder.mkdir()
    declare = (
        "from prometheus_client import Counter, Gauge\n"
        "done = Counter('imag_test_merge_done', 'test', ['outcome'])\n"
        "busy = Gauge('imag_test_merge_busy', 'test', multiprocess_mode='livesum')\n"
        "info = Gauge('imag_test_merge_info', 'test', ['node'], multiprocess_mode='max')\n"
    )
    child = declare + "done.labels('ok').inc(3)\nbusy.inc(2)\ninfo.labels('node-a').set(1)\n"
    subprocess.run(
        [sys.executable, "-c", child],
        env=os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(folder)},
        check=True,
        timeout=120,
    )
    done = Counter("imag_test_merge_done", "test", ["outcome"])
    busy = Gauge("imag_test_merge_busy", "test", multiprocess_mode="livesum")
    info = Gauge("imag_test_merge_info", "test", ["node"], multiprocess_mode="max")
    try:
        done.labels("ok").inc(5)  # this (parent) process's own, in memory
        busy.inc(1)
        info.labels("node-a").set(1)
        page = _samples(node_metrics(str(folder)).decode())
    finally:
        for metric in (done, busy, info):
            REGISTRY.unregister(metric)
    assert page['imag_test_merge_done_total{outcome="ok"}'] == 8
    assert page["imag_test_merge_busy"] == 3
    assert page['imag_test_merge_info{node="node-a"}'] == 1
    assert not any(name.endswith("_created") for name in page)


def test_a_listener_process_that_keeps_exiting_is_restarted_ever_more_slowly() -> None:
    """One exit costs nothing; a child that cannot run is not restarted in a
    tight loop (each attempt a Python start-up and an index connection)."""
    from archive.dimse.processes import MAX_RESTART_DELAY, restart_delay

    assert [restart_delay(n) for n in range(1, 6)] == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert restart_delay(40) == MAX_RESTART_DELAY


def test_ready_counts_the_listener_processes_accepting_and_names_one_starting_again() -> None:
    """``/health/ready``'s ``dicom_processes`` line, from what the processes
    publish: a child that exited and waits to start again is named, the node
    stays ready (the others take its connections)."""
    from types import SimpleNamespace

    from archive.dimse.nodeslots import NodeAssociations
    from archive.dimse.processes import Listeners

    node = NodeAssociations(3)
    listeners = Listeners(None, None, 2, node)  # type: ignore[arg-type] - never started
    listeners.procs = [SimpleNamespace(name=f"imag-dicom-{i}") for i in (1, 2)]  # type: ignore[misc]
    for i in (1, 2):
        node.for_process(i).publish_pending(0)  # each child listening
    assert listeners.accepting() == "3 of 3 accepting"
    node.for_process(2).absent()  # exited
    assert listeners.accepting() == "2 of 3 accepting (imag-dicom-2 starting again)"
    node.for_process(2).publish_pending(0)  # back
    assert listeners.accepting() == "3 of 3 accepting"


def test_ready_names_a_store_it_cannot_reach_while_live_still_answers(tmp_path: Path) -> None:
    dead_endpoint = f"http://{HOST}:{free_port()}"  # nothing listens there
    settings = {
        "IMAG_STORAGE_URL": "s3://unreachable-bucket/imag",
        "IMAG_S3_ENDPOINT_URL": dead_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }
    with serving_in_process(tmp_path / "imag", settings=settings) as server:
        live = requests.get(server.url + "/health/live", timeout=30)
        assert live.status_code == 200 and live.json()["status"] == "ok"
        for path in ("/health/ready", "/health"):
            ready = requests.get(server.url + path, timeout=30)
            assert ready.status_code == 503
            body = ready.json()
            assert body["status"] == "error" and body["index"] == "ok"
            assert body["storage"] != "ok"
            assert body["node"] == server.config.node


def test_ready_says_ok_for_index_and_store(tmp_path: Path) -> None:
    with serving_in_process(tmp_path / "imag") as server:
        body = requests.get(server.url + "/health/ready", timeout=30).json()
        assert body["status"] == "ok" and body["index"] == "ok" and body["storage"] == "ok"
        assert "dicom_processes" not in body  # one process: the dicom line says it all


def test_the_node_name_is_in_audit_rows_logs_and_job_worker_names(tmp_path: Path) -> None:
    node = HttpImag(
        tmp_path / "node",
        settings={
            "IMAG_NODE_NAME": "node-7",
            "IMAG_LOG_FORMAT": "json",
            "IMAG_JOBS_WORKERS": "1",
            "IMAG_STABLE_AFTER_SECONDS": "1",
        },
    ).start()
    try:
        node.client().store_instances([dcmread(BytesIO(make_instance()))])
        config = load_config(env=node.env)
        db = open_database(config.index_url)
        try:
            eventually(
                lambda: db.scalar("SELECT COUNT(*) FROM jobs WHERE state = 'done'"),
                timeout=60,
                what="a job run by the node's worker",
            )
            workers = {r[0] for r in db.query("SELECT worker FROM jobs WHERE state = 'done'")}
            nodes = {r[0] for r in db.query("SELECT node FROM audit")}
        finally:
            db.close()
        assert workers and all(w.startswith("node-7/serve-") for w in workers), workers
        assert nodes == {"node-7"}
        lines = [json.loads(x) for x in node.log().splitlines() if x.startswith("{")]
        assert lines and all(line.get("node") == "node-7" for line in lines)
    finally:
        assert node.stop() == 0


def _scrape(url: str, headers: dict[str, str] | None = None) -> dict[str, list]:
    """The samples of a /metrics page: name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url, headers=headers or {}, timeout=30).text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(
        value
        for found, value in samples.get(name, [])
        if all(found.get(k) == v for k, v in labels.items())
    )


@pytest.mark.postgres
@pytest.mark.slow
def test_metrics_summed_over_the_nodes_give_the_true_totals(
    tmp_path: Path, pg_admin_url: str
) -> None:
    from tests.pgserver import fresh_database

    stored = 12
    with fresh_database(pg_admin_url, "imag_metrics") as url:
        shared = {
            "IMAG_STORAGE_URL": (tmp_path / "objects").as_uri(),
            "IMAG_STABLE_AFTER_SECONDS": "1",
        }
        one = HttpImag(tmp_path / "one", index_url=url, settings=shared).start()
        two = HttpImag(tmp_path / "two", index_url=url, settings=shared)
        worker = None
        try:
            two.start()
            auth = {"Authorization": f"Bearer {one.token}"}
            metrics_port = free_port()
            worker = subprocess.Popen(
                [sys.executable, "-m", "archive.cli", "worker"]
                + ["--metrics-port", str(metrics_port)],
                env=one.env,
                stdout=open(tmp_path / "worker.log", "wb"),  # noqa: SIM115 - closed with it
                stderr=subprocess.STDOUT,
            )
            for i in range(stored):  # one study each, half through each node
                node = (one, two)[i % 2]
                node.client(one.token).store_instances([dcmread(BytesIO(make_instance()))])
            db = open_database(url)
            try:
                eventually(
                    lambda: (
                        db.scalar("SELECT COUNT(*) FROM jobs WHERE state = 'done'") >= stored
                        and not db.scalar("SELECT COUNT(*) FROM jobs WHERE state <> 'done'")
                    ),
                    timeout=120,
                    what="every stability job done",
                )
                done_jobs = db.scalar("SELECT COUNT(*) FROM jobs WHERE state = 'done'")
            finally:
                db.close()
            worker_url = f"http://{HOST}:{metrics_port}/metrics"
            eventually(lambda: _answers(worker_url), timeout=60, what="the worker's /metrics")
            pages = [
                _scrape(one.url + "/metrics", auth),
                _scrape(two.url + "/metrics", auth),
                _scrape(worker_url),
            ]
            ingested = sum(
                _total(p, "imag_ingest_instances_total", outcome="stored") for p in pages
            )
            assert ingested == stored
            assert sum(_total(p, "imag_job_runs_total", outcome="done") for p in pages) == (
                done_jobs
            )
            # each page names its node and process
            named = [[labels for labels, _ in p.get("imag_node_info", [])] for p in pages]
            assert [len(n) for n in named] == [1, 1, 1]
            assert [n[0]["process"] for n in named] == ["serve", "serve", "worker"]
            assert named[0][0]["node"] != named[1][0]["node"]
            # the shared queue: reported by exactly one process of the cluster
            assert [bool(p.get("imag_jobs_oldest_due_seconds")) for p in pages].count(True) == 1
        finally:
            if worker is not None:
                worker.terminate()
                assert worker.wait(timeout=60) == 0
            for node in (one, two):
                if node.proc is not None and node.proc.poll() is None:
                    assert node.stop() == 0


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.ConnectionError:
        return False
