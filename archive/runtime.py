"""Opening the archive from its configuration: object store, index, pipeline."""

from __future__ import annotations

import functools
from typing import Any

from archive import plugins
from archive.clock import Clock
from archive.config import Config
from archive.index import Catalog, Database, open_database, upgrade
from archive.ingest import IngestPipeline
from archive.security.audit import AuditLog
from storage import ObjectStore, open_store


def open_object_store(config: Config) -> ObjectStore:
    """The configured object store (creating an S3 bucket when asked to)."""
    store = open_store(
        config.storage_url, s3_endpoint_url=config["s3.endpoint_url"], s3_region=config["s3.region"]
    )
    if config["s3.create_bucket"] and hasattr(store, "ensure_bucket"):
        store.ensure_bucket()
    return store


class Archive:
    """The archive core as one object: what every command and server needs."""

    def __init__(
        self,
        config: Config,
        *,
        migrate: bool = True,
        writer: bool = True,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.db: Database = open_database(config.index_url, clock=clock)
        #: the archive's time (the index's clock): a FakeClock in tests
        self.clock: Clock = self.db.clock
        if migrate:
            upgrade(self.db)
        self.store: ObjectStore = open_object_store(config)
        self.catalog = Catalog(self.db)
        self.pipeline = IngestPipeline(config, self.store, self.db, writer=writer)
        #: the append-only audit trail of accesses and security events
        self.audit = AuditLog(self.db, config["audit.syslog"], node=config.node)

    @property
    def identity(self) -> Any:
        """The identity provider (setting ``plugins.identity``), as ingest uses it."""
        return self.pipeline.identity

    @functools.cached_property
    def orientation(self) -> Any:
        """The orientation provider (setting ``plugins.orientation``)."""
        return plugins.provider("orientation", self.config["plugins.orientation"], self.config)

    @functools.cached_property
    def messaging(self) -> Any:
        """The messaging transport (setting ``plugins.messaging``)."""
        return plugins.provider("messaging", self.config["plugins.messaging"], self.config)

    def close(self) -> None:
        for provider in (self.__dict__.get("orientation"), self.__dict__.get("messaging")):
            close = getattr(provider, "close", None)
            if close is not None:  # a provider that opened its own resources
                close()
        self.pipeline.close()
        self.store.close()
        self.db.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
