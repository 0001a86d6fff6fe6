"""The states of a reading request and the statuses of a refused change, as in
DICOM's Unified Procedure Step (PS3.4 annex CC, PS3.18 UPS-RS).

The worklist keeps the UPS state machine so that a reporting tool that speaks
UPS-RS and a browser on ``/api/worklist`` see the same item the same way:
``SCHEDULED -> IN PROGRESS -> COMPLETED | CANCELED``, a claim returns a
Transaction UID, and every later change by the holder presents it.  A change
that the state does not allow raises :class:`UpsError` carrying the UPS status
(``C302`` ...) and the HTTP status PS3.18 gives it; a change that has already
happened is a :class:`UpsWarning` (``B304`` / ``B306``): the caller answers
success with a warning, the way UPS does.
"""

from __future__ import annotations

SCHEDULED = "SCHEDULED"
IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
CANCELED = "CANCELED"
STATES = (SCHEDULED, IN_PROGRESS, COMPLETED, CANCELED)
FINAL = (COMPLETED, CANCELED)

#: the worklist's priorities, most urgent first, and their UPS Scheduled
#: Procedure Step Priority (0074,1200)
PRIORITIES = {"STAT": "HIGH", "URGENT": "MEDIUM", "ROUTINE": "LOW"}
#: rank for ordering: STAT before URGENT before ROUTINE
RANK = {name: rank for rank, name in enumerate(PRIORITIES)}
UPS_PRIORITY_TO_NAME = {ups: name for name, ups in PRIORITIES.items()}

#: UPS status -> (HTTP status, what it means)
CODES = {
    "C300": (409, "the request is already in a final state (COMPLETED or CANCELED)"),
    "C301": (409, "the Transaction UID is missing or is not the one the claim returned"),
    "C302": (409, "the request is already IN PROGRESS: another reader holds it"),
    "C303": (409, "a request cannot move back to SCHEDULED this way"),
    "C307": (404, "no such request (or not one you may see)"),
    "C310": (409, "the request is not IN PROGRESS"),
    "C311": (409, "a completed request cannot be canceled"),
    "B304": (200, "the request was already CANCELED"),
    "B306": (200, "the request was already COMPLETED"),
}


class UpsError(Exception):
    """A change the request's state refuses: ``code`` is the UPS status,
    ``http`` the HTTP status, the message says what to do."""

    def __init__(self, code: str, message: str = "") -> None:
        self.code = code
        self.http, meaning = CODES[code]
        super().__init__(message or meaning)


class UpsWarning(Exception):
    """The change had already happened (B304 already canceled, B306 already
    completed): nothing changed, and the caller answers success with a warning."""

    def __init__(self, code: str, item: object = None) -> None:
        self.code = code
        self.item = item
        super().__init__(CODES[code][1])
