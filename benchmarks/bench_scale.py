"""Query figures at scale: QIDO-RS and C-FIND of `imag serve` over a bulk-loaded index.

1. A fresh index (SQLite file or a new PostgreSQL database) is opened with the
   real migrations and bulk-loaded with synthetic rows
   (:mod:`benchmarks.scale_data`: 7 sites, 10 years of dates, French names with
   accents, a modality mix; ``--instances`` instances, 10^5 by default).
2. A real ``imag serve`` subprocess is started on it, with an admin token, a
   site-bound user token (site CHU_NORD), and two DICOM peers: one bound to
   CHU_NORD, one regional.
3. The standard query mix of issue 17 -- PatientID; PatientName prefix,
   contains and accent-insensitive (``fuzzymatching=true``); one day, one
   year, one week + CT; AccessionNumber; ModalitiesInStudy; StudyInstanceUID;
   the series of a study; the instances of a series; no filter; a deep page
   -- over QIDO-RS (HTTP/1.1 keep-alive, ``limit=100``), each as the
   site-bound caller and as the admin, each repetition with another value
   drawn from the data; p50/p99 in ms (from sending the request to the
   answer's last byte; the client's JSON decoding is not timed) and the rows
   returned.  Then C-FIND (Study Root, one association per caller) for the
   same keys where the answer has at most ``--cfind-max-rows`` rows.
4. The SQL plan of each query (EXPLAIN, run in this process on the SQL the
   query model generates): the scan nodes, and ``seq`` when a large table is
   read whole.
5. ``--orthanc``: the same queries on Orthanc (Debian ``orthanc`` +
   ``orthanc-dicomweb``, SQLite index), loaded with the same studies as small
   DICOM objects through its REST API (:mod:`benchmarks.orthanc_load`; no bulk
   loader, so at 10^5 instances at most); its p50 and the ratio IMAG/Orthanc
   are printed beside the admin's figures (Orthanc has no site-bound caller).

6. ``--prewarm``: before timing, the tables the study mix reads and their
   indexes are loaded into the index's cache (PostgreSQL's shared buffers
   with ``pg_prewarm``; for SQLite the file is read once into the OS cache),
   as a server that has run for a while holds them.  Without it, values
   drawn afresh each repetition read their rows from disk: what a cold cache,
   or one smaller than the index, costs.  The header says which it was.

    python -m benchmarks.bench_scale                                 # 10^5, SQLite + PostgreSQL
    python -m benchmarks.bench_scale --backends postgresql --instances 10000000
    python -m benchmarks.bench_scale --backends postgresql --instances 10000000 --prewarm

The PostgreSQL server comes from IMAG_BENCH_PG_URL (default
postgresql://postgres@127.0.0.1:5432/postgres); the database is dropped after
unless ``--keep``.  Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from multidict import MultiDict
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from archive.index import open_database
from archive.index.db import Database
from archive.index.migrate import upgrade
from archive.index.statistics import Statistics
from archive.query import search
from archive.scu import close_reactor_race
from archive.security.scope import Scope
from benchmarks import orthanc, orthanc_load, scale_data
from benchmarks.bench_dimse import BenchError, imag_command, nodelay
from dicomweb.qido import build_query

PG_URL = os.environ.get("IMAG_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REPO = Path(__file__).resolve().parents[1]
SITE = "CHU_NORD"
SEED = 1
LIMIT = 100
BIG_TABLES = ("patients", "studies", "series", "instances")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the query mix


@dataclass(frozen=True)
class Sample:
    """What one repetition of a query may use: a study of the data and its patient."""

    study: scale_data.Study
    patient: scale_data.Patient


@dataclass(frozen=True)
class QuerySpec:
    name: str
    #: (sample, repetition) -> (QIDO path, parameters)
    qido: Callable[[Sample, int], tuple[str, dict[str, str]]]
    #: also asked over C-FIND (study root identifier keys), or None
    cfind: Callable[[Sample, int], dict[str, str]] | None = None


_PREFIXES = ("LEF*", "GAG*", "BOY*", "FON*")
_CONTAINS = ("*côté*", "*lefèvre*", "*müller*", "*hébert*")
_FUZZY = ("*cote*", "*lefevre*", "*muller*", "*hebert*")
_FUZZY_PREFIX = ("MUL*", "LEFE*", "HEB*", "COT*")
_MODALITIES = ("MR", "US", "MG", "CT")


def _week(day: str) -> str:
    start = datetime.strptime(day, "%Y%m%d")
    return f"{day}-{(start + timedelta(days=6)).strftime('%Y%m%d')}"


def query_mix(deep_offset: int) -> list[QuerySpec]:
    """Issue 17's query mix; each repetition draws its value from a sample."""
    s = "/studies"
    return [
        QuerySpec(
            "PatientID",
            lambda x, i: (s, {"PatientID": x.patient.patient_id}),
            lambda x, i: {"PatientID": x.patient.patient_id},
        ),
        QuerySpec(
            "PatientName prefix",
            lambda x, i: (s, {"PatientName": _PREFIXES[i % 4]}),
            lambda x, i: {"PatientName": _PREFIXES[i % 4]},
        ),
        QuerySpec(
            "PatientName contains",
            lambda x, i: (s, {"PatientName": _CONTAINS[i % 4]}),
            lambda x, i: {"PatientName": _CONTAINS[i % 4].upper()},
        ),
        QuerySpec(
            "PatientName fuzzy contains",
            lambda x, i: (s, {"PatientName": _FUZZY[i % 4], "fuzzymatching": "true"}),
        ),
        QuerySpec(
            "PatientName fuzzy prefix",
            lambda x, i: (s, {"PatientName": _FUZZY_PREFIX[i % 4], "fuzzymatching": "true"}),
        ),
        QuerySpec(
            "StudyDate one day",
            lambda x, i: (s, {"StudyDate": x.study.date}),
            lambda x, i: {"StudyDate": x.study.date},
        ),
        QuerySpec(
            "StudyDate one year",
            lambda x, i: (s, {"StudyDate": f"{x.study.date[:4]}0101-{x.study.date[:4]}1231"}),
            # C-FIND has no limit: ~1,000 rows at 10^5 instances
            lambda x, i: {"StudyDate": f"{x.study.date[:4]}0101-{x.study.date[:4]}1231"},
        ),
        QuerySpec(
            "one week + CT",
            lambda x, i: (s, {"StudyDate": _week(x.study.date), "ModalitiesInStudy": "CT"}),
            lambda x, i: {"StudyDate": _week(x.study.date), "ModalitiesInStudy": "CT"},
        ),
        QuerySpec(
            "AccessionNumber",
            lambda x, i: (s, {"AccessionNumber": x.study.accession}),
            lambda x, i: {"AccessionNumber": x.study.accession},
        ),
        QuerySpec(
            "ModalitiesInStudy",
            lambda x, i: (s, {"ModalitiesInStudy": _MODALITIES[i % 4]}),
        ),
        QuerySpec(
            "StudyInstanceUID",
            lambda x, i: (s, {"StudyInstanceUID": x.study.uid}),
            lambda x, i: {"StudyInstanceUID": x.study.uid},
        ),
        QuerySpec(
            "series of a study",
            lambda x, i: (f"{s}/{x.study.uid}/series", {}),
            lambda x, i: {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": x.study.uid},
        ),
        QuerySpec(
            "instances of a series",
            lambda x, i: (f"{s}/{x.study.uid}/series/{x.study.series[0].uid}/instances", {}),
            lambda x, i: {
                "QueryRetrieveLevel": "IMAGE",
                "StudyInstanceUID": x.study.uid,
                "SeriesInstanceUID": x.study.series[0].uid,
            },
        ),
        QuerySpec("no filter", lambda x, i: (s, {})),
        QuerySpec(
            f"deep page (offset {deep_offset})", lambda x, i: (s, {"offset": str(deep_offset)})
        ),
        QuerySpec(
            f"deep page, one year (offset {deep_offset // 10})",
            lambda x, i: (
                s,
                {
                    "StudyDate": f"{x.study.date[:4]}0101-{x.study.date[:4]}1231",
                    "offset": str(deep_offset // 10),
                },
            ),
        ),
    ]


def samples(shape: scale_data.Shape, count: int, site: str | None) -> list[Sample]:
    """``count`` studies spread over the data (of ``site`` only when given)."""
    found: list[Sample] = []
    n = 0
    step = max(1, shape.studies // (count * (8 if site else 1)))
    while len(found) < count and n < shape.studies * 2:
        number = 1 + (n * step * 7919) % shape.studies
        n += 1
        st = scale_data.study(SEED, number, shape)
        if site is None or st.site == site:
            found.append(Sample(st, scale_data.patient(SEED, st.patient)))
    return found


# --------------------------------------------------------------------------- the archive


@dataclass
class Server:
    base: str
    host: str
    http_port: int
    dicom_port: int
    tokens: dict[str, str]  # caller -> bearer token
    peers: dict[str, str]  # caller -> calling AE title
    index_url: str


@contextmanager
def fresh_index(backend: str, tmp: Path, keep: bool, reuse: str = "") -> Iterator[str]:
    """A new index database, dropped after unless ``keep``; with ``reuse``,
    that PostgreSQL database, created when missing and never dropped (it
    is then loaded once: see :func:`loaded`)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp / 'index.db'}"
        return
    if reuse:
        with psycopg.connect(PG_URL, autocommit=True, connect_timeout=5) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (reuse,))
            if not found.fetchone():
                conn.execute(f'CREATE DATABASE "{reuse}"')
        yield PG_URL.rsplit("/", 1)[0] + "/" + reuse
        return
    name = f"imag_scale_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        if keep:
            progress(f"kept database {name}")
        else:
            with psycopg.connect(PG_URL, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def loaded(url: str) -> int:
    """The instance count a reused database was fully loaded for (0: not, or
    a load that did not finish: it is started again, on a fresh database)."""
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            return int(conn.execute("SELECT instances FROM bench_scale_loaded").fetchone()[0])
    except (psycopg.Error, TypeError):
        return 0


def mark_loaded(url: str, instances: int) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("CREATE TABLE bench_scale_loaded (instances bigint)")
        conn.execute("INSERT INTO bench_scale_loaded VALUES (%s)", (instances,))


def _healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


@contextmanager
def running_imag(index_url: str, tmp: Path) -> Iterator[Server]:
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    http_port, dicom_port = orthanc.free_port(), orthanc.free_port()
    config = tmp / "imag.toml"
    config.write_text(
        "[[dicom.peers]]\n"
        f'aet = "SCALE_SITE"\nhost = "127.0.0.1"\nsite = "{SITE}"\n\n'
        "[[dicom.peers]]\n"
        'aet = "SCALE_ALL"\nhost = "127.0.0.1"\nregional = true\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAG_")}
    env |= {
        "IMAG_CONFIG": str(config),
        "IMAG_DATA_DIR": str(data),
        "IMAG_INDEX_URL": index_url,
        "IMAG_HTTP_HOST": "127.0.0.1",
        "IMAG_HTTP_PORT": str(http_port),
        "IMAG_DICOM_HOST": "127.0.0.1",
        "IMAG_DICOM_PORT": str(dicom_port),
        "IMAG_LOG_LEVEL": "WARNING",
    }
    if "scale-site" not in imag_command(env, "user", "list"):  # a reused database has them
        imag_command(env, "user", "add", "scale-site", "--role", "radiologist", "--site", SITE)
        imag_command(env, "user", "add", "scale-admin", "--role", "admin")
    tokens = {
        "site": imag_command(env, "token", "create", "scale-site").strip().splitlines()[0],
        "admin": imag_command(env, "token", "create", "scale-admin").strip().splitlines()[0],
    }
    log_path = tmp / "imag.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "archive.cli", "serve"],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while not _healthy(http_port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"imag serve did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
            yield Server(
                "/dicom-web",
                "127.0.0.1",
                http_port,
                dicom_port,
                tokens,
                {"site": "SCALE_SITE", "admin": "SCALE_ALL"},
                index_url,
            )
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- measuring


@dataclass
class Figure:
    query: str
    caller: str
    service: str  # QIDO-RS or C-FIND
    times: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    error: str = ""
    plan: str = ""

    def p(self, q: float) -> float | None:
        if not self.times:
            return None
        ordered = sorted(self.times)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def p50(self) -> float | None:
        return statistics.median(self.times) * 1000 if self.times else None

    @property
    def p99(self) -> float | None:
        return self.p(0.99)


class Qido:
    """One keep-alive HTTP connection, as a viewer keeps one."""

    def __init__(self, host: str, port: int, prefix: str, token: str) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=300)
        self.prefix = prefix
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/dicom+json"}

    def fetch(self, path: str, params: dict[str, str]) -> bytes:
        """The answer's body, read to its last byte (what the timing covers)."""
        # "*" left as it is (RFC 3986 allows it in a query): Orthanc's DICOMweb
        # plugin does not decode %2A, and answered every wildcard search empty
        query = urllib.parse.urlencode({"limit": str(LIMIT), **params}, safe="*")
        self.conn.request("GET", f"{self.prefix}{path}?{query}", headers=self.headers)
        response = self.conn.getresponse()
        body = response.read()
        if response.status == 204:
            return b""
        if response.status != 200:
            raise BenchError(f"HTTP {response.status}: {body[:300]!r}")
        return body

    @staticmethod
    def rows(body: bytes) -> int:
        """The matches an answer holds (parsed after the timing: decoding
        80 KB of JSON is the client's work, ~1.7 ms here, not the server's)."""
        return len(json.loads(body)) if body else 0

    def get(self, path: str, params: dict[str, str]) -> int:
        return self.rows(self.fetch(path, params))

    def close(self) -> None:
        self.conn.close()


def measure_qido(
    server_host: str,
    port: int,
    prefix: str,
    tokens: dict[str, str],
    mix: list[QuerySpec],
    picks: dict[str, list[Sample]],
    repeats: int,
    service: str = "QIDO-RS",
) -> list[Figure]:
    figures = []
    for caller, token in tokens.items():
        client = Qido(server_host, port, prefix, token)
        try:
            for spec in mix:
                fig = Figure(spec.name, caller, service)
                chosen = picks[caller]
                try:
                    client.get(*spec.qido(chosen[0], 0))  # warm-up
                    for i in range(repeats):
                        path, params = spec.qido(chosen[i % len(chosen)], i)
                        started = time.perf_counter()
                        body = client.fetch(path, params)
                        fig.times.append(time.perf_counter() - started)
                        fig.rows.append(client.rows(body))
                except (BenchError, OSError, http.client.HTTPException) as exc:
                    fig.error = str(exc)[:200]
                    client.close()
                    client = Qido(server_host, port, prefix, token)
                figures.append(fig)
        finally:
            client.close()
    return figures


def _identifier(keys: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = keys.get("QueryRetrieveLevel", "STUDY")
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate",
                    "AccessionNumber", "ModalitiesInStudy"):  # fmt: skip
        setattr(ds, keyword, keys.get(keyword, ""))
    if ds.QueryRetrieveLevel in ("SERIES", "IMAGE"):
        ds.SeriesInstanceUID = keys.get("SeriesInstanceUID", "")
        ds.Modality = ""
        ds.SeriesNumber = ""
    if ds.QueryRetrieveLevel == "IMAGE":
        ds.SOPInstanceUID = ""
        ds.InstanceNumber = ""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID"):
        if keyword in keys:
            setattr(ds, keyword, keys[keyword])
    return ds


def _cfind(assoc: Any, ds: Dataset, cancel_after: int | None = None) -> int:
    """The matches of one C-FIND; past ``cancel_after`` a C-CANCEL stops it
    (an answer of 10^5 rows is not what the figure is about)."""
    matches = 0
    model = StudyRootQueryRetrieveInformationModelFind
    for status, _ in assoc.send_c_find(ds, model, msg_id=7):
        if not status:
            raise BenchError("C-FIND: no response")
        code = int(status.Status)
        if code in (0xFF00, 0xFF01):
            matches += 1
            if cancel_after is not None and matches == cancel_after + 1:
                assoc.send_c_cancel(7, query_model=model)
        elif code == 0xFE00 and cancel_after is not None:
            return matches  # canceled by us
        elif code != 0:
            raise BenchError(f"C-FIND status 0x{code:04X}")
    return matches


def measure_cfind(
    host: str,
    port: int,
    aet: str,
    peers: dict[str, str],
    mix: list[QuerySpec],
    picks: dict[str, list[Sample]],
    repeats: int,
    max_rows: int,
) -> list[Figure]:
    figures = []
    for caller, calling in peers.items():
        ae = AE(ae_title=calling)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.acse_timeout = 30
        ae.dimse_timeout = ae.network_timeout = 600

        def connect(ae: AE = ae, calling: str = calling) -> Any:
            assoc = ae.associate(
                host, port, ae_title=aet, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)]
            )
            if not assoc.is_established:
                raise BenchError(f"C-FIND association of {calling} not established")
            return assoc

        assoc = connect()
        try:
            for spec in mix:
                if spec.cfind is None:
                    continue
                fig = Figure(spec.name, caller, "C-FIND")
                chosen = picks[caller]
                try:
                    if not assoc.is_established:  # the previous query lost it
                        assoc = connect()
                    first = _cfind(assoc, _identifier(spec.cfind(chosen[0], 0)), max_rows)
                    if first > max_rows:
                        fig.error = f"more than {max_rows} rows (--cfind-max-rows), not timed"
                    else:
                        for i in range(repeats):
                            ds = _identifier(spec.cfind(chosen[i % len(chosen)], i))
                            started = time.perf_counter()
                            fig.rows.append(_cfind(assoc, ds))
                            fig.times.append(time.perf_counter() - started)
                except (BenchError, RuntimeError) as exc:  # RuntimeError: association lost
                    fig.error = str(exc)[:200]
                figures.append(fig)
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
    return figures


# --------------------------------------------------------------------------- plans


class _Recorder:
    """A stand-in for the index that records the search's SQL instead of running it."""

    def __init__(self, db: Database) -> None:
        self.dialect = db.dialect
        self.seen: list[tuple[str, list[Any]]] = []

    def query(self, sql: str, params: Any = (), **options: Any) -> list:
        self.seen.append((sql, list(params)))
        return []


def plan_of(db: Database, path: str, params: dict[str, str], scope: Scope | None) -> str:
    """The scan nodes of the SQL a QIDO request runs, and ``seq`` when a
    large table is read whole."""
    level, path_keys = _route(path)
    query, fields = build_query(level, MultiDict({**params, "limit": str(LIMIT)}), path_keys)
    query.return_keys = fields
    query.scope = scope
    recorder = _Recorder(db)
    search(recorder, query)  # type: ignore[arg-type]
    sql, args = recorder.seen[0]
    if db.dialect == "postgresql":
        lines = [r[0] for r in db.query("EXPLAIN " + sql, args)]
        nodes = [
            line.strip().lstrip("-> ").split("  ")[0]
            for line in lines
            if "Scan" in line and " on " in line
        ]
        paged = [n for n in nodes if n.endswith(("_1", " sm"))]
        # a paged search: what grows with the data is the page-of-ids
        # subquery (aliases st_1, p_1...); its <= 101 rows are read by key after
        seq = any("Seq Scan" in n for n in (paged or nodes) if n.split(" on ")[1].split()[0]
                  in BIG_TABLES)  # fmt: skip
    else:
        lines = [r[3] for r in db.query("EXPLAIN QUERY PLAN " + sql, args)]
        nodes = [line for line in lines if line.startswith(("SCAN", "SEARCH"))]
        # "SCAN page": the <= 101 ids of a page; "SCAN st" alone walks the
        # table in rowid order and stops at LIMIT when nothing else filters
        seq = any(
            line.startswith("SCAN") and " USING " not in line and line != "SCAN page"
            for line in lines
        )
    compact = "; ".join(dict.fromkeys(nodes))
    return ("SEQ " if seq else "index ") + compact


def _route(path: str) -> tuple[str, dict[str, str]]:
    parts = [p for p in path.split("/") if p]
    keys: dict[str, str] = {}
    if len(parts) >= 2:
        keys["StudyInstanceUID"] = parts[1]
    if len(parts) >= 4:
        keys["SeriesInstanceUID"] = parts[3]
    level = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}[parts[-1]]
    return level, keys


