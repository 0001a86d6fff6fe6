"""Result letters of screening exams, and the exam-to-letter deadline.

* **Letters.**  When an exam closes (at L1, or with the L2 verdict) the
  domain records a durable ``screening.result`` event.  Its transactional
  subscriber (:func:`on_result`) queues one letter per recipient the first
  reading named (the woman, her radiologist, her GP: ``exam.recipients``)
  through the messaging plugin, each as its own message (a recipient never
  sees another's address), sets the exam's ``letters_at``, records each
  letter in ``screening_letters`` (the message id, or why it was skipped) and
  writes one ``screening.letter`` audit entry per letter, all in the
  delivery's transaction.  Exactly once per exam: the delivery itself is
  recorded once per event, ``letters_at`` is set only while still empty, and
  ``screening_letters`` is unique per exam and recipient.
* **Templates.**  ``screening.letter_subject`` and, per outcome,
  ``screening.letter_templates`` (French by default, the programme's
  language) with the placeholders of :data:`PLACEHOLDERS`; a template naming
  any other field is refused when the configuration is loaded, not when a
  letter is due (and ``{x.attr}`` or ``{x[0]}`` forms are refused with it:
  nothing but the values given here can reach a letter).
* **Deadline.**  At recognition the domain queues a ``screening.deadline``
  job due at the end of the exam day + ``screening.letter_target_days``
  (:meth:`worklist.screening.Exam.due`).  :func:`check_deadline` alerts if the
  exam has no letters by then: ``late_alerted_at`` is set, one
  ``screening.deadline-alert`` audit entry, the counter
  ``imag_screening_deadline_alerts_total`` and a message to the
  coordination centre (``screening.coordination_address``; none when
  empty).  An exam whose letters went out in time is not alerted; one whose
  letters go out after the due time without the job having fired first (the
  job ran late) is alerted by the subscriber then.  Either way at most one
  alert per exam.

Days are calendar days in UTC: with the default 15 days, the letters of an
exam of 2 March are in time until 17 March ends (a turnaround of 15 days);
from 18 March they exceed the target.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from archive.events import Event
from archive.index.db import Database
from archive.jobs import JobQueue
from archive.messaging import Actor, InvalidMessage, Message, send
from archive.messaging.message import check_address
from archive.security.audit import AuditEntry

# the domain's own row reader (one definition of an exam row, not a copy)
from worklist.screening import CLOSED, DEADLINE_JOB, Exam, Settings, load_exam
from worklist.screening_readings import OUTCOMES, RECIPIENTS

if TYPE_CHECKING:
    from archive.runtime import Archive

log = logging.getLogger(__name__)

SUBSCRIBER = "screening-letters"
LETTER_ACTION = "screening.letter"
ALERT_ACTION = "screening.deadline-alert"
LETTER_PURPOSE = "screening.letter"
ALERT_PURPOSE = "screening.deadline-alert"
#: the actor of the letters and alerts (the archive itself, not a user)
ACTOR = "imag-screening"

DEADLINE_ALERTS = Counter(
    "imag_screening_deadline_alerts",
    "Screening exams without their result letters at exam day + "
    "screening.letter_target_days (alerted once each), by producing site",
    ["site"],
)

#: what a template may name; every value is plain text
PLACEHOLDERS = {
    "exam_date": "the exam's date (JJ/MM/AAAA)",
    "l1_date": "the first reading's date",
    "l2_date": "the second reading's date ('sans objet' when closed at L1)",
    "letter_date": "the letter's date",
    "outcome": "the outcome, in words",
    "next_step": "what the woman does next",
    "views": "the views to redo (technically inadequate exams)",
    "further_exams": "the further exams the second reader recommends (recalls)",
    "site": "the producing site (screening centre)",
    "patient_name": "the woman's name as the images give it",
    "birth_date": "her birth date",
}

#: outcome -> (the outcome in words, what to do next), in French
OUTCOME_WORDS = {
    "NEGATIVE": (
        "mammographie normale, sans anomalie à la première ni à la seconde lecture",
        "la prochaine mammographie de dépistage est à faire dans 2 ans",
    ),
    "POSITIVE_L2": (
        "image à explorer repérée à la seconde lecture",
        "prendre rendez-vous avec votre radiologue pour un bilan diagnostique différé",
    ),
    "INADEQUATE": (
        "clichés techniquement insuffisants pour la seconde lecture",
        "refaire chez votre radiologue les clichés suivants : {views}",
    ),
    "POSITIVE_L1": (
        "anomalie repérée à la première lecture",
        "la suite est prise en charge par votre radiologue",
    ),
}
#: the four standard views, in French
VIEW_WORDS = {
    "RCC": "face droite (RCC)",
    "LCC": "face gauche (LCC)",
    "RMLO": "oblique externe droite (RMLO)",
    "LMLO": "oblique externe gauche (LMLO)",
}

DEFAULT_SUBJECT = (
    "Dépistage organisé du cancer du sein : résultat de la mammographie du {exam_date}"
)

_HEAD = "Concerne : {patient_name}, née le {birth_date}\n\nMadame, Docteur,\n\n"
_TAIL = (
    "\n\nRésultat : {outcome}.\nÀ faire : {next_step}.\n\n"
    "Dates : mammographie du {exam_date} ; première lecture du {l1_date} ; "
    "seconde lecture du {l2_date} ; courrier du {letter_date}.\n\n"
    "Programme de dépistage organisé du cancer du sein - centre {site}\n"
)
DEFAULT_TEMPLATES = {
    "NEGATIVE": _HEAD
    + "La mammographie de dépistage du {exam_date} a été lue par deux radiologues "
    "l'un après l'autre : elle ne montre pas d'anomalie." + _TAIL,
    "POSITIVE_L2": _HEAD
    + "La mammographie de dépistage du {exam_date}, jugée normale à la première lecture, "
    "a été relue par un second radiologue, qui a repéré une image à explorer. Des examens "
    "complémentaires sont recommandés : {further_exams}. Cela ne veut pas dire qu'il "
    "s'agit d'un cancer." + _TAIL,
    "INADEQUATE": _HEAD
    + "La mammographie de dépistage du {exam_date} n'a pas pu être relue par le second "
    "radiologue : certains clichés sont techniquement insuffisants et doivent être "
    "refaits ({views})." + _TAIL,
    "POSITIVE_L1": _HEAD
    + "La mammographie de dépistage du {exam_date} a montré à la première lecture une image "
    "qui demande un complément d'exploration ; votre radiologue vous en a informée et "
    "organise la suite." + _TAIL,
}

_NOT_APPLICABLE = "sans objet"
_UNKNOWN = "non renseigné"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


# -- settings --------------------------------------------------------------------------------


def check_template(value: Any, what: str = "a letter template") -> str:
    """``value`` if it is text naming only :data:`PLACEHOLDERS` (plain
    ``{name}``: no attribute, index, conversion or format spec); TypeError
    otherwise, naming the field at fault and the ones allowed."""
    if not isinstance(value, str) or not value.strip():
        raise TypeError(f"{what}: non-empty text")
    try:
        parsed = list(string.Formatter().parse(value))
    except ValueError as exc:  # a lone { or }
        raise TypeError(f"{what}: {exc} (write {{{{ and }}}} for literal braces)") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in PLACEHOLDERS or spec or conversion:
            raise TypeError(
                f"{what}: unknown placeholder {{{name}}}; use {', '.join(sorted(PLACEHOLDERS))}"
            )
    return value


def check_subject(value: Any) -> str:
    """The ``screening.letter_subject`` setting: a template on one line."""
    text = check_template(value, "the letter subject")
    if _CONTROL.search(text) or len(text) > 300:
        raise TypeError("the letter subject: one line of at most 300 characters")
    return text


def check_templates(value: Any) -> dict[str, str]:
    """The ``screening.letter_templates`` setting: a table outcome -> body
    template (env: a JSON object).  Outcomes not given keep the French
    default; an unknown outcome is refused."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            raise TypeError("a JSON object: outcome -> template") from None
    if not isinstance(value, Mapping):
        raise TypeError(f"a table with a template per outcome ({', '.join(OUTCOMES)})")
    unknown = set(value) - set(OUTCOMES)
    if unknown:
        raise TypeError(f"unknown outcomes {sorted(unknown)} (expected {', '.join(OUTCOMES)})")
    merged = dict(DEFAULT_TEMPLATES)
    for outcome, template in value.items():
        merged[outcome] = check_template(template, f"the {outcome} letter")
    return merged


