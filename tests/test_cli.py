"""The `imag` command as an administrator runs it: import, kill -9, re-run,
verify, repair, stats, and `imag serve` answering /health and /metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from archive.index import Catalog, open_database
from archive.synthetic import generate_ct_series
from tests.processes import free_port
from tests.s3server import S3Server, StoreUnderTest, s3_store_under_test


def imag(
    env: dict, *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [sys.executable, "-m", "archive.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and run.returncode not in (0,):
        raise AssertionError(f"imag {' '.join(args)} exited {run.returncode}:\n{run.stderr}")
    return run


@pytest.fixture
def in_process(
    env: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., subprocess.CompletedProcess]:
    """``imag ARGS`` through ``archive.cli.main`` in this process, with ``env``
    as the environment: for commands whose process is not the point."""
    from archive.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        for key in [k for k in os.environ if k.startswith("IMAG_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["imag", *args], code, out, err)

    return run


@pytest.fixture
def env(tmp_path: Path, index_url: str) -> dict:
    return {
        "PATH": os.environ["PATH"],
        "IMAG_DATA_DIR": str(tmp_path / "data"),
        "IMAG_INDEX_URL": index_url,
        "IMAG_LOG_FORMAT": "text",
        "IMAG_LOG_LEVEL": "WARNING",
    }


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ct")
    generate_ct_series(folder, 240, seed=7)
    return folder


@pytest.mark.slow
def test_import_killed_with_sigkill_then_rerun_stores_every_file_exactly_once(
    env: dict, ct_folder: Path, index_url: str
) -> None:
    files = sorted(ct_folder.iterdir())
    proc = subprocess.Popen(
        [sys.executable, "-m", "archive.cli", "import", "-q", "--workers", "2", str(ct_folder)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db = open_database(index_url)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            try:
                done = db.scalar("SELECT COUNT(*) FROM instances")
            except Exception:  # noqa: BLE001 - schema not created yet
                done = 0
            if done and done >= 20:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the importer and its workers
        proc.wait()
        db.close()
    db = open_database(index_url)
    partial = Catalog(db).counts()["instances"]
    assert 0 < partial < len(files), "the kill should land part-way through the import"

    run = imag(env, "import", "--json", "-q", str(ct_folder))
    summary = json.loads(run.stdout)
    assert summary["rejected"] == 0
    assert summary["stored"] + summary["duplicate"] == len(files)
    assert summary["duplicate"] >= partial
    assert Catalog(db).counts()["instances"] == len(files)
    assert db.scalar("SELECT COUNT(DISTINCT sop_instance_uid) FROM instances") == len(files)
    db.close()
    verified = imag(env, "verify", "--json", "-q")
    report = json.loads(verified.stdout)
    assert report["clean"] and report["ok"] == len(files)


@pytest.mark.s3_on_sqlite  # the store meets any index alike (PostgreSQL + S3: test_several_nodes)
@pytest.mark.slow
@pytest.mark.parametrize("store", ["filesystem", pytest.param("s3", marks=pytest.mark.s3)])
def test_verify_finds_missing_corrupt_and_orphaned_objects_and_repair_fixes_what_it_can(
    env: dict, ct_folder: Path, tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    """`imag verify` reads every object back through the store's own stream (a
    file, an S3 body): the damage is done through the store API so that the
    same checks hold in a folder and in a bucket."""
    under_test = StoreUnderTest("filesystem")
    if store == "s3":
        under_test = request.getfixturevalue("verify_bucket")
        env = env | under_test.settings()
    files = sorted(ct_folder.iterdir())[:5]
    for f in files:
        imag(env, "import", "-q", str(f))
    objects = under_test.open(tmp_path / "data")
    try:
        keys = sorted(k for k in objects.iter_keys() if k.endswith(".dcm"))
        assert len(keys) == 5
        objects.delete(keys[0])  # missing
        data = bytearray(objects.get(keys[1]))
        data[len(data) // 2] ^= 0xFF  # corrupt: one byte flipped
        objects.put(keys[1], bytes(data))
        orphan = keys[2].rsplit("/", 1)[0] + "/1.2.3.4.0123456789abcdef.dcm"
        objects.put(orphan, b"left behind")

        run = imag(env, "verify", "--json", "-q", check=False)
        assert run.returncode == 1
        report = json.loads(run.stdout)
        assert (len(report["missing"]), len(report["corrupt"]), len(report["orphans"])) == (1, 1, 1)
        assert report["orphans"] == [orphan]
        assert report["ok"] == 3

        imag(env, "verify", "--repair", "-q", check=False)
        assert not objects.exists(orphan)
        assert objects.exists(keys[1])  # a corrupt object is kept: it is all there is
        after = json.loads(imag(env, "verify", "--json", "-q", check=False).stdout)
        assert after["orphans"] == []
        assert len(after["missing"]) == 1  # still lost until re-sent ...

        imag(env, "import", "-q", *map(str, files))  # ... and a re-import restores it
        final = imag(env, "verify", "--json", "-q", check=False)
        assert len(json.loads(final.stdout)["missing"]) == 0
        assert objects.exists(keys[0])
    finally:
        objects.close()


@pytest.fixture
def verify_bucket(s3_server: S3Server) -> Iterator[StoreUnderTest]:
    with s3_store_under_test(s3_server) as store:
        yield store


def test_stats_json_has_the_documented_keys(env: dict, ct_folder: Path, in_process) -> None:
    imag(env, "import", "-q", "--site", "NORD", *map(str, sorted(ct_folder.iterdir())[:3]))
    stats = json.loads(in_process("stats", "--json").stdout)
    assert {k: stats[k] for k in ("patients", "studies", "series", "instances")} == {
        "patients": 1,
        "studies": 1,
        "series": 1,
        "instances": 3,
    }
    assert stats["bytes"] == sum(f.stat().st_size for f in sorted(ct_folder.iterdir())[:3])
    assert stats["by_site"]["NORD"]["instances"] == 3
    assert stats["by_modality"]["CT"]["instances"] == 3
    human = in_process("stats").stdout
    assert "instances" in human and "NORD" in human


def test_import_reports_rejections_and_exits_2(env: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not an image")
    run = imag(env, "import", str(bad), check=False)
    assert run.returncode == 2
    assert "notes.txt" in run.stderr + run.stdout and "DICM" in run.stderr + run.stdout


def test_db_upgrade_reports_the_schema_version(in_process) -> None:
    from archive.index.migrate import available

    latest = available()[-1][0]
    first = in_process("db", "upgrade")
    assert first.returncode == 0, first.stderr
    assert f"schema version {latest}" in first.stdout and "applied" in first.stdout
    assert "already current" in in_process("db", "upgrade").stdout


def test_serve_answers_health_and_prometheus_metrics(env: dict, ct_folder: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "archive.cli", "serve"],
        env=env | {"IMAG_HTTP_PORT": str(port), "IMAG_DICOM_PORT": str(free_port())},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.load(r)
                    assert health["status"] == "ok"
                    # ready: what a balancer checks, each part named
                    assert health["index"] == health["storage"] == health["dicom"] == "ok"
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"imag serve did not start: {proc.stderr.read()}"
                    ) from None
                time.sleep(0.1)
        # the first start wrote the admin token, for its owner only
        token_file = Path(env["IMAG_DATA_DIR"]) / "admin-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        bearer = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert err.value.code == 401
        metrics = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=bearer)
        with urllib.request.urlopen(metrics, timeout=5) as r:
            text = r.read().decode()
        assert "imag_ingest_seconds" in text and "imag_http_requests_total" in text
        # what the process holds from its startup is left out of garbage collections
        frozen = re.search(r"^imag_heap_frozen_objects ([0-9.e+]+)$", text, re.MULTILINE)
        assert frozen and float(frozen[1]) > 50_000, text[:2000]
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(
                urllib.request.Request(f"http://127.0.0.1:{port}/nothing-here", headers=bearer),
                timeout=5,
            )
        assert err.value.code == 404
        assert err.value.headers["Content-Type"].startswith("application/problem+json")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert proc.returncode == 0
