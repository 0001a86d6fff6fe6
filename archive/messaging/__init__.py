"""Messaging: messages (with attachments, IHE XDM packages) sent as jobs through
a replaceable transport (an outbox folder of .eml files, SMTP over TLS).

The public API, for the services that send mail (report delivery, share links,
screening letters)::

    from archive.messaging import Attachment, Message, send
    from archive.messaging.xdm import Document, Patient, package

    message_ref = send(archive, Message(to=["dr.x@hopital.mssante.fr"], subject="CR",
                       text="...", attachments=[package(...)]), by="worklist")

:func:`send` validates the message, builds its final bytes and records it with
one delivery job and an audit entry, in one transaction.  The job sends it
through the transport named by ``plugins.messaging`` (:class:`Transport`,
hook ``imag_messaging_provider``), retried with the job queue's back-off,
``failed`` (the dead letter) after ``messaging.max_attempts`` or at once on
a permanent refusal.  See :mod:`archive.messaging.message` for the details.
"""

from archive.messaging.message import (
    KIND,
    STATES,
    Actor,
    Attachment,
    DeliveryFailure,
    InvalidMessage,
    Message,
    MessageRecord,
    MessageStateError,
    MessageTooLarge,
    Outgoing,
    PermanentFailure,
    TemporaryFailure,
    Transport,
    Visibility,
    get,
    listing,
    retry,
    send,
)

__all__ = [
    "KIND",
    "STATES",
    "Actor",
    "Attachment",
    "DeliveryFailure",
    "InvalidMessage",
    "Message",
    "MessageRecord",
    "MessageStateError",
    "MessageTooLarge",
    "Outgoing",
    "PermanentFailure",
    "TemporaryFailure",
    "Transport",
    "Visibility",
    "get",
    "listing",
    "retry",
    "send",
]
