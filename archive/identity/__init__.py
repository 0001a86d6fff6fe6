"""The identity plugin: which patient an incoming instance belongs to.

Patients are keyed by (site, issuer, patient ID), never by the patient ID
alone, because two producers may use the same local ID for different people.
The default plugin keeps the instance's IssuerOfPatientID; when a producer
sends none, the producing site's name stands in as the issuer, so that local
IDs of different sites still never collide.  Regional identity services (an
INS or a regional patient index) replace this plugin through the
``imag.identity`` entry point group and the ``plugins.identity`` setting.

**A local patient identity belongs to one site.**  The index files a patient
under the producing site of the instance that created it (``patients.site``)
and matches an incoming instance only against its own site's patients.  An
issuer is not proof of ownership: any sender can write any
IssuerOfPatientID.  So a site-B sender that names site A's issuer and guesses
one of its PatientIDs gets a patient row of its own, holding the demographics
it sent; it is never attached to site A's patient, and what site B finds by
QIDO-RS or C-FIND (scoped to its studies, whose patient rows are its own)
never shows site A's name or birth date.  Nothing is refused for this: a
shared regional issuer is legitimate, and refusing would itself tell the
sender that the ID exists elsewhere.  A study keeps the patient it was
created with; instances added to it later do not re-file it.  Linking the
rows of one person across sites (an INS, a regional patient index) is the
identity plugin's job, through a regional identifier, not the index's.

**The provider contract** (:class:`IdentityPlugin`): ``resolve`` runs on the
ingest hot path (fast, no I/O, the dataset untouched) and returns the local
key, plus what the instance says of the patient (INS, status, traits) for the
provider's own commit hook or subscriber; ``patient_refs`` lets C-FIND and
QIDO-RS search by an identifier the provider understands (an INS, its
regional identifier): the local patient rows of that person, which the
caller's scope then narrows, or None to match PatientID / IssuerOfPatientID
as plain local values.  The default (``plugins.identity = "default"``) is the
regional patient index of :mod:`archive.identity.regional`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydicom.dataset import Dataset

from archive.index.catalog import Origin
from archive.security.scope import Scope

if TYPE_CHECKING:
    from archive.config import Config
    from archive.index.db import Database


@dataclass(frozen=True)
class Source:
    """Where an instance came from: used for the producing site, identity and audit."""

    kind: str  # "import", "dicom", "stow"
    site: str = ""
    calling_aet: str = ""
    address: str = ""
    user: str = ""
    #: the studies the sender may see; its sites are those it may write into
    #: (None: any, for regional peers and admins).  A study, series or SOP
    #: instance of another site is refused, so a site cannot add to (or
    #: replace in) another site's data.
    scope: Scope | None = None
    #: who to name in the audit entry committed with each instance's index row
    #: (C-STORE); None where the request is audited as a whole (STOW-RS)
    origin: Origin | None = None

    @property
    def may_write(self) -> frozenset[str] | None:
        """The sites whose studies this sender may add to; None: any.

        ``imag import --site S`` speaks for site S (an operator importing a
        site's files must not merge them into another site's studies); an
        import without a site, like a regional peer or an admin, may write
        anywhere."""
        if self.scope is not None:
            return self.scope.sites
        if self.kind == "import" and self.site:
            return frozenset([self.site])
        return None


@dataclass(frozen=True)
class PatientIdentity:
    """The patient key an instance is filed under (within its site)."""

    issuer: str
    patient_id: str
    #: what else the instance says of the patient, for the provider's own
    #: commit hook (the regional index's :class:`archive.identity.ins.Observed`:
    #: INS, identity status, reference traits); None when the provider keeps none
    observed: Any = None


class IdentityPlugin(Protocol):
    """Resolve the patient key of an incoming instance (called on the ingest hot
    path: it must be fast, and must not modify the dataset), and say which
    local patients a national or regional identifier designates."""

    def resolve(self, ds: Dataset, source: Source) -> PatientIdentity: ...

    def patient_refs(
        self, db: Database, patient_id: str, issuer: str, oid: str = ""
    ) -> list[int] | None:
        """The ``patients`` rows of the person that (``patient_id``, ``issuer``,
        qualifier ``oid``) designates when it is an identifier this provider
        knows (an INS, a regional identifier): possibly none.  None: not such
        an identifier, match it as a plain local PatientID."""
        ...


class DefaultIdentity:
    """IssuerOfPatientID + PatientID, with the producing site as the fallback issuer."""

    def resolve(self, ds: Dataset, source: Source) -> PatientIdentity:
        issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
        patient_id = str(ds.get("PatientID", "") or "").strip()
        return PatientIdentity(issuer or source.site, patient_id)

    def patient_refs(
        self, db: Database, patient_id: str, issuer: str, oid: str = ""
    ) -> list[int] | None:
        """No identifier but local ones: always None."""
        return None


def load_identity_plugin(name: str, config: Config | None = None) -> IdentityPlugin:
    """The identity provider named ``name`` (setting ``plugins.identity``), from
    the plugins' ``imag_identity_provider``."""
    from archive import plugins

    return plugins.provider("identity", name, config)
