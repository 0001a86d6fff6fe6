"""pynetdicom as a service user: the race between its reactor thread and a
``send_c_*`` call (``archive/scu.py``).  The reactor may pass its checkpoint
an instant before a sender pauses it and then read the queue the sender's
answer arrives on; with the fix, its non-blocking read leaves a message to
the sender while the sender holds the reactor paused."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import Verification

from archive.scu import close_reactor_race
from tests.processes import HOST, free_port


@pytest.fixture
def association() -> Iterator[object]:
    """A real association between two pynetdicom AEs on loopback."""
    scp = AE(ae_title="SCP")
    scp.add_supported_context(Verification, ExplicitVRLittleEndian)
    port = free_port()
    server = scp.start_server(
        (HOST, port), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0)]
    )
    scu = AE(ae_title="SCU")
    scu.add_requested_context(Verification, ExplicitVRLittleEndian)
    assoc = scu.associate(HOST, port, ae_title="SCP")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()
        server.shutdown()
        scu.shutdown()


def test_while_a_sender_holds_the_reactor_paused_its_answer_is_left_for_it(
    association: object,
) -> None:
    close_reactor_race()
    assoc = association
    dimse = assoc.dimse  # type: ignore[attr-defined]
    answer = C_ECHO()
    answer.MessageIDBeingRespondedTo, answer.Status = 1, 0x0000
    checkpoint: threading.Event = assoc._reactor_checkpoint  # type: ignore[attr-defined]  # noqa: SLF001
    checkpoint.clear()  # what send_c_echo() does first: the reactor is held
    try:
        dimse.msg_queue.put((1, answer))
        # the reactor's read, made in the instant the race left it: nothing
        assert dimse.get_msg(block=False) == (None, None)
        # the sender's read: its answer
        assert dimse.get_msg(block=True) == (1, answer)
    finally:
        checkpoint.set()
    dimse.msg_queue.put((1, answer))  # the reactor running: it reads what comes
    assert dimse.get_msg(block=False) == (1, answer)
