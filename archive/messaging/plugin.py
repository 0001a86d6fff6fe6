"""The default messaging transports, registered through the platform's hooks."""
