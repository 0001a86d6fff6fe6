"""DICOMweb (PS3.18): STOW-RS, QIDO-RS, WADO-RS and WADO-URI routes over the archive core."""
