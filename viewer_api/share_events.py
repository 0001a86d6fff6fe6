"""When a report is validated, a view-only link for the referring GP: the
durable subscriber of ``report.validated`` (transactional, so the link, its
mail and the delivery commit together: exactly once per event).

The event's detail names the addresses in ``share_with`` (the worklist adds
the GP's); an event without them asks for nothing.  Each address gets its own
link (audience ``gp``, the default GP lifetime), so one can be revoked
without the other, and one audit entry ``share.create``.
"""

from __future__ import annotations

import logging
from typing import Any

from archive.events import Event
from archive.messaging import InvalidMessage
from archive.security.audit import AuditEntry
from archive.security.roles import Principal
from viewer_api import shares
from viewer_api.shares_http import mail_link

log = logging.getLogger(__name__)

#: the creator recorded on links the subscriber makes
SYSTEM = "imag-sharing"


def public_url(config: Any) -> str:
    """The base of links mailed without a request to take the origin from."""
    configured = config["http.public_url"]
    if configured:
        return configured.rstrip("/")
    return f"http://{config['http.host']}:{config['http.port']}"


def on_report_validated(archive: Any, event: Event) -> None:
    wanted = (event.detail or {}).get("share_with") or []
    if not event.study_uid or not isinstance(wanted, list):
        return
    site = event.site or ""
    creator = Principal(SYSTEM, "admin", kind="system", sites=(site,) if site else ())
    for address in dict.fromkeys(a for a in wanted if isinstance(a, str)):
        try:
            share, secret = shares.create(
                archive,
                creator,
                shares.Request(study_uid=event.study_uid, audience="gp", recipient=address),
                site=site,
            )
        except (shares.ShareError, InvalidMessage) as exc:
            log.warning(
                "no share link for a validated report",
                extra={"study": event.study_uid, "to": address, "reason": str(exc)},
            )
            continue
        message = mail_link(archive, share, f"{public_url(archive.config)}/share/{secret}", SYSTEM)
        archive.audit.write(
            AuditEntry(
                SYSTEM,
                "system",
                "share.create",
                "allowed",
                study_uid=share.study_uid,
                detail={"share": share.id, "to": address, "message": message, "event": event.seq},
            )
        )
