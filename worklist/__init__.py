"""Teleradiology reading worklist and the screening second-read queue."""
