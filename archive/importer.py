"""``imag import``: bulk ingest of folders of DICOM files through the one pipeline.

Worker processes read, parse, validate, hash and store the objects in
parallel; the parent commits their index rows in group transactions.  Every
step is idempotent, so an import interrupted at any point (even by SIGKILL)
is completed by running it again: files already stored are recognised by
their SOP Instance UID and digest and counted as duplicates.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from archive.config import Config
from archive.identity import Source
from archive.index import Database
from archive.index.catalog import StoreOutcome
from archive.ingest import IngestPipeline, IngestResult, Prepared
from archive.parse import Rejected
from archive.pool import BoundedPool
from archive.runtime import Archive, open_object_store


@dataclass
class ImportSummary:
    """Counts of one import run, and each rejected file with its reason."""

    stored: int = 0
    replaced: int = 0
    duplicate: int = 0
    kept: int = 0
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # path, code, reason
    bytes_stored: int = 0

    @property
    def files(self) -> int:
        return self.stored + self.replaced + self.duplicate + self.kept + len(self.rejected)

    def add(self, path: str, result: IngestResult) -> None:
        if result.outcome is None:
            self.rejected.append((path, result.code, result.reason))
        elif result.outcome is StoreOutcome.STORED:
            self.stored += 1
            self.bytes_stored += result.size
        elif result.outcome is StoreOutcome.REPLACED:
            self.replaced += 1
            self.bytes_stored += result.size
        elif result.outcome is StoreOutcome.DUPLICATE:
            self.duplicate += 1
        else:
            self.kept += 1

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "stored": self.stored,
            "replaced": self.replaced,
            "duplicate": self.duplicate,
            "conflict_kept": self.kept,
            "rejected": len(self.rejected),
            "rejected_by_code": dict(Counter(code for _, code, _ in self.rejected)),
            "bytes_stored": self.bytes_stored,
        }


def iter_files(paths: Iterable[str | Path]) -> Iterator[str]:
    """Every regular file under ``paths`` (recursively), in a stable order,
    without listing a whole tree in memory first."""
    for root in paths:
        root = Path(root)
        if root.is_file():
            yield str(root)
            continue
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such file or folder")
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                yield os.path.join(folder, name)


# -- worker processes ------------------------------------------------------------------

_worker: IngestPipeline | None = None
_source: Source | None = None


def _init_worker(config: Config, source: Source) -> None:
    global _worker, _source
    _worker = IngestPipeline(
        config, open_object_store(config), Database(config.index_url), writer=False
    )
    _source = source


def _prepare_file(path: str) -> Prepared | IngestResult:
    assert _worker is not None and _source is not None
    try:
        if os.path.getsize(path) > _worker.config["ingest.stream_threshold"]:
            return _worker.prepare_file(path, _source)  # never whole in memory
        with open(path, "rb") as fh:
            data = fh.read(_worker.max_bytes + 1)
    except OSError as exc:
        return IngestResult.rejected(Rejected("unreadable", f"cannot read the file: {exc}"))
    return _worker.prepare(data, _source)


# -- the parent ------------------------------------------------------------------------


def run_import(
    archive: Archive,
    paths: Iterable[str | Path],
    *,
    site: str = "",
    workers: int = 0,
    on_result: Callable[[str, IngestResult], None] | None = None,
) -> ImportSummary:
    """Import every file under ``paths``; return the summary.

    ``on_result`` is called in the parent for each file as it completes (for
    progress bars and per-file reports).  Ctrl-C stops the import once the
    files being prepared are done (:class:`archive.pool.BoundedPool`); a
    re-run completes it.
    """
    config = archive.config
    source = Source(kind="import", site=site or config["ingest.default_site"])
    workers = workers or config["import.workers"] or os.cpu_count() or 1
    summary = ImportSummary()
    pipeline = archive.pipeline

    def finish(path: str, result: IngestResult) -> None:
        summary.add(path, result)
        if on_result is not None:
            on_result(path, result)

    with BoundedPool(
        workers, per_worker=8, initializer=_init_worker, initargs=(config, source)
    ) as pool:

        def prepared(path: str, step: Prepared | IngestResult) -> None:
            if isinstance(step, IngestResult):
                finish(path, step)
            else:  # stored by the worker: its index row is committed by the writer thread
                pool.follow(pipeline.commit(step), partial(finish, path))

        for path in iter_files(paths):
            pool.submit(_prepare_file, path, partial(prepared, path))
    return summary
