"""DICOMweb (PS3.18): STOW-RS, QIDO-RS, WADO-RS and WADO-URI routes over the archive core."""

from aiohttp import web

#: the sub-application key holding the path DICOMweb is mounted under
#: (``/dicom-web``), for the links in answers
PREFIX_KEY = web.AppKey("dicomweb_prefix", str)
