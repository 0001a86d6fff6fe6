"""``imag verify``: prove that what the index says is stored really is.

Every indexed object is read back and re-hashed against the SHA-256 recorded
at ingest (missing and corrupt objects are reported); every key in the store
is checked against the index (objects no row references are orphans, e.g.
left by a crash between the object write and the index commit).  With
``repair`` orphans are deleted and missing or corrupt instances are marked in
the index, so that a re-import or a re-send restores them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from archive.index.catalog import Catalog, StoredInstance
from archive.metadata import PREFIX as METADATA_PREFIX
from storage import ObjectNotFound, ObjectStore

_CHUNK = 4 * 2**20
_KEY = re.compile(r"^[0-9.]+/[0-9.]+/([0-9.]+)\.[0-9a-f]{16}\.dcm$")


@dataclass
class VerifyReport:
    checked: int = 0
    ok: int = 0
    missing: list[str] = field(default_factory=list)  # SOP Instance UIDs
    corrupt: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # object keys
    repaired: int = 0

    @property
    def clean(self) -> bool:
        return not (self.missing or self.corrupt or self.orphans)

    def as_dict(self) -> dict:
        return {
            "checked": self.checked,
            "ok": self.ok,
            "missing": self.missing,
            "corrupt": self.corrupt,
            "orphans": self.orphans,
            "repaired": self.repaired,
            "clean": self.clean,
        }


def _digest(store: ObjectStore, key: str) -> bytes | None:
    try:
        stream = store.open(key)
    except ObjectNotFound:
        return None
    h = hashlib.sha256()
    with stream:
        while chunk := stream.read(_CHUNK):
            h.update(chunk)
    return h.digest()


def verify(
    catalog: Catalog,
    store: ObjectStore,
    *,
    repair: bool = False,
    workers: int = 4,
    progress: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Check index against store and store against index; see the module doc."""
    report = VerifyReport()
    tick = progress or (lambda phase: None)

    def check(inst: StoredInstance) -> tuple[StoredInstance, bytes | None]:
        return inst, _digest(store, inst.object_key)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for inst, digest in pool.map(check, catalog.iter_instances()):
            report.checked += 1
            tick("objects")
            # Known-lost objects stay reported until re-sent: the data is still gone.
            if digest is None:
                report.missing.append(inst.sop_instance_uid)
                if repair and inst.integrity != "missing":
                    catalog.mark_integrity(inst.id, "missing")
                    report.repaired += 1
            elif digest != inst.sha256:
                report.corrupt.append(inst.sop_instance_uid)
                if repair and inst.integrity != "corrupt":
                    catalog.mark_integrity(inst.id, "corrupt")
                    report.repaired += 1
            else:
                report.ok += 1
                if repair and inst.integrity != "ok":
                    catalog.mark_integrity(inst.id, "ok")

    for key in store.iter_keys():
        tick("orphans")
        if key.startswith(METADATA_PREFIX):  # derived data, rebuilt on demand
            continue
        match = _KEY.match(key)
        known = catalog.find_instance(match[1]) if match else None
        if known is None or known.object_key != key:
            report.orphans.append(key)
            if repair:
                store.delete(key)
                report.repaired += 1
    if repair and hasattr(store, "cleanup_temp"):
        store.cleanup_temp()
    return report
