"""The refusal of an incoming object, shared by the header parse
(:mod:`archive.parse`), the ingest checks (:mod:`archive.validate`) and the
pipeline (:mod:`archive.ingest`).  A leaf module, so that every check can
raise it without import cycles; :mod:`archive.parse` re-exports it."""

from __future__ import annotations


class Rejected(Exception):
    """An incoming object that is refused, with a reason a sender can act on.

    ``code`` is a stable short name for the kind of problem (also the metrics
    label and the basis of the DICOM / HTTP status the network services send).
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
