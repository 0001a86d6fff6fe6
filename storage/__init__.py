"""Object stores behind one small interface.

The archive keeps every DICOM object here; the SQL index says which key holds
which instance. This package knows nothing of DICOM: a key is an opaque,
validated path-like string and a value is bytes.
"""

from storage.base import ObjectNotFound, ObjectStore, StagedPut, StorageError, validate_key
from storage.factory import open_store

__all__ = [
    "ObjectNotFound",
    "ObjectStore",
    "StagedPut",
    "StorageError",
    "open_store",
    "validate_key",
]
