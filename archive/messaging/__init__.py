"""Messaging: messages (with attachments, IHE XDM packages) sent as jobs through
a replaceable transport (an outbox folder of .eml files, SMTP over TLS)."""
