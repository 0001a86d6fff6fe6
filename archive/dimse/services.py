"""DICOM services as plugins: what a service accepts and the handlers that serve it.

The archive's Application Entity is assembled from every plugin's
``imag_dicom_services``: each :class:`DicomService` adds its presentation
contexts and binds pynetdicom event handlers (see pynetdicom's handler
contracts for each event).  The core's own C-ECHO, C-STORE, C-FIND, C-GET and
C-MOVE are the first such service.  pynetdicom binds one handler per
*intervention* event (a C-FIND is answered once), so two services claiming
the same one is refused at start-up; notification events (connection opened,
association released...) may have any number.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from archive.hookspecs import hookimpl

if TYPE_CHECKING:
    from archive.config import Config
    from archive.dimse.peers import PeerTable
    from archive.runtime import Archive


QUERY_RETRIEVE = [
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
]
#: transfer syntaxes accepted for commands (C-ECHO, C-FIND, C-GET, C-MOVE)
COMMAND_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
]


@dataclass(frozen=True)
class DicomService:
    """``contexts``: (abstract syntax UID, transfer syntaxes) accepted as SCP.
    ``handlers(archive, peers, aet)``: the (event, handler) pairs to bind; the
    peer table says who the calling AE is (its site scope)."""

    name: str
    contexts: Sequence[tuple[str, Sequence[str]]]
    handlers: Callable[[Archive, PeerTable, str], Iterable[tuple[Any, Callable]]]


def bindings(
    services: Iterable[DicomService], archive: Archive, peers: PeerTable, aet: str
) -> list[tuple[Any, Callable]]:
    """Every service's handlers, refusing an intervention event bound twice."""
    bound: list[tuple[Any, Callable]] = []
    owner: dict[Any, str] = {}
    for service in services:
        for event, fn in service.handlers(archive, peers, aet):
            if isinstance(event, evt.InterventionEvent):
                if event in owner:
                    raise ValueError(
                        f"DICOM event {event.name} is served by two services: "
                        f"{owner[event]} and {service.name}"
                    )
                owner[event] = service.name
            bound.append((event, fn))
    return bound


def _core_handlers(archive: Archive, peers: PeerTable, aet: str) -> list[tuple[Any, Callable]]:
    from archive.dimse.handlers import DicomServices

    return DicomServices(archive, peers, aet).handlers()


@hookimpl
def imag_dicom_services(config: Config) -> list[DicomService]:
    contexts = [(Verification, COMMAND_SYNTAXES)]
    contexts += [(sop_class, COMMAND_SYNTAXES) for sop_class in QUERY_RETRIEVE]
    return [DicomService("core", contexts, _core_handlers)]
