"""DIMSE figures: C-STORE ingest and C-FIND latency of `imag serve`, beside Orthanc.

1. C-STORE ingest of generated CT slices (512x512, 16-bit, explicit VR little
   endian) with dcmtk ``storescu`` (TCP_NODELAY=1), over 1 association and over
   N parallel associations (the files split in N folders, N concurrent
   ``storescu +sd`` processes). Wall time runs from the start of the first
   storescu to the exit of the last; every exit code must be 0 and the archive
   must then hold exactly ``--count`` instances (``imag stats --json``,
   Orthanc's /statistics). Every measurement uses a fresh archive (fresh data
   folder and database).
2. C-FIND latency (study root) after the last ingest, with a few hundred small
   extra studies stored too: median and p95 of N queries over one reused
   pynetdicom association, and the wall time of a one-shot ``findscu`` process
   for reference.
3. The same on Orthanc (Debian package), with IMAG/Orthanc ratios.
4. A reference C-STORE row: dcmtk's ``storescp --ignore``, which receives
   every object and keeps none -- the rate the senders and the transport alone
   allow on this machine, so the ceiling of any archive's here, and the CPU
   that receiving alone costs (``--no-null-scp`` leaves it out).

    python -m benchmarks.bench_dimse --count 1000
    python -m benchmarks.bench_dimse --backends sqlite --imag-env IMAG_DICOM_MAX_PDU=1MiB
    python -m benchmarks.bench_dimse --backends sqlite --receive lean,pynetdicom --no-find
    python -m benchmarks.bench_dimse --backends sqlite --tls --count 200
    python -m benchmarks.bench_dimse --backends sqlite --receive lean --rounds 3

``--rounds N`` measures every archive N times, IMAG's and Orthanc's in turn,
prints each round's tables, then a summary: each figure's median and range,
and each ratio to Orthanc taken within its round before it is summarised (on
a shared or virtual machine the rate of the same archive moves by a third
between minutes; within a round both archives meet the same conditions).

``--tls`` pushes over mutual TLS (a throwaway CA signs the archives' and
storescu's certificates; IMAG with ``dicom.tls_cert``/``tls_ca``, Orthanc with
its ``DicomTls*`` options, storescu ``+tls``); the C-FIND part is then left out.

``--receive`` chooses IMAG's C-STORE receive path (``dicom.lean_store``): the
lean asyncio one, pynetdicom's, or both side by side (default).  Each C-STORE
row also reports the server's CPU time per instance (user + system of the
server process, read from /proc before and after the push) and its peak
memory during the push: the peak RSS (VmHWM, reset through
/proc/PID/clear_refs just before the push) of the server process plus that of
each of its listener processes (``dicom.processes``), in MiB.  The memory of
one large object received is measured by ``benchmarks.bench_big_store``.

Extra IMAG settings also come from IMAG_BENCH_IMAG_ENV ("K=V K2=V2"); the
PostgreSQL server from IMAG_BENCH_PG_URL (default
postgresql://postgres@127.0.0.1:5432/postgres; a fresh database is created and
dropped for each measurement).
Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from archive.scu import close_reactor_race
from archive.synthetic import (
    ct_benchmark_study,
    generate_ct_series,
    generate_mixed_set,
    write_study,
)
from benchmarks import orthanc
from tests.dcmtk import dcmtk, have_dcmtk

PG_URL = os.environ.get("IMAG_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REPO = Path(__file__).resolve().parents[1]
CALLING_AET = "BENCH"
CT_SEED = 11
EXTRA_SEED = 3
BACKEND_LABEL = {"sqlite": "IMAG SQLite", "postgresql": "IMAG PostgreSQL"}
#: C-STORE receive paths (dicom.lean_store) by name
RECEIVE = {"lean": "true", "pynetdicom": "false"}


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A measurement that went wrong: the message says what was seen."""


# --------------------------------------------------------------------------- archives


