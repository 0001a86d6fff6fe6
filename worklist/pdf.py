"""The validated teleradiology report as a PDF: what the requester opens and receives.

One A4 document in French: title, patient identity, the request, the four chapters
(Indications, Technique, Résultats, Synthèse / Conclusion), the signature, then each
addendum with its own signature; every page's footer names the patient. The text is the
one ``worklist.documents.clean_text`` keeps, drawn literally (no markup is interpreted).

Fonts: DejaVu Sans, a Unicode TrueType font (French accents, œ, €, «») from Debian's
``fonts-dejavu-core`` (installed by ``scripts/run`` and ``scripts/test``); a machine
without it still gets a valid PDF in the PDF core font Helvetica, with what Latin-1
lacks spelled out (œ -> oe, € -> EUR) or replaced by "?".

Deterministic: the creation date is the version's last signature and nothing depends on
the clock, so re-running a job produces the same bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import tzinfo
from pathlib import Path

from fpdf import FPDF
from fpdf.enums import XPos, YPos

from worklist.documents import (
    MAX_FIELD_CHARS,
    REPORT_TIMEZONE,
    ReportContent,
    Signed,
    clean_line,
    clean_text,
    local_time,
)

TITLE = "Compte rendu de téléradiologie"
CHAPTERS = (
    ("Indications", "indications"),
    ("Technique", "technique"),
    ("Résultats", "results"),
    ("Synthèse / Conclusion", "conclusion"),
)
REQUEST_FIELDS = (
    ("Médecin demandeur", "requesting_physician"),
    ("Établissement demandeur", "requesting_site"),
    ("Examen", "exam_type"),
    ("Région anatomique", "anatomical_region"),
    ("Priorité", "priority"),
    ("Contexte clinique", "clinical_context"),
    ("Question posée", "question"),
)
PRIORITIES = {"STAT": "Urgence immédiate (STAT)", "URGENT": "Urgent", "ROUTINE": "Programmé"}
SEXES = {"F": "féminin", "M": "masculin", "O": "autre"}

# Where Debian (fonts-dejavu-core) and other distributions put DejaVu Sans.
FONT_DIRS = (
    Path("/usr/share/fonts/truetype/dejavu"),
    Path("/usr/share/fonts/TTF"),
    Path("/usr/share/fonts/dejavu"),
    Path("/usr/share/fonts/dejavu-sans-fonts"),
)
FONT_FILES = {"": "DejaVuSans.ttf", "B": "DejaVuSans-Bold.ttf"}

# What Latin-1 (the core fonts' encoding) lacks but French text uses.
_LATIN1_SPELLED = str.maketrans(
    {
        "œ": "oe",
        "Œ": "OE",
        "€": "EUR",
        "‘": "'",
        "’": "'",
        "‚": ",",
        "“": '"',
        "”": '"',
        "„": '"',
        "–": "-",
        "—": "-",
        "…": "...",
        "•": "-",
        "Ÿ": "Y",
        "\u202f": " ",
        "\u2009": " ",
        "\u2011": "-",
    }
)
_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


def unicode_fonts() -> dict[str, Path] | None:
    """DejaVu Sans regular and bold, or None when this machine has no copy."""
    for folder in FONT_DIRS:
        paths = {style: folder / name for style, name in FONT_FILES.items()}
        if all(path.is_file() for path in paths.values()):
            return paths
    return None


class _ReportPDF(FPDF):
    """A4 pages whose footer names the patient and numbers the pages."""

    def __init__(self, footer_text: str, fonts: dict[str, Path] | None) -> None:
        super().__init__(orientation="P", unit="mm", format="A4")
        self.unicode = fonts is not None
        self.family = "DejaVu" if self.unicode else "Helvetica"
        for style, path in (fonts or {}).items():
            self.add_font(self.family, style, str(path))
        self.footer_text = self.fit(footer_text)
        self.footer_fitted = ""
        self.set_margins(18, 18, 18)
        self.set_auto_page_break(auto=True, margin=18)

    def fit(self, text: str) -> str:
        """``text`` as the current font can draw it (core fonts: Latin-1 only)."""
        if self.unicode:
            return text
        spelled = text.translate(_LATIN1_SPELLED)
        return spelled.encode("latin-1", "replace").decode("latin-1")

    def footer(self) -> None:
        self.set_y(-13)
        self.set_font(self.family, "", 8)
        self.set_text_color(90)
        if not self.footer_fitted:  # one line beside the page number, whatever the name
            text, room = self.footer_text, self.epw - 22
            while self.get_string_width(text) > room:
                text = text[: int(len(text) * 0.9)]
            self.footer_fitted = text if text == self.footer_text else text[:-1] + "…"
        self.cell(0, 5, self.fit(self.footer_fitted), align="L")
        self.set_x(self.l_margin)
        self.cell(0, 5, f"page {self.page_no()}/{{nb}}", align="R")
        self.set_text_color(0)

    def heading(self, text: str, size: float = 12) -> None:
        # a heading is not left alone at the bottom of a page
        if self.will_page_break(6 + 3 * 5):
            self.add_page()
        self.ln(3)
        self.set_font(self.family, "B", size)
        self.multi_cell(0, 6, self.fit(text), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.ln(1)

    def paragraph(self, text: str, size: float = 10.5, style: str = "") -> None:
        self.set_font(self.family, style, size)
        self.multi_cell(0, 5, self.fit(text) or "—", align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    def field(self, label: str, value: str) -> None:
        self.set_font(self.family, "B", 10)
        self.write(5, self.fit(f"{label} : "))
        self.set_font(self.family, "", 10)
        self.multi_cell(0, 5, self.fit(value), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)


def _date(value: str) -> str:
    """A birth date (DICOM DA or ISO) as French readers write it; anything else as is."""
    match = _DATE.match(value)
    return f"{match[3]}/{match[2]}/{match[1]}" if match else value


def _signature(prefix: str, signed: Signed, tz: tzinfo) -> str:
    """ "… validé par Dr X (account) le 30/03/2024 à 23:15 (heure de Paris, UTC+01:00)"."""
    local = local_time(signed.at, tz)
    key = getattr(tz, "key", "")  # a ZoneInfo: "Europe/Paris" -> "heure de Paris"
    zone = f"heure de {key.rsplit('/', 1)[-1].replace('_', ' ')}, " if key else ""
    offset = f"{local:%z}"
    return (
        f"{prefix} {clean_line(signed.name)} ({clean_line(signed.user)}) "
        f"le {local:%d/%m/%Y} à {local:%H:%M} ({zone}UTC{offset[:3]}:{offset[3:5]})"
    )


def _patient_lines(patient: Mapping[str, str]) -> list[tuple[str, str]]:
    """The identity block; a value longer than any real identity is refused."""
    for key, value in patient.items():
        if value is not None and len(str(value)) > MAX_FIELD_CHARS:
            raise ValueError(f"patient field {key!r} is longer than {MAX_FIELD_CHARS} characters")
    name = clean_line(str(patient.get("name") or "")).replace("^", " ").strip()
    lines = [("Patient", " ".join(name.split()) or "non renseigné")]
    if birth := clean_line(str(patient.get("birth_date") or "")):
        lines.append(("Date de naissance", _date(birth)))
    if sex := clean_line(str(patient.get("sex") or "")):
        lines.append(("Sexe", SEXES.get(sex.upper(), sex)))
    if patient_id := clean_line(str(patient.get("patient_id") or "")):
        lines.append(("Identifiant", patient_id))
    return lines


def report_pdf(
    content: ReportContent, patient: Mapping[str, str], *, tz: tzinfo = REPORT_TIMEZONE
) -> bytes:
    """The report as PDF bytes; ``patient``: name, patient_id, birth_date, sex (strings,
    any may be empty). Times are shown in ``tz`` (Europe/Paris by default)."""
    identity = _patient_lines(patient)
    footer = f"{TITLE} — {identity[0][1]}"
    if identity[-1][0] == "Identifiant":
        footer += f" — {identity[-1][1]}"
    pdf = _ReportPDF(footer, unicode_fonts())
    pdf.set_title(TITLE)
    pdf.set_lang("fr-FR")
    pdf.set_author(pdf.fit(clean_line(content.signed.name)))
    pdf.set_subject(pdf.fit(f"{TITLE} — {identity[0][1]}"))
    pdf.set_creator("IMAG")
    pdf.set_creation_date(content.signatures[-1].at)
    pdf.add_page()

    pdf.set_font(pdf.family, "B", 16)
    pdf.multi_cell(0, 8, pdf.fit(TITLE), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(2)
    for label, value in identity:
        pdf.field(label, value)

    request = [
        (label, clean_line(str(content.request[key])))
        for label, key in REQUEST_FIELDS
        if content.request.get(key) not in (None, "")
    ]
    if request or content.request_uid:
        pdf.heading("Demande", 12)
        for label, value in request:
            pdf.field(label, PRIORITIES.get(value.upper(), value) if label == "Priorité" else value)
        if content.request_uid:
            pdf.field("Référence", content.request_uid)

    for heading, attribute in CHAPTERS:
        pdf.heading(heading)
        pdf.paragraph(clean_text(getattr(content, attribute)))
    pdf.ln(4)
    pdf.paragraph(_signature("Compte rendu validé par", content.signed, tz), 10, "B")

    for number, addendum in enumerate(content.addenda, start=1):
        pdf.heading(f"Addendum n° {number}")
        pdf.paragraph(clean_text(addendum.text))
        pdf.ln(2)
        pdf.paragraph(_signature("Addendum validé par", addendum.signed, tz), 10, "B")
    return bytes(pdf.output())
