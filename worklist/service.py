"""The worklist in a running archive: which group reads a new request, what a
route's request knows from the images, the patient's prior studies, and who
the caller is as a :class:`~worklist.requests.Viewer`.

The HTTP API, UPS-RS and the reports call these instead of assembling the
pieces themselves, so that a request made by a route at 03:00 and one made by
a site user at the same instant land in the same group.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from archive.events import Event
from archive.messaging import InvalidMessage, Message, send
from archive.orientation import OrientationError
from archive.priors import same_person_studies
from archive.routing import route_matches, stable_attrs
from archive.security.principals import Principals
from archive.security.roles import Principal
from worklist.requests import ReadRequest, Timings, Viewer, Worklist
from worklist.ups import FINAL, IN_PROGRESS

if TYPE_CHECKING:
    from archive.runtime import Archive

log = logging.getLogger(__name__)


def worklist_of(archive: Archive) -> Worklist:
    """The archive's worklist (cheap: no state of its own beyond the index)."""
    return Worklist(archive.db, archive.clock, Timings.from_config(archive.config), archive.audit)


def viewer_of(principal: Principal) -> Viewer:
    """The caller as the worklist sees it: admins see and claim everything;
    others their sites' requests (as requesters) and their reading groups'
    (as readers).  The principal's groups already include the orientation
    roster (the HTTP security adds them when it authenticates)."""
    return Viewer(
        principal.name,
        sites=frozenset(principal.sites),
        groups=frozenset(principal.groups),
        everything=principal.role == "admin",
    )


def group_on_call(archive: Archive, site: str, at: datetime) -> str | None:
    """The reading group on call for ``site`` at ``at`` (the orientation
    plugin, in the site's time zone); None when nobody is or the site is not
    in the directory (the request is then unassigned: admins see it)."""
    try:
        group = archive.orientation.on_call(site, at)
    except OrientationError as exc:
        log.warning("no reading group for site %r: %s", site, exc)
        return None
    return group.name if group is not None else None


def assign(archive: Archive, request: ReadRequest) -> None:
    """Let the group's members see the study's images and the patient's prior
    studies (they are routed to the group: ``study_groups``, what the
    archive's scoping reads)."""
    if request.group:
        studies = [request.study_uid, *(p["study_uid"] for p in priors(archive, request.study_uid))]
        Principals(archive.db).grant_group(request.group, studies)


def _from_index(attrs: dict[str, Any], db: Any, study_uid: str) -> dict[str, Any]:
    """What a route's request knows from the images: the referring physician,
    the exam (study description or modalities) and the region (body parts)."""
    row = db.query_one(
        "SELECT referring_physician_name, study_description FROM studies WHERE study_uid = ?",
        (study_uid,),
    )
    referring, description = row if row is not None else (None, None)
    fields: dict[str, Any] = {}
    if referring:
        fields["requesting_physician"] = " ".join(p for p in str(referring).split("^") if p)
    exam = description or "/".join(attrs.get("modality") or [])
    if exam:
        fields["exam_type"] = exam
    parts = [p for p in attrs.get("body_part") or [] if p]
    if parts:
        fields["anatomical_region"] = ", ".join(sorted(set(parts)))
    return fields


def _new_images_since(db: Any, study_uid: str, since: Any) -> bool:
    """Whether the study received images (not the worklist's own reports)
    after ``since``."""
    return bool(
        db.scalar(
            "SELECT 1 FROM instances i JOIN series se ON se.id = i.series_ref "
            "JOIN studies st ON st.id = se.study_ref WHERE st.study_uid = ? "
            "AND i.received_at > ? AND se.series_uid NOT IN (SELECT series_uid FROM read_outputs) "
            "LIMIT 1",
            (study_uid, since),
        )
    )


def on_stable(archive: Archive, event: Event) -> None:
    """A study became stable: each ``kind = "read"`` route it matches asks for
    it to be read -- one request per burst.  A study already waiting or being
    read gets no second request; one whose reading is done gets a new one
    only for new images (its own report series do not count)."""
    routes = [r for r in archive.config.routes if r.kind == "read"]
    if not routes or not event.study_uid:
        return
    db = archive.db
    attrs = stable_attrs(db, event.study_uid)
    if attrs is None:
        return
    route = next((r for r in routes if route_matches(r, attrs)), None)
    if route is None:
        return
    latest = db.query_one(
        "SELECT state, created_at FROM read_requests WHERE study_uid = ? ORDER BY id DESC LIMIT 1",
        (event.study_uid,),
    )
    if latest is not None:
        state, created_at = latest
        if state not in FINAL or not _new_images_since(db, event.study_uid, created_at):
            return
    at = datetime.fromisoformat(event.at) if event.at else archive.clock.now()
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    site = attrs["site"] or ""
    worklist = worklist_of(archive)
    request = worklist.create(
        study_uid=event.study_uid,
        site=site,
        group=group_on_call(archive, site, at),
        fields=_from_index(attrs, db, event.study_uid),
        created_by="imag",
        kind="read",
        origin=f"route:{route.name}",
        priority=route.priority,
        reply_to=route.reply_to or "",
        burst=event.seq,
        complete=False,
    )
    assign(archive, request)
    log.info(
        "reading request created",
        extra={
            "request": request.uid,
            "study": request.study_uid,
            "site": site,
            "group": request.group,
            "route": route.name,
        },
    )


def priors(archive: Archive, study_uid: str) -> list[dict[str, Any]]:
    """The patient's other studies, at every site, through the regional
    identity (the default identity provider's regional index), newest first:
    what a reader needs to compare.  :func:`assign` routes them to the
    request's group with the study, so the reader can open them too: the
    request gives the need to know."""
    return same_person_studies(archive.db, archive.identity, study_uid)


def notify_cancel_request(archive: Archive, item: ReadRequest) -> int | None:
    """Tell the reading group (its address in the orientation directory, if
    it has one) that the requester asks to cancel a request being read; the
    queued message's id, or None when the group has no address."""
    if not item.group:
        return None
    try:
        group = next((g for g in archive.orientation.groups() if g.name == item.group), None)
    except Exception:  # noqa: BLE001 - the request shows the cancel request anyway
        log.warning("reading group %s unavailable", item.group, exc_info=True)
        return None
    address = getattr(group, "address", "") if group is not None else ""
    if not address:
        return None
    reason = item.cancel_reason or "(no reason given)"
    message = Message(
        to=[address],
        subject=f"Cancellation requested: reading request {item.uid}",
        text=(
            f"The site {item.site} asks to cancel the reading request {item.uid} "
            f"(study {item.study_uid}), held by {item.performer}.\n"
            f"Asked by {item.cancel_requested_by}. Reason: {reason}\n"
            "The reader decides: cancel it, or complete it.\n"
        ),
        purpose="worklist.cancel-request",
        study_uid=item.study_uid,
    )
    try:
        return send(archive, message, by="worklist")
    except InvalidMessage:
        log.warning("cannot notify %s of a cancel request", address, exc_info=True)
        return None


def withdraw(
    archive: Archive, uid: str, viewer: Viewer, reason: str
) -> tuple[ReadRequest, int | None]:
    """The requester withdraws a request (REST or UPS-RS): canceled at once
    when SCHEDULED; when IN PROGRESS it is marked and its reading group told
    (the message id is returned with the request)."""
    item = worklist_of(archive).request_cancel(uid, viewer, reason)
    notified = notify_cancel_request(archive, item) if item.state == IN_PROGRESS else None
    return item, notified
