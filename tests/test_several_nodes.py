"""Issue 18's acceptance: the archive as it is deployed on several nodes.

Two ``imag serve`` nodes and one ``imag worker`` share one PostgreSQL index and
one S3 bucket (moto's server over HTTP), all reading one TOML file, behind a
real HAProxy (Debian package) started here, like ``deploy/haproxy.cfg``:
DICOM as TCP with ``send-proxy-v2`` from the balancer's own address 127.0.0.3
(each node lists it in ``dicom.proxy_protocol``), HTTP in ``mode http`` with
``X-Forwarded-For`` (each node trusts it in ``http.trusted_proxies``), both
backends health-checked on ``/health/ready``.  A routing rule forwards each
stable study to a pynetdicom Storage SCP run by the test.

* What a modality (C-STORE, from 127.0.0.2, the only address its AE title may
  use) and a DICOMweb client (STOW-RS) push through the balancer is found by
  QIDO-RS on both nodes alike, and read back -- WADO-RS metadata, frames,
  rendered, retrieve -- through the node that did *not* store it; the audit
  trail shows the modality's address, not the balancer's.
* One node is killed with SIGKILL while pushes run through the balancer and is
  started again: every acknowledged instance (C-STORE success, STOW-RS
  referenced) is in the index and its object in the bucket, and no index row
  is left without its object.
* Every study, once stable, reaches the Storage SCP in exactly one completed
  association with exactly the instances the index holds -- even across the
  kill (the only allowance: a delivery job that a dead node held and that
  therefore ran again, whose repeat carries the same bytes).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import boto3
import psycopg
import pydicom
import pytest
import requests
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, Association, evt
from pynetdicom.sop_class import CTImageStorage
from requests.adapters import HTTPAdapter

from archive import pixels
from archive.parse import dataset_offset
from tests.dicomfiles import make_instance
from tests.haproxy import Haproxy
from tests.httpserver import HttpImag
from tests.processes import HOST, eventually, free_port
from tests.s3server import S3Server
from tests.test_dicomweb import DICOM, parts_of

pytestmark = [pytest.mark.postgres, pytest.mark.s3, pytest.mark.slow, pytest.mark.serial]

MODALITY, BALANCER, WORKSTATION = "127.0.0.2", "127.0.0.3", "127.0.0.5"
INSTANCES_PER_STUDY = 3
STABLE_AFTER = 2
AS_STORED = f'multipart/related; type="{DICOM}"; transfer-syntax=*'
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# -- the routing destination: a Storage SCP that records whole deliveries ---------------------


@dataclass
class Delivery:
    """One association the SCP received: the instances it carried (SOP UID ->
    digest of the encoded data set) and how it ended."""

    studies: set[str] = field(default_factory=set)
    instances: dict[str, str] = field(default_factory=dict)
    released: bool = False


class RecordingSCP:
    """A pynetdicom Storage SCP (AE ``ROUTED``) that keeps every association,
    so that a study delivered twice -- or delivered in pieces -- is seen."""

    def __init__(self) -> None:
        self.port = free_port()
        # by association; the association is kept too, so that its id() is not
        # reused by a later one once it is garbage collected
        self.deliveries: dict[int, tuple[Association, Delivery]] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title="ROUTED")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
        ]
        self.server = ae.start_server((HOST, self.port), block=False, evt_handlers=handlers)

    def _delivery(self, event: evt.Event) -> Delivery:
        with self._lock:
            return self.deliveries.setdefault(id(event.assoc), (event.assoc, Delivery()))[1]

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        delivery = self._delivery(event)
        with self._lock:
            delivery.studies.add(str(ds.StudyInstanceUID))
            raw = event.request.DataSet.getvalue()
            delivery.instances[str(ds.SOPInstanceUID)] = hashlib.sha256(raw).hexdigest()
        return 0x0000

    def _on_released(self, event: evt.Event) -> None:
        self._delivery(event).released = True

    def completed(self) -> list[Delivery]:
        with self._lock:
            return [d for _, d in self.deliveries.values() if d.released and d.instances]

    def stop(self) -> None:
        self.server.shutdown()


# -- the cluster -----------------------------------------------------------------------------


@dataclass
class Cluster:
    nodes: dict[str, HttpImag]  # by node.name
    worker: subprocess.Popen
    balancer: Haproxy
    dicom_front: int
    http_front: int
    index_url: str
    bucket: str
    endpoint: str
    scp: RecordingSCP
    token: str

    @property
    def dicomweb(self) -> str:
        return f"http://{HOST}:{self.http_front}/dicom-web"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.index_url) as db:
            return db.execute(sql, params).fetchall()

    def bucket_objects(self) -> dict[str, int]:
        """Every key in the bucket and its size."""
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )
        try:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
            return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}
        finally:
            client.close()


def _toml(value: object) -> str:
    return json.dumps(value)  # TOML basic strings, integers and booleans are JSON's


def _config_file(path: Path, index_url: str, bucket: str, endpoint: str, scp_port: int) -> Path:
    """One configuration file for every process of the cluster, as deployed."""
    path.write_text(
        f"stable_after_seconds = {STABLE_AFTER}\n"
        "\n[index]\n"
        f"url = {_toml(index_url)}\n"
        "\n[storage]\n"
        f"url = {_toml(f's3://{bucket}/archive')}\n"
        "\n[s3]\n"
        f"endpoint_url = {_toml(endpoint)}\n"
        'region = "us-east-1"\n'
        "\n[http]\n"
        f"trusted_proxies = [{_toml(BALANCER)}]\n"
        "\n[dicom]\n"
        'aet = "IMAG"\n'
        "accept_unknown = false\n"
        f"proxy_protocol = [{_toml(BALANCER)}]\n"
        "\n[[dicom.peers]]\n"
        f'aet = "MODALITY"\nhost = {_toml(MODALITY)}\nport = 104\n'
        "\n[[dicom.peers]]\n"
        f'aet = "ROUTED"\nhost = {_toml(HOST)}\nport = {scp_port}\n'
        "\n[[routes]]\n"
        'name = "stable-to-pacs"\nwhen = "stable"\nto_dicom = "ROUTED"\n'
    )
    return path


def _balancer_config(nodes: list[HttpImag], dicom_front: int, http_front: int) -> str:
    """deploy/haproxy.cfg's shape, on loopback, with quick health checks."""
    dicom = "".join(
        f"  server {name} {HOST}:{n.dicom_port} check port {n.http_port}\n"
        for name, n in zip(("n1", "n2"), nodes, strict=True)
    )
    http = "".join(
        f"  server {name} {HOST}:{n.http_port} check\n"
        for name, n in zip(("n1", "n2"), nodes, strict=True)
    )
    return (
        "defaults\n"
        "  timeout connect 2s\n"
        "  timeout client 60s\n"
        "  timeout server 60s\n"
        "  retries 3\n"
        "  option redispatch\n"
        "frontend dicom\n"
        "  mode tcp\n"
        f"  bind {HOST}:{dicom_front}\n"
        "  default_backend imag_dicom\n"
        "backend imag_dicom\n"
        "  mode tcp\n"
        "  balance leastconn\n"
        "  option httpchk GET /health/ready\n"
        "  http-check expect status 200\n"
        f"  default-server inter 500ms fall 2 rise 2 send-proxy-v2 source {BALANCER}\n"
        + dicom
        + "frontend http\n"
        "  mode http\n"
        f"  bind {HOST}:{http_front}\n"
        "  option forwardfor\n"
        "  default_backend imag_http\n"
        "backend imag_http\n"
        "  mode http\n"
        "  balance roundrobin\n"
        "  option httpchk GET /health/ready\n"
        "  http-check expect status 200\n"
        f"  default-server inter 500ms fall 2 rise 2 source {BALANCER}\n" + http
    )


