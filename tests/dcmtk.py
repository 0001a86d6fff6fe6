"""dcmtk's command-line tools by absolute path.

pynetdicom installs console scripts named like dcmtk's tools (storescu,
findscu, getscu, movescu, echoscu, storescp) into the virtual environment's
``bin``; with that folder first on PATH, a bare ``storescu`` runs pynetdicom's
look-alike, whose options and output differ.  The tests and benchmarks that
mean dcmtk therefore name it by path, through :func:`dcmtk`.
"""

from __future__ import annotations

import os
from pathlib import Path

#: where Debian's dcmtk package installs its tools (``IMAG_DCMTK_BIN`` overrides)
DCMTK_BIN = Path(os.environ.get("IMAG_DCMTK_BIN", "/usr/bin"))


class DcmtkMissing(RuntimeError):
    """A dcmtk tool a test or benchmark needs is not installed."""


def have_dcmtk(tool: str = "dcmdump") -> bool:
    """True when dcmtk's ``tool`` is installed (for tests that skip without it)."""
    path = DCMTK_BIN / tool
    return path.is_file() and os.access(path, os.X_OK)


def dcmtk(tool: str) -> str:
    """The absolute path of dcmtk's ``tool``; raises :class:`DcmtkMissing`,
    saying how to install it, rather than falling back to whatever else on
    PATH has that name."""
    if not have_dcmtk(tool):
        raise DcmtkMissing(
            f"dcmtk's {tool} is not at {DCMTK_BIN / tool}: install dcmtk "
            "(apt-get install dcmtk; scripts/test does) or point IMAG_DCMTK_BIN at its folder"
        )
    return str(DCMTK_BIN / tool)
