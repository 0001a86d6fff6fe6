"""Screening in a running archive: the :class:`~worklist.screening.Screening`
of an archive, and the durable subscriber that recognises screening exams
when their studies become stable."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from archive.events import Event
from archive.retrieve import UnreadableObject, locate, open_header
from archive.routing import stable_attrs
from worklist import service
from worklist.screening import Screening, Settings

if TYPE_CHECKING:
    from archive.runtime import Archive

log = logging.getLogger(__name__)

#: where a mammogram names its procedure: the performed one, then the requested one
_CODE_SEQUENCES = ("ProcedureCodeSequence", "RequestedProcedureCodeSequence")


def screening_of(archive: Archive) -> Screening:
    """The archive's screening exams (cheap: no state beyond the index)."""
    return Screening(
        archive.db,
        archive.clock,
        service.worklist_of(archive),
        archive.audit,
        Settings.from_config(archive.config),
        prior_studies=lambda study_uid: [
            p["study_uid"] for p in service.priors(archive, study_uid)
        ],
    )


def procedure_codes(archive: Archive, study_uid: str) -> list[str]:
    """The procedure code values the study's first image names (the index does
    not keep them: one header is read)."""
    items = locate(archive.db, "STUDY", {"StudyInstanceUID": study_uid})
    for item in items[:1]:
        try:
            with open_header(archive.store, item) as header:
                ds = header.dataset
                codes = []
                for keyword in _CODE_SEQUENCES:
                    for code in ds.get(keyword) or []:
                        value = str(code.get("CodeValue", "") or "").strip()
                        if value:
                            codes.append(value)
                return codes
        except (UnreadableObject, OSError):
            log.warning("cannot read the procedure code of study %s", study_uid, exc_info=True)
    return []


def on_stable(archive: Archive, event: Event) -> None:
    """A study became stable: the first ``[[screening.rules]]`` rule it matches
    makes it a screening exam (once per study, whatever the bursts)."""
    screening = screening_of(archive)
    if not screening.settings.rules or not event.study_uid:
        return
    db = archive.db
    attrs = stable_attrs(db, event.study_uid)
    if attrs is None:
        return
    candidates = [r for r in screening.settings.rules if r.matches_index(attrs)]
    if not candidates:
        return  # most stable studies: decided from the index, no header read
    needs_codes = any(rule.procedure_code for rule in candidates)
    codes = procedure_codes(archive, event.study_uid) if needs_codes else []
    rule = screening.rule_for(attrs, codes)
    if rule is None:
        return
    row: Any = db.query_one(
        "SELECT patient_ref, study_date FROM studies WHERE study_uid = ?", (event.study_uid,)
    )
    patient_ref, study_date = row if row is not None else (None, None)
    exam = screening.recognise(
        study_uid=event.study_uid,
        site=attrs["site"] or "",
        patient_ref=patient_ref,
        study_date=study_date,
        rule=rule,
        burst=event.seq,
    )
    log.info(
        "screening exam recognised",
        extra={"study": exam.study_uid, "site": exam.site, "rule": rule.name},
    )
