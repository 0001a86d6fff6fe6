"""A replacement identity provider, as a region's master patient index client
would be written: registered through ``imag_identity_provider`` (here via
``IMAG_PLUGINS=tests.plugins.identity_stub``) and chosen with
``plugins.identity = "stub-mpi"``; nothing in ``archive/`` knows about it.

It files every patient under the issuer ``STUB-MPI`` with the PatientID
upper-cased, and understands PatientIDs of that issuer in searches."""

from __future__ import annotations

from pydicom.dataset import Dataset

from archive.hookspecs import hookimpl
from archive.identity import PatientIdentity, Source
from archive.index.db import Database

ISSUER = "STUB-MPI"


class StubMpi:
    def resolve(self, ds: Dataset, source: Source) -> PatientIdentity:
        return PatientIdentity(ISSUER, str(ds.get("PatientID", "") or "").strip().upper())

    def patient_refs(
        self, db: Database, patient_id: str, issuer: str, oid: str = ""
    ) -> list[int] | None:
        if issuer != ISSUER:
            return None
        rows = db.query(
            "SELECT id FROM patients WHERE issuer = ? AND patient_id = ?",
            (ISSUER, patient_id.upper()),
        )
        return [int(r[0]) for r in rows]


@hookimpl
def imag_identity_provider(name: str) -> StubMpi | None:
    return StubMpi() if name == "stub-mpi" else None
