"""What a screening reading says, checked: the first reading (L1) and the
second reading's verdict (L2), as the organised breast-cancer screening
programme records them.

* **ACR assessment** per breast, 0 to 5 (BI-RADS categories as the French
  programme uses them: 1 and 2 are negative; 0 asks for more imaging; 3, 4, 5
  are abnormal findings).
* **Breast density** A to D; the older numbering 1 to 4 is accepted and
  mapped (1 -> A, 2 -> B, 3 -> C, 4 -> D).
* **Immediate diagnostic work-up** (BDI, *bilan diagnostique immédiat*): done
  by the L1 radiologist the same day when the mammogram shows something; its
  result, negative or positive, decides.
* An exam is **negative at L1** when both breasts are ACR 1 or 2, or when the
  immediate work-up was done and is negative.  Only those are read again (L2);
  the others are closed at L1.
* **L2 verdicts**: NEGATIVE; POSITIVE (the woman is recalled for a deferred
  work-up, BDD), with per breast the ACR, the location of the finding and the
  further exams recommended; TECHNICALLY INADEQUATE, with the reason and the
  views to redo.  There is no third reading.

Every check collects all the faults at once (``ReadingInvalid.problems``), so
the reader fixes them in one go.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from archive.messaging.message import InvalidMessage, check_address

BREASTS = ("right", "left")
VIEWS = ("RCC", "LCC", "RMLO", "LMLO")
DENSITIES = ("A", "B", "C", "D")
#: the older density numbering (1-4) and the letters that replaced it
OLD_DENSITY = {"1": "A", "2": "B", "3": "C", "4": "D"}
NEGATIVE_ACR = (1, 2)
L1_NEGATIVE = "NEGATIVE"
L1_POSITIVE = "POSITIVE"
VERDICTS = ("NEGATIVE", "POSITIVE", "INADEQUATE")
#: further exams a positive L2 may recommend (free text is accepted too)
FURTHER_EXAMS = ("ultrasound", "magnified views", "spot compression", "MRI", "biopsy")
RECIPIENTS = ("woman", "radiologist", "gp")
MAX_TEXT = 2000


class ReadingInvalid(ValueError):
    """A reading that cannot be recorded as sent (HTTP 400): ``problems``
    names every field at fault with what is expected."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.problems.items()))


def density(value: Any) -> str:
    """A density as a letter A-D, from a letter or the older 1-4; ValueError otherwise."""
    text = str(value).strip().upper() if value is not None else ""
    if text in DENSITIES:
        return text
    if text in OLD_DENSITY:
        return OLD_DENSITY[text]
    raise ValueError("A, B, C or D (or the older 1 to 4)")


def _acr(value: Any, allowed: range = range(0, 6)) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ValueError(f"an ACR assessment, a whole number from {allowed[0]} to {allowed[-1]}")
    return value


def _text(value: Any, *, required: bool = False) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ValueError("text")
    if len(value) > MAX_TEXT:
        raise ValueError(f"at most {MAX_TEXT} characters")
    if required and not value.strip():
        raise ValueError("required")
    return value.strip()


def _unknown(payload: Mapping[str, Any], known: tuple[str, ...], problems: dict[str, str]) -> None:
    for key in payload:
        if key not in known:
            problems[key] = f"unknown field (expected: {', '.join(known)})"


def check_l1(payload: Any) -> dict[str, Any]:
    """The first reading, checked and normalised::

        {"right": {"acr": 1, "density": "B"}, "left": {"acr": 2, "density": "B"},
         "bdi": {"done": false} | {"done": true, "result": "NEGATIVE" | "POSITIVE"},
         "recipients": {"woman": "...", "radiologist": "...", "gp": "..."}}

    ``recipients`` (optional) are where the result letters go."""
    if not isinstance(payload, Mapping):
        raise ReadingInvalid({"reading": "a JSON object"})
    problems: dict[str, str] = {}
    _unknown(payload, (*BREASTS, "bdi", "recipients"), problems)
    clean: dict[str, Any] = {}
    for breast in BREASTS:
        side = payload.get(breast)
        if not isinstance(side, Mapping):
            problems[breast] = "an object with acr (0-5) and density (A-D)"
            continue
        _unknown(side, ("acr", "density"), {})
        entry: dict[str, Any] = {}
        try:
            entry["acr"] = _acr(side.get("acr"))
        except ValueError as exc:
            problems[f"{breast}.acr"] = str(exc)
        try:
            entry["density"] = density(side.get("density"))
        except ValueError as exc:
            problems[f"{breast}.density"] = str(exc)
        clean[breast] = entry
    bdi = payload.get("bdi", {"done": False})
    if not isinstance(bdi, Mapping) or not isinstance(bdi.get("done", False), bool):
        problems["bdi"] = 'an object {"done": true|false, "result": "NEGATIVE"|"POSITIVE"}'
    else:
        done = bool(bdi.get("done", False))
        result = bdi.get("result")
        if done and result not in (L1_NEGATIVE, L1_POSITIVE):
            problems["bdi.result"] = "NEGATIVE or POSITIVE: the immediate work-up's result"
        elif not done and result is not None:
            problems["bdi.result"] = "only when the immediate work-up was done"
        clean["bdi"] = {"done": done, **({"result": result} if done else {})}
    clean["recipients"] = check_recipients(payload.get("recipients", {}), problems)
    if problems:
        raise ReadingInvalid(problems)
    return clean


