"""UID validation and the object keys derived from validated UIDs."""

from __future__ import annotations

import re

# PS3.5 9.1: components of digits separated by ".", at most 64 characters.
# Leading zeros in a component are not allowed by the standard but common in
# real data; they are harmless for us (keys only need digits and dots), so we
# accept them rather than refuse a modality's images.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a syntactically valid UID (digits and dots, <= 64)."""
    return 0 < len(value) <= 64 and bool(_UID.match(value))


def object_key(study_uid: str, series_uid: str, sop_uid: str, sha256_hex: str) -> str:
    """The object store key of an instance.

    Only validated UIDs and our own digest go into it.  The digest prefix makes
    a different object under the same SOP Instance UID a different key, so a
    replacement is written beside the old object and the index switches over
    atomically; an object is never overwritten with other content.
    """
    for uid in (study_uid, series_uid, sop_uid):
        if not is_valid_uid(uid):
            raise ValueError(f"not a valid UID: {uid!r}")
    return f"{study_uid}/{series_uid}/{sop_uid}.{sha256_hex[:16]}.dcm"