# --------------------------------------------------------------------------- report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(
    label: str,
    shape: scale_data.Shape,
    load_seconds: float,
    figures: list[Figure],
    orthanc_figures: dict[tuple[str, str, str], Figure],
    cache: str = "",
) -> None:
    print(
        f"\n== {label}: {shape.instances:,} instances, {shape.studies:,} studies, "
        f"{shape.patients:,} patients; "
        + (
            f"bulk load {load_seconds:.0f} s "
            f"({shape.instances / max(load_seconds, 1e-9):,.0f} instances/s)"
            if load_seconds >= 0
            else "loaded by an earlier run (--reuse)"
        )
    )
    if cache:
        print(f"# cache: {cache}")
    print(
        f"{'query':34} {'caller':6} {'service':8} {'p50 ms':>8} {'p99 ms':>8} {'rows':>6}"
        f" {'Orthanc p50':>11} {'rows':>6} {'ratio':>6}  plan"
    )
    unlike = False
    for f in figures:
        rows = f"{statistics.median(f.rows):.0f}" if f.rows else "-"
        other = orthanc_figures.get((f.query, f.caller, f.service))
        ortho = other.p50 if other else None
        ratio = f"{f.p50 / ortho:.2f}" if ortho and f.p50 else "-"  # < 1: IMAG faster
        their_rows = f"{statistics.median(other.rows):.0f}" if other and other.rows else "-"
        if other and other.error:
            their_rows = "error"
        elif other and other.rows and f.rows and their_rows != rows:
            ratio = "n/a*"  # not the same work
            unlike = True
        print(
            f"{f.query:34} {f.caller:6} {f.service:8} {_ms(f.p50):>8} {_ms(f.p99):>8} {rows:>6}"
            f" {_ms(ortho):>11} {their_rows:>6} {ratio:>6}  {f.error or f.plan}"
        )
    if unlike:
        print(
            "n/a*: Orthanc answered other rows, so its time is not the same work (its "
            "QIDO-RS does not decode percent-escaped values, so an accented name finds "
            "nothing, and fuzzymatching does not make MUL* find MÜLLER)"
        )
    sys.stdout.flush()


