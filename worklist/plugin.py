"""The teleradiology worklist, registered through the platform's hooks: its
settings (``worklist.*``), tables (component ``worklist``), the permission to
ask for readings and who has it, the subscriber that turns stable studies
into requests (``[[routes]]`` of ``kind = "read"``), the event it records and
its HTTP routes (``/api/worklist``, UPS-RS under ``/dicom-web/workitems``)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING

from archive.config import Setting, as_bool, as_int, as_text
from archive.events import Event, Subscriber
from archive.hookspecs import hookimpl
from archive.index.migrate import Migrations

if TYPE_CHECKING:
    from aiohttp import web

    from archive.runtime import Archive

READ = "worklist.read"  # the core's: see the reading worklist
WRITE = "worklist.write"  # the core's: claim and report reading requests
REQUEST = "worklist.request"
REPORT_VALIDATED = "report.validated"
REPORT_JOB = "worklist.report"  # worklist.reports.JOB_KIND
SCREENING_RESULT = "screening.result"  # worklist.screening.RESULT_EVENT
SCREENING_DEADLINE = "screening.deadline"  # worklist.screening.DEADLINE_JOB
FIRST_READ = "screening.first-read"  # worklist.screening.FIRST_READ
COORDINATE = "screening.coordinate"  # worklist.screening.COORDINATE

HOUR = 3600


@hookimpl
def imag_settings() -> list[Setting]:
    return [
        Setting(
            "worklist.lease_seconds",
            15 * 60,
            as_int(30, 7 * 24 * HOUR),
            "a claim without activity for this long returns the request to the worklist",
            cluster=True,
        ),
        Setting(
            "worklist.due_stat_seconds",
            HOUR,
            as_int(60, 365 * 24 * HOUR),
            "default time to report a STAT request (UPS priority HIGH)",
            cluster=True,
        ),
        Setting(
            "worklist.due_urgent_seconds",
            12 * HOUR,
            as_int(60, 365 * 24 * HOUR),
            "default time to report an URGENT request (UPS priority MEDIUM)",
            cluster=True,
        ),
        Setting(
            "worklist.due_routine_seconds",
            4 * 24 * HOUR,
            as_int(60, 365 * 24 * HOUR),
            "default time to report a ROUTINE request (UPS priority LOW)",
            cluster=True,
        ),
        Setting(
            "screening.rules",
            [],
            _screening_rules,
            "screening mammography: [[screening.rules]] name, site, procedure_code, "
            "study_description, modality (MG by default); a stable study matching one is a "
            "screening exam (env: JSON array)",
            cluster=True,
        ),
        Setting(
            "screening.l2_group",
            "screening-l2",
            as_text,
            "the reading group of accredited second readers: it is granted the exams in the L2 "
            "queue and the women's prior rounds",
            cluster=True,
        ),
        Setting(
            "screening.letter_target_days",
            15,
            as_int(1, 365),
            "days from the exam to the result letter; an exam without its letter by then is "
            "alerted",
            cluster=True,
        ),
        *_screening_letter_settings(),
        Setting(
            "worklist.xdm",
            False,
            as_bool,
            "deliver validated reports with an IHE XDM package (IHE_XDM.ZIP) beside the PDF",
            cluster=True,
        ),
    ]


def _screening_letter_settings() -> list[Setting]:
    """The result letters' and programme indicators' settings
    (:mod:`worklist.screening_letters`, :mod:`worklist.screening_stats`)."""
    from worklist import screening_letters as letters

    return [
        Setting(
            "screening.letter_subject",
            letters.DEFAULT_SUBJECT,
            letters.check_subject,
            "subject of the screening result letters; placeholders: "
            + ", ".join("{" + p + "}" for p in sorted(letters.PLACEHOLDERS)),
            cluster=True,
        ),
        Setting(
            "screening.letter_templates",
            dict(letters.DEFAULT_TEMPLATES),
            letters.check_templates,
            "result letter per outcome (NEGATIVE, POSITIVE_L1, POSITIVE_L2, INADEQUATE; French "
            "by default, an outcome not given keeps it), same placeholders as the subject "
            "(env: JSON object)",
            cluster=True,
        ),
        Setting(
            "screening.coordination_address",
            "",
            letters.check_coordination_address,
            "the screening coordination centre's mailbox: deadline alerts are mailed there "
            "(empty: audited and counted only)",
            cluster=True,
        ),
        Setting(
            "screening.min_l1_per_year",
            500,
            as_int(0, 1_000_000),
            "first readings a year under which a reader is flagged in the programme indicators",
            cluster=True,
        ),
        Setting(
            "screening.min_l2_per_year",
            1500,
            as_int(0, 1_000_000),
            "second readings a year under which a reader is flagged in the programme indicators",
            cluster=True,
        ),
    ]


def _screening_rules(value: object) -> list:
    from worklist.screening import parse_rules

    return parse_rules(value)


@hookimpl
def imag_job_kinds() -> dict[str, Callable[[Archive, dict], None]]:
    return {REPORT_JOB: _store_and_deliver_report, SCREENING_DEADLINE: _screening_deadline}


def _screening_deadline(archive: Archive, payload: dict) -> None:
    """The ``screening.deadline`` job: the day an exam's result letter is due
    (:mod:`worklist.screening_letters`)."""
    from worklist.screening_letters import check_deadline

    check_deadline(archive, payload)


def _store_and_deliver_report(archive: Archive, payload: dict) -> None:
    """The ``worklist.report`` job (:mod:`worklist.report_delivery`), imported
    when a report is first stored: highdicom and fpdf2 are not loaded by every
    process that merely starts."""
    from worklist.report_delivery import run

    run(archive, payload)


@hookimpl
def imag_migrations() -> Migrations:
    return Migrations("worklist", resources.files("worklist").joinpath("migrations"))


@hookimpl
def imag_permissions() -> dict[str, str]:
    return {
        REQUEST: "ask for a reading (tele-expertise), complete or withdraw the requests of "
        "one's sites and read their reports",
        FIRST_READ: "record the first reading (L1) of one's sites' screening mammograms",
        COORDINATE: "see every screening exam, the programme's indicators, and manage "
        "second readers' accreditations (the screening coordination centre)",
    }


@hookimpl
def imag_role_grants() -> dict[str, list[str]]:
    grants: dict[str, list[str]] = {
        role: [REQUEST] for role in ("site_admin", "technician", "radiologist")
    }
    # a radiologist reads L1 at their site and, once accredited, L2 for the
    # programme (most second readers are first readers too): the accreditation,
    # not the role, is what opens the L2 queue
    grants["radiologist"] += [FIRST_READ, "screening.read", "screening.write"]
    # the coordination centre: every exam, the indicators, the accreditations
    grants["screening_coordinator"] = [COORDINATE, "studies.read"]
    return grants


@hookimpl
def imag_event_types() -> list[str]:
    return [REPORT_VALIDATED, SCREENING_RESULT]


@hookimpl
def imag_event_subscribers() -> list[Subscriber]:
    from worklist.screening_service import on_stable as screening_on_stable
    from worklist.service import on_stable

    # transactional: the request commits with the delivery, exactly once per burst
    return [
        Subscriber("worklist-read-routes", ("study.stable",), on_stable),
        Subscriber("screening-exams", ("study.stable",), screening_on_stable),
        # the result letters, queued with the delivery: exactly once per exam
        Subscriber("screening-letters", (SCREENING_RESULT,), _screening_letters),
    ]


def _screening_letters(archive: Archive, event: Event) -> None:
    """The ``screening.result`` subscriber (:func:`worklist.screening_letters.on_result`)."""
    from worklist.screening_letters import on_result

    on_result(archive, event)


@hookimpl
def imag_routes(app: web.Application, archive: Archive) -> None:
    from worklist.http import add_routes
    from worklist.reports_http import add_routes as add_reports
    from worklist.screening_http import add_routes as add_screening
    from worklist.screening_stats_http import add_routes as add_screening_stats
    from worklist.stats_http import add_routes as add_stats
    from worklist.upsrs import add_routes as add_ups

    add_routes(app)
    add_ups(app)
    add_stats(app)
    add_reports(app)
    add_screening(app)
    add_screening_stats(app)