def check_coordination_address(value: Any) -> str:
    """The ``screening.coordination_address`` setting: a mailbox, or empty."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise TypeError("an e-mail address (local@domain), or empty")
    try:
        return check_address(value.strip())
    except InvalidMessage as exc:
        raise TypeError(str(exc)) from None


# -- the letters -----------------------------------------------------------------------------


def _french(day: date | datetime | None) -> str:
    if day is None:
        return _NOT_APPLICABLE
    return day.strftime("%d/%m/%Y")


def _plain(value: Any) -> str:
    """A value as one line of text (no line break can come from the data)."""
    return _CONTROL.sub(" ", str(value or "")).strip()


def _person(db: Database, patient_ref: int | None) -> tuple[str, str]:
    """The woman's name (given names then family name) and birth date, from the index."""
    row = (
        db.query_one("SELECT patient_name, birth_date FROM patients WHERE id = ?", (patient_ref,))
        if patient_ref is not None
        else None
    )
    if row is None:
        return _UNKNOWN, _UNKNOWN
    name, born = row
    family, _, rest = _plain(name).partition("^")
    given = rest.split("^")[0]
    shown = " ".join(p for p in (given.strip(), family.strip().upper()) if p) or _UNKNOWN
    text = _plain(born)
    if len(text) == 8 and text.isdigit():
        text = f"{text[6:]}/{text[4:6]}/{text[:4]}"
    return shown, text or _UNKNOWN