# --------------------------------------------------------------------------- cache

#: what the study-level mix reads (instances only through a series's rows)
PREWARMED = ("studies", "patients", "study_modalities", "series")


def prewarm(db: Database) -> str:
    """Load the tables of :data:`PREWARMED` and their indexes into the index's
    cache; return what was done, for the report's header.  PostgreSQL: into
    its shared buffers with ``pg_prewarm`` (when they are smaller than what is
    read, only the last part read stays, and the header says so).  SQLite:
    the file read once, into the OS cache it reads through."""
    started = time.monotonic()
    if db.dialect == "sqlite":
        assert db.path is not None
        size = 0
        with open(db.path, "rb") as f:
            while chunk := f.read(1 << 20):
                size += len(chunk)
        return (
            f"prewarmed: the index file ({size / 2**20:,.0f} MiB) read into the OS cache "
            f"in {time.monotonic() - started:.0f} s"
        )
    db.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
    marks = ", ".join("?" * len(PREWARMED))
    relations = db.query(
        "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c "
        f"WHERE c.relname IN ({marks}) AND c.relkind = 'r' AND c.relnamespace = "
        "current_schema()::regnamespace UNION ALL "
        "SELECT i.relname, pg_relation_size(i.oid) FROM pg_index x "
        "JOIN pg_class t ON t.oid = x.indrelid JOIN pg_class i ON i.oid = x.indexrelid "
        f"WHERE t.relname IN ({marks}) AND t.relnamespace = current_schema()::regnamespace",
        (*PREWARMED, *PREWARMED),
    )
    for name, _ in relations:
        db.scalar("SELECT pg_prewarm(?::regclass)", (name,))
    total = sum(size for _, size in relations)
    buffers = _shared_buffers(db)
    fits = "" if total <= buffers else " -- more than the shared buffers: only part of it stays"
    return (
        f"prewarmed with pg_prewarm: {', '.join(PREWARMED)} and their "
        f"{len(relations) - len(PREWARMED)} indexes, {total / 2**20:,.0f} MiB, "
        f"in {time.monotonic() - started:.0f} s; "
        f"shared_buffers {buffers / 2**20:,.0f} MiB{fits}"
    )