def check_recipients(value: Any, problems: dict[str, str]) -> dict[str, str]:
    """Where the result letters go: woman, radiologist, gp -> an address."""
    if not isinstance(value, Mapping):
        problems["recipients"] = f"an object with {', '.join(RECIPIENTS)} addresses"
        return {}
    clean: dict[str, str] = {}
    for key, address in value.items():
        if key not in RECIPIENTS:
            problems[f"recipients.{key}"] = f"one of {', '.join(RECIPIENTS)}"
        elif address in (None, ""):
            continue
        elif not isinstance(address, str):
            problems[f"recipients.{key}"] = "an e-mail address"
        else:
            try:
                clean[key] = check_address(address.strip())
            except InvalidMessage as exc:
                problems[f"recipients.{key}"] = str(exc)
    return clean


def l1_outcome(l1: Mapping[str, Any]) -> str:
    """NEGATIVE (read again at L2) or POSITIVE (closed at L1): negative when
    both breasts are ACR 1 or 2, or when an immediate work-up was done and is
    negative; an ACR 0, 3, 4 or 5 without a negative work-up is positive."""
    both_negative = all(l1[b]["acr"] in NEGATIVE_ACR for b in BREASTS)
    bdi = l1.get("bdi") or {}
    if both_negative and not (bdi.get("done") and bdi.get("result") == L1_POSITIVE):
        return L1_NEGATIVE
    if bdi.get("done") and bdi.get("result") == L1_NEGATIVE:
        return L1_NEGATIVE
    return L1_POSITIVE


def check_l2(payload: Any) -> dict[str, Any]:
    """The second reading's verdict, checked and normalised::

    {"verdict": "NEGATIVE"}
    {"verdict": "POSITIVE", "findings": {"right": {"acr": 4, "location": "QSE",
        "further_exams": ["ultrasound", "biopsy"]}}}      (one breast or both)
    {"verdict": "INADEQUATE", "reason": "...", "views": ["RMLO"]}
    """
    if not isinstance(payload, Mapping):
        raise ReadingInvalid({"verdict": "a JSON object"})
    problems: dict[str, str] = {}
    _unknown(payload, ("verdict", "findings", "reason", "views", "comment"), problems)
    verdict = payload.get("verdict")
    clean: dict[str, Any] = {"verdict": verdict}
    try:
        comment = _text(payload.get("comment"))
        if comment:
            clean["comment"] = comment
    except ValueError as exc:
        problems["comment"] = str(exc)
    if verdict not in VERDICTS:
        problems["verdict"] = f"one of {', '.join(VERDICTS)}"
    elif verdict == "POSITIVE":
        clean["findings"] = _findings(payload.get("findings"), problems)
    elif verdict == "INADEQUATE":
        try:
            clean["reason"] = _text(payload.get("reason"), required=True)
        except ValueError as exc:
            problems["reason"] = f"{exc}: why the exam cannot be read"
        views = payload.get("views")
        if (
            not isinstance(views, list)
            or not views
            or any(v not in VIEWS for v in views)
            or len(set(views)) != len(views)
        ):
            problems["views"] = f"the views to redo, a non-empty list of {', '.join(VIEWS)}"
        else:
            clean["views"] = [v for v in VIEWS if v in views]
    for key in ("findings", "reason", "views"):
        if key in payload and verdict in VERDICTS and key not in clean:
            problems.setdefault(key, f"not part of a {verdict} verdict")
    if problems:
        raise ReadingInvalid(problems)
    return clean


def _findings(value: Any, problems: dict[str, str]) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not value:
        problems["findings"] = "per breast (right, left) the ACR (3-5), location and further exams"
        return {}
    clean: dict[str, Any] = {}
    for breast, finding in value.items():
        where = f"findings.{breast}"
        if breast not in BREASTS:
            problems[where] = "right or left"
            continue
        if not isinstance(finding, Mapping):
            problems[where] = "an object with acr, location and further_exams"
            continue
        entry: dict[str, Any] = {}
        try:
            entry["acr"] = _acr(finding.get("acr"), range(3, 6))
        except ValueError as exc:
            problems[f"{where}.acr"] = f"{exc} (a recall is ACR 3, 4 or 5)"
        try:
            entry["location"] = _text(finding.get("location"), required=True)
        except ValueError as exc:
            problems[f"{where}.location"] = f"{exc}: where the finding is (quadrant, clock)"
        exams = finding.get("further_exams")
        if (
            not isinstance(exams, list)
            or not exams
            or not all(isinstance(e, str) and e.strip() and len(e) <= 200 for e in exams)
        ):
            problems[f"{where}.further_exams"] = (
                f"a non-empty list of exams to do (e.g. {', '.join(FURTHER_EXAMS)})"
            )
        else:
            entry["further_exams"] = [e.strip() for e in exams]
        clean[breast] = entry
    return clean


#: the programme's result of an exam once closed, from its readings
OUTCOMES = {
    "NEGATIVE": "negative at both readings: next round in two years",
    "POSITIVE_L1": "abnormal at the first reading: handled by the first radiologist",
    "POSITIVE_L2": "recalled after the second reading for a deferred diagnostic work-up",
    "INADEQUATE": "technically inadequate at the second reading: views to redo",
}


def final_outcome(l2: Mapping[str, Any]) -> str:
    """The exam's outcome from an L2 verdict."""
    return {"NEGATIVE": "NEGATIVE", "POSITIVE": "POSITIVE_L2", "INADEQUATE": "INADEQUATE"}[
        l2["verdict"]
    ]
