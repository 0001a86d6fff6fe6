"""The identity plugin: which patient an incoming instance belongs to.

Patients are keyed by (issuer, patient ID), never by the patient ID alone,
because two producers may use the same local ID for different people.  The
default plugin keeps the instance's IssuerOfPatientID; when a producer sends
none, the producing site's name stands in as the issuer, so that local IDs of
different sites still never collide.  Regional identity services (an INS or a
regional patient index) replace this plugin through the ``imag.identity``
entry point group and the ``plugins.identity`` setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol

from pydicom.dataset import Dataset

from archive.security.scope import Scope


@dataclass(frozen=True)
class Source:
    """Where an instance came from: used for the producing site, identity and audit."""

    kind: str  # "import", "dicom", "stow"
    site: str = ""
    calling_aet: str = ""
    address: str = ""
    user: str = ""
    #: the studies the sender may write into (None: any); a study of another
    #: site is refused, so a site cannot add to another site's studies
    scope: Scope | None = None


@dataclass(frozen=True)
class PatientIdentity:
    """The patient key an instance is filed under."""

    issuer: str
    patient_id: str


class IdentityPlugin(Protocol):
    """Resolve the patient key of an incoming instance (called on the ingest hot
    path: it must be fast, and must not modify the dataset)."""

    def resolve(self, ds: Dataset, source: Source) -> PatientIdentity: ...


class DefaultIdentity:
    """IssuerOfPatientID + PatientID, with the producing site as the fallback issuer."""

    def resolve(self, ds: Dataset, source: Source) -> PatientIdentity:
        issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
        patient_id = str(ds.get("PatientID", "") or "").strip()
        return PatientIdentity(issuer or source.site, patient_id)


def load_identity_plugin(name: str) -> IdentityPlugin:
    """Instantiate the identity plugin registered under ``name`` in the
    ``imag.identity`` entry point group."""
    if name == "default":
        return DefaultIdentity()
    found = entry_points(group="imag.identity", name=name)
    if not found:
        available = sorted(ep.name for ep in entry_points(group="imag.identity"))
        raise ValueError(
            f"identity plugin {name!r} not found; installed: {', '.join(available) or 'none'}"
        )
    return next(iter(found)).load()()