def _shared_buffers(db: Database) -> int:
    """PostgreSQL's shared_buffers, in bytes (its setting counts 8 kB pages)."""
    return int(
        db.scalar(
            "SELECT setting::bigint * 8192 FROM pg_settings WHERE name = ?", ("shared_buffers",)
        )
    )


def cold_cache(db: Database) -> str:
    """What the report says of a run without ``--prewarm``."""
    if db.dialect == "sqlite":
        return "not prewarmed: the OS cache holds whatever earlier reads left in it"
    buffers = _shared_buffers(db)
    return (
        f"not prewarmed (--prewarm): shared_buffers {buffers / 2**20:,.0f} MiB; each "
        "repetition's fresh value reads its rows from the OS cache or the disk"
    )


# --------------------------------------------------------------------------- main


def run_backend(backend: str, args: argparse.Namespace) -> list[Figure]:
    tmp = Path(tempfile.mkdtemp(prefix=f"imag-scale-{backend}-"))
    try:
        with fresh_index(backend, tmp, args.keep, args.reuse if backend != "sqlite" else "") as url:
            started = time.monotonic()
            held = loaded(url) if args.reuse and backend != "sqlite" else 0
            if held and held != args.instances:  # a load of hours is not dropped by a typo
                raise BenchError(
                    f"{args.reuse} holds a load of {held:,} instances, not {args.instances:,}: "
                    f"pass --instances {held} to time it, or another --reuse name "
                    f"(DROP DATABASE {args.reuse} to load it anew)"
                )
            if held:
                progress(f"{backend}: reusing {args.reuse}, {args.instances:,} instances loaded")
                shape = scale_data.Shape(args.instances)
                started = float("inf")  # no load time to report
            else:
                if args.reuse and backend != "sqlite":  # a load that did not finish: anew
                    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=10) as conn:
                        conn.execute(f'DROP DATABASE IF EXISTS "{args.reuse}" WITH (FORCE)')
                        conn.execute(f'CREATE DATABASE "{args.reuse}"')
                progress(f"{backend}: bulk-loading {args.instances:,} instances ...")
                shape = scale_data.load(url, args.instances, SEED, progress)
                if args.reuse and backend != "sqlite":
                    mark_loaded(url, args.instances)
            load_seconds = time.monotonic() - started
            site_share = dict(scale_data.SITES)[SITE] / sum(w for _, w in scale_data.SITES)
            deep = min(10_000, int(shape.studies * site_share / 2) // 100 * 100)
            mix = query_mix(deep)
            picks = {
                "site": samples(shape, args.samples, SITE),
                "admin": samples(shape, args.samples, None),
            }
            db = open_database(url)
            try:
                # a reused database gets the migrations added since its load
                # now, and SQLite its planner's statistics, as imag serve would
                # (its index writer gathers them), so that the plans are those timed
                upgrade(db)
                Statistics(db).start()
                cache = prewarm(db) if args.prewarm else cold_cache(db)
                plans = {}
                for spec in mix:
                    for caller, scope in (("site", Scope.of([SITE])), ("admin", None)):
                        path, params = spec.qido(picks[caller][0], 0)
                        plans[(spec.name, caller)] = plan_of(db, path, params, scope)
            finally:
                db.close()
            with running_imag(url, tmp) as server:
                figures = []
                if not args.no_qido:
                    progress(f"{backend}: QIDO-RS, {args.repeats} repetitions per query and caller")
                    figures += measure_qido(
                        server.host, server.http_port, server.base, server.tokens, mix, picks,
                        args.repeats,
                    )  # fmt: skip
                if not args.no_cfind:
                    progress(f"{backend}: C-FIND")
                    figures += measure_cfind(
                        server.host, server.dicom_port, "IMAG", server.peers, mix, picks,
                        args.cfind_repeats, args.cfind_max_rows,
                    )  # fmt: skip
            for f in figures:
                f.plan = plans.get((f.query, f.caller), "")
            ortho: dict[tuple[str, str, str], Figure] = {}
            if args.orthanc and backend == args.backends.split(",")[0]:
                ortho = orthanc_figures(shape, mix, picks, args)
            label = {"sqlite": "IMAG SQLite", "postgresql": "IMAG PostgreSQL"}[backend]
            report(label, shape, load_seconds, figures, ortho, cache)
            return figures
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def orthanc_figures(
    shape: scale_data.Shape,
    mix: list[QuerySpec],
    picks: dict[str, list[Sample]],
    args: argparse.Namespace,
) -> dict[tuple[str, str, str], Figure]:
    """The same queries on Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``,
    its SQLite index), loaded with the same studies through its REST API
    (:mod:`benchmarks.orthanc_load`: no bulk loader, so 10^5 instances at
    most).  Orthanc has no site-bound callers: its figures stand beside the
    admin's."""
    if shape.instances > 100_000:
        print("Orthanc: not measured above 10^5 instances (no bulk loader; REST upload only)")
        return {}
    if not orthanc.available() or not orthanc.dicomweb_plugin():
        print("Orthanc: not measured (install the Debian orthanc and orthanc-dicomweb packages)")
        return {}
    extra = {
        "Plugins": [orthanc.dicomweb_plugin()],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    with orthanc.running_orthanc(extra) as server:
        progress(f"Orthanc: loading {shape.instances:,} instances through its REST API ...")
        orthanc_load.load(server.http_url, shape, SEED, progress)
        host, port = server.http_url.removeprefix("http://").split(":")
        admin = {"admin": picks["admin"]}
        figures = []
        if not args.no_qido:
            progress(f"Orthanc: QIDO-RS, {args.repeats} repetitions per query")
            figures += measure_qido(host, int(port), "/dicom-web", {"admin": ""}, mix, admin,
                                    args.repeats)  # fmt: skip
        if not args.no_cfind:
            progress("Orthanc: C-FIND")
            figures += measure_cfind(
                host, server.dicom_port, server.aet, {"admin": "BENCH"}, mix, admin,
                args.cfind_repeats, args.cfind_max_rows,
            )  # fmt: skip
    return {(f.query, f.caller, f.service): f for f in figures}


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"instance counts, comma-separated: {text!r}") from None
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"instance counts, comma-separated: {text!r}")
    return sizes


