"""The application: the processes IMAG runs, assembled from the domain and its plugins.

``serve`` runs ``imag serve`` (the archive, its HTTP and DICOM servers, job
workers); ``worker`` runs ``imag worker``.  The command line only parses
arguments and calls them, and no domain module imports them.
"""
