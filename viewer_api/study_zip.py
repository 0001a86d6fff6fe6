"""A study as a ZIP for people who download it: DICOM files with a DICOMDIR,
and JPEGs (and the report as a PDF or text) for those without a DICOM viewer.

The DICOMDIR is made by pydicom's :class:`~pydicom.fileset.FileSet`, which
needs the files on disk: the study's objects are copied from the store into
a temporary directory, the file-set is written there, and the directory is
removed when the ZIP is done (or abandoned).  The ZIP is written to a
:class:`Pipe` as it is built and sent as it comes (ZIP data descriptors: no
seeking back), so memory holds one rendered image and a few chunks whatever
the study's size; a slow client slows the builder down (the pipe's queue is
bounded) rather than filling memory.

Layout of the archive::

    DICOMDIR
    PT000000/ST000000/SE000000/IM000000 ...   (the DICOM files, as FileSet names them)
    JPEG/S001 CT THORAX/I0001.jpg              (first frame; all frames of a
    JPEG/S002 US/I0001-F0001.jpg                multi-frame, up to a bound)
    REPORT/report-1.pdf, REPORT/report-2.txt   (Encapsulated PDF, SR text)
    OTHER/...                                  (objects FileSet cannot index)
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import tempfile
import threading
import unicodedata
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
from pydicom.fileset import FileSet

from archive import pixels
from archive.retrieve import StoredObject, UnreadableObject, open_header
from storage import ObjectStore
from viewer_api.study_view import document_kind, sr_sections

log = logging.getLogger(__name__)

#: bytes per chunk handed to the HTTP side
CHUNK = 256 * 1024
#: chunks waiting to be sent before the builder waits for the client
QUEUE_CHUNKS = 16
COPY = 1 << 20


class Cancelled(Exception):
    """The client went away: the builder stops."""


class Pipe:
    """A write-only, unseekable file the ZIP is written into; the HTTP side
    reads :meth:`chunks` from another thread.  Writes block while the queue
    is full; :meth:`cancel` makes the next write raise :class:`Cancelled`."""

    def __init__(self) -> None:
        self.queue: queue.Queue[bytes | BaseException | None] = queue.Queue(QUEUE_CHUNKS)
        self._buffer = bytearray()
        self._cancelled = threading.Event()
        self._written = 0

    # the file interface zipfile uses on an unseekable stream
    def write(self, data: bytes) -> int:
        self._buffer += data
        self._written += len(data)
        if len(self._buffer) >= CHUNK:
            self._put(bytes(self._buffer))
            self._buffer.clear()
        return len(data)

    def tell(self) -> int:
        raise OSError("unseekable")

    def flush(self) -> None:
        pass

    def _put(self, item: bytes | BaseException | None) -> None:
        while True:
            if self._cancelled.is_set():
                raise Cancelled()
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self, error: BaseException | None = None) -> None:
        """The end of the stream (or the builder's error)."""
        if self._buffer and error is None:
            self._put(bytes(self._buffer))
            self._buffer.clear()
        self._put(error)

    def cancel(self) -> None:
        self._cancelled.set()

    def next_chunk(self) -> bytes | None:
        """The next chunk (blocking); None at the end; the builder's error
        raised; :class:`Cancelled` once cancelled (no thread waits forever)."""
        while True:
            if self._cancelled.is_set():
                raise Cancelled()
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            return item


def zip_name(study: dict[str, Any]) -> str:
    """A file name saying what it is: ``IMAG-20240101-CT-THORAX.zip``."""
    parts = ["IMAG", study.get("date") or "", study.get("description") or ""]
    text = "-".join(p for p in parts if p)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:80]
    return (text or "IMAG-study") + ".zip"


def _folder_name(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9 ._-]+", "_", text).strip(" .")[:60]