@pytest.fixture(scope="module")
def cluster(
    pg_admin_url: str, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    from tests.pgserver import fresh_database

    root = tmp_path_factory.mktemp("cluster")
    endpoint = s3_server.endpoint_url
    bucket = f"imag-nodes-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
    )
    s3.create_bucket(Bucket=bucket)
    s3.close()
    scp = RecordingSCP()
    with fresh_database(pg_admin_url, "imag_several") as url:
        config = _config_file(root / "imag.toml", url, bucket, endpoint, scp.port)

        def settings(name: str) -> dict[str, str]:
            return {
                "IMAG_CONFIG": str(config),
                "IMAG_NODE_NAME": name,
                # tests.httpserver's defaults for a lone node, back to the file's
                "IMAG_DICOM_ACCEPT_UNKNOWN": "false",
                **CREDENTIALS,
            }

        nodes = {
            name: HttpImag(root / name, dicom=True, settings=settings(name))
            for name in ("node-1", "node-2")
        }
        worker = balancer = None
        try:
            with ThreadPoolExecutor(2) as pool:  # started together, as systemd would
                list(pool.map(lambda n: n.start(timeout=120), nodes.values()))
            (token,) = {n.token for n in nodes.values() if n.token}
            for node in nodes.values():
                node.token = token
                node.http.headers["Authorization"] = f"Bearer {token}"
            worker_env = nodes["node-1"].env | {
                "IMAG_NODE_NAME": "worker-1",
                "IMAG_DATA_DIR": str(root / "worker"),
            }
            worker = subprocess.Popen(
                [sys.executable, "-m", "archive.cli", "worker", "--concurrency", "2"]
                + ["--metrics-port", str(free_port())],
                env=worker_env,
                stdout=open(root / "worker.log", "wb"),  # noqa: SIM115 - closed with the process
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            dicom_front, http_front = free_port(), free_port()
            balancer = Haproxy(
                root / "haproxy",
                _balancer_config(list(nodes.values()), dicom_front, http_front),
                [dicom_front, http_front],
            ).start()
            yield Cluster(
                nodes, worker, balancer, dicom_front, http_front, url, bucket, endpoint, scp, token
            )
        finally:
            if balancer is not None:
                balancer.stop()
            if worker is not None:
                worker.terminate()
                worker.wait(timeout=60)
            for node in nodes.values():
                if node.proc is not None and node.proc.poll() is None:
                    node.stop()
            scp.stop()
    for node in nodes.values():  # no request failed with a 500 on any node
        log = node.log()
        at = log.find("Traceback")
        assert at < 0, log[max(0, at - 1500) : at + 4000]


# -- pushing through the balancer --------------------------------------------------------------


def _study(n: int = INSTANCES_PER_STUDY) -> list[bytes]:
    study, series = generate_uid(), generate_uid()
    return [make_instance(study=study, series=series) for _ in range(n)]


def _sop(data: bytes) -> str:
    return str(pydicom.dcmread(BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def _associate(cluster: Cluster) -> Association:
    """An association from the modality's address, through the balancer."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)  # CT_small's own syntax
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 30
    return ae.associate(HOST, cluster.dicom_front, ae_title="IMAG", bind_address=(MODALITY, 0))


def _send(assoc: Association, instances: list[bytes]) -> list[str]:
    """C-STORE each instance while the association lasts; the SOP Instance
    UIDs acknowledged with a success status."""
    acknowledged = []
    for data in instances:
        try:
            status = assoc.send_c_store(pydicom.dcmread(BytesIO(data)))
        except RuntimeError:  # the association is gone (its node was killed)
            break
        if getattr(status, "Status", None) == 0x0000:
            acknowledged.append(_sop(data))
    return acknowledged


def c_store(cluster: Cluster, study: list[bytes]) -> list[str]:
    """One association through the balancer for one study; what it acknowledged."""
    assoc = _associate(cluster)
    if not assoc.is_established:
        return []
    try:
        return _send(assoc, study)
    finally:
        if assoc.is_established:
            assoc.release()


class _BoundAdapter(HTTPAdapter):
    """Connections from one loopback address (a workstation other than the test's)."""

    def __init__(self, source: str) -> None:
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)  # type: ignore[arg-type]


def stow(cluster: Cluster, study: list[bytes]) -> list[str]:
    """One STOW-RS request from the workstation's address through the
    balancer; the SOP Instance UIDs its answer lists as stored
    (ReferencedSOPSequence)."""
    boundary = "several-nodes-b0undary"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: {DICOM}\r\n\r\n".encode() + data + b"\r\n"
            for data in study
        )
        + f"--{boundary}--\r\n".encode()
    )
    session = requests.Session()
    session.mount("http://", _BoundAdapter(WORKSTATION))
    try:
        answer = session.post(
            cluster.dicomweb + "/studies",
            data=body,
            headers={
                "Content-Type": f'multipart/related; type="{DICOM}"; boundary={boundary}',
                "Accept": "application/dicom+json",
                **cluster.auth(),
            },
            timeout=60,
        )
    except requests.ConnectionError:
        return []  # cut under the request: not acknowledged
    finally:
        session.close()
    if answer.status_code != 200:
        return []
    referenced = answer.json().get("00081199", {}).get("Value", [])
    return [item["00081155"]["Value"][0] for item in referenced]


def _data_set(data: bytes) -> bytes:
    """The data set as encoded, after the File Meta Information (which a
    C-STORE receiver writes itself, and which IMAG stores with a zeroed preamble)."""
    return data[dataset_offset(BytesIO(data)) :]


def _storing_nodes(cluster: Cluster, study: str) -> set[str]:
    """The nodes whose audit rows record storing into ``study``."""
    rows = cluster.query(
        "SELECT DISTINCT node FROM audit WHERE study_uid = %s AND outcome = 'allowed' "
        "AND (action LIKE %s OR action LIKE %s)",
        (study, "%store%", "%stow%"),
    )
    return {r[0] for r in rows}


# -- the tests ---------------------------------------------------------------------------------


def test_what_is_pushed_through_the_balancer_is_read_back_through_the_other_node(
    cluster: Cluster,
) -> None:
    by_dicom = [_study() for _ in range(4)]
    by_stow = [_study() for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:  # concurrent associations: leastconn spreads them
        dicom_acks = list(pool.map(lambda s: c_store(cluster, s), by_dicom))
        stow_acks = list(pool.map(lambda s: stow(cluster, s), by_stow))
    sent = {_sop(d): d for study in by_dicom + by_stow for d in study}
    assert sorted(u for acks in dicom_acks + stow_acks for u in acks) == sorted(sent)

    studies = {
        str(pydicom.dcmread(BytesIO(s[0]), stop_before_pixels=True).StudyInstanceUID): s
        for s in by_dicom + by_stow
    }
    storers: dict[str, str] = {}
    for study in studies:
        (storers[study],) = _storing_nodes(cluster, study)
    assert set(storers.values()) == set(cluster.nodes), storers  # both nodes took a share

    # QIDO-RS: both nodes give the same answer
    answers = []
    for node in cluster.nodes.values():
        found = node.http.get(node.dicomweb + "/instances", params={"limit": 1000}, timeout=60)
        assert found.status_code == 200, found.text[:300]
        answers.append(sorted(i["00080018"]["Value"][0] for i in found.json()))
    assert answers[0] == answers[1] and set(sent) <= set(answers[0])

    for study, datasets in studies.items():
        (other,) = (n for name, n in cluster.nodes.items() if name != storers[study])
        base = other.dicomweb + f"/studies/{study}"
        sops = {_sop(d) for d in datasets}

        def get(
            path: str, accept: str | None = None, base: str = base, other: HttpImag = other
        ) -> requests.Response:
            answer = other.http.get(
                base + path, headers={"Accept": accept} if accept else {}, timeout=60
            )
            assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
            return answer

        series = get("/series").json()
        assert len(series) == 1
        metadata = get("/metadata").json()
        assert {m["00080018"]["Value"][0] for m in metadata} == sops
        retrieved = {_sop(body): _data_set(body) for _, body in parts_of(get("", AS_STORED))}
        assert retrieved == {sop: _data_set(sent[sop]) for sop in sops}  # the pushed data sets
        for data in datasets:
            ds = pydicom.dcmread(BytesIO(data))
            path = f"/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
            (frame,) = parts_of(get(path + "/frames/1"))
            assert frame[1] == ds.PixelData
            rendered = get(path + "/rendered", "image/png").content
            assert rendered == pixels.render(ds, 1, media_type="image/png")

    # the audit trail names the modality behind the balancer, and the STOW-RS client
    sources = {
        r[0]: r[1]
        for r in cluster.query(
            "SELECT study_uid, source FROM audit WHERE outcome = 'allowed' "
            "AND study_uid IS NOT NULL AND (action LIKE %s OR action LIKE %s)",
            ("%store%", "%stow%"),
        )
    }
    for study in list(studies)[:4]:  # pushed by C-STORE: the PROXY protocol header
        assert sources[study].startswith(f"MODALITY@{MODALITY}"), sources[study]
    for study in list(studies)[4:]:  # pushed by STOW-RS: X-Forwarded-For
        assert sources[study] == WORKSTATION, sources[study]


def test_a_node_killed_mid_push_loses_no_acknowledged_instance(cluster: Cluster) -> None:
    victim = cluster.nodes["node-2"]
    acknowledged: list[str] = []
    attempted: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def pusher(how: str) -> None:
        while not stop.is_set():
            study = _study()
            with lock:
                attempted.extend(_sop(d) for d in study)
            done = c_store(cluster, study) if how == "dicom" else stow(cluster, study)
            with lock:
                acknowledged.extend(done)

    def count() -> int:
        with lock:
            return len(acknowledged)

    def stored_by_victim() -> int:
        return cluster.query(
            "SELECT count(*) FROM audit WHERE node = %s AND outcome = 'allowed' "
            "AND (action LIKE %s OR action LIKE %s)",
            ("node-2", "%store%", "%stow%"),
        )[0][0]

    def held_on(name: str) -> tuple[Association, list[bytes]]:
        """An association through the balancer that reached node ``name`` (its
        first instance stored there, as the audit row says) and is kept open
        with the rest of its study still to send."""
        for _ in range(20):
            study = _study()
            with lock:
                attempted.extend(_sop(d) for d in study)
            assoc = _associate(cluster)
            assert assoc.is_established
            first = _send(assoc, study[:1])
            with lock:
                acknowledged.extend(first)
            uid = str(pydicom.dcmread(BytesIO(study[0])).StudyInstanceUID)
            if first and _storing_nodes(cluster, uid) == {name}:
                return assoc, study[1:]
            with lock:
                acknowledged.extend(_send(assoc, study[1:]))
            assoc.release()
        raise AssertionError(f"no association through the balancer reached {name}")

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(pusher, how) for how in ("dicom", "dicom", "stow", "stow")]
        before = stored_by_victim()
        eventually(lambda: stored_by_victim() >= before + 10, timeout=60, what="node-2 storing")
        held, rest = held_on("node-2")
        victim.kill()  # SIGKILL, mid-push: at least the held association is cut
        at_kill = count()
        cut = _send(held, rest)
        assert cut == [], "a C-STORE acknowledged by a node killed before it was sent"
        eventually(lambda: count() >= at_kill + 30, timeout=60, what="pushes to node-1 alone")
        victim.start(timeout=120)
        victim.http.headers["Authorization"] = f"Bearer {cluster.token}"
        restarted = stored_by_victim()
        eventually(lambda: stored_by_victim() >= restarted + 6, timeout=60, what="node-2 back in")
        stop.set()
        for future in running:
            future.result()

    rows = cluster.query("SELECT sop_instance_uid, object_key, size FROM instances")
    indexed = {r[0] for r in rows}
    lost = set(acknowledged) - indexed
    assert not lost, f"{len(lost)} acknowledged instances are not in the index"
    objects = cluster.bucket_objects()
    orphans = [r[0] for r in rows if objects.get(f"archive/{r[1]}") != r[2]]
    assert not orphans, f"{len(orphans)} index rows without their object, e.g. {orphans[0]}"
    print(
        f"\n{len(attempted)} instances pushed, {len(acknowledged)} acknowledged, "
        f"{len(set(attempted) & indexed)} indexed; node-2 killed after {at_kill} acknowledgements"
    )


def test_each_stable_study_reaches_the_routing_destination_once(cluster: Cluster) -> None:
    # a burst after the others: at least these studies are routed by a whole cluster
    for study in (_study() for _ in range(4)):
        assert len(stow(cluster, study)) == INSTANCES_PER_STUDY

    def settled() -> dict[str, set[str]] | None:
        assert cluster.worker.poll() is None, "imag worker died"
        dead = cluster.query("SELECT kind, last_error FROM jobs WHERE state = 'dead'")
        assert not dead, dead
        if cluster.query("SELECT count(*) FROM jobs WHERE state <> 'done'")[0][0]:
            return None
        indexed: dict[str, set[str]] = {}
        for study, sop in cluster.query(
            "SELECT st.study_uid, i.sop_instance_uid FROM instances i "
            "JOIN series se ON se.id = i.series_ref JOIN studies st ON st.id = se.study_ref"
        ):
            indexed.setdefault(study, set()).add(sop)
        stable = {
            r[0]
            for r in cluster.query(
                "SELECT study_uid FROM changes WHERE type = %s", ("study.stable",)
            )
        }
        return indexed if set(indexed) <= stable else None

    indexed = eventually(settled, timeout=150, what="every study stable and routed", interval=0.5)

    stable_events = Counter(
        r[0]
        for r in cluster.query("SELECT study_uid FROM changes WHERE type = %s", ("study.stable",))
    )
    assert set(stable_events.values()) == {1}, "one burst per study: one study.stable each"
    route_jobs = cluster.query("SELECT payload, attempts FROM jobs WHERE kind = 'route.study'")
    per_job = Counter(json.loads(payload)["study"] for payload, _ in route_jobs)
    assert set(per_job) == set(indexed)  # a delivery job per stable study, none invented
    assert set(per_job.values()) == {1}, [s for s, n in per_job.items() if n > 1]
    attempts = {json.loads(payload)["study"]: n for payload, n in route_jobs}

    def delivered() -> set[str]:  # the SCP may see the release after the job is done
        return {s for d in cluster.scp.completed() for s in d.studies}

    eventually(lambda: delivered() >= set(indexed), timeout=30, what="every release seen")
    per_study: dict[str, list] = {}
    for delivery in cluster.scp.completed():
        assert len(delivery.studies) == 1, delivery.studies  # a study per association
        per_study.setdefault(next(iter(delivery.studies)), []).append(delivery)
    assert set(per_study) == set(indexed), set(indexed) ^ set(per_study)
    repeated = []
    for study, deliveries in per_study.items():
        for delivery in deliveries:  # each delivery is the whole study as indexed
            assert set(delivery.instances) == indexed[study], study
        if len(deliveries) > 1:
            # at least once: only a job reclaimed from a dead node runs twice,
            # and its repeat is the same bytes
            assert attempts[study] > 1, (study, len(deliveries))
            assert all(d.instances == deliveries[0].instances for d in deliveries)
            repeated.append(study)
    workers = cluster.query(
        "SELECT count(DISTINCT split_part(worker, '/', 1)) FROM jobs WHERE kind = 'route.study'"
    )[0][0]
    print(
        f"\n{len(indexed)} studies routed, {len(indexed) - len(repeated)} exactly once, "
        f"{len(repeated)} again after a node's death; delivery jobs ran in {workers} processes"
    )
