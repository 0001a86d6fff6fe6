"""The archive core: config, ingest, index, query, DIMSE, jobs, security, CLI."""