def letter_values(db: Database, exam: Exam, at: datetime) -> dict[str, str]:
    """The placeholders' values for ``exam``'s letters written at ``at``."""
    outcome = exam.outcome or ""
    words, next_step = OUTCOME_WORDS.get(outcome, (outcome, ""))
    l2 = exam.l2 or {}
    views = ", ".join(VIEW_WORDS.get(v, v) for v in l2.get("views") or []) or _NOT_APPLICABLE
    further: list[str] = []  # in the reader's order, right breast first, each once
    findings = l2.get("findings") or {}
    for breast in ("right", "left"):
        for wanted in (findings.get(breast) or {}).get("further_exams") or []:
            if wanted not in further:
                further.append(wanted)
    name, born = _person(db, exam.patient_ref)
    return {
        "exam_date": _french(date.fromisoformat(exam.exam_date)),
        "l1_date": _french(exam.l1_at),
        "l2_date": _french(exam.l2_at),
        "letter_date": _french(at),
        "outcome": words,
        "next_step": next_step.format(views=views),
        "views": views,
        "further_exams": ", ".join(_plain(e) for e in further) or _NOT_APPLICABLE,
        "site": _plain(exam.site),
        "patient_name": name,
        "birth_date": born,
    }


def render(config: Any, exam: Exam, values: Mapping[str, str]) -> tuple[str, str]:
    """The letter's subject and text for ``exam`` from the configured templates."""
    subject = config["screening.letter_subject"].format_map(values)
    template = config["screening.letter_templates"][exam.outcome]
    return _plain(subject), template.format_map(values)


def on_result(archive: Archive, event: Event) -> None:
    """The ``screening.result`` subscriber (transactional): the exam's letters."""
    if event.study_uid:
        send_letters(archive, event.study_uid)


def send_letters(archive: Archive, study_uid: str) -> list[dict[str, Any]]:
    """Queue the closed exam's result letters, once: the letters recorded
    (recipient, status, message), or [] when the exam is not closed or its
    letters were queued already.  Runs in the caller's transaction when there
    is one (the subscriber's delivery), else in its own."""
    db = archive.db
    now = archive.clock.now()
    settings = Settings.from_config(archive.config)
    with _transaction(db):
        exam = load_exam(db, study_uid)
        if exam is None or exam.state != CLOSED or exam.outcome not in OUTCOMES:
            log.warning("no closed screening exam %s: no letters", study_uid)
            return []
        claimed = db.query_one(
            "UPDATE screening_exams SET letters_at = ? WHERE study_uid = ? AND letters_at IS NULL "
            "RETURNING id",
            (now, study_uid),
        )
        if claimed is None:
            return []  # queued already: never twice
        subject, text = render(archive.config, exam, letter_values(db, exam, now))
        actor = Actor(ACTOR, kind="system", site=exam.site)
        letters = [_letter(archive, exam, who, subject, text, actor, now) for who in RECIPIENTS]
        alerted = (
            exam.late_alerted_at is None
            and now >= exam.due(settings.letter_target)
            and _alert(archive, exam, now, letters_at=now)
        )
    if alerted:
        DEADLINE_ALERTS.labels(exam.site).inc()
    return letters


def _letter(
    archive: Archive,
    exam: Exam,
    recipient: str,
    subject: str,
    text: str,
    actor: Actor,
    now: datetime,
) -> dict[str, Any]:
    """One recipient's letter: queued, or skipped with the reason; recorded and audited."""
    address = exam.recipients.get(recipient) or None
    ref: int | None = None
    detail = ""
    if address is None:
        status = "no address"
    else:
        try:
            ref = send(
                archive,
                Message(
                    to=[address],
                    subject=subject,
                    text=text,
                    purpose=LETTER_PURPOSE,
                    study_uid=exam.study_uid,
                ),
                by=actor,
            )
            status = "queued"
        except InvalidMessage as exc:
            status, detail = "refused", str(exc)
    archive.db.execute(
        "INSERT INTO screening_letters (study_uid, recipient, address, message_ref, status, "
        "detail, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (exam.study_uid, recipient, address, ref, status, detail, now),
    )
    archive.audit.write(
        AuditEntry(
            ACTOR,
            "system",
            LETTER_ACTION,
            "failed" if status == "refused" else "allowed",
            study_uid=exam.study_uid,
            detail={
                "site": exam.site,
                "recipient": recipient,
                "outcome": exam.outcome,
                "status": status,
                **({"message": ref} if ref is not None else {}),
                **({"error": detail} if detail else {}),
            },
        )
    )
    return {"recipient": recipient, "status": status, "message": ref}


