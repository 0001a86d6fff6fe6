"""One configuration for the cluster: a node configured differently from the
running ones refuses to start, naming the setting; a whole-cluster change (or a
single node's) is taken; ``imag config publish`` makes a rolling change.

The adversary is the operator's own slip: a peer added to one node's file only,
which would let that node accept a modality the others refuse.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from archive import cluster
from archive.app.worker import run_worker_process
from archive.cli import main
from archive.clock import FakeClock
from archive.config import Config, load_config
from archive.index import Database, open_database, upgrade
from tests.httpserver import HttpImag

PEER_A = {"aet": "CT1", "host": "10.0.0.1", "port": 104, "site": "A"}
PEER_B = {"aet": "MR1", "host": "10.0.0.2", "port": 104, "site": "A"}


def node_config(name: str, peers: list[dict], **settings: str) -> Config:
    env = {"IMAG_NODE_NAME": name, "IMAG_DICOM_PEERS": json.dumps(peers), **settings}
    return load_config(env=env, overrides={"storage.url": "file:///srv/imag/objects"})


@pytest.fixture
def db(index_url: str) -> Iterator[Database]:
    database = open_database(index_url, clock=FakeClock())
    upgrade(database)
    yield database
    database.close()


def test_nodes_with_the_same_settings_join(db: Database) -> None:
    assert cluster.join(db, node_config("n1", [PEER_A])) == []
    assert cluster.join(db, node_config("n2", [PEER_A])) == []
    # node-local settings (ports, log format) may differ freely
    assert cluster.join(db, node_config("n3", [PEER_A], IMAG_HTTP_PORT="9999")) == []
    assert {n.name for n in cluster.nodes(db) if n.live(db.clock.now())} == {"n1", "n2", "n3"}


def test_a_node_deliberately_run_differently_starts_with_a_warning(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    cluster.join(db, node_config("n1", [PEER_A]))
    before = cluster.published(db)
    odd = node_config("n2", [PEER_A, PEER_B], IMAG_CLUSTER_CHECK="warn")
    assert cluster.join(db, odd) == []
    assert "dicom.peers differ" in caplog.text and "cluster.check = warn" in caplog.text
    assert cluster.published(db) == before  # it does not impose its settings


def test_a_node_with_another_peer_list_refuses_while_others_run(db: Database) -> None:
    cluster.join(db, node_config("n1", [PEER_A]))
    before = cluster.published(db)
    with pytest.raises(cluster.ClusterConfigError, match="dicom.peers") as refused:
        cluster.join(db, node_config("n2", [PEER_A, PEER_B]))
    assert "n1" in str(refused.value) and "imag config publish" in str(refused.value)
    assert cluster.published(db) == before  # the cluster's view is unchanged
    assert "n2" not in {n.name for n in cluster.nodes(db)}


def test_when_no_other_node_runs_a_new_configuration_is_taken(db: Database) -> None:
    cluster.join(db, node_config("n1", [PEER_A]))
    cluster.join(db, node_config("n2", [PEER_A]))
    cluster.leave(db, "n1")  # stopped cleanly
    db.clock.advance(cluster.LIVE_SECONDS + 1)  # n2 was killed: its heartbeat ages
    changed = cluster.join(db, node_config("n1", [PEER_A, PEER_B]))
    assert changed == ["dicom.peers"]
    published = json.loads(cluster.published(db)["dicom.peers"][1])
    assert [p["aet"] for p in published] == ["CT1", "MR1"]


def test_a_restarted_node_is_not_held_back_by_its_own_row(db: Database) -> None:
    cluster.join(db, node_config("n1", [PEER_A]))  # then kill -9: no leave()
    assert cluster.join(db, node_config("n1", [PEER_B])) == ["dicom.peers"]


def test_a_heartbeat_keeps_a_node_live(db: Database) -> None:
    cluster.join(db, node_config("n1", [PEER_A]))
    for _ in range(5):
        db.clock.advance(cluster.HEARTBEAT_SECONDS)
        cluster.heartbeat(db, "n1")
    with pytest.raises(cluster.ClusterConfigError):
        cluster.join(db, node_config("n2", [PEER_B]))
    db.clock.advance(cluster.LIVE_SECONDS)
    assert cluster.join(db, node_config("n2", [PEER_B])) == ["dicom.peers"]


def test_publish_makes_a_rolling_change(db: Database) -> None:
    cluster.join(db, node_config("n1", [PEER_A]))
    cluster.join(db, node_config("n2", [PEER_A]))
    new = node_config("n1", [PEER_A, PEER_B])
    assert cluster.publish(db, new) == ["dicom.peers"]
    cluster.leave(db, "n1")
    assert cluster.join(db, new) == []  # n1 restarted with the new file, n2 still running
    with pytest.raises(cluster.ClusterConfigError, match="dicom.peers"):
        cluster.join(db, node_config("n3", [PEER_A]))  # the old file is now the odd one


def test_imag_config_cluster_shows_what_differs(
    db: Database, index_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.join(db, node_config("n1", [PEER_A]))
    config_file = tmp_path / "imag.toml"
    config_file.write_text(
        f'[index]\nurl = "{index_url}"\n[storage]\nurl = "file:///srv/imag/objects"\n'
        '[[dicom.peers]]\naet = "MR1"\nhost = "10.0.0.2"\nport = 104\nsite = "A"\n'
    )
    assert main(["--config", str(config_file), "config", "cluster"]) == 0
    out = capsys.readouterr().out
    assert "!= dicom.peers" in out and "MR1" in out and "CT1" in out
    assert "node n1" in out and "live" in out


@pytest.mark.postgres
def test_imag_serve_refuses_a_configuration_that_differs_from_the_running_nodes(
    tmp_path: Path, pg_url: str
) -> None:
    shared = {"IMAG_STORAGE_URL": (tmp_path / "objects").as_uri()}
    one = HttpImag(
        tmp_path / "one",
        index_url=pg_url,
        settings=shared | {"IMAG_DICOM_PEERS": json.dumps([PEER_A])},
    ).start()
    try:
        odd = HttpImag(
            tmp_path / "two",
            index_url=pg_url,
            settings=shared | {"IMAG_DICOM_PEERS": json.dumps([PEER_A, PEER_B])},
        )
        odd.workdir.mkdir(parents=True)
        with open(odd.log_path, "wb") as log:
            code = subprocess.run(
                [sys.executable, "-m", "archive.cli", "serve"],
                env=odd.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=120,
            ).returncode
        assert code == 1
        assert "dicom.peers differ from the cluster's" in odd.log(), odd.log()
        assert "Traceback" not in odd.log()
        same = HttpImag(
            tmp_path / "three",
            index_url=pg_url,
            settings=shared | {"IMAG_DICOM_PEERS": json.dumps([PEER_A])},
        ).start()
        assert same.stop() == 0
    finally:
        assert one.stop() == 0


def test_imag_worker_starts_only_with_the_clusters_settings(
    db: Database, index_url: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A worker runs the cluster's jobs (it transcodes into the store, routes
    studies) and publishes nothing: given another peer list or store than the
    nodes', it refuses to start and says which setting differs."""

    def worker(peers: list[dict], **env: str) -> int:
        config = load_config(
            env={
                "IMAG_NODE_NAME": "w1",
                "IMAG_INDEX_URL": index_url,
                "IMAG_DICOM_PEERS": json.dumps(peers),
                **env,
            },
            overrides={"storage.url": "file:///srv/imag/objects", "data_dir": str(tmp_path)},
        )
        stop = threading.Event()
        stop.set()  # checked, started, then stopped at once
        code: list[int] = []
        # not in the main thread, so that it installs no signal handlers in pytest's process
        thread = threading.Thread(target=lambda: code.append(run_worker_process(config, stop=stop)))
        thread.start()
        thread.join(60)
        return code[0]

    assert worker([PEER_A, PEER_B]) == 0  # no node ever published: nothing to disagree with
    cluster.join(db, node_config("n1", [PEER_A]))
    capsys.readouterr()
    assert worker([PEER_A, PEER_B]) == 1
    assert "dicom.peers differ from the cluster's" in capsys.readouterr().err
    assert worker([PEER_A]) == 0
    assert worker([PEER_A, PEER_B], IMAG_CLUSTER_CHECK="warn") == 0
    assert "w1" not in {n.name for n in cluster.nodes(db)}  # a worker is no node