def build_zip(
    store: ObjectStore,
    items: list[StoredObject],
    sink: Pipe,
    *,
    max_frames: int,
    max_bytes: int,
    header_limits: dict[str, int],
    workdir: str | None = None,
) -> None:
    """Write the study's ZIP into ``sink`` (run in a worker thread); the
    temporary directory is removed whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix="imag-zip-", dir=workdir))
    try:
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:  # type: ignore[arg-type]
            _write(store, items, zf, tmp, max_frames, max_bytes, header_limits)
        sink.close()
    except Cancelled:
        log.info("study download abandoned by the client")
    except BaseException as exc:  # the HTTP side cuts the stream
        try:
            sink.close(exc)
        except Cancelled:
            pass
        if not isinstance(exc, Exception):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(
    store: ObjectStore,
    items: list[StoredObject],
    zf: zipfile.ZipFile,
    tmp: Path,
    max_frames: int,
    max_bytes: int,
    header_limits: dict[str, int],
) -> None:
    staged = tmp / "in"
    staged.mkdir()
    fileset = FileSet()
    others: list[tuple[Path, StoredObject]] = []
    for n, item in enumerate(items):
        path = staged / f"{n:06d}.dcm"
        with store.open(item.object_key) as source, open(path, "wb") as target:
            shutil.copyfileobj(source, target, COPY)
        try:
            fileset.add(str(path))
        except (ValueError, KeyError, AttributeError) as exc:
            log.warning(
                "instance not indexed in the DICOMDIR",
                extra={"sop_instance_uid": item.sop_instance_uid, "error": str(exc)},
            )
            others.append((path, item))
    out = tmp / "out"
    if len(fileset):
        fileset.write(str(out))
        zf.write(out / "DICOMDIR", "DICOMDIR")
        for instance in fileset:
            relative = Path(instance.path).relative_to(out)
            zf.write(instance.path, relative.as_posix())
    for path, item in others:
        zf.write(path, f"OTHER/{item.sop_instance_uid}.dcm")
    shutil.rmtree(staged, ignore_errors=True)
    for name, body in _readable(store, items, max_frames, max_bytes, header_limits):
        zf.writestr(name, body)


def _readable(
    store: ObjectStore,
    items: list[StoredObject],
    max_frames: int,
    max_bytes: int,
    header_limits: dict[str, int],
) -> Iterator[tuple[str, bytes]]:
    """JPEGs of the images, the report documents as PDF or text: one at a time."""
    series_number: dict[str, int] = {}
    instance_count: dict[str, int] = {}
    reports = 0
    for item in items:
        kind = document_kind(item.sop_class_uid)
        try:
            with open_header(store, item, **header_limits) as header:
                ds = header.dataset
                if kind is not None:
                    reports += 1
                    yield from _report(store, item, kind, reports)
                    continue
                image = pixels.ImageFile(ds, header.file, header.pixel_at)
                if image.keyword is None:
                    continue
                number = series_number.setdefault(item.series_uid, len(series_number) + 1)
                folder = f"JPEG/S{number:03d} {_folder_name(str(ds.get('Modality', '')))}"
                description = _folder_name(str(ds.get("SeriesDescription", "")))
                if description:
                    folder += f" {description}"
                count = instance_count[item.series_uid] = instance_count.get(item.series_uid, 0) + 1
                frames = pixels.frame_count(image)
                for frame in range(1, min(frames, max_frames) + 1):
                    name = f"I{count:04d}" + (f"-F{frame:04d}" if frames > 1 else "")
                    body = pixels.render(image, frame, quality=90, max_bytes=max_bytes)
                    yield f"{folder.strip()}/{name}.jpg", body
        except (pixels.FrameError, pixels.RenderError, pixels.TooLarge, pixels.DecodeError,
                UnreadableObject) as exc:  # fmt: skip
            log.warning(
                "no JPEG for an instance of a downloaded study",
                extra={"sop_instance_uid": item.sop_instance_uid, "error": str(exc)},
            )


def _report(
    store: ObjectStore, item: StoredObject, kind: str, n: int
) -> Iterator[tuple[str, bytes]]:
    with store.open(item.object_key) as source:
        ds = pydicom.dcmread(source)
    if kind == "pdf":
        document = bytes(ds.get("EncapsulatedDocument") or b"")
        if document.endswith(b"\0"):  # padded to an even length
            document = document[:-1]
        yield f"REPORT/report-{n}.pdf", document
    else:
        lines: list[str] = []
        for section in sr_sections(ds):
            if section["heading"]:
                lines.append(section["heading"])
            if section["text"]:
                lines.append(section["text"])
            lines.append("")
        yield f"REPORT/report-{n}.txt", "\n".join(lines).encode("utf-8")
