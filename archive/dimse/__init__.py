"""DICOM network services (DIMSE): C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE."""
