"""Day one with IMAG, as a new administrator lives it (issue 19): the README's
first test with dcmtk and curl run verbatim, files sent by storescu then
imported, the logs read after a session, ``--config`` wherever it is typed,
and the install scripts restarted offline.

Every DICOM peer here is dcmtk's real tool (by absolute path, tests/dcmtk.py),
every server a real ``imag serve`` process on free ports."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from archive.contentdigest import content_digest
from archive.parse import dataset_offset
from tests.dcmtk import DCMTK_BIN, have_dcmtk
from tests.dicomfiles import base_dataset, pydicom_test_folders
from tests.dicomnet import run_tool
from tests.processes import HOST, eventually, free_port
from tests.s3server import StoreUnderTest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

needs_dcmtk = pytest.mark.skipif(not have_dcmtk("storescu"), reason="dcmtk is not installed")

#: real-world files whose data set dcmtk's storescu re-encodes when it sends
#: them: trailing padding (CT_small), Implicit VR (rtplan, MR_small_implicit),
#: undefined-length sequences and items (reportsi, waveform_ecg), group
#: lengths (693_UNCR)
REENCODED_BY_STORESCU = (
    "CT_small.dcm",
    "MR_small_implicit.dcm",
    "rtplan.dcm",
    "reportsi.dcm",
    "waveform_ecg.dcm",
    "693_UNCR.dcm",
)


def dicom_folder(folder: Path) -> dict[str, Path]:
    """Copy the files of :data:`REENCODED_BY_STORESCU` found into ``folder``
    (a sub-folder too: storescu +r and imag import recurse); by SOP Instance UID."""
    (folder / "sub").mkdir(parents=True)
    found: dict[str, Path] = {}
    for name in REENCODED_BY_STORESCU:
        source = next((d / name for d in pydicom_test_folders() if (d / name).is_file()), None)
        if source is None:
            continue
        target = folder / ("sub" if len(found) % 2 else "") / name
        shutil.copyfile(source, target)
        found[str(pydicom.dcmread(target, stop_before_pixels=True).SOPInstanceUID)] = target
    assert len(found) >= 5, f"pydicom's test files are missing: {found}"
    return found


# -- an imag serve process -------------------------------------------------------------------


@dataclass
class Serve:
    """``imag serve`` in ``workdir`` (its data in ``workdir/imag-data``, the
    default data folder seen from there), JSON logs in ``log_path``."""

    workdir: Path
    proc: subprocess.Popen
    http_port: int
    dicom_port: int
    log_path: Path
    env: dict[str, str]

    def records(self) -> list[dict]:
        """The JSON log lines written so far."""
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def messages(self, message: str) -> list[dict]:
        return [r for r in self.records() if r.get("message") == message]

    def imag(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "archive.cli", *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """Start ``imag ARGS`` (default ``serve --config imag.toml``) in a work
    folder holding ``config``; stopped at the end of the test."""
    started: list[Serve] = []

    def start(config: str, *args: str, env: dict[str, str] | None = None) -> Serve:
        workdir = tmp_path / f"site{len(started)}"
        workdir.mkdir()
        (workdir / "imag.toml").write_text(config, encoding="utf-8")
        http_port, dicom_port = free_port(), free_port()
        full_env = {
            "PATH": os.environ["PATH"],
            "IMAG_HTTP_PORT": str(http_port),
            "IMAG_DICOM_PORT": str(dicom_port),
            "IMAG_LOG_FORMAT": "json",
            **(env or {}),
        }
        log_path = workdir / "serve.log"
        with open(log_path, "wb") as log:
            command = args or ("serve", "--config", "imag.toml")
            proc = subprocess.Popen(
                [sys.executable, "-m", "archive.cli", *command],
                cwd=workdir,
                env=full_env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        server = Serve(workdir, proc, http_port, dicom_port, log_path, full_env)
        started.append(server)

        def healthy() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                with urllib.request.urlopen(f"http://{HOST}:{http_port}/health", timeout=2):
                    return True
            except OSError:
                return False

        eventually(healthy, timeout=60, what="imag serve to answer /health")
        return server

    yield start
    for server in started:
        server.stop()


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def fenced(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


FIRST_TEST = "A first test with dcmtk and curl"


def dcmtk_path_env(serve: Serve) -> dict[str, str]:
    """The environment of the README's commands: dcmtk's folder first on PATH
    (never the venv's pynetdicom look-alikes), curl and the shell after it."""
    return {"PATH": f"{DCMTK_BIN}:/usr/bin:/bin", "TCP_NODELAY": "1", "HOME": str(serve.workdir)}


# -- 1. imag import after C-STORE of the same files ------------------------------------------


@pytest.mark.interop
@needs_dcmtk
def test_files_sent_by_storescu_and_then_imported_are_all_already_stored_without_warnings(
    serve: Callable[..., Serve], tmp_path: Path, store_under_test: StoreUnderTest
) -> None:
    """The issue's scenario: a folder sent by dcmtk's storescu (which drops the
    trailing padding, writes sequence lengths, recomputes group lengths and
    sends Implicit VR as Explicit VR), then ``imag import`` of the same
    folder: every file already stored, not one conflict nor warning -- in a
    folder and in an S3 bucket, the stored objects read back through the store."""
    folder = tmp_path / "dicom"
    files = dicom_folder(folder)
    peers = '[[dicom.peers]]\naet = "STORESCU"\nhost = "127.0.0.1"\nsite = "TEST"\n'
    server = serve(peers, env=store_under_test.settings())
    sent = run_tool(
        "storescu", "-v", "-aec", "IMAG", "+sd", "+r", HOST, str(server.dicom_port),
        str(folder), timeout=120,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout
    assert sent.stdout.count("Received Store Response (Success)") == len(files), sent.stdout
    stored = server.imag("stats", "--json")
    assert json.loads(stored.stdout)["instances"] == len(files), stored.stderr
    # the stored objects are not the files: storescu re-encoded their data sets
    objects = stored_objects(store_under_test, server.workdir / "imag-data")
    assert len(objects) == len(files)
    reencoded = {
        uid
        for uid, data in ((uid_of(io.BytesIO(d)), d) for d in objects.values())
        if data_set(data) != data_set(files[uid].read_bytes())
    }
    assert len(reencoded) >= 4, "storescu no longer re-encodes these files: pick others"

    imported = server.imag("import", "--json", str(folder))

    assert imported.returncode == 0, imported.stderr
    summary = json.loads(imported.stdout)
    assert (summary["files"], summary["duplicate"]) == (len(files), len(files)), summary
    assert (summary["stored"], summary["conflict_kept"], summary["replaced"]) == (0, 0, 0)
    assert "different object" not in imported.stderr, imported.stderr
    assert stored_objects(store_under_test, server.workdir / "imag-data") == objects


def stored_objects(store: StoreUnderTest, data_dir: Path) -> dict[str, bytes]:
    """Every stored DICOM object's bytes by key, read through the store itself."""
    objects = store.open(data_dir)
    try:
        return {k: objects.get(k) for k in sorted(objects.iter_keys()) if k.endswith(".dcm")}
    finally:
        objects.close()


def uid_of(path: Path | io.BytesIO) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def data_set(data: bytes) -> bytes:
    return data[dataset_offset(io.BytesIO(data)) :]


def digest_of(ds: Dataset, syntax: str = ExplicitVRLittleEndian, padding: bool = False) -> bytes:
    """The content digest of ``ds`` written in ``syntax`` (with trailing padding)."""
    ds = ds.copy()
    ds.file_meta.TransferSyntaxUID = syntax
    if padding:
        ds.add_new(0xFFFCFFFC, "OB", b"\0" * 16)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    digest = content_digest(io.BytesIO(data), dataset_offset(io.BytesIO(data)), syntax)
    assert digest is not None
    return digest


def test_the_content_digest_ignores_how_a_data_set_is_laid_out_but_not_what_it_says() -> None:
    ds = base_dataset()
    if 0xFFFCFFFC in ds:
        del ds[0xFFFCFFFC]
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.3", "1.2.3.4"
    ds.ReferencedStudySequence = Sequence([item])
    plain = digest_of(ds)
    # padding, Implicit VR, deflate, undefined lengths, a group length: the same content
    assert digest_of(ds, padding=True) == plain
    assert digest_of(ds, ImplicitVRLittleEndian) == plain
    assert digest_of(ds, DeflatedExplicitVRLittleEndian) == plain
    undefined = ds.copy()
    undefined["ReferencedStudySequence"].is_undefined_length = True
    undefined.ReferencedStudySequence[0].is_undefined_length_sequence_item = True
    assert digest_of(undefined) == plain
    grouped = ds.copy()
    grouped.add_new(0x00100000, "UL", 42)
    assert digest_of(grouped) == plain
    # what it says: one value, one pixel byte, one item more
    for edit in (
        lambda d: setattr(d, "PatientName", "OTHER^NAME"),
        lambda d: setattr(d, "PixelData", b"\1" + d.PixelData[1:]),
        lambda d: d.ReferencedStudySequence.append(Dataset()),
        lambda d: delattr(d, "StudyDescription"),
    ):
        other = ds.copy()
        edit(other)
        assert digest_of(other) != plain


def test_a_data_set_the_digest_cannot_walk_has_none_and_is_compared_by_bytes() -> None:
    """Truncated, a broken deflate stream, a non-item inside a sequence: None
    (the pipeline then compares bytes), never an exception nor a digest of
    part of it."""
    ds = base_dataset()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    start = dataset_offset(io.BytesIO(data))
    assert content_digest(io.BytesIO(data[:-10]), start, ExplicitVRLittleEndian) is None
    garbage = data[:start] + zlib.compress(b"x" * 100)[2:-8] + b"\xff" * 50
    assert content_digest(io.BytesIO(garbage), start, DeflatedExplicitVRLittleEndian) is None
    # (0008,1110) SQ of undefined length holding an element where an item belongs
    bad = b"\x08\x00\x10\x11SQ\0\0\xff\xff\xff\xff" + b"\x10\x00\x10\x00PN\x04\x00ABCD"
    assert content_digest(io.BytesIO(bad), 0, ExplicitVRLittleEndian) is None


# -- 2. the README's first test, verbatim ----------------------------------------------------


@pytest.mark.interop
@needs_dcmtk
def test_the_readme_first_test_runs_verbatim_against_a_fresh_archive(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    """The README's config block is the server's config file, as is; its
    commands run as a shell script with dcmtk's tools, only the ports, the
    folder and the study UID (the lines the README says to adapt) substituted."""
    section = readme_section(FIRST_TEST)
    [config] = fenced(section, "toml")
    [commands] = [block for block in fenced(section, "sh") if "storescu" in block]
    for aet in ("STORESCU", "FINDSCU", "GETSCU", "MOVESCU", "ECHOSCU"):
        assert f'aet = "{aet}"' in config and aet in section
    folder = tmp_path / "dicom"
    files = dicom_folder(folder)
    study = str(pydicom.dcmread(files[next(iter(files))]).StudyInstanceUID)
    in_study = [uid for uid, p in files.items() if pydicom.dcmread(p).StudyInstanceUID == study]
    move_port = free_port()
    assert "port = 11113" in config
    server = serve(config.replace("port = 11113", f"port = {move_port}"))

    script = commands
    script = re.sub(r"(?m)^DICOM_FOLDER=\S+", f"DICOM_FOLDER={folder}", script)
    script = re.sub(r"(?m)^STUDY=\S+", f"STUDY={study}", script)
    script = script.replace(" 11112", f" {server.dicom_port}")
    script = script.replace("+P 11113", f"+P {move_port}")
    script = script.replace("127.0.0.1:8080", f"127.0.0.1:{server.http_port}")
    done = subprocess.run(
        ["/bin/bash", "-euo", "pipefail", "-c", script],
        cwd=server.workdir,
        env=dcmtk_path_env(server),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )

    out = done.stdout
    assert done.returncode == 0, out
    assert "Received Echo Response (Success)" in out, out
    assert out.count("Received Store Response (Success)") == len(files), out
    assert study in out and "Received Final Find Response (Success)" in out, out
    retrieved = {uid_of(p) for p in (server.workdir / "retrieved").iterdir()}
    moved = {uid_of(p) for p in (server.workdir / "moved").iterdir()}
    assert retrieved == moved == set(in_study), out
    qido = json.loads(out.rstrip().splitlines()[-1])  # curl's answer, the last command
    assert [s["0020000D"]["Value"] for s in qido] == [[study]]


@pytest.mark.interop
@needs_dcmtk
def test_an_undeclared_calling_ae_is_refused_and_the_log_names_the_setting_to_change(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    """dcmtk's default AE title, not declared: the sender reads "Calling AE
    Title Not Recognized"; the log line names the AE, its address and the
    setting; nothing is stored."""
    folder = tmp_path / "dicom"
    dicom_folder(folder)
    server = serve('[[dicom.peers]]\naet = "FINDSCU"\nhost = "127.0.0.1"\n')

    sent = run_tool("storescu", "-aec", "IMAG", "+sd", "+r", HOST, str(server.dicom_port),
                    str(folder))  # fmt: skip

    assert sent.returncode != 0
    assert "Association Rejected" in sent.stdout, sent.stdout
    assert "Calling AE Title Not Recognized" in sent.stdout, sent.stdout
    [line] = eventually(lambda: server.messages(
        "association rejected: calling AE title 'STORESCU' is not a configured peer "
        "(add it to [[dicom.peers]] or set dicom.accept_unknown)"
    ), what="the rejection's log line")  # fmt: skip
    assert (line["level"], line["calling_aet"], line["address"]) == ("warning", "STORESCU", HOST)
    assert json.loads(server.imag("stats", "--json").stdout)["instances"] == 0
    assert server.messages("association ended") == []


# -- 6. one log line per association, one at shutdown ----------------------------------------


@pytest.mark.interop
@needs_dcmtk
def test_each_association_logs_one_line_with_what_it_did_and_the_stop_logs_one(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    folder = tmp_path / "dicom"
    files = dicom_folder(folder)
    first = files[next(iter(files))]
    study = str(pydicom.dcmread(first).StudyInstanceUID)
    in_study = sum(pydicom.dcmread(p).StudyInstanceUID == study for p in files.values())
    peers = "".join(
        f'[[dicom.peers]]\naet = "{aet}"\nhost = "127.0.0.1"\nsite = "TEST"\n\n'
        for aet in ("STORESCU", "FINDSCU", "GETSCU", "ECHOSCU")
    )
    server = serve(peers)
    port = str(server.dicom_port)
    assert run_tool("storescu", "-aec", "IMAG", "+sd", "+r", HOST, port,
                    str(folder)).returncode == 0  # fmt: skip
    found = run_tool("findscu", "-S", "-aec", "IMAG", "-k", "QueryRetrieveLevel=STUDY",
                     "-k", "StudyInstanceUID", HOST, port)  # fmt: skip
    assert found.returncode == 0, found.stdout
    (tmp_path / "got").mkdir()
    got = run_tool("getscu", "-S", "-aec", "IMAG", "-od", str(tmp_path / "got"),
                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                   HOST, port)  # fmt: skip
    assert got.returncode == 0, got.stdout
    # an association the peer aborts instead of releasing
    run_tool("echoscu", "--abort", "-aec", "IMAG", HOST, port)
    studies = len({pydicom.dcmread(p).StudyInstanceUID for p in files.values()})

    ended = eventually(lambda: (lines := server.messages("association ended"))
                       and len(lines) == 4 and lines, what="four association lines")  # fmt: skip

    by_aet = {line["calling_aet"]: line for line in ended}
    assert set(by_aet) == {"STORESCU", "FINDSCU", "GETSCU", "ECHOSCU"}
    counts = ("outcome", "stored", "store_failures", "found", "retrieved", "retrieve_failures")
    assert [tuple(by_aet[a][k] for k in counts) for a in by_aet] == [
        ("released", len(files), 0, 0, 0, 0),
        ("released", 0, 0, studies, 0, 0),
        ("released", 0, 0, 0, in_study, 0),
        ("aborted", 0, 0, 0, 0, 0),
    ]
    for line in ended:
        assert line["address"] == HOST and line["level"] == "info"
        assert 0 <= line["seconds"] < 60

    assert server.stop() == 0
    [stopped] = server.messages("imag stopped")
    assert stopped["signal"] == "SIGTERM" and stopped["uptime_seconds"] > 0
    assert server.records()[-1]["message"] == "imag stopped"  # the last word


# -- 5. --config wherever a user puts it, and IMAG_CONFIG ------------------------------------


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):  # noqa: ANN201
    """``imag ARGS`` through ``archive.cli.main`` in this process, with only
    the ``IMAG_*`` variables given."""
    from archive.cli import main

    def run(*args: str, **env: str) -> tuple[int, str, str]:
        for key in [k for k in os.environ if k.startswith("IMAG_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_config_is_read_before_or_after_the_command_and_from_imag_config(
    cli: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    config = tmp_path / "imag.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[http]\nport = 9123\n')
    other = tmp_path / "other.toml"
    other.write_text("[http]\nport = 9456\n")

    def port(*args: str, **env: str) -> int:
        code, out, err = cli(*args, **env)
        assert code == 0, err
        return json.loads(out)["http.port"]

    assert port("--config", str(config), "config", "show", "--json") == 9123
    assert port("config", "show", "--json", "--config", str(config)) == 9123
    assert port("config", "show", "-c", str(config), "--json") == 9123
    assert port("config", "show", "--json", IMAG_CONFIG=str(config)) == 9123
    # an explicit option wins over the variable, after the command as before it
    assert port("config", "show", "--json", "--config", str(other), IMAG_CONFIG=str(config)) == 9456
    assert port("--config", str(other), "config", "show", "--json", IMAG_CONFIG=str(config)) == 9456
    assert port("config", "show", "--json") == 8080
    # a nested command, as the systemd unit's ExecStartPre runs it
    code, out, err = cli("db", "upgrade", "--config", str(config))
    assert code == 0 and "schema version" in out, err
    assert (tmp_path / "data" / "index.db").is_file()


def test_every_command_plugins_included_accepts_config_after_it() -> None:
    from archive.cli import build_parser

    def commands(parser, path=()):  # noqa: ANN001, ANN202
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    yield path + (name,), sub
                    yield from commands(sub, path + (name,))

    found = list(commands(build_parser()))
    assert {("serve",), ("import",), ("db", "upgrade"), ("jobs", "list")} <= {p for p, _ in found}
    for path, sub in found:
        assert any("--config" in a.option_strings for a in sub._actions), path


def test_a_missing_config_file_named_by_imag_config_stops_with_its_name(
    cli: Callable[..., tuple[int, str, str]], tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere.toml"
    code, out, err = cli("config", "show", IMAG_CONFIG=str(missing))
    assert code == 78 and out == ""
    assert f"config file {missing} not found" in err


# -- 3. ./scripts/run restarts offline, quietly ----------------------------------------------


@pytest.fixture
def fake_checkout(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of scripts/common.sh and pyproject.toml (the scripts' ROOT), and
    a virtual environment whose python records every call and plays pip's
    part (an install succeeds and leaves bin/imag) without any network; the
    record of calls."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "common.sh", root / "scripts" / "common.sh")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "python-calls"
    python = venv / "bin" / "python"
    python.write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        echo "$*" >> {calls}
        if [ "$1 $2 $3" = "-m pip install" ]; then
            # pip itself cannot reach an index here: prove it, then act installed
            {sys.executable} -m pip download --no-deps -q -d {tmp_path}/dl imag-nothing \\
                >/dev/null 2>&1 && exit 99
            touch {venv}/bin/imag && chmod +x {venv}/bin/imag
            exit 0
        fi
        exec {sys.executable} "$@"
        """)
    )
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return root, venv, calls


def make_venv(root: Path, venv: Path, extras: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/bin/bash", "-c", f'source "{root}/scripts/common.sh" && make_venv "{extras}"'],
        env={
            "PATH": os.environ["PATH"],
            "IMAG_VENV": str(venv),
            "PIP_INDEX_URL": "http://127.0.0.1:9/",  # nothing listens: no network for pip
            "PIP_NO_INDEX": "1",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def pip_calls(calls: Path) -> list[str]:
    if not calls.exists():
        return []
    return [line for line in calls.read_text().splitlines() if line.startswith("-m pip")]


def test_the_scripts_install_once_and_then_start_without_calling_pip(
    fake_checkout: tuple[Path, Path, Path],
) -> None:
    root, venv, calls = fake_checkout
    first = make_venv(root, venv, "[test]")
    assert first.returncode == 0, first.stderr
    assert pip_calls(calls) == [
        f"-m pip install -q --disable-pip-version-check -e {root}[test]"
    ]  # no pip upgrade of an existing venv either

    for extras in ("[test]", "", "[test]"):  # ./scripts/test, ./scripts/run, again
        again = make_venv(root, venv, extras)
        assert again.returncode == 0, again.stderr
        assert (again.stdout, again.stderr) == ("", "")  # quiet
    assert len(pip_calls(calls)) == 1

    # a changed pyproject.toml (new dependencies) is installed, once
    with open(root / "pyproject.toml", "a") as fh:
        fh.write("\n# a new dependency\n")
    assert make_venv(root, venv, "").returncode == 0
    assert make_venv(root, venv, "").returncode == 0
    assert pip_calls(calls)[1:] == [f"-m pip install -q --disable-pip-version-check -e {root}"]
    # installed without the test extras: ./scripts/test installs them
    assert make_venv(root, venv, "[test]").returncode == 0
    assert len(pip_calls(calls)) == 3


def test_a_venv_whose_install_failed_is_installed_again(
    fake_checkout: tuple[Path, Path, Path],
) -> None:
    """No stamp without a finished install: an interrupted first run (pip
    failed, no network) is not taken for an installed one."""
    root, venv, calls = fake_checkout
    python = venv / "bin" / "python"
    python.write_text(python.read_text().replace("touch ", "exit 1; touch "))
    assert make_venv(root, venv, "").returncode != 0
    assert not (venv / ".imag-installed").exists()
    python.write_text(python.read_text().replace("exit 1; touch ", "touch "))
    assert make_venv(root, venv, "").returncode == 0
    assert make_venv(root, venv, "").returncode == 0
    assert len(pip_calls(calls)) == 2


def test_the_package_metadata_builds_without_a_deprecation_warning(tmp_path: Path) -> None:
    """setuptools deprecates ``project.license`` as a TOML table: the licence is
    an SPDX expression, and building the metadata warns of nothing."""
    build = subprocess.run(
        [sys.executable, "-W", "error", "-c",
         "import sys, setuptools.build_meta as b; "
         "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    metadata = (tmp_path / build.stdout.split()[-1] / "METADATA").read_text()
    assert "License-Expression: LicenseRef-Proprietary" in metadata


# -- 4. what the README uses is installed; interop skips fail under CI ----------------------


def test_the_tools_the_readme_uses_are_installed_by_the_scripts() -> None:
    readme = README.read_text(encoding="utf-8")
    run_script = (ROOT / "scripts" / "run").read_text()
    test_script = (ROOT / "scripts" / "test").read_text()
    installs = {
        name: {pkg for line in re.findall(r"(?m)^\s*apt_install (.*)$", text)
               for pkg in line.split("#")[0].split()}
        for name, text in (("run", run_script), ("test", test_script))
    }  # fmt: skip
    assert "curl " in readme and "curl" in installs["run"] and "curl" in installs["test"]
    assert "dcmtk" in installs["test"]
    assert {"orthanc", "orthanc-dicomweb", "orthanc-gdcm"} <= installs["test"]
    # Debian's orthanc service (4242/8042) is stopped right after its install
    assert re.search(r"apt_install orthanc .*\n\s*stop_service orthanc", test_script)


INTEROP_PROBE = """
import pytest

@pytest.mark.interop
def test_marked():
    pytest.skip("Orthanc is not installed")

def test_unmarked():
    pytest.skip("not an interoperability test")

@pytest.mark.interop
def test_marked_passes():
    pass
"""


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_skipped_interoperability_test_fails_under_ci(tmp_path: Path, ci: str) -> None:
    (tmp_path / "test_probe.py").write_text(INTEROP_PROBE)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.interop", "-p", "no:cacheprovider",
         "-p", "no:xdist", "-q", "-rA", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=ROOT, env={**os.environ, "CI": ci, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = run.stdout
    if ci:
        assert run.returncode == 1, out
        assert "1 failed, 1 passed, 1 skipped" in out, out
        assert re.search(r"FAILED \S*test_probe\.py::test_marked\b", out), out
        assert "interoperability test skipped under CI=true: Orthanc is not installed" in out
    else:
        assert run.returncode == 0, out
        assert "1 passed, 2 skipped" in out, out


def test_interoperability_tests_are_marked() -> None:
    """The Orthanc interoperability test carries the marker that makes its
    skip a failure on CI."""
    source = (ROOT / "tests" / "test_dicomweb.py").read_text()
    assert re.search(r"@pytest\.mark\.interop[^\n]*\ndef test_orthanc_lists_and_retrieves", source)