def _mix_name(query: str) -> str:
    """A query of the mix whatever the size (a deep page's offset grows with it)."""
    return re.sub(r" \(offset \d+\)", "", query)


def growth(backend: str, runs: list[tuple[int, list[Figure]]]) -> None:
    """How each query's p50 grows from the smallest archive to the largest
    (issue 17: the same mix at 10^5 and 10^7, the ratio printed)."""
    (small, first), (large, last) = runs[0], runs[-1]
    before = {(_mix_name(f.query), f.caller, f.service): f for f in first}
    print(f"\n== {backend}: p50 from {small:,} to {large:,} instances (ratio: larger / smaller)")
    print(
        f"{'query':34} {'caller':6} {'service':8} {'p50 small':>10} {'p50 large':>10} {'ratio':>6}"
    )
    for f in last:
        key = (_mix_name(f.query), f.caller, f.service)
        other = before.get(key)
        ratio = f"{f.p50 / other.p50:.2f}" if other and other.p50 and f.p50 else "-"
        print(
            f"{key[0]:34} {f.caller:6} {f.service:8} {_ms(other.p50 if other else None):>10} "
            f"{_ms(f.p50):>10} {ratio:>6}"
        )
    sys.stdout.flush()


def main() -> int:
    close_reactor_race()  # the pynetdicom SCUs timing C-FIND: archive/scu.py
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--instances",
        type=_sizes,
        default=[100_000],
        help="default 10^5; several (100000,10000000): each in turn, then how each "
        "query's p50 grows from the smallest to the largest",
    )
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--repeats", type=int, default=40, help="QIDO repetitions per query")
    parser.add_argument("--samples", type=int, default=40, help="distinct values per query")
    parser.add_argument("--cfind-repeats", type=int, default=10)
    parser.add_argument("--cfind-max-rows", type=int, default=1000)
    parser.add_argument("--no-cfind", action="store_true")
    parser.add_argument("--no-qido", action="store_true", help="C-FIND only")
    parser.add_argument("--orthanc", action="store_true", help="Orthanc side by side (<= 10^5)")
    parser.add_argument("--keep", action="store_true", help="keep the PostgreSQL database")
    parser.add_argument(
        "--prewarm",
        action="store_true",
        help="load the tables the mix reads into the index's cache first, as a server "
        "running for a while holds them",
    )
    parser.add_argument(
        "--reuse",
        default="",
        metavar="DB[,DB...]",
        help="PostgreSQL database to load once and time again later (kept; e.g. a 10^7 "
        "load); one per --instances count",
    )
    args = parser.parse_args()
    sizes: list[int] = args.instances
    reused = [name.strip() for name in args.reuse.split(",")] if args.reuse else []
    if reused and len(reused) != len(sizes):
        parser.error(f"--reuse names {len(reused)} databases for {len(sizes)} --instances counts")
    try:
        for backend in (b.strip() for b in args.backends.split(",")):
            runs = []
            for i, size in enumerate(sizes):
                reuse = reused[i] if reused else ""
                one = argparse.Namespace(**{**vars(args), "instances": size, "reuse": reuse})
                runs.append((size, run_backend(backend, one)))
            if len(runs) > 1:
                growth(backend, sorted(runs, key=lambda run: run[0]))
    except BenchError as exc:
        print(f"bench_scale: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