def imag_command(env: dict[str, str], *args: str) -> str:
    """What ``imag <args>`` prints, run with ``env`` (an archive's settings);
    BenchError with its error output when it fails."""
    run = subprocess.run(
        [sys.executable, "-m", "archive.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if run.returncode != 0:
        raise BenchError(f"imag {' '.join(args)} failed ({run.returncode}): {run.stderr[-2000:]}")
    return run.stdout


@dataclass
class Target:
    """A DICOM archive under test."""

    label: str
    host: str
    port: int
    aet: str
    instances: Callable[[], int] | None  # what the archive reports holding (None: nothing kept)
    log_tail: Callable[[], str]  # the end of the server's log
    pid: int = 0  # the server process, for its CPU time (0: not measured)
    tls: tuple[str, ...] = ()  # dcmtk options reaching it over TLS (empty: plain)
    #: the ``results`` its C-FIND audit entries record, oldest first (None: not kept)
    find_audit: Callable[[], list[int | None]] | None = None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` and of its descendants (the
    listener processes of ``dicom.processes``), running or waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    total = ticks / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        total += sum(cpu_seconds(int(child)) or 0.0 for child in children)
    return total


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (listener processes), as /proc lists them now."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            out += process_tree(int(child))
    return out


def reset_peak_rss(pid: int) -> None:
    """Start the peak RSS (VmHWM) of ``pid`` and its descendants afresh from
    their current RSS (Linux: ``5`` written to /proc/PID/clear_refs)."""
    for p in process_tree(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:  # not ours, or gone: its lifetime peak is reported
            pass


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def memory_mib(pid: int, key: str = "VmHWM") -> float | None:
    """``key`` (VmHWM: peak RSS; VmRSS: now) of ``pid`` plus its descendants, MiB."""
    values = [_status_kib(p, key) for p in process_tree(pid)]
    known = [v for v in values if v is not None]
    return sum(known) / 1024 if known else None


def echo(host: str, port: int, aet: str, tls: tuple[str, ...] = ()) -> bool:
    run = subprocess.run(
        [dcmtk("echoscu"), "-aec", aet, "-aet", CALLING_AET, "-to", "5", *tls, host, str(port)],
        capture_output=True,
        timeout=30,
    )
    return run.returncode == 0


@dataclass(frozen=True)
class Tls:
    """``--tls``: what each archive is given, and the storescu/echoscu options."""

    imag_env: dict[str, str]
    orthanc_config: dict[str, object]
    client: tuple[str, ...]


def make_tls(folder: Path) -> Tls:
    """A throwaway CA, a server certificate for 127.0.0.1 (both archives) and
    a client certificate it signed (storescu); every side verifies the other."""
    from tests.test_tls import make_pki  # the tests' PKI: only when --tls

    pki = make_pki(folder)
    return Tls(
        imag_env={
            "IMAG_DICOM_TLS_CERT": str(pki.server.cert),
            "IMAG_DICOM_TLS_KEY": str(pki.server.key),
            "IMAG_DICOM_TLS_CA": str(pki.ca),
        },
        orthanc_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.server.cert),
            "DicomTlsPrivateKey": str(pki.server.key),
            "DicomTlsTrustedCertificates": str(pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
        },
        client=("+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.ca)),
    )


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@contextmanager
def running_imag(
    tmp: Path,
    backend: str,
    extra_env: dict[str, str],
    receive: str = "lean",
    tls: Tls | None = None,
) -> Iterator[Target]:
    """A fresh `imag serve` (new data folder, new index database), stopped and removed after."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"imag-{backend}-", dir=tmp))
    log_path = data_dir.with_suffix(".log")
    db = None
    proc = None
    logf = None
    try:
        if backend == "postgresql":
            db = f"imag_bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(PG_URL, autocommit=True, connect_timeout=3) as conn:
                conn.execute(f'CREATE DATABASE "{db}"')
            index_url = PG_URL.rsplit("/", 1)[0] + "/" + db
        else:
            index_url = f"sqlite:///{data_dir / 'index.db'}"
        dicom_port = orthanc.free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAG_")}
        env |= {
            "IMAG_DATA_DIR": str(data_dir),
            "IMAG_INDEX_URL": index_url,
            "IMAG_HTTP_PORT": str(orthanc.free_port()),
            "IMAG_DICOM_HOST": "127.0.0.1",
            "IMAG_DICOM_PORT": str(dicom_port),
            "IMAG_DICOM_ACCEPT_UNKNOWN": "true",
            "IMAG_LOG_LEVEL": "WARNING",
            "IMAG_DICOM_LEAN_STORE": RECEIVE[receive],
        }
        env |= extra_env | (tls.imag_env if tls else {})
        client_tls = tls.client if tls else ()
        aet = env.get("IMAG_DICOM_AET", "IMAG")
        logf = open(log_path, "w")  # noqa: SIM115 - open while IMAG runs
        proc = subprocess.Popen(
            [sys.executable, "-m", "archive.cli", "serve"],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        # "IMAG listening" is printed once every listener process listens
        # (dicom.processes): an association opened before a child listens
        # stays with the parent for the whole push
        while "IMAG listening" not in log_path.read_text(errors="replace") or not echo(
            "127.0.0.1", dicom_port, aet, client_tls
        ):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(
                    f"IMAG did not start (exit code {proc.poll()}):\n{_tail(log_path)}"
                )
            time.sleep(0.2)

        def instances() -> int:
            return int(json.loads(imag_command(env, "stats", "--json"))["instances"])

        def find_audit() -> list[int | None]:
            out = imag_command(env, "audit", "--action", "dicom.c-find", "--json")
            entries = [json.loads(line) for line in out.splitlines() if line.strip()]
            return [(entry.get("detail") or {}).get("results") for entry in entries]

        yield Target(
            f"{BACKEND_LABEL[backend]} {receive}",
            "127.0.0.1",
            dicom_port,
            aet,
            instances,
            lambda: _tail(log_path),
            proc.pid,
            client_tls,
            find_audit,
        )
        if proc.poll() is not None:
            raise BenchError(f"IMAG exited early ({proc.returncode}):\n{_tail(log_path)}")
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                progress("IMAG did not stop within 30 s of SIGTERM: killed")
                proc.kill()
                proc.wait()
        if logf is not None:
            logf.close()
        if db is not None:
            try:
                with psycopg.connect(PG_URL, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            except psycopg.Error as exc:
                progress(f"could not drop database {db}: {exc}")
        shutil.rmtree(data_dir, ignore_errors=True)
        log_path.unlink(missing_ok=True)


@contextmanager
def running_orthanc(tls: Tls | None = None) -> Iterator[Target]:
    with orthanc.running_orthanc(tls.orthanc_config if tls else None) as server:

        def instances() -> int:
            with urllib.request.urlopen(server.http_url + "/statistics", timeout=60) as resp:
                return int(json.load(resp)["CountInstances"])

        target = Target(
            "Orthanc",
            "127.0.0.1",
            server.dicom_port,
            server.aet,
            instances,
            server.log_tail,
            server.pid,
            tls.client if tls else (),
        )
        deadline = time.monotonic() + 30
        while not echo(target.host, target.port, target.aet, target.tls):
            if time.monotonic() > deadline:
                raise BenchError(f"Orthanc did not answer C-ECHO:\n{server.log_tail()}")
            time.sleep(0.2)
        yield target


NULL_LABEL = "storescp --ignore"


@contextmanager
def running_null_scp() -> Iterator[Target]:
    """dcmtk's ``storescp --ignore``: it receives every object over the same
    associations and writes nothing.  Its row is the rate that the senders and
    the transport alone allow on this machine, the ceiling of any archive's
    rate here, and its CPU time per instance what receiving alone costs."""
    port = orthanc.free_port()
    with tempfile.TemporaryDirectory(prefix="imag-bench-null-scp-") as folder:
        log_path = Path(folder) / "storescp.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [dcmtk("storescp"), "--ignore", "-aet", "NULLSCP", str(port)],
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            target = Target(
                NULL_LABEL, "127.0.0.1", port, "NULLSCP", None, lambda: _tail(log_path), proc.pid
            )
            deadline = time.monotonic() + 30
            while not echo(target.host, target.port, target.aet):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"storescp did not answer C-ECHO:\n{_tail(log_path)}")
                time.sleep(0.2)
            yield target
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- C-STORE


@dataclass
class StoreResult:
    label: str
    associations: int
    wall: float
    expected: int
    stored: int | None = None
    errors: list[str] = field(default_factory=list)
    cpu: float | None = None  #: server CPU seconds during the push
    peak_rss: float | None = None  #: MiB, peak RSS of the server (+ listeners) during the push

    @property
    def cpu_ms_per_instance(self) -> float | None:
        return None if self.cpu is None else 1000 * self.cpu / self.expected

    @property
    def ok(self) -> bool:
        return not self.errors


def split_files(files: list[Path], parts: int, folder: Path) -> list[Path]:
    """``parts`` folders of hard links (contiguous, near-equal groups)."""
    if parts == 1:
        return [files[0].parent]
    groups = []
    size = math.ceil(len(files) / parts)
    for i in range(parts):
        group = folder / f"g{i}"
        group.mkdir(parents=True)
        for path in files[i * size : (i + 1) * size]:
            os.link(path, group / path.name)
        groups.append(group)
    return groups


def storescu(
    target: Target, folders: list[Path], logs: Path, options: tuple[str, ...] = ()
) -> tuple[float, list[str]]:
    """Concurrent `storescu +sd` processes, one per folder: wall time and problems seen."""
    env = os.environ | {"TCP_NODELAY": "1"}
    procs: list[tuple[subprocess.Popen, Path]] = []
    logs.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    try:
        started = time.perf_counter()
        for i, folder in enumerate(folders):
            log_path = logs / f"storescu-{i}.log"
            with open(log_path, "w") as out:
                cmd = [dcmtk("storescu"), "-aec", target.aet, "-aet", CALLING_AET, "+sd", *options]
                cmd += target.tls
                cmd += [target.host, str(target.port), str(folder)]
                procs.append(
                    (
                        subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT),
                        log_path,
                    )
                )
        for proc, _ in procs:
            proc.wait()
        wall = time.perf_counter() - started
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, (proc, log_path) in enumerate(procs):
        lines = [ln for ln in _tail(log_path, 100_000).splitlines() if ln.strip()]
        bad = [ln for ln in lines if ln.startswith(("E:", "F:", "W:"))]
        if proc.returncode != 0 or bad:
            shown = "\n      ".join((bad or lines)[-8:])
            problems.append(
                f"storescu #{i} exit code {proc.returncode}, {len(bad)} error/warning lines:"
                f"\n      {shown}"
            )
    return wall, problems


def measure_store(
    target: Target,
    folders: list[Path],
    expected: int,
    logs: Path,
    before: int = 0,
    options: tuple[str, ...] = (),
) -> StoreResult:
    n = len(folders)
    progress(f"  {target.label}: C-STORE {expected} files over {n} association(s) ...")
    cpu_before = cpu_seconds(target.pid) if target.pid else None
    if target.pid:
        reset_peak_rss(target.pid)
    wall, problems = storescu(target, folders, logs, options)
    cpu_after = cpu_seconds(target.pid) if target.pid else None
    result = StoreResult(target.label, n, wall, expected, errors=problems)
    result.peak_rss = memory_mib(target.pid) if target.pid else None
    if cpu_before is not None and cpu_after is not None:
        result.cpu = cpu_after - cpu_before
    try:
        if target.instances is not None:  # the null SCP keeps nothing to count
            result.stored = target.instances() - before
    except Exception as exc:  # noqa: BLE001 - reported with the figures
        result.errors.append(f"cannot read the instance count: {exc}")
    if result.stored is not None and result.stored != expected:
        result.errors.append(f"archive holds {result.stored} new instances, expected {expected}")
    if result.errors:
        result.errors.append("server log tail:\n" + _indent(target.log_tail()))
        progress(f"  {target.label}: PROBLEM\n    " + "\n    ".join(result.errors))
    else:
        cpu = result.cpu_ms_per_instance
        progress(
            f"  {target.label}: {wall:.2f} s, {expected / wall:.1f} inst/s"
            + (f", {cpu:.2f} ms CPU/inst" if cpu is not None else "")
            + (f", peak RSS {result.peak_rss:.0f} MiB" if result.peak_rss is not None else "")
        )
    return result


def _decode(output: bytes, chars: int = 500) -> str:
    return output.decode("utf-8", "replace")[-chars:]


def _indent(text: str) -> str:
    return "\n".join("      | " + ln for ln in text.rstrip().splitlines()[-40:])


def generate_extras(tmp: Path, studies: int) -> list:
    """``generate_mixed_set`` studies (small images, several modalities, accented
    names), rewritten in explicit VR little endian into ``tmp/extra``: storescu
    proposes one compressed syntax at a time, and C-FIND does not care."""
    specs = generate_mixed_set(tmp / "mixed", studies=studies, seed=EXTRA_SEED)
    shutil.rmtree(tmp / "mixed")
    for spec in specs:
        for series in spec.series:
            series.transfer_syntax = ExplicitVRLittleEndian
        write_study(spec, tmp / "extra", seed=EXTRA_SEED)
    return specs


# --------------------------------------------------------------------------- C-FIND


@dataclass
class Query:
    key: str
    title: str
    identifier: Dataset
    expected: int


@dataclass
class FindResult:
    label: str
    query: str
    matches: int
    times: list[float]
    findscu: list[float]
    error: str = ""
    #: repetitions that did not find what the warm-up found (timed all the same)
    unstable: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def p95(self) -> float:
        ordered = sorted(self.times)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


_STUDY_RETURN = dict(
    StudyInstanceUID="",
    StudyDate="",
    StudyTime="",
    AccessionNumber="",
    StudyDescription="",
    ModalitiesInStudy="",
    NumberOfStudyRelatedSeries="",
    NumberOfStudyRelatedInstances="",
)


def build_queries(count: int, extra_specs: list) -> list[Query]:
    ct = ct_benchmark_study(count, seed=CT_SEED)
    study_uid, series_uid = ct.study_uid, ct.series[0].series_uid
    patient_id = "IMAG0001"
    by_pid = sum(1 for s in extra_specs if s.patient_id == patient_id)
    name_prefix, date_from, date_to = "DUP", "20240301", "20240630"
    by_name = sum(
        1
        for s in extra_specs
        if s.patient_name.upper().startswith(name_prefix) and date_from <= s.study_date <= date_to
    )
    return [
        Query(
            "a",
            f"STUDY PatientID={patient_id}",
            _identifier(
                "STUDY", PatientID=patient_id, PatientName="", PatientBirthDate="", **_STUDY_RETURN
            ),
            by_pid,
        ),
        Query(
            "b",
            f"STUDY PatientName={name_prefix}* StudyDate={date_from}-{date_to}",
            _identifier(
                "STUDY",
                PatientName=f"{name_prefix}*",
                PatientID="",
                **(_STUDY_RETURN | {"StudyDate": f"{date_from}-{date_to}"}),
            ),
            by_name,
        ),
        Query(
            "c",
            "SERIES StudyInstanceUID=<CT study>",
            _identifier(
                "SERIES",
                StudyInstanceUID=study_uid,
                SeriesInstanceUID="",
                Modality="",
                SeriesNumber="",
                SeriesDescription="",
                NumberOfSeriesRelatedInstances="",
            ),
            1,
        ),
        Query(
            "d",
            f"IMAGE all of the CT series ({count})",
            _identifier(
                "IMAGE",
                StudyInstanceUID=study_uid,
                SeriesInstanceUID=series_uid,
                SOPInstanceUID="",
                SOPClassUID="",
                InstanceNumber="",
            ),
            count,
        ),
    ]


def nodelay(event: evt.Event) -> None:
    """TCP_NODELAY on an SCU's socket (EVT_CONN_OPEN): without it the small
    PDUs of a request wait for the peer's delayed ACK (~40 ms each)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _find(assoc, identifier: Dataset) -> int:
    matches = 0
    for status, _ in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        if not status:
            raise BenchError("C-FIND: no response (timeout, abort or association lost)")
        code = int(status.Status)
        if code in (0xFF00, 0xFF01):
            matches += 1
        elif code != 0x0000:
            raise BenchError(f"C-FIND status 0x{code:04X} {status.get('ErrorComment', '')}")
    return matches


def _findscu_args(target: Target, identifier: Dataset) -> list[str]:
    cmd = [dcmtk("findscu"), "-S", "-aec", target.aet, "-aet", CALLING_AET]
    for elem in identifier:
        value = str(elem.value) if elem.value not in (None, "") else ""
        cmd += ["-k", f"{elem.keyword}={value}" if value else elem.keyword]
    return [*cmd, target.host, str(target.port)]


class _Stolen(logging.Handler):
    """Counts pynetdicom's "Received unexpected C-FIND service message": the
    SCU's reactor thread took a response off the queue before the thread that
    sent the request got it, and dropped it.  Its pause handshake with
    ``send_c_*`` leaves a window (the reactor passes its checkpoint, the
    sender sees it paused and sends, the reactor then reads the queue:
    ``association.py`` ``_run_reactor``; pynetdicom issue 875), so now and
    then a pending match, or the one response of a C-ECHO, never reaches
    the caller.  ``main`` closes that race (:mod:`archive.scu`), so this
    should stay 0; a count mismatch is then the server's, not the client's,
    and this tells the two apart should the race come back."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Received unexpected"):
            self.count += 1


def measure_find(
    target: Target, queries: list[Query], repeats: int, findscu_repeats: int
) -> list[FindResult]:
    progress(f"  {target.label}: C-FIND, {repeats} queries of each kind on one association ...")
    ae = AE(ae_title=CALLING_AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = 30
    ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate(
        target.host, target.port, ae_title=target.aet, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)]
    )
    if not assoc.is_established:
        raise BenchError(f"{target.label}: C-FIND association not established")
    results = []
    try:
        for q in queries:
            result = FindResult(target.label, q.key, 0, [], [])
            stolen = _Stolen()
            logging.getLogger("pynetdicom").addHandler(stolen)
            try:
                result.matches = _find(assoc, q.identifier)  # warm-up, not timed
                other: list[int] = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    matches = _find(assoc, q.identifier)
                    result.times.append(time.perf_counter() - started)
                    if matches != result.matches:
                        other.append(matches)
                if other:
                    # timed all the same; an error for IMAG, a note for Orthanc
                    result.unstable = (
                        f"{len(other)} of {repeats} repetitions had another number of matches "
                        f"than the warm-up's {result.matches} ({sorted(set(other))})"
                    )
                    if target.find_audit is not None:
                        # whether the server's search found the other count, or
                        # the answer was lost on its way: its audit entries say
                        counted = target.find_audit()[-(repeats + 1) :]
                        tally = sorted(Counter(counted).items(), key=lambda kv: str(kv[0]))
                        result.unstable += (
                            f"; the server's audit entries of these {len(counted)} requests "
                            f"record (results, times) {tally}"
                        )
                    result.unstable += (
                        f"; the pynetdicom client dropped {stolen.count} response(s) as "
                        "'Received unexpected C-FIND service message' (its reactor race)"
                    )
            except BenchError as exc:
                result.error = str(exc)
            finally:
                logging.getLogger("pynetdicom").removeHandler(stolen)
            if not result.error and result.matches != q.expected:
                result.error = f"{result.matches} matches, expected {q.expected}"
            results.append(result)
            if not assoc.is_established:
                for rest in queries[len(results) :]:
                    results.append(FindResult(target.label, rest.key, 0, [], [], "not run"))
                result.error += " (association lost during this query)"
                break
    except BaseException:
        if assoc.is_established:
            assoc.abort()  # do not wait for a release in the middle of a response stream
        raise
    else:
        if assoc.is_established:
            assoc.release()
    finally:
        ae.shutdown()
    env = os.environ | {"TCP_NODELAY": "1"}
    for q, result in zip(queries, results, strict=True):
        cmd = _findscu_args(target, q.identifier)
        for _ in range(findscu_repeats):
            started = time.perf_counter()
            run = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
            result.findscu.append(time.perf_counter() - started)
            if run.returncode != 0 and not result.error:
                result.error = f"findscu exit code {run.returncode}: {_decode(run.stderr)}"
        if result.error:
            progress(f"  {target.label} query ({q.key}): PROBLEM {result.error}")
        if result.unstable:
            progress(f"  {target.label} query ({q.key}): UNSTABLE {result.unstable}")
    return results


# --------------------------------------------------------------------------- one archive


def bench_archive(
    start,  # () -> context manager yielding a Target
    label: str,
    splits: dict[int, list[Path]],
    count: int,
    extras: Path,
    extra_count: int,
    queries: list[Query],
    args: argparse.Namespace,
    logs: Path,
) -> tuple[list[StoreResult], list[FindResult], list[str]]:
    stores: list[StoreResult] = []
    finds: list[FindResult] = []
    notes: list[str] = []
    last = max(splits)
    for n in sorted(splits):
        progress(f"{label}, {n} association(s): fresh archive")
        try:
            with start() as target:
                stores.append(measure_store(target, splits[n], count, logs / f"{label}-{n}"))
                if n != last or args.no_find or target.instances is None:
                    continue  # the null SCP keeps nothing to query
                progress(f"  {target.label}: storing {extra_count} extra small instances ...")
                # -R: propose only the SOP classes of the files (more than 128 otherwise)
                extra = measure_store(
                    target, [extras], extra_count, logs / f"{label}-x", count, options=("-R",)
                )
                if not extra.ok:
                    notes.append(f"{label}: extra studies: " + "\n    ".join(extra.errors))
                finds = measure_find(target, queries, args.find_repeats, args.findscu_repeats)
                if any(r.error for r in finds):
                    notes.append(f"{label}: C-FIND server log tail:\n" + _indent(target.log_tail()))
        except BenchError as exc:
            progress(f"  {label}, {n} association(s): PROBLEM {exc}")
            notes.append(f"{label}, {n} association(s): {exc}")
    return stores, finds, notes


# --------------------------------------------------------------------------- report


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def report(
    header: list[str],
    stores: list[StoreResult],
    finds: list[FindResult],
    queries: list[Query],
    total_mb: float,
    count: int,
    args: argparse.Namespace,
    notes: list[str],
) -> None:
    for line in header:
        print(line)
    orth_store = {r.associations: r for r in stores if r.label == "Orthanc" and r.ok}
    print()
    print(
        f"C-STORE ingest of {count} CT slices ({total_mb:.1f} MB), dcmtk storescu, "
        "TCP_NODELAY=1, fresh archive each row"
    )
    print("vs Orthanc = IMAG / Orthanc throughput at the same association count (>1: IMAG faster)")
    print(
        f"{NULL_LABEL} = dcmtk's storescp receiving and keeping nothing: what the senders and "
        "the transport alone allow here (no archive can go faster)"
    )
    print("CPU ms/inst = the server process's user + system CPU time during the push / instances")
    print(
        "peak RSS = the server's peak resident memory during the push, MiB (VmHWM reset "
        "before it; listener processes added)"
    )
    print(
        f"{'archive':26} {'assoc':>5} {'wall s':>8} {'inst/s':>8} {'MB/s':>8} {'vs Orthanc':>10} "
        f"{'CPU ms/inst':>11} {'peak RSS':>8}"
    )
    for r in stores:
        if not r.ok:
            print(f"{r.label:26} {r.associations:5} {r.wall:8.2f} {'FAILED (see notes)':>28}")
            continue
        ref = orth_store.get(r.associations)
        ratio = ref.wall / r.wall if ref and r.label != "Orthanc" else None
        cpu = r.cpu_ms_per_instance
        print(
            f"{r.label:26} {r.associations:5} {r.wall:8.2f} {count / r.wall:8.1f} "
            f"{total_mb / r.wall:8.1f} {_ratio(ratio):>10} "
            f"{(f'{cpu:.2f}' if cpu is not None else '-'):>11} "
            f"{(f'{r.peak_rss:.0f}' if r.peak_rss is not None else '-'):>8}"
        )
    if finds:
        print()
        print(
            f"C-FIND latency (study root), ms: median and p95 of {args.find_repeats} queries "
            "on one reused pynetdicom association (after 1 untimed warm-up);"
        )
        print(
            f"findscu = wall time of one `findscu` process (association included), "
            f"median of {args.findscu_repeats}"
        )
        print("vs Orthanc = Orthanc / IMAG latency (>1: IMAG faster), for median and p95")
        orth_find = {r.query: r for r in finds if r.label == "Orthanc" and not r.error}
        print(
            f"{'query':4} {'archive':26} {'matches':>7} {'median':>8} {'p95':>8} {'findscu':>8} "
            f"{'vs Orthanc med':>14} {'p95':>7}"
        )
        for q in queries:
            print(f"({q.key}) {q.title}")
            for r in (r for r in finds if r.query == q.key):
                if r.error or not r.times:
                    print(f"{'':4} {r.label:26} {'FAILED: ' + r.error[:70]}")
                    continue
                ref = orth_find.get(q.key)
                rmed = ref.median / r.median if ref and r.label != "Orthanc" else None
                rp95 = ref.p95 / r.p95 if ref and r.label != "Orthanc" else None
                fs = statistics.median(r.findscu) * 1000 if r.findscu else float("nan")
                print(
                    f"{'':4} {r.label:26} {r.matches:7} {r.median * 1000:8.2f} "
                    f"{r.p95 * 1000:8.2f} {fs:8.1f} {_ratio(rmed):>14} {_ratio(rp95):>7}"
                )
    problems: list[str] = []
    for r in stores:
        if not r.ok:
            problems += [f"{r.label}, {r.associations} association(s):", *r.errors]
    problems += notes
    problems += [f"{r.label} query ({r.query}): {r.error}" for r in finds if r.error]
    # the reference archive answering inconsistently is reported, not a failure of the run
    problems += [
        f"{r.label} query ({r.query}): {r.unstable}"
        for r in finds
        if r.unstable and r.label != "Orthanc"
    ]
    quirks = [f"{r.label} query ({r.query}): {r.unstable}" for r in finds if r.unstable]
    quirks = [q for q in quirks if q.startswith("Orthanc")]
    if quirks:
        print()
        print("NOTES (the reference archive; not counted as a failure)")
        for line in quirks:
            print("  " + line)
    if problems:
        print()
        print("PROBLEMS")
        for line in problems:
            print("  " + line)


# --------------------------------------------------------------------------- main


def _env_pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("IMAG_"):
            raise SystemExit(f"--imag-env wants IMAG_NAME=VALUE, not {item!r}")
        out[key] = value
    return out


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def postgres_answers() -> bool:
    try:
        with psycopg.connect(PG_URL, autocommit=True, connect_timeout=3):
            return True
    except psycopg.OperationalError as exc:
        progress(f"PostgreSQL at {PG_URL} does not answer, skipped: {str(exc).strip()}")
        return False


def main() -> int:
    close_reactor_race()  # the pynetdicom SCUs timing C-FIND: archive/scu.py
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="CT slices (default 1000)")
    parser.add_argument(
        "--backends", default="sqlite,postgresql", help="IMAG index backends (sqlite,postgresql)"
    )
    parser.add_argument("--associations", default="1,4", help="parallel associations (1,4)")
    parser.add_argument("--no-orthanc", action="store_true", help="skip Orthanc")
    parser.add_argument(
        "--receive",
        default="lean,pynetdicom",
        help="IMAG C-STORE receive paths, dicom.lean_store on/off (lean,pynetdicom)",
    )
    parser.add_argument("--no-find", action="store_true", help="C-STORE only (no C-FIND part)")
    parser.add_argument(
        "--no-null-scp",
        action="store_true",
        help="leave out the reference row of dcmtk's storescp --ignore (receives, keeps nothing)",
    )
    parser.add_argument(
        "--tls", action="store_true", help="C-STORE over mutual TLS (implies --no-find)"
    )
    parser.add_argument("--find-repeats", type=int, default=50, help="C-FIND queries per kind")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every archive this many times, alternating, and summarise (a shared "
        "machine drifts: ratios are taken within each round)",
    )
    parser.add_argument("--findscu-repeats", type=int, default=5, help="one-shot findscu runs")
    parser.add_argument(
        "--extra-studies", type=int, default=300, help="small extra studies for C-FIND (300)"
    )
    parser.add_argument(
        "--imag-env",
        action="append",
        default=shlex.split(os.environ.get("IMAG_BENCH_IMAG_ENV", "")),
        metavar="IMAG_X=V",
        help="extra IMAG setting for every IMAG started (repeatable; also IMAG_BENCH_IMAG_ENV)",
    )
    args = parser.parse_args()
    args.no_find = args.no_find or args.tls
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := set(backends) - set(BACKEND_LABEL):
        parser.error(f"unknown backend(s) {sorted(unknown)}; known: sqlite, postgresql")
    receive = [r.strip() for r in args.receive.split(",") if r.strip()]
    if not receive or set(receive) - set(RECEIVE):
        parser.error("--receive wants lean, pynetdicom or both (lean,pynetdicom)")
    args.receive = receive
    if args.rounds < 1:
        parser.error("--rounds wants a positive integer")
    associations = sorted({int(n) for n in args.associations.split(",") if n.strip()})
    if not associations or min(associations) < 1:
        parser.error("--associations wants positive integers, e.g. 1,4")
    extra_env = _env_pairs(args.imag_env)
    for tool in ("storescu", "storescp", "findscu", "echoscu"):
        if not have_dcmtk(tool):
            raise SystemExit(f"dcmtk's {tool} not found: apt-get install dcmtk")

    # Ctrl-C and SIGTERM unwind through every cleanup (also when started in the
    # background, where SIGINT would otherwise be ignored)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    # dcmtk (storescu, findscu, echoscu, and Orthanc's DICOM server) disables Nagle with it
    os.environ["TCP_NODELAY"] = "1"
    run_started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="imag-bench-dimse-") as tmp:
            return _run(Path(tmp), args, backends, associations, extra_env, run_started)
    except KeyboardInterrupt:
        progress("interrupted: servers stopped, temporary data removed")
        return 130


def _run(
    tmp: Path,
    args: argparse.Namespace,
    backends: list[str],
    associations: list[int],
    extra_env: dict[str, str],
    run_started: float,
) -> int:
    if "postgresql" in backends and not postgres_answers():
        backends = [b for b in backends if b != "postgresql"]
    use_orthanc = not args.no_orthanc
    if use_orthanc and not orthanc.available():
        progress("Orthanc not installed (apt-get install orthanc): no comparison")
        use_orthanc = False

    progress(f"generating {args.count} CT slices 512x512 16-bit ...")
    files = generate_ct_series(tmp / "ct", args.count, seed=CT_SEED)
    total_mb = sum(f.stat().st_size for f in files) / 1e6
    progress(f"generating {args.extra_studies} small extra studies ...")
    specs = generate_extras(tmp, args.extra_studies)
    extra_files = list((tmp / "extra").iterdir())
    extra_mb = sum(f.stat().st_size for f in extra_files) / 1e6
    splits = {n: split_files(files, n, tmp / f"split{n}") for n in associations}
    queries = build_queries(args.count, specs)
    tls = make_tls(tmp / "pki") if args.tls else None

    header = [
        f"# bench_dimse: {args.count} CT slices 512x512 16-bit explicit VR LE, {total_mb:.1f} MB; "
        f"{os.cpu_count()} CPUs; associations {','.join(map(str, associations))}; "
        f"load average at start {os.getloadavg()[0]:.2f}",
        f"# C-FIND archive content: the CT series + {len(specs)} small studies "
        f"({len(extra_files)} instances, {extra_mb:.1f} MB, mixed modalities, explicit VR LE)",
        "# IMAG extra env: " + (" ".join(f"{k}={v}" for k, v in extra_env.items()) or "(none)"),
        "# transport: " + ("mutual TLS (storescu +tls, RSA 2048)" if tls else "plain TCP"),
    ]
    if use_orthanc:
        version = subprocess.run(["Orthanc", "--version"], capture_output=True, text=True)
        header.append(f"# Orthanc: {version.stdout.splitlines()[0] if version.stdout else '?'}")
    rounds: list[tuple[list[StoreResult], list[FindResult]]] = []
    notes: list[str] = []
    for number in range(1, args.rounds + 1):
        if args.rounds > 1:
            progress(f"== round {number} of {args.rounds}")
        stores: list[StoreResult] = []
        finds: list[FindResult] = []
        round_notes: list[str] = []
        logs = tmp / f"logs-{number}"
        # the null SCP first: it deletes no files that the next row's would
        # be allocated among (the others' data folders are removed after them)
        archives = [] if tls or args.no_null_scp else [(running_null_scp, NULL_LABEL)]
        archives += [
            (
                lambda b=backend, r=receive: running_imag(tmp, b, extra_env, r, tls),
                f"{BACKEND_LABEL[backend]} {receive}",
            )
            for backend in backends
            for receive in args.receive
        ]
        if use_orthanc:
            archives.append((lambda: running_orthanc(tls), "Orthanc"))
        for start, label in archives:
            s, f, n = bench_archive(
                start,
                label,
                splits,
                args.count,
                tmp / "extra",
                len(extra_files),
                queries,
                args,
                logs,
            )
            stores += s
            finds += f
            round_notes += n
        notes += round_notes
        round_header = header + ([f"# round {number} of {args.rounds}"] if args.rounds > 1 else [])
        if number > 1:
            print()
        report(round_header, stores, finds, queries, total_mb, args.count, args, round_notes)
        rounds.append((stores, finds))
    if args.rounds > 1:
        summary(rounds, queries, args.count)
    elapsed = time.perf_counter() - run_started
    print(f"\n# whole run: {elapsed:.0f} s; load average at end {os.getloadavg()[0]:.2f}")
    bad = (
        any(not r.ok for stores, _ in rounds for r in stores)
        or any(
            r.error or (r.unstable and r.label != "Orthanc") for _, finds in rounds for r in finds
        )
        or bool(notes)
    )
    return 1 if bad else 0


def _spread(values: list[float], form: str = "{:.2f}") -> str:
    """median (min-max) of ``values``; '-' when there are none."""
    if not values:
        return "-"
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{form.format(mid)} ({form.format(low)}-{form.format(high)})"


def summary(
    rounds: list[tuple[list[StoreResult], list[FindResult]]], queries: list[Query], count: int
) -> None:
    """The rounds side by side: each figure's median and range, and each ratio
    to Orthanc taken within its round (the machine's drift between rounds
    then cancels out) before its median and range are given."""
    print()
    print(
        f"SUMMARY over {len(rounds)} rounds: median (min-max); ratios to Orthanc are taken "
        "within each round, then summarised"
    )
    print(f"{'archive':26} {'assoc':>5} {'inst/s':>24} {'vs Orthanc':>24} {'CPU ms/inst':>22}")
    keys = list(dict.fromkeys((r.label, r.associations) for r in rounds[0][0]))
    for label, n in keys:
        rates, ratios, cpus = [], [], []
        for stores, _ in rounds:
            mine = next((r for r in stores if (r.label, r.associations) == (label, n)), None)
            ref = next((r for r in stores if (r.label, r.associations) == ("Orthanc", n)), None)
            if mine is None or not mine.ok:
                continue
            rates.append(count / mine.wall)
            if mine.cpu_ms_per_instance is not None:
                cpus.append(mine.cpu_ms_per_instance)
            if ref is not None and ref.ok and label != "Orthanc":
                ratios.append(ref.wall / mine.wall)
        print(
            f"{label:26} {n:5} {_spread(rates, '{:.1f}'):>24} {_spread(ratios):>24} "
            f"{_spread(cpus):>22}"
        )
    if not any(finds for _, finds in rounds):
        return
    print(f"{'C-FIND':31} {'median ms':>24} {'vs Orthanc':>24}")
    for q in queries:
        print(f"({q.key}) {q.title}")
        labels = list(dict.fromkeys(r.label for r in rounds[0][1] if r.query == q.key))
        for label in labels:
            medians, ratios = [], []
            for _, finds in rounds:
                mine = next((r for r in finds if (r.label, r.query) == (label, q.key)), None)
                ref = next((r for r in finds if (r.label, r.query) == ("Orthanc", q.key)), None)
                if mine is None or mine.error or not mine.times:
                    continue
                medians.append(mine.median * 1000)
                if ref is not None and not ref.error and ref.times and label != "Orthanc":
                    ratios.append(ref.median / mine.median)
            print(f"{'':4} {label:26} {_spread(medians):>24} {_spread(ratios):>24}")


if __name__ == "__main__":
    sys.exit(main())