def letters_of(db: Database, study_uid: str) -> list[dict[str, Any]]:
    """The letters recorded for an exam, in recipient order."""
    rows = db.query(
        "SELECT recipient, status, message_ref, detail FROM screening_letters WHERE study_uid = ?",
        (study_uid,),
    )
    found = [{"recipient": r, "status": s, "message": m, "detail": d} for r, s, m, d in rows]
    return sorted(found, key=lambda x: RECIPIENTS.index(x["recipient"]))


# -- the deadline ----------------------------------------------------------------------------


def check_deadline(archive: Archive, payload: dict) -> None:
    """The ``screening.deadline`` job, due at the exam day + the target: if
    the exam has no letters yet, alert once (see the module docstring).  Run
    early (the target was lengthened since the job was queued), it queues
    itself again for the exam's due time."""
    db = archive.db
    study_uid = str(payload.get("study_uid") or "")
    exam = load_exam(db, study_uid)
    if exam is None:
        log.warning("screening deadline of an unknown exam %s", study_uid)
        return
    if exam.letters_at is not None or exam.late_alerted_at is not None:
        return  # on time, or alerted already (by the subscriber, for late letters)
    now = archive.clock.now()
    due = exam.due(Settings.from_config(archive.config).letter_target)
    if now < due:
        JobQueue(db).enqueue(
            DEADLINE_JOB,
            {"study_uid": study_uid},
            due_at=due,
            dedupe_key=f"screening-deadline:{study_uid}:{due.isoformat()}",
        )
        return
    with db.transaction():
        alerted = _alert(archive, exam, now, letters_at=None)
    if alerted:
        DEADLINE_ALERTS.labels(exam.site).inc()


def _alert(archive: Archive, exam: Exam, now: datetime, *, letters_at: datetime | None) -> bool:
    """The deadline alert, in the caller's transaction: ``late_alerted_at``,
    one audit entry, the coordination centre's message (when it has an
    address).  False, and nothing done, when the exam was alerted already
    -- or, from the deadline job (``letters_at`` None), got its letters --
    since the caller read it: the letters and the deadline job may run at
    the same moment on two nodes, and the row decides which one alerts."""
    db = archive.db
    target = archive.config["screening.letter_target_days"]
    claimed = db.query_one(
        "UPDATE screening_exams SET late_alerted_at = ? WHERE study_uid = ? "
        "AND late_alerted_at IS NULL"
        + (" AND letters_at IS NULL" if letters_at is None else "")
        + " RETURNING id",
        (now, exam.study_uid),
    )
    if claimed is None:
        return False
    address = archive.config["screening.coordination_address"]
    message_ref = None
    exam_day = _french(date.fromisoformat(exam.exam_date))
    if address:
        state = (
            f"courrier envoyé en retard le {_french(letters_at)}"
            if letters_at is not None
            else f"pas de courrier de résultat au {_french(now)} (état : {exam.state})"
        )
        message_ref = send(
            archive,
            Message(
                to=[address],
                subject=f"Dépistage : délai de {target} jours dépassé - centre "
                f"{_plain(exam.site)}, mammographie du {exam_day}",
                text=(
                    f"Examen de dépistage {exam.study_uid} (centre {_plain(exam.site)}), "
                    f"mammographie du {exam_day} : "
                    f"{state}.\nObjectif : courrier de résultat dans les {target} jours.\n"
                    f"Première lecture : {_french(exam.l1_at)} ; seconde lecture : "
                    f"{_french(exam.l2_at)}.\n"
                ),
                purpose=ALERT_PURPOSE,
                study_uid=exam.study_uid,
            ),
            by=Actor(ACTOR, kind="system"),
        )
    archive.audit.write(
        AuditEntry(
            ACTOR,
            "system",
            ALERT_ACTION,
            "allowed",
            study_uid=exam.study_uid,
            detail={
                "site": exam.site,
                "exam_date": exam.exam_date,
                "state": exam.state,
                "target_days": target,
                "letters_at": letters_at.isoformat() if letters_at is not None else None,
                **({"message": message_ref} if message_ref is not None else {}),
            },
        )
    )
    return True


# -- helpers ---------------------------------------------------------------------------------


@contextmanager
def _transaction(db: Database) -> Iterator[Database]:
    if db.in_transaction():
        yield db
    else:
        with db.transaction():
            yield db
