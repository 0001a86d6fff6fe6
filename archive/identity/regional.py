"""The default identity provider: a regional patient index in the archive's own database.

Each local identity (a ``patients`` row: site + issuer + PatientID, see
:mod:`archive.identity`) is linked to exactly one **regional identity**, which
has a regional identifier (``identity.regional_prefix`` + a number, searched
under the issuer ``identity.regional_issuer``), the INS when one is known,
the identity status and the five reference traits.

**Ingest stays cheap.**  :meth:`RegionalIdentity.resolve` only reads the
instance (:func:`archive.identity.ins.observe`).  Inside the commit
transaction, :func:`observation_hook` records one ``identity.observed`` event
per *new* observation (site, local key, INS, status, traits): a fingerprint
already seen by this process is skipped without a query; the others cost one
indexed query per batch (``identity_seen``).  The work -- linking, proposals,
conflicts -- is the ``identity`` subscriber's (:meth:`RegionalIndex.observe`),
run exactly once per event by the job workers.

**Linking.**  A new local identity carrying a valid INS joins the regional
identity holding that INS when their traits agree.  When they do not (the
same INS, another birth date), it gets a regional identity of its own and a
*conflict* enters the identity-vigilance queue: two people, or one input
error, is for a person to decide.  Without an INS match it gets a new regional
identity, and a *link proposal* is queued for every regional identity of
another site whose traits match (exactly, or near: accents, hyphens and case,
setting ``identity.near_match``).  A local identity whose traits change over
time (the same local ID sent with another birth date) raises a conflict too;
its link records what the producer now says, the regional identity keeps its
reference traits.

**Resolution.**  Accepting a proposal merges the two regional identities;
rejecting it keeps them apart for good (it is not proposed again).  A
conflict is resolved by merging (when it names two identities) or by
dismissing it, with a note.  Merges and unmerges are audited in their own
transaction and exactly reversible: a merge records the survivor's and the
merged identity's rows, the links it moved and the queue items it closed;
unmerge puts every one of them back.  Studies never move: they belong to
their local identity (and so to their site), which is what the links move.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from archive import events
from archive.identity import DefaultIdentity, PatientIdentity, Source
from archive.identity.ins import (
    INS_ISSUER,
    OIDS,
    InsError,
    Observed,
    Reading,
    Traits,
    check_ins,
    differences,
    observe,
    traits_match,
)
from archive.index.catalog import CommitResult, InstanceRecord, StoreOutcome
from archive.index.db import Database
from archive.security.audit import AuditEntry, AuditLog
from archive.security.scope import Scope, study_clause

if TYPE_CHECKING:
    from archive.config import Config

log = logging.getLogger(__name__)

EVENT = "identity.observed"
TRAIT_FIELDS = tuple(Traits.__dataclass_fields__)
_REGIONAL_FIELDS = ("regional_id", "ins", "ins_oid", "status", *TRAIT_FIELDS, "merged_into")
_LINK_FIELDS = ("patient_ref", "regional_ref", "ins", "ins_oid", "status", *TRAIT_FIELDS)
#: fingerprints remembered per process before the memory is cleared
SEEN_CACHE = 200_000


class IdentityError(Exception):
    """A request on the regional index that cannot be done as asked.
    ``status``: 404 (unknown), 409 (the state forbids it), 400 (malformed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class IdentitySettings:
    """The ``identity.*`` settings."""

    reading: Reading = Reading()
    near_match: bool = True
    regional_issuer: str = "IMAG-RPI"
    regional_prefix: str = "RPI"

    @classmethod
    def from_config(cls, config: Config | None) -> IdentitySettings:
        if config is None:
            return cls()
        return cls(
            Reading(
                accept_test_ins=config["identity.accept_test_ins"],
                status_attribute=config["identity.status_attribute"],
                birthplace_attribute=config["identity.birthplace_attribute"],
                qualifying_sites=frozenset(config["identity.qualifying_sites"]),
            ),
            near_match=config["identity.near_match"],
            regional_issuer=config["identity.regional_issuer"],
            regional_prefix=config["identity.regional_prefix"],
        )


@dataclass(frozen=True)
class Actor:
    """Who asks for a change, for its audit entry."""

    name: str
    kind: str = "user"
    role: str | None = None
    source: str | None = None


SYSTEM = Actor("identity-index", "service")


# -- the provider ---------------------------------------------------------------------------


class RegionalIdentity(DefaultIdentity):
    """The identity provider backed by the regional index (``plugins.identity =
    "default"``): the local key as :class:`DefaultIdentity` files it, plus the
    INS, status and traits the instance carries."""

    def __init__(self, config: Config | None = None) -> None:
        self.settings = IdentitySettings.from_config(config)

    def resolve(self, ds: Dataset, source: Source) -> PatientIdentity:
        key = super().resolve(ds, source)
        try:
            observed = observe(ds, source.site, self.settings.reading)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad values
            # an unreadable optional attribute (a broken Other Patient IDs item)
            # must not refuse the image: it is filed under its local key alone
            observed = Observed(ins_error=f"patient identification unreadable: {exc}"[:200])
        if observed.ins_error:
            log.warning(
                "INS refused: the patient is filed under its local identifier only",
                extra={"site": source.site, "reason": observed.ins_error},
            )
        if observed.status_error:
            log.warning(
                "identity status ignored",
                extra={"site": source.site, "reason": observed.status_error},
            )
        return PatientIdentity(key.issuer, key.patient_id, observed)

    def patient_refs(
        self, db: Database, patient_id: str, issuer: str, oid: str = ""
    ) -> list[int] | None:
        """The local identities of the person an INS or a regional identifier
        designates; None for any other identifier (and for a malformed INS,
        which is then matched as the plain local ID it was filed as)."""
        issuer, oid = issuer.strip(), oid.strip()
        if issuer == self.settings.regional_issuer:
            return RegionalIndex(db, self.settings).patients_of_regional(patient_id.strip())
        if issuer != INS_ISSUER and oid not in OIDS:
            return None
        try:
            ins = check_ins(patient_id, oid, accept_test=self.settings.reading.accept_test_ins)
        except InsError:
            return None
        return RegionalIndex(db, self.settings).patients_of_ins(ins.matricule)

    def index(self, db: Database, audit: AuditLog | None = None) -> RegionalIndex:
        return RegionalIndex(db, self.settings, audit)


def _fingerprint(detail: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(detail, sort_keys=True).encode()).hexdigest()[:40]


def observation_hook(settings: IdentitySettings):  # noqa: ANN201 - a Catalog.commit hook
    """The commit hook that records ``identity.observed`` for new observations."""
    seen: set[str] = set()

    def hook(db: Database, done: Sequence[tuple[InstanceRecord, CommitResult]]) -> None:
        fresh: dict[str, tuple[InstanceRecord, dict[str, Any]]] = {}
        for record, result in done:
            if result.outcome not in (StoreOutcome.STORED, StoreOutcome.REPLACED):
                continue
            who = getattr(record, "identity", None)
            observed = getattr(who, "observed", None)
            if not isinstance(observed, Observed):
                continue
            detail = {
                "site": record.site,
                "issuer": record.issuer,
                "patient_id": record.patient_id,
                **observed.as_detail(),
            }
            fp = _fingerprint(detail)
            if fp not in seen and fp not in fresh:
                fresh[fp] = (record, detail)
        if not fresh:
            return
        marks = ", ".join("?" * len(fresh))
        for (fp,) in db.query(
            f"SELECT fingerprint FROM identity_seen WHERE fingerprint IN ({marks})", list(fresh)
        ):
            fresh.pop(fp, None)
            if len(seen) >= SEEN_CACHE:
                seen.clear()
            seen.add(fp)  # committed by an earlier transaction: safe to remember
        now = db.clock.now()
        rows = []
        for fp, (record, detail) in fresh.items():
            if db.query_one(
                "INSERT INTO identity_seen (fingerprint, seen_at, observation) VALUES (?, ?, ?) "
                "ON CONFLICT (fingerprint) DO NOTHING RETURNING fingerprint",
                (fp, now, json.dumps(detail, sort_keys=True)),
            ):
                # the event names the observation; its demographics stay in
                # identity_seen, out of the change feed (GET /changes)
                rows.append(
                    events.EventRow(
                        EVENT,
                        site=record.site,
                        study_uid=record.study_uid,
                        detail={"fingerprint": fp},
                    )
                )
        if rows:
            events.record(db, rows)

    return hook


# -- the index ------------------------------------------------------------------------------


def _row(fields: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(fields, row, strict=True))


def _traits(row: dict[str, Any]) -> Traits:
    return Traits.from_dict(row)


class RegionalIndex:
    """The regional index's tables: what the subscriber, the API and the
    commands read and change.  Changes run in their own transaction (with
    their audit entry) unless the caller holds one (the subscriber)."""

    def __init__(
        self, db: Database, settings: IdentitySettings | None = None, audit: AuditLog | None = None
    ) -> None:
        self.db = db
        self.settings = settings or IdentitySettings()
        self.audit = audit or AuditLog(db)

    # -- reading ---------------------------------------------------------------------------

    def _regional(self, where: str, params: Sequence[Any]) -> dict[str, Any] | None:
        row = self.db.query_one(
            f"SELECT id, {', '.join(_REGIONAL_FIELDS)}, created_at, updated_at "
            f"FROM identity_regional WHERE {where}",
            params,
        )
        if row is None:
            return None
        return _row(("id", *_REGIONAL_FIELDS, "created_at", "updated_at"), row)

    def regional(self, regional_id: str) -> dict[str, Any] | None:
        return self._regional("regional_id = ?", (regional_id,))

    def _regional_by_ref(self, ref: int) -> dict[str, Any]:
        found = self._regional("id = ?", (ref,))
        assert found is not None
        return found

    def _active(self, regional_id: str) -> dict[str, Any]:
        """The regional identity, following merges to the survivor; 404 when unknown."""
        found = self.regional(regional_id)
        if found is None:
            raise IdentityError(404, f"no regional identity {regional_id!r}")
        hops = 0
        while found["merged_into"] is not None and hops < 1000:
            found, hops = self._regional_by_ref(found["merged_into"]), hops + 1
        return found

    def _links(self, regional_ref: int) -> list[dict[str, Any]]:
        return [
            _row(_LINK_FIELDS, r)
            for r in self.db.query(
                f"SELECT {', '.join(_LINK_FIELDS)} FROM identity_links WHERE regional_ref = ? "
                "ORDER BY patient_ref",
                (regional_ref,),
            )
        ]

    def link_of(self, patient_ref: int) -> dict[str, Any] | None:
        row = self.db.query_one(
            f"SELECT {', '.join(_LINK_FIELDS)} FROM identity_links WHERE patient_ref = ?",
            (patient_ref,),
        )
        return _row(_LINK_FIELDS, row) if row else None

    def patients_of_regional(self, regional_id: str) -> list[int]:
        try:
            found = self._active(regional_id)
        except IdentityError:
            return []
        return [link["patient_ref"] for link in self._links(found["id"])]

    def same_person(self, patient_ref: int) -> list[int]:
        """The local identities (``patients`` rows) linked to the same regional
        identity as ``patient_ref``, itself included: a patient's studies at
        every site (a reader's priors).  Just itself when it is not linked."""
        link = self.link_of(patient_ref)
        if link is None:
            return [patient_ref]
        regional = self._regional_by_ref(link["regional_ref"])
        return sorted({patient_ref, *self.patients_of_regional(regional["regional_id"])})

    def patients_of_ins(self, matricule: str) -> list[int]:
        """Every local identity that carries the INS or belongs to a regional
        identity that does (the producer's INS may sit on either)."""
        rows = self.db.query(
            "SELECT l.patient_ref FROM identity_links l WHERE l.ins = ? OR l.regional_ref IN "
            "(SELECT r.id FROM identity_regional r WHERE r.ins = ? AND r.merged_into IS NULL) "
            "ORDER BY l.patient_ref",
            (matricule, matricule),
        )
        return [int(r[0]) for r in rows]

    def identities(
        self, scope: Scope | None, *, ins: str = "", limit: int = 100, offset: int = 0
    ) -> list[dict[str, Any]]:
        """Active regional identities with a local identity holding a study in
        ``scope`` (None: all), newest first."""
        where, params = ["r.merged_into IS NULL"], []
        if ins:
            where.append(
                "(r.ins = ? OR EXISTS (SELECT 1 FROM identity_links l2 "
                "WHERE l2.regional_ref = r.id AND l2.ins = ?))"
            )
            params += [ins, ins]
        if scope is not None:
            clause, scope_params = study_clause(scope, "st")
            where.append(
                "EXISTS (SELECT 1 FROM identity_links l JOIN studies st ON "
                f"st.patient_ref = l.patient_ref WHERE l.regional_ref = r.id AND {clause})"
            )
            params += scope_params
        rows = self.db.query(
            f"SELECT r.regional_id FROM identity_regional r WHERE {' AND '.join(where)} "
            "ORDER BY r.id DESC LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        out = []
        for (rid,) in rows:
            shown = self.show(rid, scope)
            if shown is not None:
                out.append(shown)
        return out

    def show(self, regional_id: str, scope: Scope | None) -> dict[str, Any] | None:
        """A regional identity with its local identities and their studies'
        UIDs, within ``scope``; None when unknown or nothing of it is in scope
        (the same answer: no hint that it exists)."""
        found = self.regional(regional_id)
        if found is None:
            return None
        out = _public(found)
        if found["merged_into"] is not None:
            out["merged_into"] = self._active(regional_id)["regional_id"]
        out["local_identities"] = []
        for link in self._links(found["id"]):
            patient = self.db.query_one(
                "SELECT site, issuer, patient_id FROM patients WHERE id = ?", (link["patient_ref"],)
            )
            if patient is None:
                continue
            sql = "SELECT st.study_uid FROM studies st WHERE st.patient_ref = ?"
            params: list[Any] = [link["patient_ref"]]
            if scope is not None:
                clause, scope_params = study_clause(scope, "st")
                sql += f" AND {clause}"
                params += scope_params
            studies = [r[0] for r in self.db.query(sql + " ORDER BY st.id", params)]
            if scope is not None and not studies:
                continue
            out["local_identities"].append(
                {
                    "site": patient[0],
                    "issuer": patient[1],
                    "patient_id": patient[2],
                    "ins": link["ins"],
                    "ins_oid": link["ins_oid"],
                    "status": link["status"],
                    "traits": _traits(link).as_dict(),
                    "studies": studies,
                }
            )
        if scope is not None and not out["local_identities"]:
            return None
        return out

    def queue(self, state: str | None = "open", limit: int = 100) -> list[dict[str, Any]]:
        """The identity-vigilance queue: proposals and conflicts, oldest first."""
        sql = (
            "SELECT q.id, q.kind, q.reason, ra.regional_id, rb.regional_id, q.patient_ref, "
            "q.detail, q.state, q.created_at, q.decided_at, q.decided_by, q.note "
            "FROM identity_queue q LEFT JOIN identity_regional ra ON ra.id = q.regional_a "
            "LEFT JOIN identity_regional rb ON rb.id = q.regional_b"
        )
        params: list[Any] = []
        if state:
            sql += " WHERE q.state = ?"
            params.append(state)
        rows = self.db.query(sql + " ORDER BY q.id LIMIT ?", [*params, limit])
        return [_queue_item(r) for r in rows]

    def item(self, item_id: int) -> dict[str, Any]:
        row = self.db.query_one(
            "SELECT q.id, q.kind, q.reason, ra.regional_id, rb.regional_id, q.patient_ref, "
            "q.detail, q.state, q.created_at, q.decided_at, q.decided_by, q.note "
            "FROM identity_queue q LEFT JOIN identity_regional ra ON ra.id = q.regional_a "
            "LEFT JOIN identity_regional rb ON rb.id = q.regional_b WHERE q.id = ?",
            (item_id,),
        )
        if row is None:
            raise IdentityError(404, f"no item {item_id} in the identity-vigilance queue")
        return _queue_item(row)

    def merges(self) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT m.id, s.regional_id, g.regional_id, m.merged_at, m.merged_by, m.undone_at, "
            "m.undone_by FROM identity_merges m JOIN identity_regional s ON s.id = m.survivor_ref "
            "JOIN identity_regional g ON g.id = m.merged_ref ORDER BY m.id"
        )
        keys = ("id", "survivor", "merged", "merged_at", "merged_by", "undone_at", "undone_by")
        return [_jsonable(_row(keys, r)) for r in rows]

    # -- observations (the subscriber) -------------------------------------------------------

    def observe(self, detail: dict[str, Any]) -> None:
        """Take one ``identity.observed`` event into the index (inside the
        subscriber's transaction): link, propose, raise conflicts.  ``detail``
        is the event's (the observation's fingerprint) or the observation."""
        db = self.db
        if set(detail) == {"fingerprint"}:
            stored = db.scalar(
                "SELECT observation FROM identity_seen WHERE fingerprint = ?",
                (detail["fingerprint"],),
            )
            if stored is None:
                raise IdentityError(404, f"no observation {detail['fingerprint']}")
            detail = json.loads(stored)
        patient_ref = db.scalar(
            "SELECT id FROM patients WHERE site = ? AND issuer = ? AND patient_id = ?",
            (detail["site"], detail["issuer"], detail["patient_id"]),
        )
        if patient_ref is None:
            log.info(
                "identity observation of a patient no longer stored", extra={"site": detail["site"]}
            )
            return
        traits = Traits.from_dict(detail.get("traits"))
        ins, oid = detail.get("ins") or None, detail.get("ins_oid") or None
        status = detail.get("status") or "PROV"
        link = self.link_of(patient_ref)
        now = db.clock.now()
        if link is None:
            self._link_new(patient_ref, detail["site"], ins, oid, status, traits, now)
            return
        old = _traits(link)
        changed = differences(old, traits, near=False)
        if changed:
            self._enqueue(
                "conflict",
                "local-traits",
                link["regional_ref"],
                None,
                patient_ref,
                {
                    "site": detail["site"],
                    "patient_id": detail["patient_id"],
                    "traits": changed,
                    "before": old.as_dict(),
                    "after": traits.as_dict(),
                },
                now,
            )
        if link["ins"] and ins and link["ins"] != ins:
            self._enqueue(
                "conflict",
                "local-ins",
                link["regional_ref"],
                None,
                patient_ref,
                {
                    "site": detail["site"],
                    "patient_id": detail["patient_id"],
                    "before": link["ins"],
                    "after": ins,
                },
                now,
            )
        merged = {k: (getattr(traits, k) or link[k]) for k in TRAIT_FIELDS}
        db.execute(
            "UPDATE identity_links SET ins = ?, ins_oid = ?, status = ?, "
            + ", ".join(f"{k} = ?" for k in TRAIT_FIELDS)
            + ", updated_at = ? WHERE patient_ref = ?",
            (
                ins or link["ins"],
                oid or link["ins_oid"],
                status,
                *merged.values(),
                now,
                patient_ref,
            ),
        )
        if ins and not link["ins"]:
            self._ins_arrived(link["regional_ref"], patient_ref, ins, oid, traits, now)

    def _link_new(
        self,
        patient_ref: int,
        site: str,
        ins: str | None,
        oid: str | None,
        status: str,
        traits: Traits,
        now: datetime,
    ) -> None:
        holder = self._regional("ins = ? AND merged_into IS NULL", (ins,)) if ins else None
        if holder is not None and not differences(_traits(holder), traits, near=self.near):
            self._insert_link(patient_ref, holder["id"], ins, oid, status, traits, now)
            return
        # a regional identity of its own; it carries the INS unless another does
        ref = self._new_regional(None if holder is not None else ins, oid, status, traits, now)
        self._insert_link(patient_ref, ref, ins, oid, status, traits, now)
        if holder is not None:
            self._enqueue(
                "conflict",
                "ins-traits",
                holder["id"],
                ref,
                patient_ref,
                {
                    "ins": ins,
                    "site": site,
                    "traits": differences(_traits(holder), traits, near=self.near),
                    "holder": _traits(holder).as_dict(),
                    "observed": traits.as_dict(),
                },
                now,
            )
            return
        self._propose(ref, site, ins, traits, now)

    def _ins_arrived(
        self,
        regional_ref: int,
        patient_ref: int,
        ins: str,
        oid: str | None,
        traits: Traits,
        now: datetime,
    ) -> None:
        """A local identity already linked now carries an INS."""
        mine = self._regional_by_ref(regional_ref)
        holder = self._regional("ins = ? AND merged_into IS NULL", (ins,))
        if holder is None:
            if not mine["ins"]:
                self.db.execute(
                    "UPDATE identity_regional SET ins = ?, ins_oid = ?, updated_at = ? "
                    "WHERE id = ?",
                    (ins, oid, now, regional_ref),
                )
            return
        if holder["id"] == regional_ref:
            return
        if differences(_traits(holder), traits, near=self.near):
            self._enqueue(
                "conflict",
                "ins-traits",
                holder["id"],
                regional_ref,
                patient_ref,
                {
                    "ins": ins,
                    "traits": differences(_traits(holder), traits, near=self.near),
                    "holder": _traits(holder).as_dict(),
                    "observed": traits.as_dict(),
                },
                now,
            )
        else:
            self._enqueue(
                "proposal", "same-ins", holder["id"], regional_ref, patient_ref, {"ins": ins}, now
            )

    @property
    def near(self) -> bool:
        return self.settings.near_match

    def _new_regional(
        self, ins: str | None, oid: str | None, status: str, traits: Traits, now: datetime
    ) -> int:
        ref = int(
            self.db.scalar(
                "INSERT INTO identity_regional (regional_id, ins, ins_oid, status, "
                + ", ".join(TRAIT_FIELDS)
                + ", created_at, updated_at) VALUES (?, ?, ?, ?, "
                + ", ".join("?" * len(TRAIT_FIELDS))
                + ", ?, ?) RETURNING id",
                (
                    "pending-" + uuid.uuid4().hex,
                    ins,
                    oid if ins else None,
                    status,
                    *traits.as_dict().values(),
                    now,
                    now,
                ),
            )
        )
        self.db.execute(
            "UPDATE identity_regional SET regional_id = ? WHERE id = ?",
            (f"{self.settings.regional_prefix}{ref:09d}", ref),
        )
        return ref

    def _insert_link(
        self,
        patient_ref: int,
        regional_ref: int,
        ins: str | None,
        oid: str | None,
        status: str,
        traits: Traits,
        now: datetime,
    ) -> None:
        self.db.execute(
            "INSERT INTO identity_links (patient_ref, regional_ref, ins, ins_oid, status, "
            + ", ".join(TRAIT_FIELDS)
            + ", linked_at, updated_at) VALUES (?, ?, ?, ?, ?, "
            + ", ".join("?" * len(TRAIT_FIELDS))
            + ", ?, ?)",
            (patient_ref, regional_ref, ins, oid, status, *traits.as_dict().values(), now, now),
        )

    def _propose(self, ref: int, site: str, ins: str | None, traits: Traits, now: datetime) -> None:
        """Queue a link proposal for every regional identity of another site
        whose traits match those of the new identity ``ref``."""
        if not traits.birth_date:
            return
        candidates = self.db.query(
            f"SELECT id, {', '.join(_REGIONAL_FIELDS)}, created_at, updated_at "
            "FROM identity_regional WHERE birth_date = ? AND merged_into IS NULL AND id <> ? "
            "ORDER BY id LIMIT 50",
            (traits.birth_date, ref),
        )
        for values in candidates:
            other = _row(("id", *_REGIONAL_FIELDS, "created_at", "updated_at"), values)
            if ins and other["ins"] and other["ins"] != ins:
                continue  # two different INS: two people
            if not traits_match(_traits(other), traits, near=self.near):
                continue
            sites = {
                r[0]
                for r in self.db.query(
                    "SELECT p.site FROM identity_links l JOIN patients p ON p.id = l.patient_ref "
                    "WHERE l.regional_ref = ?",
                    (other["id"],),
                )
            }
            if not sites or sites == {site}:
                continue  # proposals link different sites' identities
            if self.db.scalar(
                "SELECT 1 FROM identity_queue WHERE kind = 'proposal' AND "
                "((regional_a = ? AND regional_b = ?) OR (regional_a = ? AND regional_b = ?))",
                (other["id"], ref, ref, other["id"]),
            ):
                continue
            exact = traits_match(_traits(other), traits, near=False)
            self._enqueue(
                "proposal",
                "same-traits" if exact else "near-traits",
                other["id"],
                ref,
                None,
                {"traits": traits.as_dict(), "candidate": _traits(other).as_dict()},
                now,
            )

    def _enqueue(
        self,
        kind: str,
        reason: str,
        a: int | None,
        b: int | None,
        patient_ref: int | None,
        detail: dict[str, Any],
        now: datetime,
    ) -> int:
        item = int(
            self.db.scalar(
                "INSERT INTO identity_queue (kind, reason, regional_a, regional_b, patient_ref, "
                "detail, state, created_at) VALUES (?, ?, ?, ?, ?, ?, 'open', ?) RETURNING id",
                (kind, reason, a, b, patient_ref, json.dumps(detail, sort_keys=True), now),
            )
        )
        log.info(
            "identity-vigilance item queued", extra={"item": item, "kind": kind, "reason": reason}
        )
        self.audit.write(
            AuditEntry(
                SYSTEM.name,
                SYSTEM.kind,
                f"identity.{kind}.queued",
                "allowed",
                detail={"item": item, "reason": reason},
            )
        )
        return item

    # -- decisions ---------------------------------------------------------------------------

    def _entry(self, actor: Actor, action: str, detail: dict[str, Any]) -> None:
        self.audit.write(
            AuditEntry(
                actor.name,
                actor.kind,
                action,
                "allowed",
                role=actor.role,
                source=actor.source,
                detail=detail,
            )
        )

    def _open_item(self, item_id: int, kind: str) -> dict[str, Any]:
        item = self.item(item_id)
        if item["kind"] != kind:
            raise IdentityError(
                409,
                f"item {item_id} is a {item['kind']}, not a {kind}: use the {item['kind']}'s "
                "action",
            )
        if item["state"] != "open":
            raise IdentityError(
                409, f"item {item_id} was already {item['state']} by {item['decided_by']}"
            )
        return item

    def _decide(self, item_id: int, state: str, actor: Actor, note: str) -> None:
        self.db.execute(
            "UPDATE identity_queue SET state = ?, decided_at = ?, decided_by = ?, note = ? "
            "WHERE id = ?",
            (state, self.db.clock.now(), actor.name, note or None, item_id),
        )

    def accept(self, item_id: int, actor: Actor, note: str = "") -> dict[str, Any]:
        """Accept a link proposal: the two regional identities are merged (the
        one with an INS, else the older, survives).  Returns the merge."""
        with self.db.transaction():
            item = self._open_item(item_id, "proposal")
            a, b = self._active(item["regional_a"]), self._active(item["regional_b"])
            survivor, merged = (b, a) if b["ins"] and not a["ins"] else (a, b)
            merge = self._merge(survivor, merged, actor, note, item_id)
            self._decide(item_id, "accepted", actor, note)
            self._entry(
                actor, "identity.proposal.accepted", {"item": item_id, "merge": merge["id"]}
            )
        return merge

    def reject(self, item_id: int, actor: Actor, note: str = "") -> dict[str, Any]:
        """Reject a link proposal: the identities stay apart and the pair is
        not proposed again."""
        with self.db.transaction():
            self._open_item(item_id, "proposal")
            self._decide(item_id, "rejected", actor, note)
            self._entry(actor, "identity.proposal.rejected", {"item": item_id, "note": note})
        return self.item(item_id)

    def resolve(self, item_id: int, actor: Actor, action: str, note: str = "") -> dict[str, Any]:
        """Resolve a conflict: ``merge`` its two regional identities (the
        first, which held the INS first, survives) or ``dismiss`` it (the
        identities stay as they are; the note says why)."""
        if action not in ("merge", "dismiss"):
            raise IdentityError(
                400, f"a conflict is resolved by 'merge' or 'dismiss', not {action!r}"
            )
        if action == "dismiss" and not note.strip():
            raise IdentityError(400, "dismissing a conflict needs a note saying why")
        with self.db.transaction():
            item = self._open_item(item_id, "conflict")
            detail: dict[str, Any] = {"item": item_id, "action": action, "note": note}
            if action == "merge":
                if not item["regional_b"]:
                    raise IdentityError(
                        409,
                        f"conflict {item_id} concerns one identity: there is nothing to "
                        "merge; correct the producer's data and dismiss it",
                    )
                a, b = self._active(item["regional_a"]), self._active(item["regional_b"])
                detail["merge"] = self._merge(a, b, actor, note, item_id)["id"]
            self._decide(item_id, "resolved", actor, note)
            self._entry(actor, "identity.conflict.resolved", detail)
        return self.item(item_id)

    def merge(
        self, survivor_id: str, merged_id: str, actor: Actor, note: str = ""
    ) -> dict[str, Any]:
        """Merge regional identity ``merged_id`` into ``survivor_id``."""
        with self.db.transaction():
            survivor, merged = self._named(survivor_id), self._named(merged_id)
            return self._merge(survivor, merged, actor, note, None)

    def _named(self, regional_id: str) -> dict[str, Any]:
        found = self.regional(regional_id)
        if found is None:
            raise IdentityError(404, f"no regional identity {regional_id!r}")
        if found["merged_into"] is not None:
            raise IdentityError(
                409,
                f"{regional_id} was merged into "
                f"{self._active(regional_id)['regional_id']}: name that identity instead",
            )
        return found

    def _merge(
        self,
        survivor: dict[str, Any],
        merged: dict[str, Any],
        actor: Actor,
        note: str,
        item_id: int | None,
    ) -> dict[str, Any]:
        db = self.db
        if survivor["id"] == merged["id"]:
            raise IdentityError(409, f"{survivor['regional_id']} cannot be merged into itself")
        if survivor["ins"] and merged["ins"] and survivor["ins"] != merged["ins"]:
            raise IdentityError(
                409,
                f"{survivor['regional_id']} and {merged['regional_id']} carry two "
                "different INS: two people, not one; correct the INS first",
            )
        now = db.clock.now()
        links = self._links(merged["id"])
        closed = [
            {"id": r[0], "state": r[1], "decided_at": _iso(r[2]), "decided_by": r[3], "note": r[4]}
            for r in db.query(
                "SELECT id, state, decided_at, decided_by, note FROM identity_queue WHERE "
                "state = 'open' AND id <> ? AND ((regional_a = ? AND regional_b = ?) OR "
                "(regional_a = ? AND regional_b = ?))",
                (item_id or 0, survivor["id"], merged["id"], merged["id"], survivor["id"]),
            )
        ]
        snapshot = {
            "survivor": _jsonable(survivor),
            "merged": _jsonable(merged),
            "links": [link["patient_ref"] for link in links],
            "queue": closed,
            "item": item_id,
        }
        merge_id = int(
            db.scalar(
                "INSERT INTO identity_merges (survivor_ref, merged_ref, snapshot, merged_at, "
                "merged_by) VALUES (?, ?, ?, ?, ?) RETURNING id",
                (
                    survivor["id"],
                    merged["id"],
                    json.dumps(snapshot, sort_keys=True),
                    now,
                    actor.name,
                ),
            )
        )
        if not survivor["ins"] and merged["ins"]:
            db.execute(
                "UPDATE identity_regional SET ins = ?, ins_oid = ?, updated_at = ? WHERE id = ?",
                (merged["ins"], merged["ins_oid"], now, survivor["id"]),
            )
        db.execute(
            "UPDATE identity_links SET regional_ref = ? WHERE regional_ref = ?",
            (survivor["id"], merged["id"]),
        )
        db.execute(
            "UPDATE identity_regional SET merged_into = ?, updated_at = ? WHERE id = ?",
            (survivor["id"], now, merged["id"]),
        )
        for item in closed:
            db.execute(
                "UPDATE identity_queue SET state = 'accepted', decided_at = ?, decided_by = ?, "
                "note = ? WHERE id = ?",
                (now, actor.name, f"merge {merge_id}", item["id"]),
            )
        self._entry(
            actor,
            "identity.merged",
            {
                "merge": merge_id,
                "survivor": survivor["regional_id"],
                "merged": merged["regional_id"],
                "links": len(links),
                "note": note,
            },
        )
        return {
            "id": merge_id,
            "survivor": survivor["regional_id"],
            "merged": merged["regional_id"],
            "links": len(links),
        }

    def _timestamp(self, value: Any) -> Any:
        """A timestamp read back from a snapshot, as the backend stores it
        (PostgreSQL: a datetime; SQLite: the text it was read as)."""
        if isinstance(value, str) and self.db.dialect == "postgresql":
            return datetime.fromisoformat(value)
        return value

    def unmerge(self, merge_id: int, actor: Actor, note: str = "") -> dict[str, Any]:
        """Undo a merge exactly: both identities' rows as they were, the moved
        links back, the queue items it closed reopened."""
        db = self.db
        with db.transaction():
            row = db.query_one(
                "SELECT survivor_ref, merged_ref, snapshot, undone_at, undone_by "
                "FROM identity_merges WHERE id = ?",
                (merge_id,),
            )
            if row is None:
                raise IdentityError(404, f"no merge {merge_id}")
            survivor_ref, merged_ref, snapshot, undone_at, undone_by = row
            if undone_at is not None:
                raise IdentityError(409, f"merge {merge_id} was already undone by {undone_by}")
            survivor = self._regional_by_ref(survivor_ref)
            merged = self._regional_by_ref(merged_ref)
            if survivor["merged_into"] is not None:
                later = db.scalar(
                    "SELECT MAX(id) FROM identity_merges WHERE merged_ref = ? "
                    "AND undone_at IS NULL",
                    (survivor_ref,),
                )
                raise IdentityError(
                    409,
                    f"{survivor['regional_id']} was merged again later (merge {later}): "
                    "unmerge that one first",
                )
            if merged["merged_into"] != survivor_ref:
                raise IdentityError(
                    409, f"merge {merge_id} is not the current state of {merged['regional_id']}"
                )
            saved = json.loads(snapshot)
            moved = list(saved["links"])
            if moved:
                marks = ", ".join("?" * len(moved))
                elsewhere = db.scalar(
                    f"SELECT COUNT(*) FROM identity_links WHERE patient_ref IN ({marks}) "
                    "AND regional_ref <> ?",
                    (*moved, survivor_ref),
                )
                if elsewhere:
                    raise IdentityError(
                        409,
                        f"local identities merge {merge_id} moved have been moved since: "
                        "undo the later merges first",
                    )
                db.execute(
                    f"UPDATE identity_links SET regional_ref = ? WHERE patient_ref IN ({marks})",
                    (merged_ref, *moved),
                )
            for key in ("survivor", "merged"):
                values = saved[key]
                db.execute(
                    "UPDATE identity_regional SET "
                    + ", ".join(f"{f} = ?" for f in _REGIONAL_FIELDS)
                    + ", updated_at = ? WHERE id = ?",
                    (
                        *(values[f] for f in _REGIONAL_FIELDS),
                        self._timestamp(values["updated_at"]),
                        values["id"],
                    ),
                )
            for item in saved["queue"]:
                db.execute(
                    "UPDATE identity_queue SET state = ?, decided_at = ?, decided_by = ?, note = ? "
                    "WHERE id = ?",
                    (
                        item["state"],
                        self._timestamp(item["decided_at"]),
                        item["decided_by"],
                        item["note"],
                        item["id"],
                    ),
                )
            if saved.get("item"):
                # the proposal or conflict whose decision was this merge is open again
                db.execute(
                    "UPDATE identity_queue SET state = 'open', decided_at = NULL, "
                    "decided_by = NULL, note = NULL WHERE id = ?",
                    (saved["item"],),
                )
            now = db.clock.now()
            db.execute(
                "UPDATE identity_merges SET undone_at = ?, undone_by = ? WHERE id = ?",
                (now, actor.name, merge_id),
            )
            self._entry(
                actor,
                "identity.unmerged",
                {
                    "merge": merge_id,
                    "survivor": survivor["regional_id"],
                    "merged": merged["regional_id"],
                    "links": len(moved),
                    "note": note,
                },
            )
        return {
            "id": merge_id,
            "survivor": survivor["regional_id"],
            "merged": merged["regional_id"],
            "links": len(moved),
        }


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _iso(v) for k, v in row.items()}


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "regional_id": row["regional_id"],
        "ins": row["ins"],
        "ins_oid": row["ins_oid"],
        "status": row["status"],
        "traits": _traits(row).as_dict(),
        "merged_into": None,
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
    }


def _queue_item(r: Sequence[Any]) -> dict[str, Any]:
    return {
        "id": int(r[0]),
        "kind": r[1],
        "reason": r[2],
        "regional_a": r[3],
        "regional_b": r[4],
        "patient_ref": r[5],
        "detail": json.loads(r[6] or "{}"),
        "state": r[7],
        "created_at": _iso(r[8]),
        "decided_at": _iso(r[9]),
        "decided_by": r[10],
        "note": r[11],
    }
