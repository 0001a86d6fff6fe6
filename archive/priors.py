"""A patient's studies at every site: the priors a reader compares with.

Studies belong to a local identity (a ``patients`` row: one site's PatientID),
so a woman screened at two sites under two local IDs has two patient rows.
The identity provider's regional index links them to one regional identity
(:meth:`archive.identity.regional.RegionalIndex.same_person`); this module
turns that link into the list of the person's studies, in one place, for
every service that shows priors (the worklist's reading requests, the
viewer's mammography layout).

Nothing here is scoped: the list says which studies exist, not who may see
them.  A caller that shows them to a user reads each one again through
:func:`archive.query.search` with that user's scope (the viewer does), or
routes them to the reader's group with the study it gives them to read (the
worklist does).
"""

from __future__ import annotations

from typing import Any

from archive.index.db import Database


def same_person_refs(db: Database, identity: Any, patient_ref: int) -> set[int]:
    """The local identities (``patients`` rows) of the person ``patient_ref``
    is: itself, plus those the provider's regional index links to it (when
    the provider keeps one: a provider without ``index`` links nothing)."""
    refs = {patient_ref}
    index = getattr(identity, "index", None)  # the regional index, when it is one
    if index is not None:
        refs.update(index(db).same_person(patient_ref))
    return refs


def same_person_studies(
    db: Database, identity: Any, study_uid: str, *, include_self: bool = False
) -> list[dict[str, Any]]:
    """The other studies of the patient of ``study_uid``, at every site,
    through the regional identity, newest first (study date, then arrival).
    ``include_self`` puts the study itself in the list too (where it falls
    in that order), for a caller that wants its site and date the same way.
    Empty when the study is unknown.

    Each: ``study_uid``, ``study_date``, ``study_description``,
    ``modalities`` (a list), ``site``, ``instances``."""
    row = db.query_one("SELECT st.patient_ref FROM studies st WHERE st.study_uid = ?", (study_uid,))
    if row is None:
        return []
    refs = same_person_refs(db, identity, int(row[0]))
    marks = ", ".join("?" * len(refs))
    others = "" if include_self else "AND st.study_uid <> ? "
    rows = db.query(
        "SELECT st.study_uid, st.study_date, st.study_description, st.modalities, st.site, "
        "st.num_instances FROM studies st WHERE st.patient_ref IN ("
        + marks
        + ") "
        + others
        + "ORDER BY st.study_date DESC, st.id DESC",
        (*sorted(refs), *(() if include_self else (study_uid,))),
    )
    return [
        {
            "study_uid": r[0],
            "study_date": r[1],
            "study_description": r[2],
            "modalities": [m for m in (r[3] or "").split("\\") if m],
            "site": r[4],
            "instances": r[5],
        }
        for r in rows
    ]
