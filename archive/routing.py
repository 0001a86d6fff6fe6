"""Routing: forward matching instances or stable studies to other systems.

Rules (``[[routes]]``, read as :class:`archive.topology.Route` records) match
on the producing site, the calling AE, modality, SOP class, study description
and body part (exact, ``*``/``?`` wildcards, or ``re:`` regular expressions).
A matching instance (``when = "instance"``) or a study that became stable
(``when = "stable"``) becomes a delivery job,
enqueued in the same transaction as the change that caused it, so no
delivery is lost across restarts.  The job sends to a DICOM peer (C-STORE,
in a transfer syntax the peer accepts) or to a STOW-RS endpoint; failures are
retried with back-off by the job queue.  Delivery is at least once: the
receivers' idempotence (same SOP Instance UID, same bytes) makes it exactly
once in their index.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context

from archive import multipart
from archive.codecs import convert_for
from archive.config import Config
from archive.hookspecs import hookimpl
from archive.index.catalog import CommitResult, InstanceRecord, StoreOutcome
from archive.index.db import Database
from archive.jobs import JobQueue, PermanentJobError
from archive.retrieve import StoredObject, locate, read
from archive.scu import close_reactor_race
from archive.topology import Route

log = logging.getLogger(__name__)
STOW_BATCH = 50


def matches(pattern: str | None, value: str | None) -> bool:
    """One match key: no pattern matches everything; ``re:`` is a regular
    expression (searched); ``*`` / ``?`` are wildcards; otherwise equality."""
    if pattern is None or pattern == "":
        return True
    text = value or ""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], text) is not None
    if "*" in pattern or "?" in pattern:
        return fnmatch.fnmatchcase(text, pattern)
    return text == pattern


def route_matches(route: Route, attrs: dict[str, Any]) -> bool:
    """Whether every match key of ``route`` matches; list values (a study's
    modalities, its series' body parts) match when any element does."""
    for key, pattern in route.match.items():
        value = attrs.get(key)
        values = value if isinstance(value, list | tuple | set) else [value]
        if not any(matches(pattern, v) for v in values):
            return False
    return True


def commit_hook(config: Config):  # noqa: ANN201 - a Catalog.commit hook
    """Enqueue instance routes for the instances a commit stored."""
    routes = [r for r in config.routes if r.when == "instance" and r.kind == "forward"]

    def hook(db: Database, done: Sequence[tuple[InstanceRecord, CommitResult]]) -> None:
        if not routes:
            return
        queue = JobQueue(db)
        for record, result in done:
            if result.outcome not in (StoreOutcome.STORED, StoreOutcome.REPLACED):
                continue
            attrs = {
                "site": record.site,
                "calling_aet": record.calling_aet,
                "modality": record.modality,
                "sop_class": record.sop_class_uid,
                "study_description": record.study_description,
                "body_part": record.body_part_examined,
            }
            for route in routes:
                if route_matches(route, attrs):
                    queue.enqueue(
                        "route.instance",
                        {"route": route.name, "sop": record.sop_instance_uid},
                        dedupe_key=f"route:{route.name}:{record.sop_instance_uid}",
                    )

    return hook


def on_stable(config: Config, db: Database, study_uid: str) -> None:
    """Enqueue stable-study routes for a study that just became stable (inside
    the transaction that records its study.stable)."""
    routes = [r for r in config.routes if r.when == "stable" and r.kind == "forward"]
    if not routes:
        return
    attrs = stable_attrs(db, study_uid)
    if attrs is None:
        return
    queue = JobQueue(db)
    for route in routes:
        if route_matches(route, attrs):  # calling_aet is an instance-route key
            queue.enqueue(
                "route.study",
                {"route": route.name, "study": study_uid},
                dedupe_key=f"route:{route.name}:{study_uid}",
            )


def stable_attrs(db: Database, study_uid: str) -> dict[str, Any] | None:
    """What a stable-study route matches on, read from the index (None: no
    such study): its site, modalities, SOP classes, description and the body
    parts of its series.  The worklist's read routes match on the same."""
    row = db.query_one(
        "SELECT site, modalities, study_description FROM studies WHERE study_uid = ?", (study_uid,)
    )
    if row is None:
        return None
    site, modalities, description = row
    series = db.query(
        "SELECT DISTINCT se.body_part_examined FROM series se JOIN studies st "
        "ON st.id = se.study_ref WHERE st.study_uid = ?",
        (study_uid,),
    )
    classes = db.query(
        "SELECT DISTINCT i.sop_class_uid FROM instances i JOIN series se ON se.id = "
        "i.series_ref JOIN studies st ON st.id = se.study_ref WHERE st.study_uid = ?",
        (study_uid,),
    )
    return {
        "site": site,
        "calling_aet": None,
        "modality": [m for m in (modalities or "").split("\\") if m],
        "sop_class": [c[0] for c in classes],
        "study_description": description,
        "body_part": [b[0] for b in series],
    }


# -- delivery -------------------------------------------------------------------------------


def _route(config: Config, name: str) -> Route:
    route = config.route(name)
    if route is None:
        raise PermanentJobError(f"route {name!r} is no longer configured")
    return route


def deliver(archive, route: Route, items: list[StoredObject]) -> None:  # noqa: ANN001
    if not items:
        return  # deleted meanwhile: nothing to send
    if route.to_dicom:
        _to_dicom(archive, route.to_dicom, items)
    elif route.to_stow:
        _to_stow(archive, route.to_stow, items, _bearer(route))
    else:
        raise PermanentJobError(f"route {route.name!r} has no destination")


def _to_dicom(archive, aet: str, items: list[StoredObject]) -> None:  # noqa: ANN001
    peer = archive.config.peer(aet)
    if peer is None:
        raise PermanentJobError(f"route destination {aet!r} is not in [[dicom.peers]]")
    close_reactor_race()
    ae = AE(ae_title=archive.config["dicom.aet"])
    contexts, seen = [], set()
    for item in items:
        for ts in (item.transfer_syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if (item.sop_class_uid, ts) not in seen:
                seen.add((item.sop_class_uid, ts))
                contexts.append(build_context(item.sop_class_uid, [ts]))
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=aet,
        contexts=contexts[:128],
        max_pdu=archive.config["dicom.max_pdu"],
    )
    if not assoc.is_established:
        raise ConnectionError(f"could not associate with {aet} at {peer.host}:{peer.port}")
    try:
        accepted: dict[str, set[str]] = {}
        for cx in assoc.accepted_contexts:
            accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
        for item in items:
            ds = convert_for(read(archive.store, item), accepted.get(item.sop_class_uid, set()))
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None or not (code == 0 or 0xB000 <= code <= 0xBFFF):
                raise RuntimeError(
                    f"{aet} answered C-STORE of {item.sop_instance_uid} with "
                    f"status {code if code is None else hex(code)}"
                )
        assoc.release()
    except BaseException:
        assoc.abort()
        raise


def _bearer(route: Route) -> str:
    """The destination's API token, read from ``stow_token_file`` at each delivery
    (so a rotated token is picked up without a restart)."""
    path = route.stow_token_file
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError as exc:
        raise RuntimeError(f"route {route.name!r}: cannot read stow_token_file: {exc}") from None


def _to_stow(archive, base_url: str, items: list[StoredObject], token: str = "") -> None:  # noqa: ANN001
    """POST the objects as STOW-RS requests of up to STOW_BATCH instances, each
    body streamed from the store chunk by chunk (chunked transfer encoding)."""
    url = base_url.rstrip("/") + "/studies"
    for start in range(0, len(items), STOW_BATCH):
        batch = items[start : start + STOW_BATCH]
        boundary = multipart.new_boundary()
        body = multipart.stream(
            (
                ("application/dicom", multipart.chunks(archive.store.open(item.object_key)))
                for item in batch
            ),
            boundary,
        )
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={
                "Content-Type": multipart.content_type(boundary, "application/dicom"),
                "Accept": "application/dicom+json",
                **({"Authorization": f"Bearer {token}"} if token else {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as answer:
                answer.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            raise RuntimeError(f"STOW-RS to {url} answered {exc.code}: {detail}") from None


def run_instance(archive, payload: dict) -> None:  # noqa: ANN001 - Archive
    route = _route(archive.config, payload["route"])
    deliver(archive, route, locate(archive.db, "IMAGE", {"SOPInstanceUID": payload["sop"]}))


def run_study(archive, payload: dict) -> None:  # noqa: ANN001 - Archive
    route = _route(archive.config, payload["route"])
    deliver(archive, route, locate(archive.db, "STUDY", {"StudyInstanceUID": payload["study"]}))


# -- registration ----------------------------------------------------------------------------


def _on_stable_event(archive, event) -> None:  # noqa: ANN001 - Archive, events.Event
    on_stable(archive.config, archive.db, event.study_uid)


@hookimpl
def imag_job_kinds() -> dict:
    return {"route.instance": run_instance, "route.study": run_study}


@hookimpl
def imag_ingest_commit_hooks(config: Config) -> list:
    return [commit_hook(config)]


@hookimpl
def imag_event_subscribers() -> list:
    from archive.events import Subscriber

    # transactional: the delivery jobs are enqueued exactly once per stable burst
    return [Subscriber("routing", ("study.stable",), _on_stable_event)]
